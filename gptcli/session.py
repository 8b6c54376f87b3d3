"""A training run's state while it runs (``Session``: model, data, optimizer, run folder,
counters) and what the loop asks of it: save, resume, validate, sample, agree on stopping;
``StopSignals`` turns Ctrl-C/SIGTERM into a request to stop after the current step."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import save_adapter
from .checkpoint import load_training_state, save_checkpoint, save_training_state
from .chat import TEMPLATE
from .config import SampleConfig, TrainConfig
from .data import BatchSampler
from .distributed import Dist
from .errors import RuntimeFailure, UserError
from .evaluate import evaluate
from .generate import generate, prompt_ids
from .model import GPT
from .optim import StepParts
from .runs import MetricsLog, RunFolder
from .tokenizer import Tokenizer
from .trackers import Trackers


@dataclass
class FitResult:
    out: Path
    step: int
    best_val: float | None
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "max-time", "stop-after" or None
    checkpoint: Path | None = None
    is_main: bool = True
    resume_command: str = ""
    try_command: str = ""

    @property
    def exit_code(self) -> int:
        """What the process reports: a stop by signal keeps the signal's shell status (SIGPIPE:
        the display's reader went away)."""
        return {"SIGINT": 130, "SIGTERM": 143, "SIGPIPE": 141}.get(self.stopped_by or "", 0)


