"""The `gpt` command line: the only package that imports typer.

Each command parses its flags (derived from the pydantic configs, see ``app.py``), calls one
library function and renders the result. torch and the model code are imported inside the
commands, so `gpt --help` answers at once.
"""

from __future__ import annotations

import os
import sys

import typer

from . import commands  # noqa: F401 - registers the commands on the app
from . import model_files  # noqa: F401 - registers info, download, merge, quantize, export
from . import sweep  # noqa: F401 - registers `gpt sweep` and `gpt sweep show`
from ..files import STDOUT_CLOSED, silence_stdout
from .app import app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is a flag of `gpt` itself, but users put it after the command too
    # (`gpt generate --debug ...`): accept it anywhere before a `--`.
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
        os.environ["GPTCLI_DEBUG"] = "1"
    # `--resume auto` is spelled as an option value; typer has no optional-value options.
    for i in range(len(args) - 1):
        if args[i] == "--resume" and args[i + 1] == "auto":
            args[i:i + 2] = ["--resume-auto"]
            break
    try:
        try:
            code = app(args=args, prog_name="gpt", standalone_mode=False)
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except BrokenPipeError:
        silence_stdout()
        sys.exit(STDOUT_CLOSED)
    except typer.Abort:  # Ctrl-C outside a command (inside one: handle_errors)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's usage errors (typer >= 0.2x has its own copy of click)
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise
        sys.exit(usage_error(e))
    sys.exit(code if isinstance(code, int) else 0)


def usage_error(e) -> int:
    """A flag that could not be parsed (an unknown option, ``--max-steps 1e3``) as the one line
    every other mistake is, naming the help to read, rather than click's framed usage block;
    `gpt` alone still shows the help."""
    if type(e).__name__ == "NoArgsIsHelpError" or getattr(e, "ctx", None) is None:
        e.show()
        return e.exit_code
    print(f"error: {e.format_message().rstrip('.')} (see `{e.ctx.command_path} --help`)",
          file=sys.stderr)
    return e.exit_code
