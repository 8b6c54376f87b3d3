"""Hugging Face GPT-2 files -> one gptcli checkpoint: a local Hugging Face folder, or the
files ``hub.py`` fetched (config.json, then model.safetensors or the shards its index names).
Pickle weights (``pytorch_model.bin``) are never opened. The name and layout map itself is
``hf.py``.

A folder given as ``--model DIR`` is converted once and kept in the store by content
(``converted_folder``): ``models/hf-folders/<sha256>.safetensors``, the hash of its config,
weights and tokenizer files. Beside it, a record per folder path holds each input's size and
modification time and that hash, so the next use of an unchanged folder reads a few ``stat``s
and no weights (the token cache finds unchanged files the same way); a folder whose files
changed is hashed again, and converted again only if the content is new.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import write_text
from .hf import GPT2_VOCAB, from_hf
from .store import model_file, models_dir

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
NO_PICKLE = ("gptcli does not unpickle downloaded files, because unpickling can run arbitrary "
             "code; ask for (or convert to) a safetensors version")
# model.safetensors metadata key where `gpt export` keeps what gptcli knew (chat template, step)
GPTCLI_KEY = "gptcli"
KEPT = ("chat_template", "step", "val_loss", "run_id")


def read_hf_config(path: Path, where: str) -> dict[str, Any]:
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"config.json of {where} is not readable JSON: {e}") from None
    if not isinstance(hf, dict):
        raise UserError(f"config.json of {where} is not a JSON object")
    return hf


def shards(index_path: Path, where: str) -> list[str]:
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{HF_WEIGHTS_INDEX} of {where} is damaged: {e}") from None
    bad = [s for s in shards if not s.endswith(".safetensors") or "/" in s or ".." in s]
    if bad:
        raise UserError(f"{HF_WEIGHTS_INDEX} of {where} names files that are not safetensors "
                        f"shards: {bad[:3]}")
    return shards


def is_hf_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a Hugging Face model folder (config.json and weights)."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in (HF_WEIGHTS, HF_WEIGHTS_INDEX, *HF_PICKLE_WEIGHTS))


def folder_inputs(folder: Path) -> tuple[dict[str, Any], list[Path], list[Path]]:
    """(config, weight files, tokenizer files) of a local Hugging Face GPT-2 folder, after the
    checks that need no weights: a GPT-2 config, safetensors weights present."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    hf_config = read_hf_config(config_path, str(folder))
    from_hf(hf_config)
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_WEIGHTS_INDEX).is_file():
        files = [folder / s for s in shards(folder / HF_WEIGHTS_INDEX, str(folder))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"shards listed in {HF_WEIGHTS_INDEX} are missing: {missing[:3]}")
    else:
        pickles = [p for p in HF_PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise UserError(f"{folder} has only pickle weights ({pickles[0]}); " + NO_PICKLE)
        raise UserError(f"{folder} has no {HF_WEIGHTS} (nor {HF_WEIGHTS_INDEX})")
    tokenizer = [folder / n for n in HF_TOKENIZER_FILES if (folder / n).is_file()]
    return hf_config, files, tokenizer


def convert_folder(folder: str | os.PathLike, *, out: str | os.PathLike | None = None,
                   log=None) -> dict[str, Any]:
    """Convert a local Hugging Face GPT-2 folder (config.json + safetensors), no network. Its
    tokenizer files, when it has them, must be GPT-2's or a gptcli character vocabulary."""
    from .vocab import tokenizer_spec_from_files

    folder = Path(folder)
    hf_config, files, _ = folder_inputs(folder)
    spec = tokenizer_spec_from_files(folder)
    kept = _exported_metadata(files[0])
    return convert_hf(hf_config, files, out or model_file(folder.resolve().name), log=log,
                      tokenizer=spec, source=f"local:{folder.resolve()}", **kept)


def _exported_metadata(weights: Path) -> dict[str, Any]:
    """What `gpt export` kept in the weights' metadata (chat template, step, ...), if anything."""
    from .checkpoint import read_safetensors

    text = read_safetensors(weights, tensors=False)[1].get(GPTCLI_KEY)
    try:
        kept = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {k: v for k, v in kept.items() if k in KEPT} if isinstance(kept, dict) else {}


def convert_hf(hf_config: dict[str, Any], files: list[Path], out: str | os.PathLike, *,
               log=None, tokenizer: dict | None = None, **provenance: Any) -> dict[str, Any]:
    """Hugging Face GPT-2 config + safetensors files -> one gptcli checkpoint at ``out``, then
    load it back once to verify. ``tokenizer`` is the spec to store (default GPT-2's). Returns
    name, path, parameters, size and source."""
    import torch

    from .checkpoint import (check_tensors, checkpoint_tokenizer, load_checkpoint,
                             read_safetensors, save_checkpoint)
    from .model import GPT

    config, _ = from_hf(hf_config)
    spec = tokenizer or {"type": "gpt2"}
    if spec["type"] == "gpt2" and config.vocab_size < GPT2_VOCAB:
        raise UserError(f"this model has vocab_size {config.vocab_size}, fewer than the GPT-2 "
                        f"tokenizer's {GPT2_VOCAB} tokens; gptcli pairs Hub models with the "
                        "GPT-2 tokenizer")
    tok = checkpoint_tokenizer("config.json", config, spec)
    hf_state = {}
    for path in files:
        hf_state.update(read_safetensors(path)[0])
    if log:
        log(f"converting {len(files)} file(s), {len(hf_state)} tensors")
    config, state = from_hf(hf_config, hf_state)
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, config, "config.json")
    with torch.device("meta"):  # shapes only: the file's tensors become the weights
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    out = Path(out)
    save_checkpoint(out, model, tok, **{k: v for k, v in provenance.items() if v is not None})
    del model, state, hf_state
    verified, _, _ = load_checkpoint(out, finite=True)  # read back what was written
    return {"name": out.stem.replace("--", "/"), "path": str(out.resolve()),
            "parameters": verified.num_params(), "size": out.stat().st_size,
            "source": provenance.get("source"), "revision": provenance.get("revision")}


