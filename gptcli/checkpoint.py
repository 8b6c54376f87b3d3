"""Checkpoints: self-describing safetensors files, written atomically. Never pickle.

A model checkpoint's header metadata holds ``format`` (``gptcli/1``), ``config`` (ModelConfig
JSON), ``tokenizer`` (spec JSON) and provenance (gptcli version, step, val loss, source). Tied
weights are stored once (``lm_head.weight`` is left out) and re-tied on load.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, validation_message
from .model import GPT
from .runtime import UserError
from .tokenizer import Tokenizer, get_tokenizer

FORMAT = "gptcli/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``. A failure at any point leaves whatever was at ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any]) -> Path:
    """The one safetensors writer: contiguous CPU tensors, string metadata, atomic."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: unwrapped names, the tied output matrix left out."""
    model = unwrap_model(model)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer,
                    **provenance: Any) -> Path:
    """Write ``model`` with its config, tokenizer spec and provenance to one safetensors file."""
    from . import __version__

    config: ModelConfig = unwrap_model(model).config
    metadata = {
        "format": FORMAT,
        "config": config.model_dump_json(),
        "tokenizer": json.dumps(tokenizer.spec()),
        "gptcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metadata.update({k: v for k, v in provenance.items() if v is not None})
    return write_safetensors(path, model_tensors(model), metadata)


def save_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None, *, rng: Mapping[str, torch.Tensor],
                        meta: Mapping[str, Any]) -> Path:
    """What a resumed run needs besides the weights: optimizer moments as tensors, random
    generator states, and JSON metadata (step, best val loss, TrainConfig, ...)."""
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{pid}.{key}": value for pid, state in opt["state"].items()
               for key, value in state.items()}
    tensors.update({f"rng.{name}": value for name, value in rng.items()})
    metadata = {"format": "gptcli-state/1", "param_groups": opt["param_groups"],
                "scaler": scaler.state_dict() if scaler else None, **meta}
    return write_safetensors(path, tensors, metadata)


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None) -> tuple[dict, dict]:
    """Restore ``optimizer`` (and ``scaler``); returns the random generator states and metadata."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "gptcli-state/1":
        raise UserError(f"{path} is not a gptcli training state file")
    state: dict[int, dict] = {}
    rng = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
        elif name.startswith("rng."):
            rng[name[4:]] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model's optimizer: {e}") from None
    if scaler and meta.get("scaler") not in (None, "null"):
        scaler.load_state_dict(json.loads(meta["scaler"]))
    parsed = {k: json.loads(v) for k, v in meta.items() if k not in ("param_groups", "scaler")
              and k != "format"}
    return rng, parsed


def check_readable(path: str | os.PathLike) -> Path:
    """Refuse pickle files and missing paths with a message that says why."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path} looks like a pickle file ({path.suffix}); gptcli only loads .safetensors, "
            "because unpickling can run arbitrary code"
        )
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file")
    return path


def read_safetensors(path: str | os.PathLike, *, tensors: bool = True,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (or, with ``tensors=False``, only their names mapped to shapes) and metadata."""
    path = check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if tensors:
                out = {k: f.get_tensor(k) for k in f.keys()}
            else:
                out = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}")
    return out, metadata


def parse_metadata(path: str | os.PathLike, metadata: Mapping[str, str],
                   ) -> tuple[ModelConfig, dict]:
    """The ModelConfig and tokenizer spec of a gptcli checkpoint's metadata."""
    if not str(metadata.get("format", "")).startswith("gptcli/"):
        raise UserError(
            f"{path} is a safetensors file but not a gptcli checkpoint (no gptcli metadata); "
            "convert Hugging Face models with `gpt download`"
        )
    try:
        config = ModelConfig.model_validate_json(metadata["config"])
        spec = json.loads(metadata["tokenizer"])
    except (KeyError, ValueError, ValidationError) as e:
        raise UserError(f"{path} has damaged gptcli metadata: {validation_message(e)}") from None
    return config, spec


def load_checkpoint(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Load a gptcli checkpoint: ``(model in eval mode, tokenizer, metadata)``."""
    tensors, metadata = read_safetensors(path)
    config, spec = parse_metadata(path, metadata)
    tokenizer = get_tokenizer(spec)
    model = GPT(config)
    expected = set(model_tensors(model))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match its config (missing: "
                        f"{sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match its config: {str(e).splitlines()[-1]}")
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer, dict(metadata)


def resolve_model(name: str | os.PathLike | None, runs_dir: str | os.PathLike = "runs") -> Path:
    """Find the checkpoint a user means by ``name``.

    A checkpoint file; a run folder (its ``best.safetensors``, else ``last.safetensors``); the
    name of a model in the local store (``gpt2`` -> ``$GPTCLI_HOME/models/gpt2.safetensors``);
    or, for None, the most recently written run under ``runs_dir``.
    """
    from .runtime import models_dir, store_name

    if name is None:
        runs = sorted(Path(runs_dir).glob("*/*.safetensors"), key=lambda p: p.stat().st_mtime)
        runs = [p for p in runs if p.name in ("best.safetensors", "last.safetensors")]
        if not runs:
            raise UserError(f"no --model given and no trained run under ./{runs_dir}; "
                            f"train one with `gpt train` or {_available_hint()}")
        return resolve_model(runs[-1].parent)
    path = Path(name)
    if path.is_dir():
        for candidate in ("best.safetensors", "last.safetensors"):
            if (path / candidate).is_file():
                return path / candidate
        raise UserError(f"run folder {path} has no best.safetensors or last.safetensors")
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return check_readable(path)
    stored = models_dir() / f"{store_name(str(name))}.safetensors"
    if stored.is_file():
        return stored
    raise UserError(f"no model named {str(name)!r}: not a file, run folder or downloaded model; "
                    f"{_available_hint()}")


def local_models() -> list[str]:
    """Names of the models in the local store."""
    from .runtime import models_dir

    return sorted(p.stem.replace("--", "/") for p in models_dir().glob("*.safetensors"))


def _available_hint() -> str:
    names = local_models()
    runs = sorted(str(p.parent) for p in Path("runs").glob("*/last.safetensors"))
    available = names + runs
    if not available:
        return "nothing is available locally yet (try `gpt download gpt2` or `gpt train`)"
    return "available locally: " + ", ".join(available)


def load_model(name: str | os.PathLike | None, *, device: str = "auto",
               dtype: str | None = None) -> tuple[GPT, Tokenizer, Path]:
    """What every command that uses a model does first: find it (``resolve_model``), pick the
    device (and, if given, the weights' dtype) and load it. Returns (model, tokenizer, path)."""
    from .runtime import resolve_device, resolve_dtype

    path = resolve_model(name)
    dev = resolve_device(device)
    model, tokenizer, _ = load_checkpoint(
        path, device=dev, dtype=resolve_dtype(dtype, dev) if dtype is not None else None)
    return model, tokenizer, path


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What `gpt info` shows, read from the header only (no weights loaded)."""
    shapes, metadata = read_safetensors(path, tensors=False)
    config, spec = parse_metadata(path, metadata)
    n_params = 0
    for shape in shapes.values():
        count = 1
        for s in shape:
            count *= s
        n_params += count
    extra = {k: v for k, v in metadata.items() if k not in ("format", "config", "tokenizer")}
    return {
        "path": str(Path(path).resolve()),
        "format": metadata["format"],
        "file_size": Path(path).stat().st_size,
        "parameters": n_params,
        "config": config.model_dump(),
        "tokenizer": spec["type"] + (f" ({len(spec['chars'])} characters)" if "chars" in spec else ""),
        "provenance": extra,
    }
