"""A decoded token's blocks in C: one call per block (``native.c``'s ``gptcli_block``), chosen
by measurement like the kernels.

At batch 1 a GPT-2 block is four products and ~90 small operations around them (norms, the
cache write, attention over the cache, GELU, residuals, views), each a trip through Python and
torch's dispatcher; on a fast CPU those cost as much as the products themselves once the products
read their weights at memory speed. ``BlockStep`` runs each block's decode step as one C call
over the same weights (the mode's native kernel: ``native``, ``bf16-native``, ``int8-native``,
``int4-native``) and the same KV cache, all blocks in one call (``gptcli_step``), with the final
norm and the output matrix where the output matrix's chosen kernel is its mode's native one
(else the model's modules run them); the embedding stays the model's. It takes steps of rows at
one position, one new token each or a few (a speculative round's check of the draft's tokens),
``native.ROWS_MAX`` positions in all at most; every other call (prompts, rows at different
positions, another device) goes to the model as before.

``attach`` (the end of ``quantize.prepare``) times a run of the model's own blocks against
``gptcli_block`` on the same inputs, alternating, for each batch size the model is prepared for,
and gives the model a ``decode_step`` (which the decode engine calls instead of the model) only
where the C blocks were faster; the choice is cached with the kernels' (``tuning.py``).
``--kernel fused`` forces it; any other forced kernel leaves the blocks to the model.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import replace

import torch
from torch import nn

from . import hardware, native, tuning
from .errors import UserError
from .kernel_layer import KernelLinear
from .kernels import KERNELS
from .kv_cache import KVCache

NATIVE = {"float": "native", "half": "bf16-native", "int8": "int8-native", "int4": "int4-native"}
KIND = {"native": 0, "bf16-native": 1, "int8-native": 2, "int4-native": 3}
BYTES = {"float": 4, "half": 2, "int8": 1, "int4": 0.5}  # a weight's, in each mode
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
POSITION = 64  # where the measured steps decode: after this many cached positions
ROUNDS = 3


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("low", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p),
                ("ln2_w", ctypes.c_void_p), ("ln2_b", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("qkv", _Linear), ("proj", _Linear), ("fc", _Linear), ("out", _Linear)]


_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_int, ctypes.c_int]
_STEP_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]


def why_not(model: nn.Module) -> str | None:
    """None where ``model``'s blocks can run in C, else why not."""
    cfg = model.config
    if model.device.type != "cpu" or model.dtype is not torch.float32:
        return "the C blocks run float32 activations on a CPU"
    if cfg.norm != "layernorm" or cfg.position == "rope":
        return "the C blocks do GPT-2's maths: layer norm, no rotary positions"
    for block in model.h:
        for name in PROJECTIONS:
            layer = block.get_submodule(name)
            if not isinstance(layer, KernelLinear) or layer.mode not in NATIVE:
                return "the C blocks run prepared layers only"
    return native.unavailable()


