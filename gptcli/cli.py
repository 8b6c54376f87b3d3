"""The `gpt` command line. The only module that imports typer.

Each command parses and validates its flags, calls one library function and renders the result.
torch and the model code are imported inside the commands so `gpt --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .runtime import GptcliError, UserError, is_debug

app = typer.Typer(
    name="gpt",
    help="Train, run, inspect and benchmark GPT-2-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int) -> None:
    """Print one line to stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def command(name: str | None = None, **kwargs):
    """Register a command with the one error policy: a user error is one line on stderr and exit
    status 2 (bad input) or 1 (runtime failure); ``--debug`` shows the traceback instead."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except GptcliError as e:
                if is_debug():
                    traceback.print_exc()
                fail(str(e), e.exit_code)
            except KeyboardInterrupt:
                if is_debug():
                    traceback.print_exc()
                fail("interrupted", 130)
            except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
                if type(e).__name__ == "OutOfMemoryError":
                    if is_debug():
                        traceback.print_exc()
                    fail("out of memory on the device; try a smaller --batch-size or model", 1)
                if is_debug():
                    raise
                fail(f"{type(e).__name__}: {e} (run with `gpt --debug ...` for the traceback)", 1)

        return app.command(name, **kwargs)(wrapper)

    return register


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Train, run, inspect and benchmark GPT-2-family language models."""
    if debug:
        os.environ["GPTCLI_DEBUG"] = "1"


def not_built(what: str) -> None:
    fail(f"`gpt {what}` is not implemented yet", 1)


# ----------------------------------------------------------------------------- info

@command("info")
def info_cmd(
    model: Annotated[str, typer.Argument(
        help="A checkpoint file, a run folder, or the name of a downloaded model.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a checkpoint's config, parameter count, tokenizer, provenance and size."""
    from .checkpoint import checkpoint_info, resolve_model

    info = checkpoint_info(resolve_model(model))
    if as_json:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(model), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("file size", f"{info['file_size'] / 1e6:,.1f} MB")
    table.add_row("tokenizer", info["tokenizer"])
    for key, value in info["config"].items():
        table.add_row(key, str(value))
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    Console().print(table)


# ----------------------------------------------------------------------------- commands built later

@command("train")
def train_cmd() -> None:
    """Train a model on text files (default: the bundled Shakespeare corpus)."""
    not_built("train")


@command("generate")
def generate_cmd() -> None:
    """Generate text from a model."""
    not_built("generate")


@command("download")
def download_cmd() -> None:
    """Download GPT-2 weights (or a text dataset) from the Hugging Face Hub."""
    not_built("download")


@command("inspect-attention")
def inspect_attention_cmd() -> None:
    """Show what every attention head attends to."""
    not_built("inspect-attention")


@command("bench")
def bench_cmd() -> None:
    """Measure training and generation speed on this machine."""
    not_built("bench")


@command("eval")
def eval_cmd() -> None:
    """Loss, perplexity and bits per byte of a model on a text file."""
    not_built("eval")


@command("export")
def export_cmd() -> None:
    """Write a model as a Hugging Face GPT-2 folder."""
    not_built("export")


@command("plot")
def plot_cmd() -> None:
    """Overlay the loss curves of several runs."""
    not_built("plot")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
