"""Checkpoints: self-describing safetensors files, written atomically. Never pickle.

A model checkpoint's header metadata holds ``format`` (``gptcli/1``), ``config`` (ModelConfig
JSON), ``tokenizer`` (spec JSON), ``quantization`` (``int8`` for int8 checkpoints) and provenance
(gptcli version, step, run id, val loss, source). Tied weights are stored once (the output
matrix is left out) and re-tied on load.

A file is checked before anything is built from it: its metadata, then its tensor names and
shapes against its config (from the header alone; nothing is allocated for a file that asks for
more than it holds), then, for inference, that its weights are finite.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import GPT
from .errors import UserError, path_error, validation_message
from .files import PICKLE_SUFFIXES, atomic_write
from .tokenizer import Tokenizer, get_tokenizer

FORMAT = "gptcli/1"
TIED_OUTPUT = ("lm_head.weight", "lm_head.qweight", "lm_head.scale")  # stored once, as wte's
MAX_PARAMS = 2**48  # 280 trillion: more than any checkpoint holds, and far from overflowing


# ----------------------------------------------------------------------------- writing

def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any], *, what: str = "checkpoint") -> Path:
    """The one safetensors writer: contiguous CPU tensors, string metadata, atomic."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta), what=what)


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
        for name in TIED_OUTPUT:
            state.pop(name, None)
    return state


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer,
                    **provenance: Any) -> Path:
    """Write ``model`` with its config, tokenizer spec and provenance to one safetensors file
    (an int8 model as its int8 weights and scales, marked ``quantization: int8``)."""
    from . import __version__
    from .quantize import is_quantized

    model = unwrap_model(model)
    metadata = {
        "format": FORMAT,
        "config": model.config.model_dump_json(),
        "tokenizer": json.dumps(tokenizer.spec()),
        "gptcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if is_quantized(model):
        metadata["quantization"] = "int8"
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


# ----------------------------------------------------------------------------- reading

def check_readable(path: str | os.PathLike) -> Path:
    """Refuse pickle files and paths that cannot be read, with a message that says why."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path} looks like a pickle file ({path.suffix}); gptcli only loads .safetensors, "
            "because unpickling can run arbitrary code"
        )
    try:
        path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"checkpoint {path} is a symbolic link to {os.readlink(path)}, "
                            "which does not exist") from None
        raise UserError(f"checkpoint {path} does not exist") from None
    except OSError as e:  # a symbolic link loop, a file where a folder should be, ...
        raise path_error(e, "read checkpoint", path) from None
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file")
    return path


# safetensors' names of the dtypes ``read_tensors`` reads itself
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path: Path, raw: BinaryIO, f) -> dict[str, torch.Tensor]:
    """The tensors of ``f`` (safetensors' reader, which has checked the header), each read from
    ``raw`` (``path``, opened before ``f``: the same file unless a run saving it replaced it in
    between, which is refused) into memory of its own, which torch starts on a 64-byte line.
    Safetensors' own tensors are views of the mapped file at the header's offsets (gpt2's lie
    32 bytes past a line), and kernels read rows in whole vectors: torch's bf16
    ``_weight_int8pack_mm`` crashes on such weights (a segmentation fault, for more than one
    row). Copying those views instead would hold the file's pages and the copy at once: twice
    the model at the peak of a load. The cost: a load reads the whole file at once (gpt2's
    0.5 GB: 0.15-0.3 s more than mapping it, on a Zen 5 EPYC)."""
    opened, now = os.fstat(raw.fileno()), os.stat(path)
    if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
        raise UserError(f"{path} was replaced while it was being read (a run saving it?); "
                        "try again")
    size = int.from_bytes(raw.read(8), "little")
    header = json.loads(raw.read(size))
    out = {}
    for name in f.keys():
        entry = header[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None or sys.byteorder != "little":  # (rare: safetensors' copy)
            out[name] = f.get_tensor(name).clone()
            continue
        out[name] = tensor = torch.empty(entry["shape"], dtype=dtype)
        begin, end = entry["data_offsets"]
        raw.seek(8 + size + begin)
        if tensor.numel() and raw.readinto(
                tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
            raise ValueError(f"tensor {name} ends past the end of the file")
    return out


def read_safetensors(path: str | os.PathLike, *, tensors: bool = True,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (or, with ``tensors=False``, only their names mapped to shapes: the header
    alone is read) and metadata."""
    path = check_readable(path)
    try:
        # open first: the OS's own words for what stops us reading it, and the file
        # read_tensors reads (safe_open's, unless the path was replaced since)
        with open(path, "rb") as raw, safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if tensors:
                out = read_tensors(path, raw, f)
            else:
                out = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except OSError as e:
        raise path_error(e, "read checkpoint", path) from None
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{path} is " + (_other_kind(path) or "not a readable safetensors file "
                                         f"(truncated or corrupt?): {e}")) from None
    return out, metadata


