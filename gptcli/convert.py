"""Hugging Face GPT-2 files -> one gptcli checkpoint: a local Hugging Face folder, or the
files ``hub.py`` fetched (config.json, then model.safetensors or the shards its index names).
Pickle weights (``pytorch_model.bin``) are never opened. The name and layout map itself is
``hf.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .hf import GPT2_VOCAB, from_hf
from .store import model_file

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
NO_PICKLE = ("gptcli does not unpickle downloaded files, because unpickling can run arbitrary "
             "code; ask for (or convert to) a safetensors version")



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


def convert_folder(folder: str | os.PathLike, *, out: str | os.PathLike | None = None,
                   log=None) -> dict[str, Any]:
    """Convert a local Hugging Face GPT-2 folder (config.json + safetensors), no network."""
    folder = Path(folder)
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
    name = folder.resolve().name
    return convert_hf(hf_config, files, out or model_file(name), log=log,
                      source=f"local:{folder.resolve()}")


def convert_hf(hf_config: dict[str, Any], files: list[Path], out: str | os.PathLike, *,
               log=None, **provenance: Any) -> dict[str, Any]:
    """Hugging Face GPT-2 config + safetensors files -> one gptcli checkpoint at ``out``, then
    load it back once to verify. Returns name, path, parameters, size and source."""
    import torch

    from .checkpoint import check_tensors, load_checkpoint, read_safetensors, save_checkpoint
    from .model import GPT
    from .tokenizer import GPT2Tokenizer

    config, _ = from_hf(hf_config)
    if config.vocab_size < GPT2_VOCAB:
        raise UserError(f"this model has vocab_size {config.vocab_size}, fewer than the GPT-2 "
                        f"tokenizer's {GPT2_VOCAB} tokens; gptcli pairs Hub models with the "
                        "GPT-2 tokenizer")
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
    save_checkpoint(out, model, GPT2Tokenizer(), **{k: v for k, v in provenance.items() if v})
    del model, state, hf_state
    verified, _, _ = load_checkpoint(out, finite=True)  # read back what was written
    return {"name": out.stem.replace("--", "/"), "path": str(out.resolve()),
            "parameters": verified.num_params(), "size": out.stat().st_size,
            "source": provenance.get("source"), "revision": provenance.get("revision")}
