"""The `gpt` Typer app: the one error policy, and flags derived from the pydantic configs.

A command declares its own command-line-only options (``--json``, ``--prompt``, ...) as usual and
names the config models whose fields are also flags; ``command`` adds one flag per field, with the
field's description as help, its ``group`` as the help panel and its ``metavar``. Every derived
flag defaults to "not given" (None), so a command receives only what the user typed, and the
config models (with ``--config`` files and saved run configs, where a command has them) supply
every default in one place.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sys
import traceback
import types
import typing
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..config import KERNEL_INDUCTOR
from ..errors import GptcliError, UserError, is_debug, is_oom
from ..files import STDOUT_CLOSED, silence_stdout


def _closed_pipe(console) -> None:
    """rich's hook for output whose reader has gone (`gpt --help | head`): it exited with
    status 1; gptcli's policy is a quiet 141, as for everything else it prints."""
    console.quiet = True
    silence_stdout()
    raise SystemExit(STDOUT_CLOSED)


class _HelpSwitch:
    """Help that reads like a command line's, not like code: the help option is a switch (no
    ``<bool>`` after it), and an argument shows its metavar alone (no ``<list[Path]>`` type
    column, no ``{NAME}`` braces in the usage line)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "param_type_name", "") != "argument":
                continue
            name = param.metavar or param.name.upper()
            usage = name if param.required else f"[{name}]"
            # Typer offers no public way to drop the type column or the braces: these are the
            # attributes its rich help formatter and usage line read (private, as of Typer 0.29;
            # if an update renames them, tests/test_cli.py sees the type in the help again).
            param.display_type_rich = lambda ctx: None
            param._usage_display_name = lambda usage=usage: usage

    def format_help(self, ctx, formatter):
        from rich.console import Console  # (loaded for the help anyway)

        Console.on_broken_pipe = _closed_pipe  # the documented override point; typer makes
        return super().format_help(ctx, formatter)  # the consoles, so no subclass can serve

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
            panels = [getattr(p, "rich_help_panel", None) for p in self.params]
            if any(panels):  # --help goes last, in the last group, not in a group of its own
                option.rich_help_panel = [p for p in panels if p][-1]
        return option


class Command(_HelpSwitch, TyperCommand):
    pass


class Group(_HelpSwitch, TyperGroup):
    pass


app = typer.Typer(
    name="gpt",
    cls=Group,
    help="Train, run, inspect and benchmark GPT-2-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


# ----------------------------------------------------------------------------- error policy

def fail(message: str, code: int):
    """Print one line to stderr and exit with ``code``."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f"rank {rank}: " if rank is not None else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _is_validation_error(e: BaseException) -> bool:
    return type(e).__name__ == "ValidationError" and type(e).__module__.startswith("pydantic")


def handle_errors(fn, oom_hint: str):
    """``fn`` under the one error policy: a user error is one line on stderr and exit status 2
    (bad input) or 1 (runtime failure); ``--debug`` shows the traceback as well."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        try:
            result = fn(*args, **kw)
            sys.stdout.flush()  # a closed pipe shows here, under this policy, not at exit
            return result
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(STDOUT_CLOSED) from None
        except BaseException as e:  # noqa: BLE001 - the last line of defence against tracebacks
            message, code = describe(e, oom_hint)
            if _stdout_failed(e):  # what it holds cannot be written at exit either
                silence_stdout()
            if is_debug():
                traceback.print_exc()
            fail(message, code)

    return wrapper


def _write_failed(e: BaseException) -> bool:
    """A write without a file name (an open file's, or stdout's) that failed for want of room
    or a device error."""
    return isinstance(e, OSError) and not e.filename and \
        e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _stdout_failed(e: BaseException) -> bool:
    """Whether ``e`` is such a failure and stdout cannot be written either (it still holds
    what a failed write left), rather than a file of the command's on a full disk while stdout
    is fine (its log is then kept)."""
    if not _write_failed(e) or sys.stdout.isatty():
        return False
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def describe(e: BaseException, oom_hint: str) -> tuple[str, int]:
    """The one-line message and exit status for an exception that reached a command."""
    from ..errors import validation_message
    from ..errors import path_error

    if isinstance(e, GptcliError):
        return str(e), e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if _is_validation_error(e):
        return validation_message(e, flags=True), UserError.exit_code
    if is_oom(e):
        return f"out of memory on the device; {oom_hint}", 1
    if isinstance(e, OSError) and e.filename:
        err = path_error(e, "use", e.filename)
        return str(err), err.exit_code
    if _write_failed(e):  # (which of the two, the error does not say)
        return f"could not write to standard output or a file: {e.strerror}", 1
    return (f"{type(e).__name__}: {e} (an unexpected failure; run with `gpt --debug ...` for "
            "the traceback)"), 1


# ----------------------------------------------------------------------------- flags from configs

METAVARS = {int: "N", float: "FLOAT", str: "TEXT"}


def field_info(field) -> tuple[str, dict]:
    """A config field's help text and extras, looking inside ``Optional[Annotated[...]]``."""
    description, extra = field.description, dict(field.json_schema_extra or {})
    if description is None:  # e.g. `seed: Seed | None`: the shared type carries the help
        for arg in typing.get_args(field.annotation):
            for meta in getattr(arg, "__metadata__", ()):
                description = description or getattr(meta, "description", None)
                extra = {**(getattr(meta, "json_schema_extra", None) or {}), **extra}
    return description or "", extra


