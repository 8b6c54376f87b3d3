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

from .errors import UserError
from .model import Projection

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


# ----------------------------------------------------------------------------- the layers

class InferenceLinear(nn.Module):
    """A projection in an inference layout: ``matmul`` of the flattened input, then the bias."""

    n_out: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, x.size(-1)))
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.n_out)


class Int8Linear(InferenceLinear):
    """int8 weights: ``qweight`` (out, in) int8 and ``scale`` (out,) float32 per output channel
    (see ``int8_matmul``), and the float bias. Its state-dict names (``qweight``, ``scale``,
    ``bias``) are what int8 checkpoints store."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n_out = qweight.size(0)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.qweight, self.scale)


class ChunkedLinear(InferenceLinear):
    """Float weights in the ``chunked`` layout (one chunk per CPU thread). The layout is made at
    load time and never saved: the checkpoint keeps the plain weight."""

    def __init__(self, packed: torch.Tensor, n_out: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n_out = n_out
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_matmul(x, self.packed, self.n_out)


class QuantizedEmbedding(nn.Module):
    """Token embedding lookups from int8 rows (shared with the int8 output matrix when tied)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].float() * self.scale[idx].unsqueeze(-1)


# ----------------------------------------------------------------------------- preparing a model

def check_scheme(quantize: str | None, device: torch.device | None = None) -> None:
    if quantize is not None and quantize not in SCHEMES:
        raise UserError(f"unknown quantization {quantize!r}; choose one of: "
                        f"{', '.join(SCHEMES)}")
    if quantize is not None and device is not None and device.type != "cpu":
        raise UserError(f"--quantize {quantize} runs on the CPU only for now, not on "
                        f"{device.type}; use --device cpu, or leave out --quantize")


def _frozen(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _swap(model: nn.Module, make) -> None:
    """Replace every ``Projection`` of ``model`` by ``make(projection)``, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Projection):
                setattr(module, child_name, make(child))


def prepare(model: nn.Module, quantize: str | None = None, chunks: int | None = None) -> None:
    """Give ``model`` (a GPT) its inference layout, in place (see the module docstring). The
    model is then for inference only: it has no trainable weights left."""
    check_scheme(quantize)
    if is_prepared(model):
        return
    chunks = chunks or max(1, torch.get_num_threads())
    model.eval().requires_grad_(False)
    output = model.lm_head.weight.detach()  # (V, C): rows are the output channels
    if quantize == "int8":
        _swap(model, lambda p: Int8Linear(*quantize_int8(p.weight.t()), _frozen(p.bias)))
        model.lm_head = Int8Linear(*quantize_int8(output), None)
        if model.config.tie_embeddings:  # lookups read the same int8 rows
            model.wte = QuantizedEmbedding(model.lm_head.qweight, model.lm_head.scale)
        else:
            model.wte = QuantizedEmbedding(*quantize_int8(model.wte.weight))
    else:
        _swap(model, lambda p: ChunkedLinear(chunked(p.weight, chunks), p.n_out,
                                             _frozen(p.bias)))
        model.lm_head = ChunkedLinear(chunked(output.t(), chunks), output.size(0), None)


def tie_int8(model: nn.Module) -> None:
    """After loading an int8 checkpoint (which stores the tied matrix once, as the embedding's),
    point the output matrix at the embedding's int8 rows again."""
    if model.config.tie_embeddings and isinstance(model.wte, QuantizedEmbedding):
        model.lm_head.qweight, model.lm_head.scale = model.wte.qweight, model.wte.scale


def is_prepared(model: nn.Module) -> bool:
    return isinstance(model.lm_head, InferenceLinear)


def is_quantized(model: nn.Module) -> bool:
    return isinstance(model.lm_head, Int8Linear)