# ----------------------------------------------------------------------------- --model DIR

def converted_dir() -> Path:
    """Where folders given as ``--model DIR`` are kept, converted, by content."""
    return models_dir() / "hf-folders"


def _stamp(files: list[Path]) -> list[list]:
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append([f.name, st.st_size, st.st_mtime_ns])
    return stamps


def _content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def converted_folder(folder: str | os.PathLike, *, log=None) -> Path:
    """The gptcli checkpoint of Hugging Face folder ``folder``: converted on first use, then
    found again by the sizes and modification times of its config, weights and tokenizer files
    (no weights read), or by their content when those changed."""
    folder = Path(folder).resolve()
    store = converted_dir()
    record_path = store / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"
    record = _read_record(record_path)
    _, files, tokenizer = folder_inputs(folder)
    inputs = [folder / "config.json", *files, *tokenizer]
    stamp = _stamp(inputs)
    if record.get("folder") == str(folder) and record.get("stamp") == stamp:
        cached = store / f"{record.get('content')}.safetensors"
        if cached.is_file():
            return cached
    content = _content_hash(inputs)
    out = store / f"{content}.safetensors"
    if not out.is_file():
        if log:
            log(f"converting the Hugging Face folder {folder} once (kept in {store})")
        convert_folder(folder, out=out, log=log)
    write_text(record_path, json.dumps({"folder": str(folder), "stamp": stamp,
                                        "content": content}) + "\n", what="conversion record")
    _drop_unreferenced(store, record.get("content"), content)
    return out


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _drop_unreferenced(store: Path, old: str | None, new: str) -> None:
    """Delete the conversion a folder's record no longer points to, unless another uses it."""
    if not old or old == new:
        return
    if any(_read_record(p).get("content") == old for p in store.glob("*.json")):
        return
    try:
        (store / f"{old}.safetensors").unlink()
    except OSError:
        pass


def converted_name(path: Path) -> str | None:
    """The folder name a checkpoint in ``converted_dir()`` was converted from, else None."""
    try:
        if Path(path).resolve().parent != converted_dir().resolve():
            return None
    except OSError:
        return None
    for record in map(_read_record, converted_dir().glob("*.json")):
        if record.get("content") == Path(path).stem:
            return Path(record.get("folder", "")).name or None
    return None
