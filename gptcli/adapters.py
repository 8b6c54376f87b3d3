"""LoRA checkpoints: a run trained with ``--lora-rank`` saves its adapters alone (a few MB, not
the whole model) and a reference to the base they were trained on.

A LoRA checkpoint is a safetensors file whose metadata holds ``format: gptcli-lora/1``, the
base's ``config`` and ``tokenizer`` (as a model checkpoint does), ``lora`` (rank, alpha, dropout,
targets: what ``lora.apply_lora`` needs to rebuild the adapters) and ``base`` (``model``: the
name it was given as, ``path``: the file it resolved to, ``fingerprint``: ``lora.
base_fingerprint`` of its tensors), plus the usual provenance (step, val loss, run id, chat
template). Its tensors are ``lora.adapter_state``'s.

Loading one (``models.load_weights``) finds the base, refuses it when its fingerprint differs
(the base was changed or replaced), wraps it in adapters with the saved settings, loads them,
and for inference merges them into the weights, so decoding pays nothing for them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import checkpoint_tokenizer, model_tensors, write_safetensors
from .config import ModelConfig
from .errors import UserError
from .lora import (TARGETS, adapter_settings, adapter_state, apply_lora, base_fingerprint,
                   load_adapter, merge_lora)
from .tokenizer import Tokenizer

FORMAT = "gptcli-lora/1"


class Header(NamedTuple):
    """A LoRA checkpoint's header, checked: what it adapts and how."""

    config: ModelConfig
    tokenizer: dict
    lora: dict
    base: dict
    metadata: dict


def is_adapter(metadata: Mapping[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def save_adapter(path: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer, *,
                 base: dict, **provenance: Any) -> Path:
    """Write the adapters of ``model`` (a GPT wrapped by ``apply_lora``) with the reference to
    their ``base`` ({"model", "path", "fingerprint"})."""
    from . import __version__
    from .checkpoint import unwrap_model

    model = unwrap_model(model)
    metadata = {"format": FORMAT, "config": model.config.model_dump_json(),
                "tokenizer": json.dumps(tokenizer.spec()),
                "lora": json.dumps(adapter_settings(model)), "base": json.dumps(base),
                "gptcli_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    metadata.update({k: v for k, v in provenance.items() if v is not None})
    return write_safetensors(path, adapter_state(model), metadata, what="LoRA checkpoint")


def adapter_shapes(config: ModelConfig, lora: dict) -> dict[str, tuple[int, ...]]:
    """The tensors a LoRA checkpoint of these settings holds (``lora.adapter_state``'s names)."""
    sizes = {"qkv": (config.n_embd, 3 * config.n_embd), "attn-out": (config.n_embd,) * 2,
             "mlp-in": (config.n_embd, 4 * config.n_embd),
             "mlp-out": (4 * config.n_embd, config.n_embd)}
    shapes = {}
    for i in range(config.n_layer):
        for target in lora["targets"]:
            n_in, n_out = sizes[target]
            name = f"h.{i}.{TARGETS[target]}"
            shapes[f"{name}.lora_A"] = (n_in, lora["rank"])
            shapes[f"{name}.lora_B"] = (lora["rank"], n_out)
    return shapes


def read_header(path: str | os.PathLike, shapes: Mapping[str, tuple], metadata: Mapping[str, str],
                ) -> Header:
    """A LoRA checkpoint's header, checked before anything is built: config, tokenizer,
    settings, base reference, and tensor names and shapes."""
    from .checkpoint import parse_metadata

    config, spec = parse_metadata(path, {**metadata, "format": "gptcli/1"})
    checkpoint_tokenizer(path, config, spec)
    try:
        lora, base = json.loads(metadata["lora"]), json.loads(metadata["base"])
        settings = {"rank": int(lora["rank"]), "alpha": float(lora["alpha"]),
                    "dropout": float(lora["dropout"]), "targets": list(lora["targets"])}
        base = {"model": str(base["model"]), "path": str(base["path"]),
                "fingerprint": str(base["fingerprint"])}
        unknown = [t for t in settings["targets"] if t not in TARGETS]
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} has damaged LoRA metadata ({type(e).__name__}: {e})") from None
    if unknown or settings["rank"] < 1:
        raise UserError(f"{path} has damaged LoRA metadata (rank {settings['rank']}, targets "
                        f"{settings['targets']})")
    expected = adapter_shapes(config, settings)
    _check_shapes(shapes, expected, str(path))
    return Header(config, spec, settings, base, dict(metadata))


def _check_shapes(shapes: Mapping[str, tuple], expected: Mapping[str, tuple], where: str) -> None:
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else "")
                    for label, names in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape", wrong)) if names]
        raise UserError(f"{where}: the adapters do not match their settings "
                        f"({'; '.join(problems)})")


def attach(model: torch.nn.Module, path: str | os.PathLike, header: Header,
           tensors: Mapping[str, torch.Tensor], *, merge: bool) -> None:
    """Put the adapters of the LoRA checkpoint at ``path`` on ``model``, its base (refused when
    the base's tensors are not the ones they were trained on); merged into the weights when
    ``merge`` (inference), else kept apart (a resumed LoRA run trains on)."""
    if base_fingerprint(model_tensors(model)) != header.base["fingerprint"]:
        raise UserError(f"{path} holds LoRA adapters trained on base model "
                        f"{header.base['model']} ({header.base['path']}), which has changed "
                        "since (its weights differ); put back the base they were trained on, or "
                        "train the adapters again")
    apply_lora(model, **header.lora)
    load_adapter(model, tensors)
    if merge:
        merge_lora(model)
    model.eval()


def info(path: str | os.PathLike, header: Header) -> dict[str, Any]:
    """What `gpt info` shows for a LoRA checkpoint."""
    trained = sum(a * b for a, b in adapter_shapes(header.config, header.lora).values())
    extra = {k: v for k, v in header.metadata.items()
             if k not in ("format", "config", "tokenizer", "lora", "base")}
    spec = header.tokenizer
    return {"path": str(Path(path).resolve()), "format": FORMAT,
            "file_size": Path(path).stat().st_size, "parameters": trained,
            "base_parameters": header.config.num_params(), "quantization": None,
            "lora": header.lora, "base": header.base, "config": header.config.model_dump(),
            "tokenizer": spec["type"] + (f" ({len(spec['chars'])} characters)"
                                         if "chars" in spec else ""),
            "provenance": extra}
