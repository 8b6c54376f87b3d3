"""The matrix-product kernels inference can use, each with the weight layout it reads, and the
layer that runs the chosen one.

A ``Kernel`` turns a layer's stored weights into its layout once (``pack``) and multiplies a
batch of rows by them (``run``). Kernels of one mode compute the same product: ``float`` (the
model's dtype), ``half`` (16-bit weights, float activations), ``int8`` (per-channel int8 weights,
the format int8 checkpoints store) and ``int4`` (group-wise 4-bit weights). Which one is fastest
depends on the CPU, the thread count, the shape and the number of rows, so none is assumed:
``tuning.py`` times them and ``KernelLinear`` (``kernel_layer.py``) runs the winner. Kernels
of a layout share its buffers (named for the layout), so a layer runs two kernels (batch 1,
4) on one copy of them, and two layouts side by side when it must.

Storage (what ``pack`` receives, made by ``quantize.py``): ``weight`` (in, out) float for float,
half and int4 (which also gets ``q4``/``sz``); ``qweight`` (out, in) int8 and ``scale`` (out,)
float32 for int8. Every kernel is a PyTorch operator, but for the ``*-native`` ones: gptcli's own
C products (``native.py``), built on the user's machine at first use, and skipped where they
cannot be.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native

QMAX = 127
MODES = ("float", "half", "int8", "int4")
INT4_GROUP = 32  # weights per scale, as llama.cpp's q4_0 blocks


@dataclass(frozen=True)
class Kernel:
    """One way to compute ``x (M, in) @ W + b``: ``pack(storage, threads) -> buffers`` (the
    layout, made once) and ``run(x, layer) -> (M, out)`` reading the layer's buffers.
    ``tolerance`` bounds its relative error (Frobenius norm) against the float64 product with
    the mode's stored weights; tuning drops a kernel that misses it (a broken kernel on some
    CPU), and the tests hold every kernel to it."""

    name: str
    mode: str
    layout: str
    pack: Callable[[dict, int], dict]
    run: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    tolerance: float
    doc: str
    native: bool = False  # gptcli's own C (native.py): runs only where it could be built
    prompt: bool = False  # for prompts only (tuning.PROMPT_ROWS rows and more), not decoding


# ----------------------------------------------------------------------------- float

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


def chunked_rows(weight: torch.Tensor, chunks: int) -> torch.Tensor:
    """``weight`` (in, out) as (chunks, ceil(out/chunks), in): each chunk's output columns as
    rows (nn.Linear's layout), padded like ``chunked``."""
    return chunked(weight, chunks).transpose(1, 2).contiguous()


def chunked_rows_matmul(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x (M, in) @ W`` for W in the ``chunked_rows`` layout: one batched matmul with the
    weights as its first operand (W_chunk @ x^T). Beyond one row this keeps the speed that the
    ``chunked`` product loses (output matrix, 4 rows: 5.9 ms against 11.4 ms here)."""
    c, width, n_in = packed.shape
    M = x.size(0)
    y = torch.bmm(packed, x.t().unsqueeze(0).expand(c, n_in, M))  # (c, width, M)
    return y.permute(2, 0, 1).reshape(M, c * width)[:, :n_out]


def _plus_bias(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return y if layer.bias is None else y.add_(layer.bias)


def _mkldnn_pack(weight_out_in: torch.Tensor, rows: int = 1) -> torch.Tensor:
    # oneDNN's layout for its inner product (as inductor's CPU freezing packs) for ``rows``: for 1
    # a matrix-vector one; for 16 a blocked one, 1.2-1.7x faster at 4 rows on Zen 3
    return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), rows)


def _mkldnn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _in_dtype(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(dtype)


def _out_in(s: dict, threads: int) -> dict:
    return {"w_oi": s["weight"].detach().t().contiguous()}


FLOAT = [
    Kernel("addmm", "float", "in_out", lambda s, t: {"w_io": s["weight"].detach()},
           lambda x, m: torch.addmm(m.bias, x, m.w_io) if m.bias is not None else x @ m.w_io,
           1e-5, "x @ W with W (in, out), the training layout: the plain model"),
    Kernel("linear", "float", "out_in", _out_in,
           lambda x, m: F.linear(x, m.w_oi, m.bias), 1e-5,
           "F.linear with W (out, in), nn.Linear's layout"),
    Kernel("chunked", "float", "chunked",
           lambda s, t: {"w_ch": chunked(s["weight"], t)},
           lambda x, m: _plus_bias(chunked_matmul(x, m.w_ch, m.n_out), m), 1e-5,
           "one batched matmul over a slice of W's outputs per thread"),
    Kernel("chunked-rows", "float", "chunked_rows",
           lambda s, t: {"w_cr": chunked_rows(s["weight"], t)},
           lambda x, m: _plus_bias(chunked_rows_matmul(x, m.w_cr, m.n_out), m), 1e-5,
           "one batched matmul over a slice of W's rows (out, in) per thread, W first"),
    Kernel("mkldnn", "float", "mkldnn", lambda s, t: {"w_dnn": _mkldnn_pack(s["weight"].t())},
           lambda x, m: _mkldnn(x, m.w_dnn, m.bias), 1e-5,
           "oneDNN inner product on W packed in its blocked layout"),
    Kernel("mkldnn-batch", "float", "mkldnn_batch",
           lambda s, t: {"w_dnn16": _mkldnn_pack(s["weight"].t(), 16)},
           lambda x, m: _mkldnn(x, m.w_dnn16, m.bias), 1e-5,
           "as mkldnn, in the layout oneDNN picks for 16 rows"),
    # (on an AMD EPYC, 128-row products 2.3-2.6x F.linear's, which is MKL's there)
    Kernel("mkldnn-plain", "float", "out_in", _out_in,
           lambda x, m: _mkldnn(x, m.w_oi, m.bias), 1e-5,
           "oneDNN inner product on W (out, in) as it is: no packed copy", prompt=True),
]


# ----------------------------------------------------------------------------- half

def half_names(dtype: torch.dtype, mkldnn: bool = False) -> tuple[str, str]:
    # a layout's own buffers (weights, bias): a layer holding two layouts keeps both
    return f"w_{str(dtype)[6:]}{'_dnn' if mkldnn else ''}", f"b_{str(dtype)[6:]}"


def _half_pack(dtype: torch.dtype, mkldnn: bool) -> Callable[[dict, int], dict]:
    def pack(s: dict, threads: int) -> dict:
        w, (wn, bn) = s["weight"].detach().t().to(dtype).contiguous(), half_names(dtype, mkldnn)
        return {wn: _mkldnn_pack(w) if mkldnn else w, bn: _in_dtype(s.get("bias"), dtype)}
    return pack


def _half_run(dtype: torch.dtype, mkldnn: bool) -> Callable:
    wn, bn = half_names(dtype, mkldnn)

    def run(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
        w, b, h = getattr(m, wn), getattr(m, bn), x.to(dtype)
        return (_mkldnn(h, w, b) if mkldnn else F.linear(h, w, b)).to(x.dtype)
    return run


def _fbgemm_pack(s: dict, threads: int) -> dict:
    w = s["weight"].detach().t().float().contiguous()
    bias = s.get("bias")
    # A packed-parameters object, not a tensor: kept as an attribute (see KernelLinear)
    return {"fbgemm": torch.ops.quantized.linear_prepack_fp16(
        w, None if bias is None else bias.detach().float()), "packed_bytes": 2 * w.numel()}


HALF = [
    Kernel("bf16-linear", "half", "bf16-out_in", _half_pack(torch.bfloat16, False),
           _half_run(torch.bfloat16, False), 1.5e-2,
           "bf16 weights (out, in), activations rounded to bf16 (oneDNN)"),
    Kernel("bf16-mkldnn", "half", "bf16-mkldnn", _half_pack(torch.bfloat16, True),
           _half_run(torch.bfloat16, True), 1.5e-2,
           "bf16 weights in oneDNN's blocked layout, activations rounded to bf16"),
    Kernel("fp16-linear", "half", "fp16-out_in", _half_pack(torch.float16, False),
           _half_run(torch.float16, False), 3e-3,
           "fp16 weights (out, in), activations rounded to fp16"),
    Kernel("fp16-mkldnn", "half", "fp16-mkldnn", _half_pack(torch.float16, True),
           _half_run(torch.float16, True), 3e-3,
           "fp16 weights in oneDNN's blocked layout (needs avx512_fp16 or avx_ne_convert)"),
    Kernel("fp16-fbgemm", "half", "fp16-fbgemm", _fbgemm_pack,
           lambda x, m: torch.ops.quantized.linear_dynamic_fp16(x.float(), m.fbgemm).to(x.dtype),
           1e-3, "fp16 weights packed by fbgemm, float32 activations (F16C conversion)"),
]


# ----------------------------------------------------------------------------- int8

def _split_rows(x: torch.Tensor, parts: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``x`` (M, in) quantized per row into ``parts`` int8 tensors: the first rounds
    ``x * 127 / amax``, each further one quantizes (254x) what the previous left (at most half
    a step), so two parts keep ~15 bits. Returns the parts and ``amax / 127`` (M, 1)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (M, 1)
    t = xf * (QMAX / amax)  # in [-127, 127]
    hi = t.round()
    if parts == 1:
        return [hi.to(torch.int8)], amax / QMAX
    lo = (t - hi).mul_(2 * QMAX).round_()  # also in [-127, 127]
    return [hi.to(torch.int8), lo.to(torch.int8)], amax / QMAX


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                parts: int = 2) -> torch.Tensor:
    """``x (M, in) @ dequantize(q, scale).T`` with ``x`` quantized per row on the fly in
    ``parts`` int8 parts (see ``_split_rows``), multiplied by ``torch._int_mm`` (int8 x int8 ->
    int32, exact). At batch 1 each part is its own product (the second reads the weights from
    cache; a product of two rows takes a slower kernel), for more rows one product of the parts
    stacked. Returns (M, out) in ``x``'s dtype."""
    M = x.size(0)
    xs, step = _split_rows(x, parts)
    w = q.t()  # (in, out), a view of the (out, in) rows
    if parts == 1:
        acc = torch._int_mm(xs[0], w).float()
    elif M == 1:
        acc = torch._int_mm(xs[0], w).float()
        acc.add_(torch._int_mm(xs[1], w).float(), alpha=1 / (2 * QMAX))
    else:
        both = torch._int_mm(torch.cat(xs), w).float()  # (2M, out)
        acc = both[:M].add_(both[M:], alpha=1 / (2 * QMAX))
    return acc.mul_(step).mul_(scale).to(x.dtype)


def _int8pack(dtype: torch.dtype | None) -> Callable:
    def run(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
        h = x if dtype is None else x.to(dtype)
        scale = m.scale if dtype is None else getattr(m, f"scale_{str(dtype)[6:]}")
        return _plus_bias(torch._weight_int8pack_mm(h, m.qweight, scale).to(x.dtype), m)
    return run


def _scale_as(dtype: torch.dtype) -> Callable[[dict, int], dict]:
    def pack(s: dict, threads: int) -> dict:
        if dtype is torch.bfloat16 and s["qweight"].size(1) % 16:
            # (torch 2.13 on an AVX-512 CPU: a segfault there, e.g. 136 in, 101 out, 3 rows)
            raise RuntimeError("torch._weight_int8pack_mm with bf16 activations needs a "
                               "multiple of 16 inputs")
        return {f"scale_{str(dtype)[6:]}": s["scale"].to(dtype)}
    return pack


def _fbgemm_int8_pack(s: dict, threads: int) -> dict:
    q, scale, bias = s["qweight"], s["scale"], s.get("bias")
    with warnings.catch_warnings():
        # quantized tensors are deprecated (2.13 has them): once gone this raises, tuning skips
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(w, _in_dtype(bias, torch.float32))
    guard = F.pad(torch.tensor([[1.0, -1.0]]), (0, q.size(1) - 2))  # [1, -1, 0...]
    # its packed copy is read instead of qweight, as many bytes: no packed_bytes to add
    return {"fbgemm": packed, "guard": guard}


def _fbgemm_int8_run(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    # The operator quantizes its whole input with one range (asymmetric, 7 bits: reduce_range
    # keeps AVX2's u8 x s8 16-bit pair sums from saturating). More rows than one are each scaled
    # to [-1, 1] and a guard row [1, -1, 0...] pins the range, so a row is quantized alike
    # whatever the others hold; the packed bias is taken off to scale back, then put on again.
    xf = x.float()
    if xf.size(0) == 1:
        return torch.ops.quantized.linear_dynamic(xf, m.fbgemm, True).to(x.dtype)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (M, 1)
    y = torch.ops.quantized.linear_dynamic(torch.cat([xf / amax, m.guard]), m.fbgemm, True)[:-1]
    if m.bias is not None:
        return y.sub_(m.bias).mul_(amax).add_(m.bias).to(x.dtype)
    return y.mul_(amax).to(x.dtype)


INT8 = [
    Kernel("int8-intmm2", "int8", "int8", lambda s, t: {},
           lambda x, m: _plus_bias(int8_matmul(x, m.qweight, m.scale, 2), m), 3e-4,
           "torch._int_mm, activations in two int8 parts per row (~15 bits)"),
    Kernel("int8-intmm", "int8", "int8", lambda s, t: {},
           lambda x, m: _plus_bias(int8_matmul(x, m.qweight, m.scale, 1), m), 2.5e-2,
           "torch._int_mm, activations in one int8 part per row (8 bits)"),
    Kernel("int8-bf16", "int8", "int8", _scale_as(torch.bfloat16), _int8pack(torch.bfloat16),
           1.5e-2, "torch._weight_int8pack_mm, activations rounded to bf16"),
    Kernel("int8-fp16", "int8", "int8", _scale_as(torch.float16), _int8pack(torch.float16),
           3e-3, "torch._weight_int8pack_mm, activations rounded to fp16"),
    Kernel("int8-f32", "int8", "int8", lambda s, t: {}, _int8pack(None), 1e-4,
           "torch._weight_int8pack_mm, float32 activations"),
    Kernel("int8-fbgemm", "int8", "int8", _fbgemm_int8_pack, _fbgemm_int8_run, 2.5e-2,
           "fbgemm's dynamic int8 product on its own packed copy of the int8 weights, "
           "activations in 7 bits per row (u8, AVX2's vpmaddubsw)"),
]


# ----------------------------------------------------------------------------- int4

def _int4_pack(dtype: torch.dtype) -> Callable[[dict, int], dict]:
    def pack(s: dict, threads: int) -> dict:
        # q4: (out, in) int32 in [0, 15], out padded to a multiple of 16 (the kernel's tile);
        # sz: (in / group, out, 2) scales and zeros, w = (q4 - 8) * scale + zero
        return {"w4": torch._convert_weight_to_int4pack_for_cpu(s["q4"], 1),
                f"sz_{str(dtype)[6:]}": s["sz"].to(dtype)}
    return pack


def _int4_run(dtype: torch.dtype) -> Callable:
    def run(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(dtype), m.w4, INT4_GROUP,
                                              getattr(m, f"sz_{str(dtype)[6:]}"))
        return _plus_bias(y[:, :m.n_out].to(x.dtype), m)
    return run


INT4 = [
    Kernel("int4-bf16", "int4", "int4", _int4_pack(torch.bfloat16), _int4_run(torch.bfloat16),
           1.5e-2, "torch._weight_int4pack_mm_for_cpu, activations rounded to bf16"),
    Kernel("int4-f32", "int4", "int4", _int4_pack(torch.float32), _int4_run(torch.float32),
           1e-4, "torch._weight_int4pack_mm_for_cpu, float32 activations"),
]

# ----------------------------------------------------------------------------- native

def _native(pack: Callable[[dict, int], dict]) -> Callable[[dict, int], dict]:
    def ready(s: dict, threads: int) -> dict:
        native.library()  # built here once, or RuntimeError with the reason: the tuner skips it
        return pack(s, threads)
    return ready


def _native_float(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    w = m.w_oi if m.mode == "float" else m.w_bfloat16
    if x.size(0) > native.ROWS_MAX:  # a prompt: torch's product, as precise (float32 sums)
        return F.linear(x.float(), w.float(), native._f32(m.bias)).to(x.dtype)
    y = native.float_product(x, w, m.bias)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def _native_int8(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    if x.size(0) > native.ROWS_MAX:  # a prompt: torch's product, as precise (int8-intmm2's)
        return _plus_bias(int8_matmul(x, m.qweight, m.scale, 2), m)
    y = native.int8_product(x, m.qweight, m.scale, m.bias)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def _native_int4_pack(s: dict, threads: int) -> dict:
    """The int4 storage as native.c reads it: the real rows only, two weights a byte (a group's
    element j and j + 16), and per group ``scale`` and ``low`` (w = q * scale + low) in fp16:
    5 bits a weight instead of 6 (``quantize_int4`` rounds them to fp16 before choosing the
    4-bit values, so this loses nothing)."""
    n, sz = s["n_out"], s["sz"][:, :s["n_out"]]  # sz: (groups, out', 2): scale, zero
    q = s["q4"][:n].to(torch.uint8).view(n, -1, 2, INT4_GROUP // 2)
    scale, low = sz[..., 0].t(), (sz[..., 1] - 8 * sz[..., 0]).t()
    if max(scale.abs().max().item(), low.abs().max().item()) > torch.finfo(torch.float16).max:
        raise RuntimeError("int4-native keeps scales in fp16, and these weights are too large")
    return {"n4": (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1).contiguous(),
            "s4": scale.half().contiguous(), "m4": low.half().contiguous()}


def _native_int4(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    # every row count, prompts too: unpacking the weights for torch's product took twice as long
    # (a 128-row 768x2304 product: 13.2 ms against 6.1 here)
    y = native.int4_product(x, m.n4, m.s4, m.m4, m.bias)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


NATIVE = [
    Kernel("native", "float", "out_in", _native(_out_in), _native_float, 1e-5,
           "gptcli's own C product (native.py) on W (out, in), nn.Linear's layout",
           True),
    Kernel("bf16-native", "half", "bf16-out_in", _native(HALF[0].pack), _native_float, 4e-3,
           "bf16 weights (out, in) through gptcli's own C product, float32 activations",
           True),
    # prompts: the weights made float32 for the call (a 768x3072 bf16 matrix in 0.15 ms) and
    # oneDNN's product, 2.2-2.4x F.linear's on an AMD EPYC at 128 rows
    Kernel("bf16-dnn", "half", "bf16-out_in", HALF[0].pack,
           lambda x, m: _mkldnn(native._f32(x), m.w_bfloat16.float(),
                                native._f32(m.bias)).to(x.dtype), 4e-3,
           "bf16 weights (out, in) made float32 for oneDNN's product, float32 activations",
           prompt=True),
    Kernel("int8-native", "int8", "int8", _native(lambda s, t: {}), _native_int8, 3e-4,
           "gptcli's own C product (native.py), activations rounded to 15 bits per row",
           True),
    Kernel("int4-native", "int4", "int4-native", _native(_native_int4_pack), _native_int4, 3e-4,
           "gptcli's own C product on two 4-bit weights a byte, activations in 15 bits per row",
           True),
    Kernel("int4-dnn", "int4", "int4-native", _native(_native_int4_pack),
           lambda x, m: _mkldnn(native._f32(x), native.int4_unpacked(m.n4, m.s4, m.m4),
                                native._f32(m.bias)).to(x.dtype), 1e-4,
           "the 4-bit weights made float32 by gptcli's C for oneDNN's product, float32 "
           "activations", True, prompt=True),
]

KERNELS: dict[str, Kernel] = {k.name: k for k in FLOAT + HALF + INT8 + INT4 + NATIVE}



def candidates(mode: str) -> list[Kernel]:
    """The kernels of ``mode`` (a compiled step runs each of them as eager does: ``product``)."""
    return [k for k in KERNELS.values() if k.mode == mode]
