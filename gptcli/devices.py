"""The one device resolver: device and dtype names to torch objects, autocast, clocks, seeds.

torch is imported inside functions so that the CLI can import this module (for its choices)
without paying for torch at start-up.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``; ``auto`` picks cuda > mps > cpu."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                "device 'cuda' is not available on this machine (no CUDA GPU or a CPU-only "
                "torch build); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device {name!r} does not exist: this machine has {count} CUDA device(s)"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UserError(
                "device 'mps' is not available (it needs Apple silicon and a macOS torch build); "
                "use --device cpu or --device auto"
            )
        return device
    raise UserError(f"unsupported device {name!r}; use {DEVICE_CHOICES}")


# Training in bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16, AMX), against
# float32, measured on an AMD EPYC (Zen 4, avx512_bf16, one thread): 1.3x the tokens/s at width
# 192, 1.4x at 256, 1.6x for the small preset (384), at the same validation loss; but 0.9-1.0x at
# the tiny preset's width 128, whose matmuls are too small to pay for the casts. So `auto` picks
# bf16 there from this width on.
CPU_BF16_MIN_WIDTH = 192


def cpu_bf16_isa() -> str | None:
    """The instruction set with which this CPU multiplies bf16 matrices natively (``amx_bf16``
    or ``avx512_bf16``, as cpuinfo names them), or None."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # cpuinfo's flags
    if capabilities is not None:
        flags = capabilities()
        return next((isa for isa in ("amx_bf16", "avx512_bf16") if flags.get(isa)), None)
    try:  # older torch: the kernel's list, on Linux
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return None
    return next((isa for isa in ("amx_bf16", "avx512_bf16") if isa in flags), None)


def resolve_dtype(name: str, device: torch.device, *, train_width: int | None = None
                  ) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that support it, and for training (``train_width``: the
    model's n_embd) on CPUs that compute bf16 natively, from ``CPU_BF16_MIN_WIDTH`` on; else
    float32 (inference on a CPU stays float32)."""
    import torch

    name = (name or "auto").strip().lower()
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and train_width is not None and \
                train_width >= CPU_BF16_MIN_WIDTH and cpu_bf16_isa() is not None:
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPE_CHOICES)}")
    dtype = table[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("float16 is not supported on the CPU; use --dtype bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for bf16/fp16 (weights stay float32); nothing for float32."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware behind ``device``."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (mps)"
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (needed before reading a clock)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
