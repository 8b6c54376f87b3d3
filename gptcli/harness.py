"""lm-evaluation-harness on gptcli models (the ``eval`` extra: ``pip install "gptcli[eval]"``).

Importing this module registers the model type ``gptcli`` with ``lm_eval``: its
``loglikelihood`` is ``tasks.score`` (the scorer behind `gpt eval --task`, with the same
context/continuation split), ``loglikelihood_rolling`` is ``tasks.rolling`` (the sliding-window
scorer), and ``generate_until`` runs the one decode loop (greedy unless the task says otherwise,
stopping before any of the task's ``until`` strings). So the harness's figures on a shared task
equal `gpt eval --task`'s.

``lm_eval``'s own command line only knows its built-in model types, so run it through gptcli:
``gpt eval --harness TASK[,TASK...] --model MODEL`` (or, in Python, ``import gptcli.harness`` and
then ``lm_eval.simple_evaluate(model="gptcli", model_args="model=runs/x", tasks=[...])``).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import RuntimeFailure, require

lm_eval_api = require("lm_eval.api.model", "eval", needed_for="the harness adapter")
registry = require("lm_eval.api.registry", "eval", needed_for="the harness adapter")


@registry.register_model("gptcli")
class GptcliLM(lm_eval_api.LM):
    """A gptcli checkpoint (file, run folder or downloaded name) as an lm-eval model."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None, batch_size: int | str = 8, **_: Any) -> None:
        super().__init__()
        from .locate import load_model

        self.model, self.tokenizer, self.path = load_model(model, device=device, dtype=dtype,
                                                           quantize=quantize)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from .tasks import score, split_pair

        pairs = [split_pair(self.tokenizer, *r.args) for r in requests]
        return score(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from .tasks import rolling

        prefix = self.tokenizer.start_id
        return [rolling(self.model, self.tokenizer.encode(r.args[0]), prefix)
                if r.args[0] else 0.0 for r in requests]

    def generate_until(self, requests) -> list[str]:
        from .config import SampleConfig
        from .generate import generate, prompt_ids

        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            config = SampleConfig(
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get(
                    "do_sample", False) else 0.0,
                stop=[u for u in until if u], seed=0)
            ids, _ = prompt_ids(self.tokenizer, context, self.model.config.context_length)
            samples, _ = generate(self.model, self.tokenizer, ids, config)
            out.append(samples[0].text)
        return out


def evaluate_harness(tasks: list[str], load, batch_size: int, limit: int | None,
                     include: str | None = None) -> dict:
    """`gpt eval --harness`: run lm-eval tasks on a gptcli model; the harness's result dict.
    ``include`` is a folder of extra task configs."""
    from .errors import UserError

    evaluator = require("lm_eval", "eval", needed_for="--harness")
    from lm_eval.tasks import TaskManager

    offline = hub_unreachable()
    if offline:  # use what the datasets library has cached, without its retries
        go_offline()
    model = GptcliLM(load.model, device=load.device, dtype=load.dtype, quantize=load.quantize,
                     batch_size=batch_size)
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-evaluation-harness has no task {', '.join(unknown)} (see "
                        "`lm_eval --tasks list`, or give a folder of task configs with "
                        "--harness-include)")
    import contextlib
    import sys

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress to stdout
            return evaluator.simple_evaluate(model=model, tasks=tasks, limit=limit,
                                             batch_size=batch_size, task_manager=manager)
    except (ConnectionError, OSError) as e:
        if not offline and "Hub" not in str(e) and "connect" not in str(e).lower():
            raise
        why = f" ({offline})" if offline else ""
        raise RuntimeFailure(f"the data of {', '.join(tasks)} is not in the datasets cache and "
                             f"the Hugging Face Hub cannot be reached{why}; run the command once "
                             "with network access (lm-evaluation-harness fetches task data with "
                             "the datasets library)") from None


def go_offline() -> None:
    """Make huggingface_hub and the datasets library use their caches only, now: both read the
    offline switches into constants when they are imported, which lm_eval has done already."""
    import sys

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
    if (datasets := sys.modules.get("datasets.config")) is not None:
        datasets.HF_HUB_OFFLINE = datasets.HF_DATASETS_OFFLINE = True


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached now (None: it can, or the user asked for offline)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return None
    from huggingface_hub import constants

    from .hub import quiet_hub, unreachable

    quiet_hub()
    return unreachable(constants.ENDPOINT)
