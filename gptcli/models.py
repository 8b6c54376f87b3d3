"""Finding and loading models for the commands: a checkpoint file, a run folder (its best,
else last checkpoint), a name in the local store, or the latest run; ``load_model`` puts it on
a device in its inference layout; ``quantize_checkpoint`` writes an int8 copy."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import PICKLE_SUFFIXES, check_readable, load_checkpoint, save_checkpoint
from .devices import resolve_device, resolve_dtype
from .errors import UserError
from .model import GPT
from .quantize import check_scheme, is_quantized, prepare
from .runs import RUNS_DIR, RunFolder
from .store import (KNOWN_MODELS, is_repo_id, is_stored_name, local_models, models_dir,
                    stored_model)
from .tokenizer import Tokenizer


def resolve_model(name: str | os.PathLike | None, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """Find the checkpoint a user means by ``name``.

    A checkpoint file; a run folder (its ``best.safetensors``, else ``last.safetensors``); the
    name of a model in the local store (``gpt2`` -> ``$GPTCLI_HOME/models/gpt2.safetensors``);
    or, for None, the most recently written run under ``runs_dir``.
    """
    if name is None:
        runs = RunFolder.all(runs_dir)
        if not runs:
            raise UserError(f"no --model given, and there is no trained run under ./{runs_dir}. "
                            f"Train one with `gpt train`, {_elsewhere()}")
        return resolve_model(runs[-1].path)
    path = Path(name)
    if path.is_dir():
        checkpoint = RunFolder(path).checkpoint()
        if checkpoint is None:
            raise UserError(f"run folder {path} has no best.safetensors or last.safetensors")
        return checkpoint
    if path.is_file() or path.is_symlink() or path.suffix.lower() in (".safetensors",
                                                                       *PICKLE_SUFFIXES):
        return check_readable(path)
    stored = stored_model(str(name))
    if stored is not None:
        return stored
    name = str(name)
    where = f"looked for a file or run folder {path.absolute()} and a downloaded model " \
            f"{name!r} in {models_dir()}"
    if name in KNOWN_MODELS or (is_repo_id(name) and not _looks_like_path(name)):
        raise UserError(f"{name} is not downloaded yet: get it with `gpt download {name}` "
                        f"(once, with network access); {_elsewhere(downloads=False)}")
    if _looks_like_path(name):
        raise UserError(f"{name} does not exist ({where}); {_elsewhere(downloads=False)}")
    raise UserError(f"no model named {name!r}: it is not a file, a run folder or a downloaded "
                    f"model ({where}); {_elsewhere(downloads=False)}")


def _looks_like_path(name: str) -> bool:
    """A model name the user meant as a path, not a Hub id: it starts like one (/, ./, ../, ~),
    has more than one slash, ends like a checkpoint, its first part is a folder here, or it is
    in the runs folder (``runs/x`` from the wrong working folder)."""
    first = Path(name).parts[0] if Path(name).parts else ""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or name.lower().endswith(".safetensors") or Path(first).is_dir()
            or first == RUNS_DIR.name)


def _elsewhere(downloads: bool = True) -> str:
    """The rest of a "which model?" message: what is available locally, or how to get one."""
    runs = sorted(str(run.path) for run in RunFolder.all() if run.last.is_file())
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
    run = RunFolder.holding(path)
    if run is not None and run.made(path):
        return run.path.name
    if is_stored_name(path):
        return path.stem.replace("--", "/")
    return path.stem


def quantize_checkpoint(model_name: str | None, out: str | None = None, *,
                        force: bool = False) -> dict:
    """`gpt quantize`: an int8 copy of a float checkpoint (int8 weights, float32 scales, the same
    metadata plus ``quantization: int8``), by default beside it as ``<name>-int8.safetensors``
    (so a stored ``gpt2`` gives ``gpt2-int8``, usable as ``--model gpt2-int8``)."""
    src = resolve_model(model_name)
    target = Path(out) if out else src.with_name(f"{src.stem}-int8.safetensors")
    if target.exists() and target.resolve() == src.resolve():
        raise UserError("--out is the checkpoint being quantized; give another file")
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it, or --out to "
                        "write another file")
    model, tokenizer, meta = load_checkpoint(src, finite=True)
    if is_quantized(model):
        raise UserError(f"{src} is already an int8 checkpoint")
    prepare(model, "int8")
    kept = {k: v for k, v in meta.items() if k in ("step", "val_loss", "source", "run_id",
                                                    "revision")}
    save_checkpoint(target, model, tokenizer, **kept, quantized_from=str(src))
    return {"path": str(target), "source": str(src), "size": target.stat().st_size,
            "source_size": src.stat().st_size, "parameters": model.num_params()}
