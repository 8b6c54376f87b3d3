"""Finding and loading models for the commands: a checkpoint file, a run folder (its best,
else last checkpoint), a name in the local store, or the latest run; ``load_model`` puts it on
a device in its inference layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import PICKLE_SUFFIXES, check_readable, load_checkpoint
from .model import GPT
from .runtime import UserError, models_dir, resolve_device, resolve_dtype, store_name
from .tokenizer import Tokenizer


def resolve_model(name: str | os.PathLike | None, runs_dir: str | os.PathLike = "runs") -> Path:
    """Find the checkpoint a user means by ``name``.

    A checkpoint file; a run folder (its ``best.safetensors``, else ``last.safetensors``); the
    name of a model in the local store (``gpt2`` -> ``$GPTCLI_HOME/models/gpt2.safetensors``);
    or, for None, the most recently written run under ``runs_dir``.
    """
    if name is None:
        runs = sorted(Path(runs_dir).glob("*/*.safetensors"), key=lambda p: p.stat().st_mtime)
        runs = [p for p in runs if p.name in ("best.safetensors", "last.safetensors")]
        if not runs:
            raise UserError(f"no --model given, and there is no trained run under ./{runs_dir}. "
                            f"Train one with `gpt train`, {_elsewhere()}")
        return resolve_model(runs[-1].parent)
    path = Path(name)
    if path.is_dir():
        for candidate in ("best.safetensors", "last.safetensors"):
            if (path / candidate).is_file():
                return path / candidate
        raise UserError(f"run folder {path} has no best.safetensors or last.safetensors")
    if path.is_file() or path.is_symlink() or path.suffix.lower() in (".safetensors",
                                                                       *PICKLE_SUFFIXES):
        return check_readable(path)
    stored = models_dir() / f"{store_name(str(name))}.safetensors"
    if stored.is_file():
        return stored
    from .hub import KNOWN_MODELS

    if str(name) in KNOWN_MODELS or str(name).count("/") == 1:
        raise UserError(f"{name} is not downloaded yet: get it with `gpt download {name}` "
                        f"(once, with network access); {_elsewhere(downloads=False)}")
    raise UserError(f"no model named {str(name)!r}: it is not a file, a run folder or a "
                    f"downloaded model; {_elsewhere(downloads=False)}")


def local_models() -> list[str]:
    """Names of the models in the local store."""
    return sorted(p.stem.replace("--", "/") for p in models_dir().glob("*.safetensors"))


def _elsewhere(downloads: bool = True) -> str:
    """The rest of a "which model?" message: what is available locally, or how to get one."""
    runs = sorted(str(p.parent) for p in Path("runs").glob("*/last.safetensors"))
    available = local_models() + runs
    if available:
        return "or use one of the models available locally: " + ", ".join(available) \
            if downloads else "available locally: " + ", ".join(available)
    return "or download one with `gpt download gpt2`" if downloads else \
        "nothing is available locally yet (`gpt download gpt2` or `gpt train` makes one)"


def load_model(name: str | os.PathLike | None, *, device: str = "auto", dtype: str | None = None,
               quantize: str | None = None) -> tuple[GPT, Tokenizer, Path]:
    """What every command that uses a model for inference does first: find it
    (``resolve_model``), check it (weights finite too), put it on the device (in ``dtype`` if
    given) and give it its inference layout (``quantize.prepare``, int8 when asked or when the
    checkpoint is int8). Returns (model, tokenizer, path)."""
    from .quantize import check_scheme, is_quantized, prepare

    path = resolve_model(name)
    dev = resolve_device(device)
    check_scheme(quantize, dev)
    model, tokenizer, _ = load_checkpoint(
        path, device=dev, dtype=resolve_dtype(dtype, dev) if dtype is not None else None,
        finite=True)
    if is_quantized(model):
        check_scheme("int8", dev)
    prepare(model, quantize)
    return model, tokenizer, path


def display_name(path: Path) -> str:
    """A checkpoint's name for titles: the run folder for a run's checkpoints, ``org/name`` for
    a model in the local store, else the file's stem."""
    path = Path(path)
    if (path.parent / "config.json").is_file() and re.fullmatch(
            r"(best|last|step-\d+)(-int8)?", path.stem):
        return path.parent.name
    try:
        if path.resolve().parent == models_dir().resolve():
            return path.stem.replace("--", "/")
    except OSError:
        pass
    return path.stem