def _linear(layer: KernelLinear, held: list) -> _Linear:
    """The C view of ``layer``'s native layout (its tensors kept alive in ``held``)."""
    name = NATIVE[layer.mode]
    if layer.mode == "float":
        tensors = (layer.w_oi, None, None)
    elif layer.mode == "half":
        tensors = (layer.w_bfloat16, None, None)
    elif layer.mode == "int8":
        tensors = (layer.qweight, native._f32(layer.scale), None)
    else:
        tensors = (layer.n4, layer.s4, layer.m4)
    w = tensors[0]
    expect = {"float": (torch.float32, (layer.n_out, layer.n_in)),
              "half": (torch.bfloat16, (layer.n_out, layer.n_in)),
              "int8": (torch.int8, (layer.n_out, layer.n_in)),
              "int4": (torch.uint8, (layer.n_out, layer.n_in // 2))}[layer.mode]
    native._check(w, *expect)
    for t in tensors[1:]:  # int8's scales (N,); int4's fp16 scales and lows (N, K / 32)
        if t is not None:
            native._check(t, *((torch.float32, (layer.n_out,)) if layer.mode == "int8" else
                               (torch.float16, (layer.n_out, layer.n_in // 32))))
    bias = native._f32(layer.bias)
    if bias is not None:
        native._check(bias, torch.float32, (layer.n_out,))
    held.extend(t for t in (*tensors, bias) if t is not None)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return _Linear(KIND[name], ptr(w), ptr(tensors[1]), ptr(tensors[2]), ptr(bias),
                   layer.n_out, layer.n_in)


def _block(block: nn.Module, held: list) -> _Block:
    norms = []
    for ln in (block.ln_1, block.ln_2):
        w, b = native._f32(ln.weight), native._f32(ln.bias)
        held.extend(t for t in (w, b) if t is not None)
        norms += [w.data_ptr(), None if b is None else b.data_ptr()]
    return _Block(*norms, block.ln_1.eps,
                  *(_linear(block.get_submodule(n), held) for n in PROJECTIONS))


def cache_dtype(model: nn.Module, positions: int) -> torch.dtype:
    """``BlockStep.cache_dtype`` of ``model``'s C step."""
    kv = model.h[0].attn.kv_dtype
    return kv if kv is not None and positions <= native.ROWS_MAX else torch.float32


def _check(status: int) -> None:
    """native.c's block and step status: 0 done, -1 out of memory, -2 a layout or cache kind
    it does not know (a mismatch between this module and the compiled library)."""
    if status == -1:
        raise MemoryError("gptcli's C block ran out of memory")
    if status:
        raise RuntimeError(f"gptcli's C block refused its inputs (status {status}): a weight "
                           "layout or cache kind it does not know")


class BlockStep:
    """The model's decode step (one position a row, or a few) with ``blocks`` (default: all of
    the model's, whose layers must hold their native layout) run in C; anything else it hands
    to the model."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None) -> None:
        self.model, self.cfg, self.modules = model, model.config, blocks
        self._build()

    def _build(self) -> None:
        self._held: list[torch.Tensor] = []  # what the structures point into
        self.blocks = [_block(b, self._held) for b in (self.model.h if self.modules is None
                                                       else self.modules)]
        self.array = (_Block * len(self.blocks))(*self.blocks)
        lib = native.library()
        self.fn, self.step_fn = lib.gptcli_block, lib.gptcli_step
        self.fn.argtypes, self.fn.restype = _ARGS, ctypes.c_int
        self.step_fn.argtypes, self.step_fn.restype = _STEP_ARGS, ctypes.c_int
        # the output matrix (and the final norm) where C can run it: its native layout packed
        self.head_layer, self.head, self.norm = None, None, (None, None, 0.0)
        head, ln = self.model.lm_head, self.model.ln_f
        if self.modules is None and isinstance(head, KernelLinear) and head.mode in NATIVE and \
                head.n_in == self.cfg.n_embd and \
                any(k.name == NATIVE[head.mode] for k in head.kernels.values()):
            w, b = native._f32(ln.weight), native._f32(ln.bias)
            self._held.extend(t for t in (w, b) if t is not None)
            self.head_layer, self.head = head, _linear(head, self._held)
            self.norm = (w.data_ptr(), None if b is None else b.data_ptr(), ln.eps)

    def __getstate__(self) -> dict:  # a copy of the model (deepcopy) points into its own
        return {"model": self.model, "cfg": self.cfg, "modules": self.modules}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.blocks = None  # built at the first call: the copied model may not be whole yet

    def cache_dtype(self, positions: int) -> torch.dtype:
        """The KV cache this step reads fastest for steps of ``positions`` positions in all
        (rows times positions a row; the decode engine's choice): fp16 where the model rounds
        keys and values to it (a quantized model's attention) and such steps run here
        (``native.ROWS_MAX`` at most), else float32 (torch's attention, which the others run,
        would widen an fp16 cache at every step)."""
        return cache_dtype(self.model, positions)

    def _kv(self, k: torch.Tensor) -> int:
        """native.c's kv for a cache whose keys are ``k``: 2 fp16, 1 float32 rounded to fp16,
        0 float32."""
        return 2 if k.dtype == torch.float16 else int(self.model.h[0].attn.kv_dtype is not None)

    def run(self, i: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
            positions: int = 1) -> None:
        """Block ``i`` on ``x`` (R * positions, C) float32 contiguous (each row's positions in
        turn), in place; its keys and values (R, nh, max_len, hs), each row's contiguous,
        written from ``pos`` on."""
        cfg = self.cfg
        if self.blocks is None:
            self._build()
        _check(self.fn(ctypes.byref(self.blocks[i]), x.data_ptr(), x.size(0) // positions,
                       positions, cfg.n_embd, cfg.n_head, pos, k.data_ptr(), v.data_ptr(),
                       k.stride(0), k.size(2), self._kv(k), torch.get_num_threads()))

    def _fits(self, idx: torch.Tensor, kv_cache: KVCache | None, start_pos, kwargs) -> bool:
        if set(kwargs) - {"last_only"} or kv_cache is None or kv_cache.static or idx.dim() != 2 or \
                not 0 < idx.numel() <= native.ROWS_MAX or isinstance(start_pos, torch.Tensor) or \
                self.model.device.type != "cpu":
            return False
        k, v, cfg = kv_cache.k[0], kv_cache.v[0], self.cfg  # (every layer's alike)
        return start_pos + idx.size(1) <= min(kv_cache.max_len, cfg.context_length) and \
            k.dtype is v.dtype in {torch.float32, self.cache_dtype(1)} and \
            k.device.type == "cpu" and \
            k.shape == v.shape == (idx.size(0), cfg.n_head, k.size(2), cfg.head_size) and \
            k.stride() == v.stride() and k.stride()[1:] == (k.size(2) * k.size(3), k.size(3), 1)

    def __call__(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                 start_pos: int | torch.Tensor = 0, last_only: bool = False,
                 **kwargs) -> torch.Tensor:
        """The model's forward: a one-token step, or a few positions a row (a draft's tokens
        checked: ``native.ROWS_MAX`` positions in all at most); anything else the model's."""
        if not self._fits(idx, kv_cache, start_pos, kwargs):
            return self.model(idx, kv_cache=kv_cache, start_pos=start_pos, last_only=last_only,
                              **kwargs)
        model, (rows, t) = self.model, idx.shape
        x = model.wte(idx).to(torch.float32)  # (R, T, C)
        if self.cfg.position == "learned":
            x = x + model.wpe.weight[start_pos:start_pos + t]
        else:
            from .model import sinusoidal_positions
            x = x + sinusoidal_positions(torch.arange(start_pos, start_pos + t), self.cfg.n_embd)
        x = x.reshape(rows * t, -1).contiguous()
        if self.blocks is None:
            self._build()
        out = 1 if last_only else t  # positions a row whose logits are asked for
        head = model.lm_head
        if head is self.head_layer and head.for_rows(rows * out).name == NATIVE[head.mode]:
            logits = torch.empty(rows, out, head.n_out)
            self.steps(x, kv_cache, start_pos, t, logits)
            return logits
        self.steps(x, kv_cache, start_pos, t)
        x = x.view(rows, t, -1)
        return head(model.ln_f(x[:, -1:] if last_only else x))  # (R, T or 1, V)

    def steps(self, x: torch.Tensor, kv_cache: KVCache, pos: int, positions: int,
              logits: torch.Tensor | None = None) -> None:
        """Every block on ``x`` (R * positions, C) as ``run`` does one, in one C call; with
        ``logits`` (R, 1 or positions, V), then the final norm and the output matrix (its native
        layout) of each row's last position or of all, written there."""
        k, rows = kv_cache.k[0], x.size(0) // positions
        pointers = ctypes.c_void_p * len(self.blocks)
        _check(self.step_fn(self.array, len(self.blocks), x.data_ptr(), rows, positions,
                            self.cfg.n_embd, self.cfg.n_head, pos,
                            pointers(*(c.data_ptr() for c in kv_cache.k)),
                            pointers(*(c.data_ptr() for c in kv_cache.v)), k.stride(0), k.size(2),
                            self._kv(k), *self.norm,
                            None if logits is None else ctypes.byref(self.head),
                            int(logits is not None and logits.size(1) == 1),
                            None if logits is None else logits.data_ptr(),
                            torch.get_num_threads()))


# ----------------------------------------------------------------------------- choosing

def _time_blocks(model: nn.Module, step: BlockStep, count: int, rows: int) -> tuple[float, float]:
    """Microseconds per block of the model's first ``count`` blocks, then of ``step``'s, on the
    same inputs (``ROUNDS`` alternating rounds, the fastest of each), each reading the KV cache
    decoding would give it (float32, or fp16 for the C blocks of a quantized model)."""
    cfg, gen = model.config, torch.Generator().manual_seed(0)
    cache = KVCache.for_model(cfg, rows, max_len=POSITION + 1)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    ours = KVCache.for_model(cfg, rows, max_len=POSITION + 1, dtype=step.cache_dtype(rows))
    for t, mine in zip((*cache.k, *cache.v), (*ours.k, *ours.v)):
        mine.copy_(t)
    x = torch.randn(rows, cfg.n_embd, generator=gen)
    best = [math.inf, math.inf]
    with torch.inference_mode():
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            h = x[:, None]
            for block in model.h[:count]:
                h = block(h, kv_cache=cache, start_pos=POSITION)[0]
            best[0] = min(best[0], time.perf_counter() - t0)
            t0 = time.perf_counter()
            h = x.clone()
            for i in range(count):
                step.run(i, h, ours.k[i], ours.v[i], POSITION)
            best[1] = min(best[1], time.perf_counter() - t0)
    return best[0] / count * 1e6, best[1] / count * 1e6


def _measured_blocks(model: nn.Module) -> int:
    """How many blocks to time: enough that their weights do not fit in the last-level cache
    twice over (so they are read from memory, as in decoding), at most all of them."""
    per_block = sum(layer.n_in * layer.n_out * BYTES[layer.mode] for layer in
                    (model.h[0].get_submodule(n) for n in PROJECTIONS))
    cache = hardware.cpu_cache_bytes() or 32 * 2 ** 20
    return max(1, min(len(model.h), math.ceil(2 * cache / per_block)))


def attach(model: nn.Module, rows: tuple[int, ...], storages: dict[str, dict],
           forced: str | None, steps: bool = True) -> None:
    """Give ``model`` a ``decode_step`` running its blocks in C where that measured faster (or
    ``forced`` is "fused"), and say in ``model.fused_choice`` what was chosen and why; see the
    module docstring. ``storages``: each layer's storage by module path, to pack the native
    layouts from; ``steps`` False: no decode steps (a compiled step, or whole texts scored).
    Where the C blocks fail in any way the model's own serve, but for --kernel fused: a
    UserError."""
    if hasattr(model, "decode_step"):  # prepared again: chosen again
        del model.decode_step
    if forced == "fused" and not steps:
        raise UserError("--kernel fused runs decode steps in C, which a compiled step "
                        "(--compile) and whole-text scoring do not take; leave it out")
    try:
        choice = _decide(model, rows, storages, forced, steps)
        if choice["fused"]:
            _switch(model, storages)
    except Exception as e:  # noqa: BLE001 - the model's own blocks serve
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if forced == "fused":
            raise UserError(f"kernel fused does not run here ({reason}); leave out --kernel "
                            "fused") from None
        choice = {"fused": False, "why": f"the C blocks failed: {reason}"}
    model.fused_choice = choice


def _decide(model: nn.Module, rows: tuple[int, ...], storages: dict[str, dict],
            forced: str | None, steps: bool) -> dict:
    """Whether to run the blocks in C, and why: measured (or cached), forced, or not possible."""
    if not steps:
        return {"fused": False, "why": "no decode steps asked for (a compiled step, or "
                                       "whole texts scored)"}
    if forced not in (None, "fused"):
        return {"fused": False, "forced": True}  # another kernel, as asked
    why = why_not(model)
    if why is None and any(f"h.{i}.{n}" not in storages for i in range(len(model.h))
                           for n in PROJECTIONS):
        why = "the model was prepared before"
    if why is None and forced is None and max(rows) > native.ROWS_MAX:
        why = f"prepared for batches over {native.ROWS_MAX} rows, which the C blocks do not take"
    if why is not None:
        if forced == "fused":
            raise RuntimeError(why)
        return {"fused": False, "why": why}
    if forced == "fused":
        return {"fused": True, "forced": True}
    cfg, layers = model.config, [b.get_submodule(n) for b in model.h for n in PROJECTIONS]
    rows = tuple(dict.fromkeys(rows))
    key = {**tuning.machine(), "step": "fused", "mode": layers[0].mode, "rows": list(rows),
           "kv": [str(cache_dtype(model, m)).removeprefix("torch.") for m in rows],
           "shape": [cfg.n_layer, cfg.n_embd, cfg.n_head], "bias": cfg.bias,
           "layers": sorted({k.name for m in layers for r, k in m.kernels.items() if r in rows})}
    entry = tuning.find(tuning.read_cache(), key, ("fused", "us"), tuning.current_load())
    if entry is None or not (isinstance(entry["fused"], bool) and isinstance(entry["us"], dict)):
        count = _measured_blocks(model)  # (an entry not as we write it: measured again)
        threads = torch.get_num_threads()
        step = BlockStep(model, [_native_copy(b, threads, storages, i)
                                 for i, b in enumerate(model.h[:count])])
        load = tuning.current_load()
        times, queued = tuning.undisturbed(lambda: [_time_blocks(model, step, count, m)
                                                    for m in rows])
        us = {"layers": sum(t[0] for t in times), "fused": sum(t[1] for t in times)}
        entry = {"fused": us["fused"] < us["layers"],
                 "us": {k: round(v, 1) for k, v in us.items()}, **tuning.when(load, queued)}
        tuning.store(key, entry)
    return {"fused": entry["fused"], "us": entry["us"]}


def _switch(model: nn.Module, storages: dict[str, dict]) -> None:
    """The blocks' layers to their native kernel (every decoding row count; prompts: the fastest
    of its layout timed for them), and the C step on."""
    threads = torch.get_num_threads()
    for i, block in enumerate(model.h):
        for n in PROJECTIONS:
            layer = block.get_submodule(n)
            kernel, choices = KERNELS[NATIVE[layer.mode]], getattr(layer, "choices", {})
            # (prompts, which the C blocks do not take: the fastest timed for them of the native
            # layout, as precise as the native kernel)
            want = {m: KERNELS[tuning.fastest(choices[m].us, kernel.layout, kernel.tolerance)
                               or kernel.name] if m in choices and choices[m].prompt else kernel
                    for m in layer.kernels}
            if any(want[m] is not k for m, k in layer.kernels.items()):
                layer.use(want, threads, storages[f"h.{i}.{n}"])
            layer.choices = {m: replace(c, kernel=want.get(m, kernel)) if c.prompt else
                             replace(c, kernel=kernel, source="fused")
                             for m, c in choices.items()}  # (prompts: not by the C blocks)
    model.decode_step = BlockStep(model)


def _native_copy(block: nn.Module, threads: int, storages: dict, i: int) -> nn.Module:
    """A stand-in for ``block`` whose projections hold their native layout (for timing)."""
    stand_in = nn.Module()
    stand_in.ln_1, stand_in.ln_2 = block.ln_1, block.ln_2
    for n in PROJECTIONS:
        layer, kernel = block.get_submodule(n), KERNELS[NATIVE[block.get_submodule(n).mode]]
        copy = layer if all(k.layout == kernel.layout for k in layer.kernels.values()) else \
            tuning.packed_layer(kernel, storages[f"h.{i}.{n}"], 1, threads)
        parent, _, child = n.rpartition(".")
        if not hasattr(stand_in, parent):
            setattr(stand_in, parent, nn.Module())
        setattr(stand_in.get_submodule(parent), child, copy)
    return stand_in
