"""Inference-only weight layouts, prepared at load time on the one model class.

``prepare(model, quantize)`` turns a float model into what decoding reads fastest, in place:

- ``quantize=None`` (float): each projection's weight is split along its outputs into one chunk
  per CPU thread, stored (chunks, in, out/chunks), and multiplied with one batched matmul, which
  runs a matrix-vector product per thread. A plain ``x @ W`` at batch 1 runs on one thread here
  and reads weights at about a third of the memory bandwidth. The output matrix gets the same
  layout as a copy (the tied embedding stays for lookups).
- ``quantize="int8"``: every projection and the output matrix become per-output-channel
  symmetric int8 weights (``qweight`` (out, in) int8, ``scale`` (out,) float32); activations are
  quantized per token (row) on the fly and multiplied with ``torch._int_mm`` (int8 x int8 ->
  int32), then rescaled. The tied embedding's lookups read the same int8 rows, dequantized.
  Positions, norms and biases stay in float.

Why ``torch._int_mm`` and not ``torch.ao.quantization.quantize_dynamic``: the latter is
deprecated (its quantized tensor types are slated for removal), and ``_int_mm`` measured as fast
or faster here for batch-1 decoding (benchmarks/int8_kernels.py). torchao's int8 path needs a
package we do not otherwise depend on.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8",)
QMAX = 127


# ----------------------------------------------------------------------------- int8 maths

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``weight`` (out, in): ``q`` int8 and ``scale`` float32 (out,),
    with ``weight ~= q * scale[:, None]``; the error of each element is at most scale/2."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8).contiguous()
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (M, in) @ dequantize(q, scale).T`` with ``x`` quantized per row on the fly, in two
    int8 parts: ``x ~= (hi + lo / 254) * amax / 127`` (``lo`` quantizes what ``hi`` left, at most
    half a step), so the activations keep ~15 bits instead of 8. The int8 x int8 -> int32
    products are exact, however they are grouped: at batch 1 the two parts are two products (the
    second reads the weights from cache; one product of two rows takes a slower kernel), for
    more rows one product of both parts stacked (benchmarks/int8_kernels.py). Returns (M, out)
    in ``x``'s dtype."""
    M = x.size(0)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (M, 1)
    t = xf * (QMAX / amax)  # in [-127, 127]
    hi = t.round()
    lo = (t - hi).mul_(2 * QMAX).round_()  # also in [-127, 127]
    w = q.t()  # (in, out), a view of the (out, in) rows: the fast layout at batch 1
    if M == 1:
        acc = torch._int_mm(hi.to(torch.int8), w).float()
        acc.add_(torch._int_mm(lo.to(torch.int8), w).float(), alpha=1 / (2 * QMAX))
    else:
        both = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), w).float()  # (2M, out)
        acc = both[:M].add_(both[M:], alpha=1 / (2 * QMAX))
    return acc.mul_(amax / QMAX).mul_(scale).to(x.dtype)


# ----------------------------------------------------------------------------- float layout

def chunked(weight: torch.Tensor, chunks: int) -> torch.Tensor:
    """``weight`` (in, out) as (chunks, in, ceil(out/chunks)) contiguous; the last chunk is padded
    with zero columns."""
    n_in, n_out = weight.shape
    width = -(-n_out // chunks)
    padded = torch.zeros(n_in, chunks * width, dtype=weight.dtype, device=weight.device)
    padded[:, :n_out] = weight.detach()
    return padded.view(n_in, chunks, width).permute(1, 0, 2).contiguous()


def chunked_matmul(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x (M, in) @ W`` for W in the ``chunked`` layout: one batched matmul, a chunk per
    thread. Returns (M, n_out)."""
    c, n_in, width = packed.shape
    M = x.size(0)
    y = torch.bmm(x.unsqueeze(0).expand(c, M, n_in), packed)  # (c, M, width)
    return y.permute(1, 0, 2).reshape(M, c * width)[:, :n_out]


# ----------------------------------------------------------------------------- preparing a model

def check_scheme(quantize: str | None, device: torch.device | None = None) -> None:
    from .runtime import UserError

    if quantize is not None and quantize not in SCHEMES:
        raise UserError(f"unknown quantization {quantize!r}; choose one of: "
                        f"{', '.join(SCHEMES)}")
    if quantize is not None and device is not None and device.type != "cpu":
        raise UserError(f"--quantize {quantize} runs on the CPU only for now, not on "
                        f"{device.type}; use --device cpu, or leave out --quantize")


def prepare(model: nn.Module, quantize: str | None = None, chunks: int | None = None) -> None:
    """Give ``model`` (a GPT) its inference layout, in place (see the module docstring). The
    model is then for inference only: it has no trainable weights left."""
    from .model import Projection, QuantizedEmbedding

    check_scheme(quantize)
    chunks = chunks or max(1, torch.get_num_threads())
    model.eval().requires_grad_(False)
    for module in list(model.modules()):
        if isinstance(module, Projection):
            module.prepare(quantize, chunks)
    output = model.lm_head
    if isinstance(output, Projection):  # already prepared
        return
    head = Projection(model.config.n_embd, model.config.vocab_size, bias=False, empty=True)
    if quantize == "int8":
        q, scale = quantize_int8(output.weight)  # (V, C) rows are the output channels
        head.set_int8(q, scale)
        if model.config.tie_embeddings:  # lookups read the same int8 rows
            model.wte = QuantizedEmbedding(head.qweight, head.scale)
        else:
            model.wte = QuantizedEmbedding(*quantize_int8(model.wte.weight))
    else:
        head.set_chunked(chunked(output.weight.detach().t(), chunks))
    model.lm_head = head


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.lm_head, "qweight", None) is not None


def quantize_checkpoint(model_name: str, out: str | None = None, *, force: bool = False) -> dict:
    """`gpt quantize`: an int8 copy of a float checkpoint (int8 weights, float32 scales, the same
    metadata plus ``quantization: int8``), by default beside it as ``<name>-int8.safetensors``
    (so a stored ``gpt2`` gives ``gpt2-int8``, usable as ``--model gpt2-int8``)."""
    from pathlib import Path

    from .checkpoint import load_checkpoint, save_checkpoint
    from .models import resolve_model
    from .runtime import UserError

    src = resolve_model(model_name)
    target = Path(out) if out else src.with_name(f"{src.stem}-int8.safetensors")
    if target.exists() and target.resolve() == src.resolve():
        raise UserError("--out is the checkpoint being quantized; give another file")
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it, or --out to "
                        "write another file")
    model, tokenizer, meta = load_checkpoint(src, finite=True)
    if is_quantized(model):
        raise UserError(f"{src} is already an int8 checkpoint")
    prepare(model, "int8")
    kept = {k: v for k, v in meta.items() if k in ("step", "val_loss", "source", "run_id",
                                                    "revision")}
    save_checkpoint(target, model, tokenizer, **kept, quantized_from=str(src))
    return {"path": str(target), "source": str(src), "size": target.stat().st_size,
            "source_size": src.stat().st_size, "parameters": model.num_params()}
