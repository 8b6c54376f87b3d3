"""gptcli's own C products (``native.c``), compiled on the user's machine at first use.

Decoding multiplies one to a few rows by each weight matrix, so a product is a matter of reading
the weights once, as fast as memory gives them: ``native.c`` reads each output row's weights in
memory order for all rows of ``x`` together, split over threads by OpenMP, with vector code for
AVX-512 (VNNI) and AVX2 and plain loops elsewhere (built with ``-march=native``, so the compiler
vectorizes those as it can for the CPU it runs on). Its kernels
(``kernels.py``: native, bf16-native, int8-native, int4-native) are candidates like the others:
the tuner times them against torch's and keeps whichever is fastest on this machine.

The library is built with the C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$GPTCLI_HOME/native/``, named by a hash of the source, the compiler and its flags and the CPU,
so it is built once per machine. A compiler that refuses a set of flags (``FLAG_SETS``: no
OpenMP, then the kernels run on one thread) is not asked again with them (a ``.failed`` note
beside it). Where no compiler works, the kernels are skipped with the reason, and torch's
kernels serve: nothing else needs a compiler. Calls go through ``ctypes`` (which lets go of
the GIL while they run).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import hardware
from .store import gptcli_home

SOURCE = Path(__file__).with_name("native.c")
# tried in order: vectorized for this CPU with OpenMP threads, then without OpenMP (a compiler
# without it, e.g. Apple's clang: one thread), then without -march=native
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
ROWS_MAX = 8  # more rows than this (a prompt): torch's product where it is faster (kernels.py)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {"gptcli_int8": [_P, _I64, _I64, _P, _P, _P, _P, _I64, _INT],
              "gptcli_bf16": [_P, _I64, _I64, _P, _P, _P, _I64, _INT],
              "gptcli_f32": [_P, _I64, _I64, _P, _P, _P, _I64, _INT],
              "gptcli_int4": [_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _INT],
              "gptcli_int4_unpack": [_P, _P, _P, _I64, _I64, _P, _INT],
              "gptcli_argmax": [_P, _I64, _I64, _I64, _P],
              "gptcli_f16": [_P, _I64, _P]}

_loaded: ctypes.CDLL | None = None
_failed: str | None = None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


class BuildError(RuntimeError):
    """The compiler failed; ``refused``: its message names one of the flags (it does not take
    them: not worth asking again), rather than something passing (a full disk, say)."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def _target(cc: str, flags: list[str], source: bytes) -> Path:
    """Where the library for this source, compiler, flags and CPU lives."""
    try:
        version = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    what = repr((source, cc, version, flags, hardware.cpu_model(), hardware.isa_flags()))
    return gptcli_home() / "native" / f"gptcli-{hashlib.sha256(what.encode()).hexdigest()[:16]}.so"


