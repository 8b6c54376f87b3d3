"""A training run's settings: where they come from (``merge_config``: the saved run < a
``--config`` file < flags) and what a run that starts from a checkpoint, or resumes, must keep
(``check_same_shape``): its shape and tokenizer, and on a resume its base model and LoRA
adapters too. A setting that asks for something else is refused, never ignored."""

from __future__ import annotations

import json
from pathlib import Path

from . import finetune
from .config import PRESETS, TrainConfig
from .errors import UserError, path_error, validation_message


def merge_config(explicit: dict, config_file: Path | None, saved: dict | None,
                 run: Path | None = None, check: bool = True) -> TrainConfig:
    """The one place settings merge: the saved run config (when resuming the run in ``run``)
    < the ``--config`` file < flags given on the command line. Defaults come from TrainConfig
    itself. ``check`` False: LoRA's flags are not checked yet (a resume's base and rank are
    the saved run's, read later)."""
    from pydantic import ValidationError

    fields: dict = dict((saved or {}).get("train", {}))
    asked: dict = {}  # what this command asks for: the --config file's settings, then flags
    if config_file is not None:
        try:
            loaded = json.loads(Path(config_file).read_text())
        except OSError as e:
            raise path_error(e, "read config file", config_file) from None
        except ValueError as e:
            raise UserError(f"config file {config_file} is not valid JSON: {e}") from None
        loaded = loaded.get("train", loaded) if isinstance(loaded, dict) else loaded
        try:
            asked.update(TrainConfig.model_validate(loaded).model_dump(exclude_unset=True))
        except ValidationError as e:
            raise UserError(f"config file {config_file}: {validation_message(e)}") from None
    asked.update(explicit)
    if saved is not None:  # a resume: the run's model decides its shape and tokenizer
        model, spec = saved.get("model") or {}, saved.get("tokenizer") or {}
        have = {k: model[k] for k in SHAPE if k in model} | (
            {"tokenizer": spec["type"]} if spec.get("type") in ("gpt2", "char") else {})
        started = {k: fields[k] for k in STARTED if k in fields}  # its base and adapters
        check_same_shape(asked, have | started, run, resume=True, config_file=config_file)
        fields.update(have)  # (what older versions recorded beside the shape is corrected)
    fields.update(asked)
    if saved is not None:  # (as the run recorded them: the same, maybe spelled otherwise)
        fields.update(started)
    cfg = TrainConfig(**fields)
    if check:
        finetune.check_flags(explicit, cfg)
    return cfg



SHAPE = ("n_layer", "n_head", "n_embd", "context_length", "position")
STARTED = ("init_from", "lora_rank", "lora_alpha", "lora_targets")  # a resume keeps them too


def check_same_shape(asked: dict, have: dict, source, *, resume: bool,
                     config_file: Path | None = None) -> None:
    """A model started from a checkpoint (or resumed) keeps its shape and tokenizer (``have``):
    a setting that asks for another (``asked``: flags or a --config file's) is refused, not
    ignored (nor, on a resume, written into config.json beside the shape it does not have)."""
    have = have | {"preset": next((name for name, shape in PRESETS.items()  # (--preset too)
                                   if shape.items() <= have.items()), "a shape of its own")}
    wrong = [k for k, v in have.items() if asked.get(k) is not None and
             not _same(k, asked[k], v) and not (k == "tokenizer" and asked[k] == "auto")]
    if wrong:
        flags = ", ".join(f"--{k.replace('_', '-')} {_flag(asked[k])} (it has {_flag(have[k])})"
                          for k in wrong)
        kind = "a resumed run" if resume else "a run started from a checkpoint"
        kept = "shape and tokenizer" if not set(wrong) & set(STARTED) else \
            "shape, tokenizer, base model and LoRA adapters"
        also = f" (and out of {config_file})" if config_file else ""
        raise UserError(f"{source} is not {flags}; {kind} keeps its checkpoint's {kept}: leave "
                        f"these flags out{also}")


def _same(key: str, asked, have) -> bool:
    """Whether a setting asks for what the run has: targets in any order, a base by any path
    to the same place."""
    if key == "lora_targets" and isinstance(asked, list) and isinstance(have, list):
        return sorted(asked) == sorted(have)
    if key == "init_from" and isinstance(asked, str) and isinstance(have, str) and asked != have:
        return Path(asked).exists() and Path(asked).resolve() == Path(have).resolve()
    return asked == have


def _flag(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else \
        "none" if value is None else str(value)
