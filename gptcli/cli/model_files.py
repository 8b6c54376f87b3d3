"""The commands over model files: `gpt info`, `download`, `merge`, `quantize` and `export`.
Like ``commands.py``, each parses, calls one library function and renders the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..files import file_out
from .app import Json, ModelArg, ModelOpt, command, one_model
from .commands import note

Opt = typer.Option
Arg = typer.Argument


@command("info")
def info_cmd(model: ModelArg = None, model_opt: ModelOpt = None, as_json: Json = False) -> None:
    """Show a checkpoint's config, parameter count, tokenizer, provenance and size (a LoRA
    checkpoint: its adapters and the base they were trained on)."""
    from ..locate import find_model
    from ..models import model_info
    from ..tables import render_info

    name = one_model(model, model_opt)
    info, path = model_info(find_model(name))
    if as_json:
        print(json.dumps(info))
    else:
        render_info(info, title=name or str(path))


@command("download")
def download_cmd(
    name: Annotated[Optional[str], Arg(metavar="NAME", help=(
        "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, a Hub repo id (org/name), a "
        "local Hugging Face GPT-2 folder, or the datasets tinystories and fineweb-edu."))] = None,
    dataset: Annotated[Optional[str], Opt(metavar="REPO", help=(
        "Fetch text files of this Hub dataset repo (org/name) instead of a model."))] = None,
    file: Annotated[Optional[list[str]], Opt("--include", metavar="GLOB", help=(
        "Files of the --dataset repo to fetch: a name or a glob such as 'data/*.parquet' "
        "(repeatable)."))] = None,
    revision: Annotated[Optional[str], Opt(metavar="REV", help=(
        "Branch, tag or commit of the Hub repo (default: main)."))] = None,
    out: Annotated[Optional[str], Opt(metavar="FILE", help=(
        "Write the checkpoint here instead of the local model store."))] = None,
    force: Annotated[bool, Opt("--force", metavar="", help=(
        "Overwrite --out if it exists, or a stored model of the same name from elsewhere."))
    ] = False,
    offline: Annotated[bool, Opt("--offline", metavar="", help=(
        "Use only the Hugging Face cache (like HF_HUB_OFFLINE=1)."))] = False,
    list_: Annotated[bool, Opt("--list", metavar="", help=(
        "Show the known names and what is in the local store."))] = False,
    as_json: Json = False,
) -> None:
    """Download GPT-2 weights (or a text dataset) from the Hugging Face Hub."""
    from ..tables import render_download, render_listing
    from ..hub import download
    from ..store import listing

    if list_:
        info = listing()
        print(json.dumps(info)) if as_json else render_listing(info)
        return
    result = download(name, dataset=dataset, files=file, revision=revision, out=file_out(out),
                      offline=offline, force=force, log=note)
    print(json.dumps(result)) if as_json else render_download(result)


@command("merge")
def merge_cmd(
    out: Annotated[str, Opt(metavar="FILE", help="Where to write the whole model.")],
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    force: Annotated[bool, Opt("--force", metavar="", help="Overwrite --out if it exists.")
                     ] = False,
    as_json: Json = False,
) -> None:
    """Fold a LoRA run's adapters into its base model and write the result as one ordinary
    checkpoint (what generate, eval and export load directly, and train can start from)."""
    from ..models import merge_checkpoint

    result = merge_checkpoint(one_model(model, model_opt), file_out(out), force=force)
    if as_json:
        print(json.dumps(result))
        return
    print(f"wrote {result['path']} ({result['parameters']:,} parameters, "
          f"{result['size'] / 1e6:,.1f} MB), merged from {result['source']}")


@command("quantize")
def quantize_cmd(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    out: Annotated[Optional[str], Opt(metavar="FILE", help=(
        "Where to write the int8 checkpoint (default: beside it, as NAME-int8.safetensors)."))
                   ] = None,
    force: Annotated[bool, Opt("--force", metavar="", help="Overwrite --out if it exists.")
                     ] = False,
    as_json: Json = False,
) -> None:
    """Write an int8 copy of a checkpoint: about a quarter of the size, and several times
    faster to generate from on a CPU (per-channel int8 weights)."""
    from ..models import quantize_checkpoint

    result = quantize_checkpoint(one_model(model, model_opt), file_out(out), force=force)
    if as_json:
        print(json.dumps(result))
        return
    print(f"wrote {result['path']} (int8, {result['size'] / 1e6:,.1f} MB, "
          f"{result['size'] / result['float_size']:.0%} of the float model's "
          f"{result['float_size'] / 1e6:,.1f} MB)")
    from ..store import is_stored_name

    path = Path(result["path"])  # a stored model by its name, as the store's models go
    note(f"use it with: gpt generate --model "
         f"{path.stem.replace('--', '/') if is_stored_name(path) else path}")


@command("export")
def export_cmd(
    out: Annotated[str, Opt(metavar="PATH", help=(
        "Where to write: a folder (--format hf) or a .gguf file (--format gguf)."))],
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    fmt: Annotated[Optional[str], Opt("--format", metavar="hf|gguf", show_default=False, help=(
        "hf: a Hugging Face folder (weights, config, tokenizer, model card); gguf: one file for "
        "llama.cpp and Ollama (default: gguf for an --out ending in .gguf, else hf)."))] = None,
    dtype: Annotated[Optional[str], Opt(metavar="TYPE", help=(
        "Weight type: f32 (default), f16 or bf16 for hf; f32, f16 or q8_0 for gguf."))] = None,
    force: Annotated[bool, Opt("--force", metavar="", help=(
        "Overwrite --out (a folder only if it holds nothing but an export's files)."))] = False,
    push_to_hub: Annotated[Optional[str], Opt(metavar="ORG/NAME", help=(
        "Also upload the result to this Hub model repo (token: HF_TOKEN or `hf auth login`)."
    ))] = None,
    private: Annotated[bool, Opt("--private", metavar="", help=(
        "Create the --push-to-hub repo as private (when it is new)."))] = False,
    revision: Annotated[Optional[str], Opt(metavar="BRANCH", help=(
        "Push to this branch of the repo (created if missing; default: main)."))] = None,
    as_json: Json = False,
) -> None:
    """Write a model as a Hugging Face GPT-2 folder (transformers loads it) or a GGUF file
    (llama.cpp, Ollama), and optionally push it to the Hugging Face Hub."""
    from ..export import export_model, summary

    if not out.strip():  # (a Path would read it as ".")
        raise UserError("--out is empty; give the folder (or .gguf file) to write")
    result = export_model(one_model(model, model_opt), Path(out), fmt=fmt, dtype=dtype, force=force,
                          push_to_hub=push_to_hub, private=private, revision=revision, log=note)
    done, hints = summary(result, str(out))
    print(json.dumps(result) if as_json else done)
    note(hints)
