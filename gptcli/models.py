"""Finding and loading models for the commands: a checkpoint file, a run folder (its best,
else last checkpoint), a Hugging Face folder (converted once), a name in the local store, or
the latest run; ``load_model`` puts it on a device in its inference layout;
``quantize_checkpoint`` writes an int8 copy. Nothing here downloads: ``locate.py``, above this
module and ``hub.py``, hands ``resolve_model`` a fetcher for Hub ids."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import adapters
from .checkpoint import (PICKLE_SUFFIXES, check_readable, checkpoint_info, load_checkpoint,
                         model_tensors, read_safetensors, save_checkpoint)
from .convert import converted_folder, converted_name, is_hf_folder
from .devices import resolve_device, resolve_dtype
from .errors import UserError
from .files import make_folder
from .model import GPT
from .quantize import check_scheme, is_quantized, prepare
from .runs import RUNS_DIR, RunFolder
from .store import (KNOWN_MODELS, is_repo_id, is_stored_name, local_models, models_dir,
                    stored_model)
from .tokenizer import Tokenizer


def resolve_model(name: str | os.PathLike | None, runs_dir: str | os.PathLike = RUNS_DIR, *,
                  fetch: Callable[[str], Path] | None = None, log=None) -> Path:
    """Find the checkpoint a user means by ``name``.

    A checkpoint file; a run folder (its ``best.safetensors``, else ``last.safetensors``); a
    Hugging Face GPT-2 folder (converted once, then kept in the store by content: see
    ``convert.converted_folder``); the name of a model in the local store (``gpt2`` ->
    ``$GPTCLI_HOME/models/gpt2.safetensors``); or, for None, the most recently written run under
    ``runs_dir``. A Hub id (``org/name``, or a known name like ``gpt2``) that is not in the
    store is handed to ``fetch`` (which downloads it and returns its path: ``locate.find_model``
    passes one when the Hub may be used); without one it is an error that says
    ``gpt download NAME``. This module never downloads: it does not import ``hub.py``.
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
        if checkpoint is None and is_hf_folder(path):
            return converted_folder(path, log=log)
        if checkpoint is None:
            raise UserError(f"{path} is neither a run folder (it has no best.safetensors or "
                            "last.safetensors) nor a Hugging Face model folder (config.json and "
                            "model.safetensors)")
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
        if fetch is not None:
            return fetch(name)
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
               quantize: str | None = None, kernel: str | None = None,
               rows: tuple[int, ...] = (1,), steps: bool = True) -> tuple[GPT, Tokenizer, Path]:
    """What every command that uses a model for inference does first: find it
    (``resolve_model``), check it (weights finite too), put it on the device (in ``dtype`` if
    given) and give it its inference layout (``quantize.prepare``, int8 when asked or when the
    checkpoint is int8; ``kernel`` forces a kernel, ``rows``: the batch sizes kernels are
    chosen for, ``steps``: C decode steps where faster, off for a compiled step). Returns
    (model, tokenizer, path)."""
    path = resolve_model(name)
    dev = resolve_device(device)
    check_scheme(quantize, dev)
    check_format(path, quantize)
    model, tokenizer, _ = load_weights(path, finite=True)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev) if dtype is not None else None)
    if is_quantized(model):
        check_scheme("int8", dev)
    prepare(model, quantize, kernel=kernel, rows=rows, steps=steps)
    return model, tokenizer, path


def check_format(path: str | os.PathLike, quantize: str | None) -> None:
    """Refuse ``--quantize`` to another format than an int8 checkpoint's own, naming the float
    model it was made from where the checkpoint records it: from the header, before the
    weights are read (LoRA checkpoints' bases are float: lora.py)."""
    if quantize in (None, "int8"):
        return
    meta = read_safetensors(path, tensors=False)[1]
    if meta.get("quantization") == "int8":
        origin = meta.get("quantized_from")
        raise UserError(f"{path} is an int8 checkpoint; --quantize {quantize} needs a float model"
                        + (f", such as the one it was made from: {origin}" if origin else ""))


def load_weights(path: str | os.PathLike, *, merge: bool = True,
                 finite: bool = False) -> tuple[GPT, Tokenizer, dict]:
    """A checkpoint on the CPU: ``(model, tokenizer, metadata)``. A LoRA checkpoint loads its
    base, checked against the fingerprint it was trained on, with the adapters merged into
    the weights (``merge``: inference, merging, quantizing) or kept apart (resuming a LoRA
    run); its metadata is the adapter's."""
    shapes, metadata = read_safetensors(path, tensors=False)
    if not adapters.is_adapter(metadata):
        return load_checkpoint(path, finite=finite)
    header = adapters.read_header(path, shapes, metadata)
    model, tokenizer, _ = load_checkpoint(_base_of(path, header.base), finite=finite)
    adapters.attach(model, path, header, read_safetensors(path)[0], merge=merge)
    return model, tokenizer, header.metadata