def _base_type(annotation) -> type:
    """int, float, str, bool or list[str] for a field annotation (Optional and Annotated and
    Literal unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return _base_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if origin is list:
        return list[str]
    return annotation


def with_default(help_text: str, default) -> str:
    """The one way help shows a default: ``(default: X)`` at the end, unless the text already
    says it (or there is none to show)."""
    if default is None or isinstance(default, bool) or default == [] or "(default:" in help_text:
        return help_text  # (a switch that is on by default says so with its --no- form)
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{help_text} (default: {shown})"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_flags(*models, exclude: tuple[str, ...] = (),
                 helps: dict[str, str] | None = None) -> dict[str, inspect.Parameter]:
    """One Typer option per field of ``models`` (the first model wins for a shared name);
    ``helps`` replaces a field's help where one command gives it another meaning (bench's
    ``--model`` defaults to a preset, not to the latest run)."""
    params: dict[str, inspect.Parameter] = {}
    for model in models:
        for name, field in model.model_fields.items():
            if name in params or name in exclude:
                continue
            help_text, extra = field_info(field)
            help_text = (helps or {}).get(name, help_text)
            if name == "kernel" and "compile" in exclude:  # (no --compile: no inductor)
                help_text = help_text.replace(KERNEL_INDUCTOR, "")
            kind = _base_type(field.annotation)
            help_text = with_default(help_text, field.default)
            flag = flag_name(name)
            if kind is bool and field.default is True:  # on by default: --x / --no-x
                flag = f"{flag}/--no-{flag[2:]}"
            names = (flag, *([extra["short"]] if "short" in extra else []))
            option = typer.Option(*names, help=help_text, show_default=False,
                                  rich_help_panel=extra.get("group"),
                                  metavar="" if kind is bool else extra.get(
                                      "metavar", METAVARS.get(kind, "TEXT")))
            params[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                             annotation=Annotated[Optional[kind], option])
    return params


def _panel(param: inspect.Parameter) -> str | None:
    for meta in getattr(param.annotation, "__metadata__", ()):
        if getattr(meta, "rich_help_panel", None):
            return meta.rich_help_panel
    return None


def command(name: str, *configs, exclude: tuple[str, ...] = (), panels: tuple[str, ...] = (),
            oom_hint: str = "try a smaller model", helps: dict[str, str] | None = None,
            **kwargs):
    """Register a command under the error policy. With ``configs``, the command also gets one
    flag per config field and receives the ones the user gave as ``given`` (a dict).
    ``panels`` orders the groups of options in ``--help``; ``helps`` overrides a field's help
    for this command."""

    def register(fn):
        callback = handle_errors(fn, oom_hint)
        if configs:
            callback = with_config_flags(fn, callback, *configs, exclude=exclude, panels=panels,
                                         helps=helps)
        kwargs.setdefault("short_help", first_sentence(fn.__doc__))
        return app.command(name, cls=Command, **kwargs)(callback)

    return register


def with_config_flags(fn, handled, *configs, exclude: tuple[str, ...] = (),
                      panels: tuple[str, ...] = (), helps: dict[str, str] | None = None):
    """A Typer callback for ``fn`` taking its own parameters plus one flag per field of
    ``configs`` (less ``exclude`` and ``fn``'s own), options grouped in the order of ``panels``;
    it calls ``handled`` (``fn`` under the error policy) with the flags the user gave as
    ``given`` (a dict)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
           if p.name != "given"]
    derived = config_flags(*configs, exclude=(*exclude, *(p.name for p in own)), helps=helps)
    order = {panel: i for i, panel in enumerate(panels)}
    listed = sorted([p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                     for p in (*derived.values(), *own)],
                    key=lambda p: order.get(_panel(p), len(order)))

    @functools.wraps(fn)
    def with_given(**kw):
        given = {k: kw.pop(k) for k in derived if kw.get(k) is not None}
        for k in derived:
            kw.pop(k, None)
        return handled(given=given, **kw)

    with_given.__signature__ = inspect.Signature(listed)
    with_given.__annotations__ = {p.name: p.annotation for p in listed}
    del with_given.__wrapped__  # Typer must read the signature above, not fn's
    return with_given


def first_sentence(doc: str | None) -> str | None:
    """A command's line in `gpt --help`: the first sentence of its docstring, on one line."""
    if not doc:
        return None
    text = " ".join(doc.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def settings(model, given: dict[str, Any], **fixed: Any):
    """Build a config model from the flags that belong to it (validation errors become one-line
    user errors through the error policy)."""
    fields = {k: v for k, v in given.items() if k in model.model_fields}
    return model(**{**fields, **fixed})


# ----------------------------------------------------------------------------- shared CLI options

# The flags every command spells the same way, declared once (DESIGN.md, "One flag vocabulary").
Json = Annotated[bool, typer.Option(
    "--json", metavar="", rich_help_panel="Output",
    help="Print the result as one JSON object, the last line of stdout.")]
MODEL_HELP = ("A checkpoint file, a run folder, a Hugging Face GPT-2 folder, a downloaded "
              "model's name, or a Hub id (org/name: downloaded once when online).")
ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", show_default=False, help=(
    MODEL_HELP + " The same as --model (default: the latest run under ./runs)."))]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="MODEL", rich_help_panel="Model", help=MODEL_HELP)]


def one_model(positional: str | None, option: str | None) -> str | None:
    """A command's model, given as its positional MODEL or as --model (not both)."""
    if positional is not None and option is not None and positional != option:
        raise UserError(f"give the model once: as MODEL ({positional}) or as --model "
                        f"({option})")
    return option if option is not None else positional


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", metavar="",
                                        help="Show full tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", metavar="", callback=_version, is_eager=True,
        help="Print the version and exit.")] = None,
) -> None:
    """Train, run, inspect and benchmark GPT-2-family language models."""
    if debug:
        os.environ["GPTCLI_DEBUG"] = "1"