def _other_kind(path: Path) -> str | None:
    """What a file that is not safetensors is, if GGUF or JSON (`gpt export`'s, a run's)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return None
    if head.startswith(b"GGUF"):
        return "a GGUF file (for llama.cpp or Ollama), not a gptcli checkpoint: give the run or " \
            "checkpoint it was exported from"
    if head[:1] in (b"{", b"["):
        return "a JSON file, not a checkpoint: give the run folder or a .safetensors file"
    return None


def parse_metadata(path: str | os.PathLike, metadata: Mapping[str, str],
                   ) -> tuple[ModelConfig, dict]:
    """The ModelConfig and tokenizer spec of a gptcli checkpoint's metadata."""
    if metadata.get("format") == "gptcli-lora/1":  # (adapters.py reads those)
        raise UserError(f"{path} holds LoRA adapters, not a whole model; load it with "
                        "gpt generate/eval/info --model, or make a whole model with gpt merge")
    if metadata.get("format") == "gptcli-state/1":
        raise UserError(f"{path} is a run's training state (what --resume reads), not a model; "
                        "give the run folder or its last.safetensors")
    if not str(metadata.get("format", "")).startswith("gptcli/"):
        raise UserError(
            f"{path} is a safetensors file but not a gptcli checkpoint (no gptcli metadata); "
            "convert Hugging Face models with `gpt download`"
        )
    try:
        config = ModelConfig.model_validate_json(metadata["config"])
        spec = json.loads(metadata["tokenizer"])
    except KeyError as e:
        raise UserError(f"{path} has damaged gptcli metadata: no {e.args[0]} entry") from None
    except (ValueError, ValidationError) as e:
        raise UserError(f"{path} has damaged gptcli metadata: {validation_message(e)}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise UserError(f"{path} has damaged gptcli metadata: its tokenizer entry is not a "
                        "tokenizer spec (an object with a type)")
    quantization = metadata.get("quantization")
    if quantization is not None and quantization != "int8":
        raise UserError(f"{path} says it is quantized as {quantization!r}, which this gptcli "
                        "does not know (int8 only)")
    return config, spec


def checkpoint_tokenizer(path: str | os.PathLike, config: ModelConfig, spec: dict) -> Tokenizer:
    """The tokenizer a checkpoint's spec describes, checked to fit the embedding: every id it
    makes has a row, and (for character vocabularies, which have no padding) every row has a
    character to decode to. A GPT-2 vocabulary may be padded (nanoGPT's 50,304 rows)."""
    try:
        tokenizer = get_tokenizer(spec)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    fits = tokenizer.vocab_size <= config.vocab_size if tokenizer.name == "gpt2" else \
        tokenizer.vocab_size == config.vocab_size
    if not fits:
        raise UserError(f"{path} is damaged: its {tokenizer.name} tokenizer has "
                        f"{tokenizer.vocab_size} tokens but the model's embedding has "
                        f"{config.vocab_size} rows")
    return tokenizer


