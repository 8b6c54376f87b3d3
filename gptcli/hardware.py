"""What the hardware can do: dense peak throughput and memory bandwidth of common accelerators,
from their datasheets, for MFU and bandwidth-use figures (unknown stays unknown: a lookup that
finds nothing returns None, never a guess); the memory available on a device and what training
or generation will ask of it, so commands refuse a shape that cannot fit before allocating it."""

from __future__ import annotations

import mmap
import platform
import re
import threading
import time

import torch

from .config import ModelConfig
from .devices import device_name
from .errors import UserError

# Dense (no 2:4 sparsity) peak tensor throughput in TFLOPs, from the vendors' datasheets /
# architecture whitepapers: NVIDIA H100 and H200 datasheets (SXM, PCIe, NVL), the A100, A10 and L4
# datasheets, the Ada (RTX 4090) and Ampere GA102 (RTX 3090) whitepapers. bf16/fp16 are with fp32
# accumulation (what PyTorch uses): on GeForce cards that is half the fp16-accumulate figure that
# marketing quotes (RTX 4090: 165.2 not 330.3; RTX 3090: 71 not 142). "tf32" is float32 matmuls
# when torch allows TF32; "fp32" is plain float32 (CUDA cores). Patterns are matched against
# torch.cuda.get_device_name, first match wins. A10G (AWS) and Apple GPUs are left out: their
# figures are not published per chip (Apple: per GPU core count), so MFU needs --peak-tflops.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*NVL", "H100 NVL", {"bf16": 835, "tf32": 418, "fp32": 60}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756, "tf32": 378, "fp32": 51}),
    (r"H100", "H100 SXM", {"bf16": 989, "tf32": 494, "fp32": 67}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835, "tf32": 418, "fp32": 60}),
    (r"H200", "H200 SXM", {"bf16": 989, "tf32": 494, "fp32": 67}),
    (r"\bA100\b", "A100", {"bf16": 312, "tf32": 156, "fp32": 19.5}),
    (r"\bA10\b", "A10", {"bf16": 125, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL4\b", "L4", {"bf16": 121, "tf32": 60, "fp32": 30.3}),
    (r"RTX 4090(?! D)", "RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090(?! Ti)", "RTX 3090", {"bf16": 71, "tf32": 35.6, "fp32": 35.6}),
]

# Peak memory bandwidth in GB/s (10^9 bytes/s), same sources; Apple from its chip pages (only chips
# with a single memory configuration; M3 Max / M4 Max vary with the model).
BANDWIDTH_GBS: list[tuple[str, str, float]] = [
    (r"H100.*NVL", "H100 NVL", 3900), (r"H100.*PCIe", "H100 PCIe", 2000),
    (r"H100", "H100 SXM", 3350), (r"H200", "H200", 4800),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", 1935), (r"A100.*80GB", "A100 80GB SXM", 2039),
    (r"A100", "A100 40GB", 1555), (r"\bA10\b", "A10", 600), (r"\bL4\b", "L4", 300),
    (r"RTX 4090(?! D)", "RTX 4090", 1008), (r"RTX 3090(?! Ti)", "RTX 3090", 936),
    (r"Apple M1 Ultra", "M1 Ultra", 800), (r"Apple M1 Max", "M1 Max", 400),
    (r"Apple M1 Pro", "M1 Pro", 200), (r"Apple M1$", "M1", 68.25),
    (r"Apple M2 Ultra", "M2 Ultra", 800), (r"Apple M2 Max", "M2 Max", 400),
    (r"Apple M2 Pro", "M2 Pro", 200), (r"Apple M2$", "M2", 100),
    (r"Apple M3 Pro", "M3 Pro", 150), (r"Apple M3$", "M3", 100),
    (r"Apple M4 Pro", "M4 Pro", 273), (r"Apple M4$", "M4", 120),
]


def hardware_name(device: torch.device) -> str:
    """The device's name as the tables below match it (the chip, for Apple GPUs)."""
    name = device_name(device) if device.type != "cpu" else cpu_model()
    if device.type == "mps" and platform.system() == "Darwin":
        import subprocess

        try:  # e.g. "Apple M2 Pro": the chip, which fixes its memory bandwidth
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=5).stdout.strip() or name
        except OSError:
            pass
    return name