def _build(cc: str, flags: list[str], target: Path) -> None:
    """Compile ``native.c`` into ``target``, atomically (a half-written library is never left
    where the next run would load it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([*shlex.split(cc), *flags, "-shared", "-fPIC", "-o", tmp,
                               str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or ["failed"]
            line = next((ln for ln in lines if "error" in ln.lower()), lines[0])
            raise BuildError(f"{cc} {' '.join(flags)}: {line.strip()[:120]}",
                             refused=any(f.lstrip("-").split("=")[0] in done.stderr
                                         for f in flags[1:]))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """The compiled library, built at the first call of a process that finds none for this
    machine; RuntimeError with the reason where it cannot be built (then at every call)."""
    global _loaded, _failed
    if _loaded is not None:
        return _loaded
    if _failed is not None:
        raise RuntimeError(_failed)
    cc = compiler()
    reasons = []
    if cc is None or not shlex.split(cc) or shutil.which(shlex.split(cc)[0]) is None:
        reasons.append(f"no C compiler {cc!r} found (set $CC)" if cc else
                       "no C compiler found (set $CC)")
    else:
        source = SOURCE.read_bytes()
        for flags in FLAG_SETS:
            target = _target(cc, flags, source)
            refused = target.with_suffix(".failed")  # this compiler refused these flags
            if refused.exists():
                reasons.append(refused.read_text(errors="replace")[:200])
                continue
            try:
                if target.exists():
                    try:
                        _loaded = _load(target)
                        return _loaded
                    except (OSError, AttributeError):  # damaged: build it again
                        target.unlink(missing_ok=True)
                _build(cc, flags, target)
                _loaded = _load(target)
                return _loaded
            except BuildError as e:
                reasons.append(str(e))
                if e.refused:  # the compiler does not take these flags: not asked again
                    try:
                        refused.write_text(str(e))
                    except OSError:
                        pass
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                reasons.append(str(e).strip().splitlines()[0] if str(e).strip() else
                               type(e).__name__)
    _failed = "gptcli's C kernels could not be built: " + "; ".join(reasons)
    raise RuntimeError(_failed)


def unavailable() -> str | None:
    """None where the library loads (building it if need be), else why it cannot."""
    try:
        library()
    except RuntimeError as e:
        return str(e)
    return None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as float32 and contiguous, converted only where it is not (decoding calls these
    products ~50 times a token: every microsecond around the C call counts)."""
    if t is None or (t.dtype is torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    """What the C reads through a bare pointer must be what it expects, or it reads past it."""
    if t.dtype is not dtype or t.shape != shape or not t.is_contiguous():
        raise ValueError(f"gptcli's C product needs a contiguous {dtype} {tuple(shape)} tensor, "
                         f"not {t.dtype} {tuple(t.shape)}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(fn, x: torch.Tensor, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
         N: int) -> torch.Tensor:
    """Call the C product ``fn`` on ``x`` (M, K), the ``weights`` buffers (checked by the caller)
    and ``bias`` (N,): a new (M, N) float32 tensor."""
    if bias is not None:
        _check(bias, torch.float32, (N,))
    (M, K), y = x.shape, torch.empty(x.size(0), N, dtype=torch.float32)
    if fn(x.data_ptr(), M, K, *(w.data_ptr() for w in weights), _ptr(bias), y.data_ptr(), N,
          torch.get_num_threads()):
        raise MemoryError("gptcli's C kernel ran out of memory")
    return y


def int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` (M, K) times int8 ``q`` (N, K) with ``scale`` (N,) per row, plus ``bias``:
    (M, N) float32, activations rounded to 15 bits per row."""
    x, scale = _f32(x), _f32(scale)
    N = q.size(0)
    _check(q, torch.int8, (N, x.size(1)))
    _check(scale, torch.float32, (N,))
    return _run((_loaded or library()).gptcli_int8, x, (q, scale), _f32(bias), N)


def int4_product(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` (M, K) times 4-bit weights: ``packed`` (N, K / 2) uint8, two per byte (see
    ``native.c``), ``w = q * scale + low`` with fp16 ``scale``, ``low`` (N, K / 32) per group
    of 32 inputs; plus ``bias``: (M, N) float32, activations rounded to 15 bits per row."""
    x = _f32(x)
    K, N = x.size(1), packed.size(0)
    if K % 32:
        raise ValueError(f"4-bit weights come in whole groups of 32 inputs, not {K}")
    _check(packed, torch.uint8, (N, K // 2))
    _check(scale, torch.float16, (N, K // 32))
    _check(low, torch.float16, (N, K // 32))
    return _run((_loaded or library()).gptcli_int4, x, (packed, scale, low), _f32(bias), N)


def int4_unpacked(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The 4-bit weights of ``int4_product`` as a new float32 (N, K) tensor."""
    (N, half), K = packed.shape, 2 * packed.size(1)
    if K % 32:
        raise ValueError(f"4-bit weights come in whole groups of 32 inputs, not {K}")
    _check(packed, torch.uint8, (N, half))
    _check(scale, torch.float16, (N, K // 32))
    _check(low, torch.float16, (N, K // 32))
    w = torch.empty(N, K, dtype=torch.float32)
    (_loaded or library()).gptcli_int4_unpack(packed.data_ptr(), scale.data_ptr(),
                                              low.data_ptr(), N, K, w.data_ptr(),
                                              torch.get_num_threads())
    return w


def float_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` (M, K) times ``w`` (N, K) in bf16 or float32, plus ``bias``: (M, N) float32, summed
    in float32."""
    if w.dtype not in (torch.float32, torch.bfloat16):  # (the tuner skips it for this model)
        raise TypeError(f"gptcli's C product takes float32 or bf16 weights, not {w.dtype}")
    lib = _loaded or library()
    x = _f32(x)
    _check(w, w.dtype, (w.size(0), x.size(1)))
    return _run(lib.gptcli_bf16 if w.dtype is torch.bfloat16 else lib.gptcli_f32, x, (w,),
                _f32(bias), w.size(0))


def argmax(scores: torch.Tensor) -> torch.Tensor | None:
    """Each row's index of its largest value (the first of equal ones) for float32 ``scores``
    (B, V) on a CPU: one C call, where a decoded token's Python is slow (the weights streamed
    through the caches leave it cold: ~0.1 ms for torch's checks and numpy's argmax, against
    ~25 µs warm). None where the library is not loaded (this never builds it), for other
    tensors, and where a row holds a NaN or no finite maximum (``sampling.usable``'s cases)."""
    if _loaded is None or scores.device.type != "cpu" or scores.dtype is not torch.float32 or \
            scores.dim() != 2 or scores.stride(-1) != 1 or scores.size(-1) == 0:
        return None
    out = torch.empty(scores.size(0), dtype=torch.int64)
    if _loaded.gptcli_argmax(scores.data_ptr(), scores.size(0), scores.size(1),
                             scores.stride(0), out.data_ptr()):
        return None
    return out


def to_f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 as the C blocks write keys and values into an fp16 cache."""
    x = _f32(x)
    out = torch.empty(x.shape, dtype=torch.float16)
    (_loaded or library()).gptcli_f16(x.data_ptr(), x.numel(), out.data_ptr())
    return out