def expected_shapes(config: ModelConfig, quantization: str | None = None,
                    ) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors a checkpoint of ``config`` stores, in the model's
    order. Taken from a one-block model built on the meta device (which allocates nothing),
    its block repeated ``n_layer`` times: every block has the same tensors (a block's index
    only picks its KV-cache slot), and building every block, even on the meta device, costs
    time and memory per block."""
    from .quantize import prepare

    with torch.device("meta"):
        model = GPT(config.model_copy(update={"n_layer": 1}))
        if quantization:
            prepare(model, quantization)
    state = {k: tuple(v.shape) for k, v in model_tensors(model).items()}
    block = {k.removeprefix("h.0."): v for k, v in state.items() if k.startswith("h.0.")}
    first = next(k for k in state if k.startswith("h.0."))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in state.items():
        if name == first:  # every block, where the one built has its tensors
            shapes.update({f"h.{i}.{k}": v for i in range(config.n_layer)
                           for k, v in block.items()})
        elif not name.startswith("h.0."):
            shapes[name] = shape
    return shapes


def check_tensors(shapes: Mapping[str, Sequence[int]], config: ModelConfig, where: str, *,
                  quantization: str | None = None) -> None:
    """The one check that a set of tensors (names -> shapes) is what ``config`` needs: used by
    load_checkpoint and checkpoint_info on a file's header and by the Hugging Face conversion.
    Names and shapes must match exactly, so a config can ask for no more than the tensors hold
    (and a file's header for no more than the file holds: safetensors checks that). Two cheap
    bounds come first, before even a one-block model is built on the meta device: no more
    blocks than the tensors have (each costs time and memory to describe), and no more than
    MAX_PARAMS parameters (sizes beyond any real checkpoint, which overflow tensor sizes)."""
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"h\.(\d+)\.", k))}
    if config.n_layer > len(layers) or config.num_params() > MAX_PARAMS:
        held = sum(math.prod(s) for s in shapes.values())
        raise UserError(f"{where}: the weights do not match the config: it describes "
                        f"{_count(config.n_layer, 'layer')} and {config.num_params():,} "
                        f"parameters, the weights have {_count(len(layers), 'layer')} and "
                        f"{held:,} values")
    expected = expected_shapes(config, quantization)
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted((k for k in shapes if k not in expected), key=_natural)
    wrong = [f"{k} {tuple(shapes[k])} (config: {shape})" for k, shape in expected.items()
             if k in shapes and tuple(shapes[k]) != shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else "")
                    for label, names in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape", wrong)) if names]
        raise UserError(f"{where}: the weights do not match the config ({'; '.join(problems)})")


def _natural(name: str) -> list:
    """Sort key that puts h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def check_finite(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Refuse NaN or infinite weights (a diverged run, a damaged file): they would make
    sampling fail, or greedy decoding print garbage without a word."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: the checkpoint's weights contain NaN or infinite values "
                            f"(tensor {name})")


def load_checkpoint(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, finite: bool = False,
                    ) -> tuple[GPT, Tokenizer, dict]:
    """Load a gptcli checkpoint: ``(model in eval mode, tokenizer, metadata)``. Everything is
    checked before the model is built; ``finite`` also checks the weights' values (for
    inference). An int8 checkpoint loads as an int8 model (see ``quantize``)."""
    from .quantize import prepare, tie_int8

    shapes, metadata = read_safetensors(path, tensors=False)
    config, spec = parse_metadata(path, metadata)
    tokenizer = checkpoint_tokenizer(path, config, spec)
    quantization = metadata.get("quantization")
    check_tensors(shapes, config, str(path), quantization=quantization)
    tensors, _ = read_safetensors(path)
    with torch.device("meta"):  # shapes only: the file's tensors become the weights
        model = GPT(config)
        if quantization:
            prepare(model, quantization)
    model.load_state_dict(tensors, strict=False, assign=True)
    if quantization:
        tie_int8(model)
    else:
        model.tie_weights()
    if finite:
        check_finite(path, model)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer, dict(metadata)


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What `gpt info` shows, read from the header only (no weights loaded), after the
    header checks ``load_checkpoint`` makes (config, tokenizer, tensor names and shapes)."""
    shapes, metadata = read_safetensors(path, tensors=False)
    config, spec = parse_metadata(path, metadata)
    checkpoint_tokenizer(path, config, spec)
    check_tensors(shapes, config, str(path), quantization=metadata.get("quantization"))
    extra = {k: v for k, v in metadata.items() if k not in ("format", "config", "tokenizer")}
    return {
        "path": str(Path(path).resolve()),
        "format": metadata["format"],
        "file_size": Path(path).stat().st_size,
        "parameters": config.num_params(),
        "quantization": metadata.get("quantization"),
        "config": config.model_dump(),
        "tokenizer": spec["type"] + (f" ({len(spec['chars'])} characters)" if "chars" in spec
                                     else ""),
        "provenance": extra,
    }