@dataclass
class Session:
    """Everything the loop needs, built by ``setup`` before it starts."""

    cfg: TrainConfig
    run: RunFolder
    dist: Dist
    display: object
    model: GPT
    runner: torch.nn.Module  # the model, compiled and/or wrapped in DDP
    parts: StepParts
    tokenizer: Tokenizer
    sampler: BatchSampler
    val_tokens: np.ndarray
    device: torch.device
    dtype: torch.dtype
    max_steps: int
    tokens_per_step: int
    run_id: str
    val_masks: object = None  # chat/instruction data: which validation targets count
    base: dict | None = None  # a LoRA run: the base its adapters belong to
    chat_template: str | None = None  # recorded in the checkpoints
    step: int = 0
    best_val: float | None = None
    elapsed_before: float = 0.0
    metrics: MetricsLog | None = None
    trackers: Trackers | None = None
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def log(self, **record) -> None:
        """One record to metrics.jsonl and the trackers (rank 0)."""
        if self.metrics:
            self.metrics.write(**record)
        if self.trackers:
            self.trackers.log(record)

    def close_logs(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.trackers:
            self.trackers.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # an error or Ctrl-C mid-step: what was logged is kept
            self.close_logs()

    def mean_over_ranks(self, value: float) -> float:
        return self.dist.sum([value], self.device)[0] / self.dist.world

    def check_finite(self, what: str, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            self.close_logs()
            kept = f"the last good checkpoint, {self.run.last}, is kept" \
                if self.run.last.is_file() else "no checkpoint had been saved yet"
            raise RuntimeFailure(f"the {what} became {value} at step {self.step}; stopped without "
                                 f"saving ({kept}); try a lower --lr")

    def save(self, path: Path, val: float | None) -> None:
        """A checkpoint of the model (a LoRA run: its adapters and their base's reference)."""
        if not self.dist.is_main:
            return
        provenance = dict(step=self.step, val_loss=val, run_id=self.run_id,
                          source=f"gpt train ({self.run.path})", chat_template=self.chat_template)
        if self.base is not None:
            save_adapter(path, self.model, self.tokenizer, base=self.base, **provenance)
        else:
            save_checkpoint(path, self.model, self.tokenizer, **provenance)

    def save_last(self, val: float | None) -> None:
        """last.safetensors and the training state that resumes from it, marked with the same
        step and run id (a resume refuses a pair that does not match)."""
        self.save(self.run.last, val)
        rng = {f"torch.{r}": s for r, s in enumerate(self.dist.gather(torch.get_rng_state()))}
        if self.device.type == "cuda":  # dropout masks on the GPU
            states = self.dist.gather(torch.cuda.get_rng_state(self.device))
            rng.update({f"cuda.{r}": s for r, s in enumerate(states)})
        if self.dist.is_main:
            save_training_state(
                self.run.last_state, self.parts.optimizer, self.parts.scaler,
                rng={**rng, "sampler": self.sampler.state()},
                meta={key: json.dumps(value) for key, value in {  # the state's metadata is JSON
                    "step": self.step, "run_id": self.run_id, "best_val": self.best_val,
                    "train_config": self.cfg.model_dump(), "elapsed": self.elapsed(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items()})

    def validate(self) -> float | None:
        if not len(self.val_tokens):
            return None
        loss = evaluate(self.model, self.val_tokens, self.model.config.context_length,
                        batch_size=self.cfg.batch_size, device=self.device, amp=self.parts.amp,
                        max_windows=self.cfg.eval_steps * self.cfg.batch_size,
                        masks=self.val_masks).loss
        self.check_finite("validation loss", loss)
        return loss

    def sample(self) -> str | None:
        if not self.dist.is_main:
            return None
        prompt, _ = prompt_ids(self.tokenizer, "", self.model.config.context_length)
        config = SampleConfig(max_new_tokens=self.cfg.sample_tokens, temperature=0.8,
                              seed=self.cfg.seed)
        self.model.eval()
        samples, _ = generate(self.model, self.tokenizer, prompt, config)
        self.model.train()
        return samples[0].text

    def stop_reason(self, signum: int | None, stop_after: int | None) -> str | None:
        """Why to stop now, agreed by every rank (a rank that stopped alone would hang the
        others)."""
        out_of_time = bool(self.cfg.max_time) and self.elapsed() > self.cfg.max_time
        if not self.dist.any(signum is not None or self.step == stop_after or out_of_time,
                             self.device):
            return None
        return (signal.Signals(signum).name if signum is not None else "max-time" if out_of_time
                else "stop-after" if self.step == stop_after else "another rank")


def restore_state(s: Session) -> None:
    """Optimizer moments, random generator states, sampler position and counters of
    last.state.safetensors: the run goes on as if it had never stopped."""
    rng, meta = load_training_state(s.run.last_state, s.parts.optimizer, s.parts.scaler)
    s.sampler.load_state(rng["sampler"])
    torch.set_rng_state(rng.get(f"torch.{s.dist.rank}", rng["torch.0"]))
    if s.device.type == "cuda" and f"cuda.{s.dist.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{s.dist.rank}"], s.device)
    s.step, s.best_val, s.elapsed_before = meta["step"], meta["best_val"], meta["elapsed"]
    s.run_id = meta.get("run_id") or s.run_id


def check_left(s: Session) -> None:
    """Refuse to resume a run with nothing left to train: past its --max-steps (or --epochs),
    or its --max-time spent (the run's time in all, across resumes)."""
    cfg, path = s.cfg, s.run.path
    if s.step > s.max_steps:
        asked = f"--max-steps {s.max_steps:,}" if cfg.epochs is None else \
            f"--epochs {cfg.epochs:g} ({s.max_steps:,} steps)"
        raise UserError(f"{path} is already at step {s.step:,}, past {asked}: nothing to train; "
                        "ask for more steps to go on")
    if cfg.max_time and s.elapsed_before >= cfg.max_time:
        raise UserError(f"{path} has trained for {seconds(s.elapsed_before)} s already, past "
                        f"--max-time {cfg.max_time:g} (the run's time in all, across resumes): "
                        "nothing to train; give a larger --max-time to go on, e.g. --max-time "
                        f"{more_time(cfg.max_time, s.elapsed_before)}")


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second press is final

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def try_command(s: Session) -> str:
    """How to try the trained model: `gpt chat` for one fine-tuned on conversations, else
    `gpt generate` with a prompt its tokenizer can encode."""
    if s.chat_template == TEMPLATE:
        return f"gpt chat --model {s.run.path}"
    prompt = "The" if s.tokenizer.name == "gpt2" else "ROMEO:" if not s.cfg.data else None
    return f"gpt generate --model {s.run.path}" + (f' --prompt "{prompt}"' if prompt else "")


def resume_command(run: RunFolder, dist: Dist, max_time: str | None = None) -> str:
    """The command that continues ``run``: the same launcher and number of processes (and, for
    a run stopped by its --max-time, a larger one: ``max_time``)."""
    more = f" --max-time {max_time}" if max_time else ""
    return dist.command(f"train --out {run.path} --resume{more}")


def seconds(t: float) -> str:
    """``t`` seconds as a user reads them: whole seconds, or two digits under 10."""
    return f"{t:,.0f}" if t >= 10 else f"{t:.2g}"


def more_time(max_time: float, elapsed: float) -> str:
    """A --max-time that gives a run stopped by ``max_time`` as long again to train."""
    return seconds(max(max_time, elapsed) * 2).replace(",", "")


def interrupted_message(run: RunFolder, dist: Dist) -> str:
    if not run.has_state():
        return "interrupted before the first checkpoint was saved"
    from .checkpoint import read_safetensors

    step = read_safetensors(run.last, tensors=False)[1].get("step", "?")
    return (f"interrupted; the checkpoint of step {step} is saved. Resume with: "
            f"{resume_command(run, dist)}")
