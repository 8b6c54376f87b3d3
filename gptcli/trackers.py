"""Experiment trackers: TensorBoard and Weights & Biases, fed from the records of metrics.jsonl.

Every record a run writes to ``metrics.jsonl`` (train loss, learning rate, tokens/s, gradient
norm, validation loss, and the results of `gpt eval --task` on the run) goes to the trackers too,
each number under its own name at the record's step, so what a tracker shows is exactly what
``metrics.jsonl`` holds. Both are optional extras (``gptcli[tensorboard]``, ``gptcli[wandb]``).

- TensorBoard writes event files to ``<run>/tensorboard``. A resumed run opens the same folder and
  drops the events after the step it resumes from (they are trained again).
- W&B keeps its files in ``<run>/wandb`` and names the W&B run by the gptcli run id, so a resumed
  run continues the same W&B run. ``WANDB_MODE=offline`` works without a network (sync later with
  ``wandb sync``); the project is ``$WANDB_PROJECT`` or "gptcli".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError, require
from .runs import MetricsLog, RunFolder

TRACKERS = ("tensorboard", "wandb")


def check_installed(names: list[str]) -> None:
    """Fail now, before a run creates anything, when a tracker's extra is missing."""
    if "tensorboard" in names:
        require("tensorboard", "tensorboard", needed_for="--log-to tensorboard")
    if "wandb" in names:
        require("wandb", "wandb", needed_for="--log-to wandb")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, by name (the step itself and non-numbers left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run: RunFolder, resume_step: int | None) -> None:
        check_installed(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events at and after it: those steps are trained again
        self.writer = SummaryWriter(str(run.tensorboard_dir),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.note = f"logging to tensorboard; view with: tensorboard --logdir {run.path}"

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run: RunFolder, run_id: str, config: dict[str, Any]) -> None:
        wandb = require("wandb", "wandb", needed_for="--log-to wandb")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptcli"),
                                  id=run_id, name=run.path.name, resume="allow",
                                  dir=str(run.path), config=config,
                                  settings=wandb.Settings(silent=True))
        except Exception as e:  # wandb raises its own types for login and network failures
            raise UserError(f"wandb could not start: {str(e).splitlines()[0] if str(e) else e!r}"
                            "; run `wandb login`, or set WANDB_MODE=offline to log without a "
                            "network") from None
        folder = Path(self.run.dir).parent  # <run>/wandb/offline-run-<time>-<id>
        self.note = (f"logging to wandb offline; upload later with: wandb sync {folder}"
                     if self.run.settings.mode == "offline" else
                     f"logging to wandb: {self.run.url}")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        # a step before the run's last is refused by W&B's history: results of evaluating an
        # earlier checkpoint go to the run's summary
        for name, value in values.items():
            self.run.summary[name] = value

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a run logs to (possibly none)."""

    def __init__(self, names: list[str], run: RunFolder, run_id: str,
                 config: dict[str, Any] | None = None, resume_step: int | None = None) -> None:
        self.trackers: list = []
        try:
            for name in dict.fromkeys(names):
                if name == "tensorboard":
                    self.trackers.append(TensorBoard(run, resume_step))
                elif name == "wandb":
                    self.trackers.append(WandB(run, run_id, config or {}))
                else:
                    raise UserError(f"unknown tracker {name!r}; choose from "
                                    f"{', '.join(TRACKERS)}")
        except BaseException:
            self.close()
            raise

    @property
    def notes(self) -> list[str]:
        """Where each tracker logs, for the user."""
        return [tracker.note for tracker in self.trackers]

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            for tracker in self.trackers:
                tracker.log(int(record["step"]), values)

    def summary(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.summary(step, values)

    def close(self) -> None:
        while self.trackers:
            self.trackers.pop().close()


def log_results(checkpoint: str | os.PathLike, values: dict[str, float], names: list[str],
                ) -> Path:
    """Add evaluation results (``{"hellaswag/acc_norm": 0.29, ...}``) of a checkpoint in a run
    folder to that run: a record in its metrics.jsonl at the checkpoint's step, and its
    trackers. Returns the run folder."""
    from .checkpoint import read_safetensors

    run = RunFolder.holding(checkpoint)
    saved = run.read_config() if run is not None else None
    if saved is None or not run.metrics_path.is_file():
        raise UserError(f"--log-to adds the results to the run the model comes from, but "
                        f"{checkpoint} is not in a run folder; give --model a run folder or a "
                        "checkpoint in one")
    _, metadata = read_safetensors(checkpoint, tensors=False)
    step = int(metadata["step"]) if str(metadata.get("step", "")).isdigit() else 0
    with run:  # not while a training run writes to the same files
        metrics = MetricsLog(run.metrics_path, None)
        metrics.write(step=step, checkpoint=Path(checkpoint).name, **values)
        metrics.close()
        trackers = Trackers(names, run, saved.get("run_id") or "", saved.get("train"))
        try:
            trackers.summary(step, values)
        finally:
            trackers.close()
    return run.path
