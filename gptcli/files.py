"""Files and processes: atomic writes, folders, text files named by a flag, a closed stdout, and
whether a process is alive. Every OS error on a user's path becomes one sentence
(``errors.path_error``)."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError, os_error_reason, path_error

# How a command ends when the reader of its stdout goes away (`gpt ... | head`): quietly, with
# the status of a process ended by SIGPIPE, as other Unix tools end.
STDOUT_CLOSED = 141


def silence_stdout(stream=None) -> None:
    """Point stdout (or ``stream``) at /dev/null once its reader is gone, so no later write or
    the interpreter's final flush can complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (stream or sys.stdout).fileno())
    except (OSError, ValueError):
        pass


def make_folder(path, doing: str, shown=None) -> None:
    """Create folder ``path`` (and its parents); a file in the way, or any other OS error, is
    one sentence: ``cannot <doing> <shown or path>: ...``."""
    path = Path(path)
    shown = path if shown is None else shown
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                e = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(part))
                raise path_error(e, doing, shown)
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # say which folder could not be made ("it does not exist" misleads)
        failed = Path(e.filename) if e.filename else path
        why = "the file system refused" if e.errno == errno.ENOENT else os_error_reason(e)
        reason = why if failed == Path(shown) else f"its folder {failed} cannot be created ({why})"
        raise path_error(e, doing, shown, reason=reason) from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *,
                 what: str = "file") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``. A failure at any point leaves whatever was at ``path`` untouched; an OS error
    becomes one sentence ("cannot write checkpoint to X: no space left on device; the previous
    checkpoint is intact")."""
    path = Path(path)
    existed = path.is_file()
    make_folder(path.parent, f"write {what} to", shown=path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise path_error(e, f"write {what} to", path) from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = _os_error(e)
        if cause is None:
            raise
        note = f"the previous {what} is intact" if existed else ""
        raise path_error(cause, f"write {what} to", path, note=note) from None
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")  # never loaded


def file_out(out: str | None, flag: str = "--out") -> Path | None:
    """An output file's name as typed (typer's Path would drop a trailing slash): one that
    ends like a folder (``newdir/``) is refused rather than written as a file so named, and so
    is an existing folder (before --force is talked about)."""
    if out is not None and (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        raise UserError(f"{flag} {out} names a folder; give the file's name, such as "
                        f"{Path(out) / 'model.safetensors'}")
    if out is not None and Path(out).suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{flag} {out} is named like a pickle file, which gptcli never loads; "
                        f"name it {Path(out).with_suffix('.safetensors')}")
    return None if out is None else Path(out)


def check_new(path: str | os.PathLike | None, flag: str, force: bool, mark: bytes) -> None:
    """Refuse an output file that exists (before any work), unless ``force`` or it is one
    gptcli wrote before (``mark`` in its first 64 KiB or last 8 KiB: a plot redrawn after more
    training, a sweep's table refreshed): a picture, page or table written over a file the user
    has loses it as surely as a checkpoint would."""
    if path is None or force or not (Path(path).is_file() or Path(path).is_symlink()):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(64 << 10)
            f.seek(max(f.seek(0, os.SEEK_END) - (8 << 10), 0))
            ours = mark in (head + f.read()).lower()
    except OSError:
        ours = False
    if not ours:
        raise UserError(f"{flag} {path} already exists and gptcli did not write it; pass "
                        "--force to overwrite it")


def write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    """``atomic_write`` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                        what=what)


def _os_error(e: BaseException) -> OSError | None:
    """The OS error behind a failed write: an OSError, or safetensors' own error for one (its
    text ends in Rust's "... (os error 28)", which gives the errno)."""
    if isinstance(e, OSError):
        return e
    if type(e).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        return OSError(errno.EIO, str(e))
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text_arg(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file the user named with a flag (``what`` names it: "prompt file"), or one
    sentence saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise path_error(e, f"read {what}", path) from None


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