def _base_of(path: str | os.PathLike, base: dict) -> Path:
    """The base checkpoint a LoRA checkpoint names: the file it was trained on, else the name
    it was given as (a stored model, a run folder), else a sentence saying what is missing."""
    if Path(base["path"]).is_file():
        return Path(base["path"])
    try:
        return resolve_model(base["model"])
    except UserError:
        how = f"gpt download {base['model']}" if base["model"] in KNOWN_MODELS or \
            is_repo_id(base["model"]) and not _looks_like_path(base["model"]) else \
            f"put it back at {base['path']}"
        raise UserError(f"{path} holds LoRA adapters for base model {base['model']} "
                        f"({base['path']}), which is not there any more; {how} to use "
                        "them") from None


def model_info(name: str | os.PathLike | None) -> tuple[dict, Path]:
    """What `gpt info` shows (from the header only) and the file it describes."""
    path = resolve_model(name)
    shapes, metadata = read_safetensors(path, tensors=False)
    info = adapters.info(path, adapters.read_header(path, shapes, metadata)) \
        if adapters.is_adapter(metadata) else checkpoint_info(path)
    run = RunFolder.holding(path)
    if run is not None and run.made(path) and (memory := run_memory(run)) is not None:
        info["memory"] = memory
    return info, path


def run_memory(run: RunFolder) -> dict | None:
    """The memory a training step of ``run`` needs, by what holds it (weights, gradients,
    optimizer, activations: ``finetune.memory_breakdown``, the estimate the memory check
    uses; activations in the dtype the run's --dtype means on this machine), their sum
    (``estimate``) and the ``peak`` its metrics.jsonl measured (None for a run without one)."""
    import torch
    from pydantic import ValidationError

    from .config import ModelConfig, TrainConfig
    from .finetune import memory_breakdown
    from .runs import read_records

    config = run.read_config() or {}
    try:
        model, train = ModelConfig(**config["model"]), TrainConfig(**config["train"])
    except (KeyError, TypeError, ValidationError):
        return None
    try:
        dtype = resolve_dtype(train.dtype, resolve_device(train.device))
    except UserError:  # its device (or its dtype there) is not on this machine
        dtype = torch.float32
    parts = memory_breakdown(model, train, dtype)
    peaks = [r["peak_memory"] for r in read_records(run.metrics_path)
             if r.get("peak_memory")] if run.metrics_path.is_file() else []
    return {**parts, "estimate": sum(parts.values()), "peak": max(peaks, default=None),
            "dtype": str(dtype).removeprefix("torch."), "batch_size": train.batch_size,
            "context_length": model.context_length}


def merge_checkpoint(name: str | None, out: str | os.PathLike, *, force: bool = False) -> dict:
    """`gpt merge`: a LoRA run's adapters folded into its base, written as a whole model."""
    src = resolve_model(name)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it, or --out to "
                        "write another file")
    if not adapters.is_adapter(read_safetensors(src, tensors=False)[1]):
        raise UserError(f"{src} is a whole model already (no LoRA adapters to merge)")
    model, tokenizer, meta = load_weights(src, finite=True)
    kept = {k: v for k, v in meta.items() if k in PROVENANCE}
    save_checkpoint(out, model, tokenizer, **kept, merged_from=str(src))
    return {"path": str(out), "source": str(src), "size": out.stat().st_size,
            "parameters": model.num_params()}


PROVENANCE = ("step", "val_loss", "source", "run_id", "revision", "chat_template")


def display_name(path: Path) -> str:
    """A checkpoint's name for titles: the run folder for a run's checkpoints, ``org/name`` for
    a model in the local store, else the file's stem."""
    path = Path(path)
    run = RunFolder.holding(path)
    if run is not None and run.made(path):
        return run.path.name
    if is_stored_name(path):
        return path.stem.replace("--", "/")
    return converted_name(path) or path.stem


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
    make_folder(target.parent, "write checkpoint to", shown=target)  # before minutes of work
    model, tokenizer, meta = load_weights(src, finite=True)
    if is_quantized(model):
        raise UserError(f"{src} is already an int8 checkpoint")
    # the float weights' bytes as a checkpoint holds them: the source file's size, or, for a
    # LoRA run's adapter file, its base with the adapters merged in
    float_size = sum(t.nbytes for t in model_tensors(model).values())
    prepare(model, "int8", steps=False)  # (saved, not decoded)
    kept = {k: v for k, v in meta.items() if k in PROVENANCE}
    save_checkpoint(target, model, tokenizer, **kept, quantized_from=str(src))
    return {"path": str(target), "source": str(src), "size": target.stat().st_size,
            "source_size": src.stat().st_size, "float_size": float_size,
            "parameters": model.num_params()}
