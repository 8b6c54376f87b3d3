"""Inference-only weight formats, prepared at load time on the one model class.

``prepare(model, quantize)`` gives every projection and the output matrix the format and the
kernel decoding reads fastest, in place (the model itself knows none of this):

- ``quantize=None``: weights stay in the model's dtype. The kernel (the plain (in, out) product,
  nn.Linear's (out, in), one chunk of outputs per thread in one batched matmul, oneDNN's packed
  layout) is chosen by measurement (``tuning.py``); the tied embedding keeps its table.
- ``"half"``: 16-bit weights (bf16 or fp16, whichever kernel measures fastest here: native bf16
  where the CPU has it), activations and everything else in float32. Halves the bytes a token
  reads. Embedding lookups read the same 16-bit rows.
- ``"int8"``: per-output-channel symmetric int8 weights (``qweight`` (out, in) int8, ``scale``
  (out,) float32: what int8 checkpoints store); the kernel multiplies them with activations
  quantized per row (``torch._int_mm``), rounded to 16 bits (``torch._weight_int8pack_mm``)
  or to 15-bit integers (gptcli's own C product, ``native.py``).
  Embedding lookups read the same int8 rows.
- ``"int4"``: group-wise 4-bit weights (32 per scale and zero, like llama.cpp's q4_0) in the
  blocks, through ``torch._weight_int4pack_mm_for_cpu``; the output matrix and the embedding
  stay int8 (llama.cpp keeps them at 6 bits for the same reason: they matter most), as do
  projections whose input width is not a multiple of 32.

Positions, norms and biases stay in float. Why ``torch._int_mm`` and not
``torch.ao.quantization.quantize_dynamic``: the latter is deprecated, and measured no faster
here (``benchmarks/int8_kernels.py``).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn

from . import native_step
from .config import KERNEL_ENV
from .errors import UserError
from .kernel_layer import KernelLinear
from .kernels import INT4_GROUP, KERNELS, QMAX, candidates, half_names
from .model import Projection
from .tuning import Choice, choose

SCHEMES = ("half", "int8", "int4")
BITS = {"float": None, "half": 16, "int8": 8, "int4": 4}


# ----------------------------------------------------------------------------- weight maths

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``weight`` (out, in): ``q`` int8 and ``scale`` float32 (out,),
    with ``weight ~= q * scale[:, None]``; the error of each element is at most scale/2."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8).contiguous()
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit of ``weight`` (out, in): ``q4`` (out', in) int32 in [0, 15]
    and ``sz`` (in / group, out', 2) float32 scales and zeros, with ``w ~= (q4 - 8) * scale +
    zero`` over each run of ``group`` inputs (the error of each element is at most scale/2,
    plus the rounding of scale and of the group's lowest weight to fp16, the precision
    gptcli's C kernel keeps them in). out' is out rounded up to a multiple of 16 (the kernel's
    tile), the extra rows zero."""
    w = weight.detach().float()
    n_out, n_in = w.shape
    padded = -(-n_out // 16) * 16
    w = torch.cat([w, w.new_zeros(padded - n_out, n_in)]).view(padded, n_in // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (out', in / group)
    lo, scale = (torch.where(t.half().isinf(), t, t.half().float()) for t in (lo, (hi - lo) / 15))
    scale = scale.clamp_min(1e-12)
    q4 = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return q4.view(padded, n_in), sz


def dequantize_int4(q4: torch.Tensor, sz: torch.Tensor, n_out: int) -> torch.Tensor:
    """The (out, in) float32 weight that ``quantize_int4`` stands for."""
    scale, zero = (sz[..., i].t().repeat_interleave(q4.size(1) // sz.size(0), dim=1)
                   for i in (0, 1))  # (out', in)
    return ((q4.float() - 8) * scale + zero)[:n_out]


# ----------------------------------------------------------------------------- the layers

class QuantizedEmbedding(nn.Module):
    """Token embedding lookups from low-precision rows: int8 with a per-row ``scale``, or 16-bit
    (``scale`` None). Shared with the output matrix's weights where the model ties them."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[idx].float()
        return rows if self.scale is None else rows * self.scale[idx].unsqueeze(-1)


# ----------------------------------------------------------------------------- preparing

def check_scheme(quantize: str | None, device: torch.device | None = None) -> None:
    if quantize is not None and quantize not in SCHEMES:
        raise UserError(f"unknown quantization {quantize!r}; choose one of: "
                        f"{', '.join(SCHEMES)}")
    if quantize is not None and device is not None and device.type != "cpu":
        raise UserError(f"--quantize {quantize} runs on the CPU only for now, not on "
                        f"{device.type}; use --device cpu, or leave out --quantize")


# --kernel inductor: each mode's kernel of plain operators, traced by a compiled step in which
# inductor freezes the weights and chooses its own products (its C++ templates, autotuned)
TRACED = {"float": "linear", "half": "bf16-linear", "int8": "int8-bf16", "int4": "int4-bf16"}


def forced_kernel(kernel: str | None, modes: set[str]) -> str | None:
    """The kernel ``--kernel`` (else ``$GPTCLI_KERNEL``) forces, checked against the modes the
    model's layers are in; None or "auto": choose by measurement; "inductor": see TRACED;
    "fused": the blocks' decode steps in C (``native_step.py``)."""
    name = kernel or os.environ.get(KERNEL_ENV) or None
    if name in (None, "auto", "inductor", "fused"):
        return None if name == "auto" else name
    allowed = [k.name for mode in sorted(modes) for k in candidates(mode)]
    choose = f"for this model choose one of: {', '.join(allowed)} (or auto, fused, or " \
        "inductor with --compile)"
    if name not in KERNELS:
        raise UserError(f"unknown kernel {name!r}; {choose}")
    if name not in allowed:
        mode = KERNELS[name].mode
        flag = "no --quantize" if mode == "float" else f"--quantize {mode}"
        raise UserError(f"kernel {name} is for {flag}; {choose}")
    return name


def _storage(mode: str, weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """What the layer keeps for ``mode`` (see kernels.py), from its float weight (in, out)."""
    bias = None if bias is None else bias.detach()
    if mode == "int8":
        q, scale = quantize_int8(weight_in_out.t())
        return {"qweight": q, "scale": scale, "bias": bias}
    if mode == "int4":
        q4, sz = quantize_int4(weight_in_out.t())
        return {"q4": q4, "sz": sz, "n_out": weight_in_out.size(1), "bias": bias}
    return {"weight": weight_in_out.detach(), "bias": bias}


def _reference(mode: str, s: dict) -> torch.Tensor:
    """The (in, out) float weight a storage stands for: what every kernel must compute with."""
    if mode == "int8":
        return (s["qweight"].float() * s["scale"][:, None]).t()
    if mode == "int4":
        return dequantize_int4(s["q4"], s["sz"], s["n_out"]).t()
    return s["weight"].float()


def _layers(model: nn.Module, quantize: str | None) -> dict[str, tuple[str, dict]]:
    """Every projection and the output matrix, by module path: (its mode, its storage)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Projection):
            mode = quantize or "float"
            if mode == "int4" and module.n_in % INT4_GROUP:
                mode = "int8"  # the 4-bit kernel takes whole groups only
            layers[name] = (mode, _storage(mode, module.weight, module.bias))
        elif isinstance(module, KernelLinear) and module.kernel is None:  # loaded int8
            layers[name] = (module.mode, {"qweight": module.qweight, "scale": module.scale,
                                          "bias": module.bias})
    if isinstance(model.lm_head, nn.Linear):
        mode = {"int4": "int8"}.get(quantize, quantize or "float")
        layers["lm_head"] = (mode, _storage(mode, model.lm_head.weight.t(), None))
    return layers


def _shape(s: dict) -> tuple[int, int]:
    """(in, out) of a storage."""
    if "weight" in s:
        return tuple(s["weight"].shape)
    return (s["qweight"].size(1), s["qweight"].size(0)) if "qweight" in s else \
        (s["q4"].size(1), s["n_out"])


def prepare(model: nn.Module, quantize: str | None = None, *, kernel: str | None = None,
            rows: tuple[int, ...] = (1,), steps: bool = True) -> None:
    """Give ``model`` (a GPT) its inference format and kernels, in place (see the module
    docstring). Kernels are chosen per weight shape for decoding with ``rows`` rows (other
    counts: ``KernelLinear.for_rows``), or forced by ``kernel`` / ``$GPTCLI_KERNEL``. The
    model is then for inference only: it has no trainable weights left. A model loaded from an int8
    checkpoint stays int8; on the meta device only the formats are made (checkpoint shapes)."""
    check_scheme(quantize)
    current = quantization(model)
    if quantize is not None and (current not in (None, quantize)
                                 or (is_prepared(model) and current != quantize)):
        raise UserError(f"the model is already prepared as {current or 'float'}; load it "
                        f"again to use --quantize {quantize}")
    model.eval().requires_grad_(False)
    device = model.ln_f.weight.device
    if device.type not in ("cpu", "meta") or (device.type == "meta" and not quantize):
        return  # other devices keep the training layout
    layers = _layers(model, quantize)
    forced = forced_kernel(kernel, {mode for mode, _ in layers.values()})
    built = {}
    for name, (mode, storage) in layers.items():
        module = model.get_submodule(name)
        built[name] = module if isinstance(module, KernelLinear) else \
            KernelLinear.from_storage(mode, storage)
    if device.type == "cpu":
        element_bits = 8 * model.ln_f.weight.element_size()
        total = sum(math.prod(_shape(s)) * (BITS[m] or element_bits)
                    for m, s in layers.values()) // 8
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, (mode, storage) in layers.items():
            groups[mode, _shape(storage)].append(name)
        for (mode, _), names in groups.items():
            own = TRACED[mode] if forced == "inductor" else forced if \
                forced in KERNELS and KERNELS[forced].mode == mode else None
            _choose_for([built[n] for n in names], [layers[n][1] for n in names], mode, rows,
                        model.ln_f.weight.dtype, own, total)
            for n in names:
                built[n].traced = forced == "inductor"
                if built[n].traced:
                    built[n].choices = {m: replace(c, source="inductor")
                                        for m, c in built[n].choices.items()}
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if quantization(model) is not None and model.ln_f.weight.dtype == torch.float32:
        for block in model.h:  # rounded weights: keys and values in fp16 too (model.py)
            block.attn.kv_dtype = torch.float16
    if device.type == "cpu":  # (steps: not for a compiled step, which calls the model)
        if forced == "fused" and not steps and kernel != "fused":
            forced = None  # $GPTCLI_KERNEL=fused where nothing decodes: nothing to force
        native_step.attach(model, rows, {n: s for n, (_, s) in layers.items()}, forced, steps)
        # the layouts as they stay (the C blocks' choice may have packed them again) into huge
        # pages, and the C step pointed at them; then a tied embedding reads the moved rows
        for layer in built.values():
            layer.into_huge_pages()
        if isinstance(getattr(model, "decode_step", None), native_step.BlockStep):
            model.decode_step._build()
    _lookups(model)


def _choose_for(layers: list[KernelLinear], storages: list[dict], mode: str,
                rows: tuple[int, ...], dtype: torch.dtype, forced: str | None,
                total: int) -> None:
    """Choose (or take the forced) kernels for layers of one shape, and pack them."""
    try:
        chosen = choose(mode, storages, lambda: _reference(mode, storages[0]),
                        _shape(storages[0]), rows, dtype, forced=forced, model_bytes=total)
        for layer, storage in zip(layers, storages):
            layer.use({m: c.kernel for m, c in chosen.items()}, torch.get_num_threads(),
                      storage)
            layer.choices = chosen
    except Exception as e:  # noqa: BLE001 - a forced kernel may fail in any way here
        if forced is None:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"kernel {forced} does not run on this machine ({reason}); choose "
                        "another --kernel, or leave it out") from None


def _lookups(model: nn.Module) -> None:
    """Point the embedding at the output matrix's low-precision rows when tied (else give it
    its own), so the float table can go."""
    head = model.lm_head
    if not isinstance(head, KernelLinear) or head.mode == "float" or \
            isinstance(model.wte, QuantizedEmbedding):
        return
    if head.mode == "int8":
        table = (head.qweight, head.scale) if model.config.tie_embeddings else \
            quantize_int8(model.wte.weight)
    else:  # half: the 16-bit format the output matrix's kernel chose
        dtype = torch.bfloat16 if head.kernel.name.startswith("bf16") else torch.float16
        w = getattr(head, half_names(dtype)[0], None)  # (the (out, in) layout, if chosen)
        same = model.config.tie_embeddings and isinstance(w, torch.Tensor) and \
            not w.is_mkldnn and w.dtype == dtype and w.shape == (head.n_out, head.n_in)
        table = (w if same else model.wte.weight.detach().to(dtype), None)
    model.wte = QuantizedEmbedding(*table)


def tie_int8(model: nn.Module) -> None:
    """After loading an int8 checkpoint (which stores the tied matrix once, as the embedding's),
    point the output matrix at the embedding's int8 rows again."""
    if model.config.tie_embeddings and isinstance(model.wte, QuantizedEmbedding):
        model.lm_head.qweight, model.lm_head.scale = model.wte.qweight, model.wte.scale


def quantization(model: nn.Module) -> str | None:
    """The model's weight format: None (float), "half", "int8" or "int4"."""
    modes = {m.mode for m in model.modules() if isinstance(m, KernelLinear)}
    for mode in ("int4", "half", "int8"):
        if mode in modes:
            return mode
    return None


def is_prepared(model: nn.Module) -> bool:
    return isinstance(model.lm_head, KernelLinear) and model.lm_head.kernel is not None


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds int8 weights as int8 checkpoints store them."""
    return quantization(model) == "int8"


def kernel_report(model: nn.Module) -> list[dict]:
    """What was chosen for each weight shape and row count: the kernel, how (measured, cached,
    forced) and every candidate's microseconds per layer."""
    seen: dict[tuple, dict] = {}
    for name, m in model.named_modules():
        if not isinstance(m, KernelLinear):
            continue
        for rows, c in getattr(m, "choices", {}).items():
            key = (m.mode, m.n_in, m.n_out, rows)
            if key not in seen:
                seen[key] = {"mode": m.mode, "shape": [m.n_in, m.n_out], "rows": rows,
                             "layers": 0, **Choice.as_dict(c)}
            seen[key]["layers"] += 1
    return list(seen.values())
