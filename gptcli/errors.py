"""Errors meant for the user, and how failures are put into words.

Every user-facing failure is a ``GptcliError``: the CLI prints its message as one line and exits
with its status, never with a traceback (``--debug`` shows one). OS errors on a user's path become
one sentence (``path_error``); a missing optional extra names the extra (``require``).

No torch here: the CLI imports this before any heavy work.
"""

from __future__ import annotations

import errno as errno_mod
import os


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


def is_debug() -> bool:
    """``gpt --debug`` (or GPTCLI_DEBUG=1): show tracebacks."""
    return os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")


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
                        f"install it with {install_command(extra)}") from None


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to this installation of gptcli: from the folder it
    was installed from where pip recorded one (a checkout, as the README installs it; editable
    or not), else by name. (A name alone would send a checkout's user to the package index,
    whose "gptcli" may be another project.)"""
    import json
    from importlib.metadata import distributions
    from urllib.parse import unquote, urlparse

    try:  # (a checkout's own gptcli.egg-info, found first from inside it, records no origin)
        origin = next((json.loads(text) for d in distributions(name="gptcli")
                       if (text := d.read_text("direct_url.json"))), {})
    except (ValueError, OSError):
        origin = {}
    folder = origin.get("dir_info") if isinstance(origin, dict) else None
    url = urlparse(str(origin.get("url", ""))) if folder is not None else None
    if url is None or url.scheme != "file":
        return f'pip install "gptcli[{extra}]"'
    editable = "-e " if isinstance(folder, dict) and folder.get("editable") else ""
    return f'pip install {editable}"{unquote(url.path)}[{extra}]"'


# errno values that mean the device or the disk failed, not the path the user gave
_DISK_ERRNOS = {"ENOSPC", "EDQUOT", "EIO", "EFBIG", "ENOMEM"}


def os_error_reason(e: OSError) -> str:
    """What went wrong, in words: "no space left on device", "permission denied", ..."""
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


def path_error(e: OSError, doing: str, path=None, *, note: str = "",
               reason: str | None = None) -> GptcliError:
    """An OSError on a user's path as one sentence: ``cannot <doing> <path>: <reason>[; note]``
    (``reason``: other words than the error's own). A failing disk or device (or an error
    without an errno) is a runtime failure (exit 1); anything about the path is bad input
    (exit 2)."""
    where = path if path is not None else (e.filename or "")
    reason = reason or os_error_reason(e)
    text = f"cannot {doing} {where}: {reason}" if where else f"cannot {doing}: {reason}"
    if note:
        text += f"; {note}"
    name = errno_mod.errorcode.get(e.errno or 0, "")
    return RuntimeFailure(text) if name in _DISK_ERRNOS or not name else UserError(text)


NUMBER_RULES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def validation_message(err: Exception, *, flags: bool = False) -> str:
    """One readable sentence from a pydantic ValidationError (or any exception): each problem as
    "<setting> <rule>, got <value>". With ``flags``, settings are named as command-line flags
    (``--batch-size``), for errors in what the user typed."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    parts = []
    for e in errors():
        loc = ".".join(str(p) for p in e.get("loc", ())  # a flag's list index says nothing
                       if not (flags and isinstance(p, int)))
        name = ("--" + loc.replace("_", "-")) if flags and loc else loc
        msg = e.get("msg", "invalid value")
        for prefix, words in (("Value error, ", ""), ("Input should be greater than or equal to",
                              "must be at least"), ("Input should be greater than",
                              "must be greater than"), ("Input should be less than or equal to",
                              "must be at most"), ("Input should be less than", "must be less than"),
                              ("Input should be", "must be")):
            if msg.startswith(prefix):
                msg = (words + msg[len(prefix):]).strip()
                break
        if e.get("type") == "extra_forbidden":
            msg = "is not a setting" if not flags else "is not an option"
        value = e.get("input")
        # a number's rule broken by a text (a sweep's value): as typed, 0 not '0'
        shown = value if isinstance(value, str) and e.get("type") in NUMBER_RULES else repr(value)
        got = f", got {shown}" if isinstance(value, (int, float, str)) and \
            e.get("type") != "extra_forbidden" and not isinstance(value, bool) else ""
        parts.append(f"{name} {msg}{got}" if name else msg)
    return "; ".join(parts)
