"""Errors, device and dtype resolution, seeding.

torch is imported inside functions so that the CLI can import the error types without paying
for torch at start-up.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class GptcliError(Exception):
    """An error meant for the user: printed as one line, never as a traceback."""

    exit_code = 1


class UserError(GptcliError):
    """Bad usage or bad input (exit status 2)."""

    exit_code = 2


class RuntimeFailure(GptcliError):
    """Something failed while doing valid work (exit status 1)."""

    exit_code = 1


class Interrupted(GptcliError):
    """The user pressed Ctrl-C (exit status 130, as a shell reports SIGINT)."""

    exit_code = 130


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that support it, else float32."""
    import torch

    name = (name or "auto").strip().lower()
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
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


def gptcli_home() -> Path:
    """The local store: ``$GPTCLI_HOME`` or ``~/.cache/gptcli`` (models/ and datasets/ inside)."""
    return Path(os.environ.get("GPTCLI_HOME") or Path.home() / ".cache" / "gptcli")


def models_dir() -> Path:
    return gptcli_home() / "models"


def datasets_dir() -> Path:
    return gptcli_home() / "datasets"


def store_name(name: str) -> str:
    """File-system name for a model or dataset name: ``org/name`` -> ``org--name``."""
    return name.strip("/").replace("/", "--")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says a device (or the host) ran out of memory."""
    text = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or \
        "can't allocate memory" in text


def require(module: str, extra: str, *, needed_for: str = "this"):
    """Import an optional dependency, or fail with a message naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{needed_for} needs {module.split('.')[0]}, which is not installed; "
                        f'install it with pip install "gptcli[{extra}]"') from None


# errno values that mean the device or the disk failed, not the path the user gave
_DISK_ERRNOS = {"ENOSPC", "EDQUOT", "EIO", "EFBIG", "ENOMEM"}


def os_error_reason(e: OSError) -> str:
    """What went wrong, in words: "no space left on device", "permission denied", ..."""
    import errno as errno_mod

    name = errno_mod.errorcode.get(e.errno or 0, "")
    words = {"ENOENT": "it does not exist", "ELOOP": "it is a symbolic link loop",
             "ENOTDIR": "a part of the path is a file, not a folder",
             "EISDIR": "it is a folder", "EACCES": "permission denied",
             "EPERM": "permission denied", "EROFS": "the file system is read-only",
             "ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
             "ENAMETOOLONG": "the name is too long", "EEXIST": "it already exists"}
    if name in words:
        return words[name]
    return (e.strerror or str(e) or "input/output error").lower()


def path_error(e: OSError, doing: str, path=None, *, note: str = "") -> GptcliError:
    """An OSError on a user's path as one sentence: ``cannot <doing> <path>: <reason>[; note]``.
    A failing disk or device (or an error without an errno) is a runtime failure (exit 1);
    anything about the path is bad input (exit 2)."""
    import errno as errno_mod

    where = path if path is not None else (e.filename or "")
    text = f"cannot {doing} {where}: {os_error_reason(e)}" if where else \
        f"cannot {doing}: {os_error_reason(e)}"
    if note:
        text += f"; {note}"
    name = errno_mod.errorcode.get(e.errno or 0, "")
    return RuntimeFailure(text) if name in _DISK_ERRNOS or not name else UserError(text)


# How a command ends when the reader of its stdout goes away (`gpt ... | head`): quietly, with
# the status of a process ended by SIGPIPE, as other Unix tools end.
STDOUT_CLOSED = 141


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so no later write or the
    interpreter's final flush can complain."""
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def make_folder(path, doing: str, shown=None) -> None:
    """Create folder ``path`` (and its parents); a file in the way, or any other OS error, is
    one sentence: ``cannot <doing> <shown or path>: ...``."""
    import errno as errno_mod

    path = Path(path)
    shown = path if shown is None else shown
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                e = NotADirectoryError(errno_mod.ENOTDIR, "Not a directory", str(part))
                raise path_error(e, doing, shown)
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(e, doing, shown) from None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user
    counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_debug() -> bool:
    return os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")
