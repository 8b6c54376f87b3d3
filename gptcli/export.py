"""`gpt export`: a gptcli checkpoint as a Hugging Face GPT-2 folder (``transformers`` loads it).
The GPT-2 <-> gptcli map itself is ``hf.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import write_text
from .hf import GPT2_VOCAB, to_hf


def export_model(model: str | os.PathLike, out: str | os.PathLike, *,
                 force: bool = False) -> dict[str, Any]:
    """Write checkpoint ``model`` as a Hugging Face GPT-2 folder (config.json, model.safetensors,
    generation_config.json) that ``GPT2LMHeadModel.from_pretrained`` loads. Options GPT-2 cannot
    express are refused before any weights are read; a folder with files is not overwritten
    without ``force``."""
    from .checkpoint import (load_checkpoint, model_tensors, parse_metadata, read_safetensors,
                             write_safetensors)
    from .tokenizer import get_tokenizer

    _, metadata = read_safetensors(model, tensors=False)
    config, spec = parse_metadata(model, metadata)
    if metadata.get("quantization"):
        raise UserError(f"{model} is an int8 checkpoint; export the float checkpoint it was "
                        "made from")
    eot = get_tokenizer(spec).eot_id if config.vocab_size >= GPT2_VOCAB else None
    to_hf(config)  # refuse what GPT-2 cannot express, before reading any weights
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the Hugging Face model "
                        "into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} already has files; pass --force to overwrite them, or give "
                        "an empty or new folder")
    net, _, _ = load_checkpoint(model)
    hf, hf_tensors = to_hf(config, model_tensors(net), eot_id=eot)
    hf["dtype"] = str(next(net.parameters()).dtype).removeprefix("torch.")
    weights = write_safetensors(out / "model.safetensors", hf_tensors, {"format": "pt"},
                                what="model.safetensors")
    special = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    for name, payload in (("config.json", hf), ("generation_config.json", special)):
        write_text(out / name, json.dumps(payload, indent=2, sort_keys=True) + "\n", what=name)
    return {"path": str(out.resolve()), "files": sorted(p.name for p in out.iterdir()
                                                        if not p.name.startswith(".")),
            "size": weights.stat().st_size, "tokenizer": spec.get("type"),
            "parameters": config.num_params()}