def peak_tflops(device: torch.device, dtype: torch.dtype, hw: str) -> tuple[float | None, str]:
    """(dense peak TFLOPs for ``dtype`` or None, where the figure comes from)."""
    if device.type != "cuda":
        return None, f"unknown for {hw}; pass --peak-tflops"
    key = "bf16" if dtype in (torch.bfloat16, torch.float16) else (
        "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, hw):
            return float(peaks[key]), f"{label} {key} dense (datasheet)"
    return None, f"unknown for {hw}; pass --peak-tflops"


def peak_bandwidth(device: torch.device, hw: str) -> tuple[float | None, str]:
    if device.type == "cpu":
        return None, "unknown for CPUs; pass --bandwidth-gbs"
    for pattern, label, gbs in BANDWIDTH_GBS:
        if re.search(pattern, hw):
            return float(gbs), f"{label} (datasheet)"
    return None, f"unknown for {hw}; pass --bandwidth-gbs"


# ----------------------------------------------------------------------------- measured ceilings

def _best_time(fn, device: torch.device, repeats: int) -> float:
    from .devices import synchronize

    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable dense matmul throughput in TFLOP/s: the best of a few large square matmuls in
    ``dtype`` (a ceiling for MFU where no datasheet figure applies). About a second on a CPU."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _best_time(lambda: a @ b, device, repeats=3) / 1e12


def measure_bandwidth(device: torch.device) -> float:
    """Achievable memory read bandwidth in GB/s: the best of a few reductions over a buffer far
    larger than any cache (what a decode step does to its weights)."""
    size = 1 << 30 if device.type != "cpu" else 512 << 20
    available = available_memory(device)
    if available is not None:
        size = max(64 << 20, min(size, available // 4))
    x = torch.ones(size // 4, device=device)
    return size / _best_time(lambda: x.sum(), device, repeats=5) / 1e9


def cpu_cache_bytes() -> int | None:
    """The size of the CPU's largest cache (the last level, shared), from sysfs on Linux."""
    import glob

    sizes = []
    for folder in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            text = open(f"{folder}/size").read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def queued_ns() -> int | None:
    """How long this process's threads have waited for a CPU while ready to run, in all (ns;
    Linux's ``/proc/self/task/*/schedstat``; None elsewhere): the time other programs took
    from them. (A thread that ended takes its share with it.)"""
    import glob

    total, found = 0, False
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[1])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


# ----------------------------------------------------------------------------- the CPU

# Instruction-set flags that decide which CPU kernels exist or pay (/proc/cpuinfo's names):
# native bf16 (avx512_bf16, amx_bf16; Arm bf16), fp16 (avx512_fp16, amx_fp16, avx_ne_convert;
# Arm fphp/asimdhp), int8 dot products (avx512_vnni, avx_vnni, amx_int8; Arm asimddp, i8mm).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_bf16",
             "amx_fp16", "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "fphp", "asimdhp",
             "sve", "sve2")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), e.g. "AMD EPYC"."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("cpu model") or info.get("hardware")
    if not name and "cpu part" in info:  # Arm: implementer and part numbers
        name = f"Arm implementer {info.get('cpu implementer', '?')} part {info['cpu part']}"
    return name or platform.processor() or platform.machine() or "unknown CPU"


def isa_flags() -> list[str]:
    """The flags of ``ISA_FLAGS`` this CPU has (x86 "flags", Arm "features")."""
    info = _cpuinfo()
    have = set((info.get("flags") or info.get("features") or "").split())
    return [f for f in ISA_FLAGS if f in have]


# ----------------------------------------------------------------------------- memory

def available_memory(device: torch.device) -> int | None:
    """Bytes the benchmark may allocate on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory()) - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every platform (macOS lacks it)
        return None


def train_memory_breakdown(config: ModelConfig, batch: int, dtype: torch.dtype, *,
                           trainable: int | None = None, extra_params: int = 0,
                           grad_checkpoint: bool = False) -> dict[str, int]:
    """Rough bytes a training step needs, by what holds them: ``weights`` (fp32, the model's
    and ``extra_params`` such as LoRA adapters), ``gradients`` (fp32, of the ``trainable``
    parameters: all of them by default), ``optimizer`` (AdamW's two fp32 moments of the
    trainable ones) and ``activations``: ~34 bytes per layer, token and channel at 2-byte
    precision (Korthikanti et al. 2022, with fused attention), only the blocks' inputs plus one
    block's with gradient checkpointing, and the logits in the autocast dtype plus float32 for
    the loss. Frozen layers keep their activations: gradients flow through them."""
    act = torch.empty((), dtype=dtype).element_size()
    tokens = batch * config.context_length
    trainable = config.num_params() + extra_params if trainable is None else trainable
    per_block = tokens * config.n_embd * 17 * act
    blocks = config.n_layer * per_block if not grad_checkpoint else \
        config.n_layer * tokens * config.n_embd * act + per_block
    return {"weights": 4 * (config.num_params() + extra_params), "gradients": 4 * trainable,
            "optimizer": 8 * trainable,
            "activations": blocks + tokens * config.vocab_size * (act + 8)}


def train_memory_estimate(config: ModelConfig, batch: int, dtype: torch.dtype,
                          **options) -> int:
    """The total of ``train_memory_breakdown`` (same options)."""
    return sum(train_memory_breakdown(config, batch, dtype, **options).values())


def generate_memory_estimate(config: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    cache = 2 * config.n_layer * batch * config.context_length * config.n_embd * size
    return config.num_params() * size + cache + 4 * batch * config.vocab_size * 4


GiB = 1024 ** 3


def peak_memory(device: torch.device, sampled: int = 0) -> int:
    """CUDA: max allocated since the phase began. MPS: the largest allocation seen after each
    step (torch.mps has no peak counter). CPU: the process's max RSS, since it started: on
    Linux its VmHWM, since ru_maxrss also counts the parent's peak from before the exec (a
    sweep's points would all show the sweep's own peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return max(sampled, torch.mps.current_allocated_memory())
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def check_memory(need: int, device: torch.device, what: str, hint: str) -> None:
    """Refuse, before allocating anything, a job whose estimate exceeds the device's available
    memory: ``what`` says what needs it, ``hint`` how to ask for less."""
    available = available_memory(device)
    if available is not None and need > available:
        raise UserError(f"{what} needs about {need / GiB:,.1f} GiB; {device.type} has "
                        f"{available / GiB:,.1f} GiB available. {hint}")


HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 Linux kernels
CHUNK = 32 << 20  # tensors under this share areas of this size (int4's matrices are ~1 MB)
SMALL = 64 << 10  # tensors under this stay where they are
_area: list = [None, 0]  # the area being filled, and how much of it is taken
_area_lock = threading.Lock()


def _new_area(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of private memory starting on a 2 MB boundary, advised for huge pages."""
    try:
        area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return None
    raw = torch.frombuffer(area, dtype=torch.uint8)  # (keeps the mapping alive)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (a CPU tensor of 64 KB or more) in memory that Linux is asked to back
    with transparent huge pages, else ``t`` itself. Decoding streams every weight once a token:
    with 4 KB pages that is a TLB miss every 4 KB, and the hardware prefetchers stop at each
    page's end. On a Zen 4 (THP "madvise", as on Ubuntu) a half or int8 token took 1.03-1.14x
    less time with its weights so held, by run (README). Tensors under ``CHUNK``
    share areas of that size (an area lives while any tensor in it does); where the kernel says
    no or THP is off, the copy is plain memory, as before."""
    nbytes = t.numel() * t.element_size()
    if nbytes < SMALL or t.device.type != "cpu" or t.layout is not torch.strided or \
            not t.is_contiguous() or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    if nbytes >= CHUNK:
        room = _new_area(nbytes)
    else:
        with _area_lock:
            if _area[0] is None or _area[1] + nbytes > CHUNK:
                _area[:] = [_new_area(CHUNK), 0]
            room = None if _area[0] is None else _area[0][_area[1]:_area[1] + nbytes]
            _area[1] += -(-nbytes // 4096) * 4096  # (the next tensor on a 4 KB boundary)
    if room is None:
        return t
    copy = room.view(t.dtype).view(t.shape)
    copy.copy_(t)
    return copy
