"""Training: ``fit()`` is the visible loop; ``setup()`` builds what it needs before it starts,
and the small helpers around it do one thing each.

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay, gradient
accumulation and clipping, autocast (bf16, or fp16 with a GradScaler), optional torch.compile,
DDP under torchrun. The run folder (``runs.RunFolder``) owns the files.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (load_checkpoint, load_training_state, save_checkpoint,
                         save_training_state)
from .config import ModelConfig, SampleConfig, TrainConfig, validation_message
from .data import BatchSampler, check_enough, load_tokens, resolve_data
from .distributed import Dist, current_dist, setup_distributed, teardown_distributed
from .evaluate import evaluate
from .hardware import check_memory, train_memory_estimate
from .model import GPT
from .models import resolve_model
from .optim import StepParts, lr_at, step_parts, train_step
from .quantize import is_quantized
from .runs import MetricsLog, RunFolder, new_run_id
from .runtime import (Interrupted, RuntimeFailure, UserError, autocast, path_error,
                      resolve_dtype, seed_everything, synchronize)
from .tokenizer import Tokenizer
from .trackers import Trackers


# ----------------------------------------------------------------------------- settings

def default_out(cfg: TrainConfig) -> Path:
    if not cfg.data:
        return Path("runs") / "shakespeare"
    return Path("runs") / (Path(cfg.data[0].rstrip("/")).stem.replace("--", "-") or "run")


def merge_config(explicit: dict, config_file: Path | None, saved: dict | None) -> TrainConfig:
    """The one place settings merge: the saved run config (when resuming) < the ``--config``
    file < flags given on the command line. Defaults come from TrainConfig itself."""
    from pydantic import ValidationError

    fields: dict = dict((saved or {}).get("train", {}))
    if config_file is not None:
        try:
            loaded = json.loads(Path(config_file).read_text())
        except OSError as e:
            raise path_error(e, "read config file", config_file) from None
        except ValueError as e:
            raise UserError(f"config file {config_file} is not valid JSON: {e}") from None
        loaded = loaded.get("train", loaded) if isinstance(loaded, dict) else loaded
        try:
            fields.update(TrainConfig.model_validate(loaded).model_dump(exclude_unset=True))
        except ValidationError as e:
            raise UserError(f"config file {config_file}: {validation_message(e)}") from None
    fields.update(explicit)
    return TrainConfig(**fields)


# ----------------------------------------------------------------------------- setup

@dataclass
class FitResult:
    out: Path
    step: int
    best_val: float | None
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "max-time", "stop-after" or None
    checkpoint: Path | None = None
    is_main: bool = True

    @property
    def exit_code(self) -> int:
        """What the process reports: a stop by signal keeps the signal's shell status."""
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.stopped_by or "", 0)


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
            raise RuntimeFailure(f"the {what} became {value} at step {self.step}; stopped without "
                                 f"saving (the last good checkpoint in {self.run.path} is kept); "
                                 "try a lower --lr")

    def save(self, path: Path, val: float | None) -> None:
        if self.dist.is_main:
            save_checkpoint(path, self.model, self.tokenizer, step=self.step, val_loss=val,
                            run_id=self.run_id, source=f"gpt train ({self.run.path})")

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
                        max_windows=self.cfg.eval_steps * self.cfg.batch_size).loss
        self.check_finite("validation loss", loss)
        return loss

    def sample(self) -> str | None:
        if not self.dist.is_main:
            return None
        from .sampling import generate, prompt_ids

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


def setup(cfg: TrainConfig, run: RunFolder, resume: bool, display) -> Session:
    """Device, data, model, optimizer, sampler and (when resuming) the saved state; writes
    config.json and opens metrics.jsonl (rank 0)."""
    from .display import NullDisplay

    dist = current_dist()
    display = display if display is not None and dist.is_main else NullDisplay()
    device = dist.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed + dist.rank)
    init = load_checkpoint(run.last) if resume else \
        load_checkpoint(resolve_model(cfg.init_from)) if cfg.init_from else None
    if init and is_quantized(init[0]):
        raise UserError(f"{cfg.init_from} is an int8 checkpoint, for inference only; train from "
                        f"the float checkpoint it was made from "
                        f"({init[2].get('quantized_from', 'see gpt info')})")
    files = resolve_data(cfg.data)
    tokenizer_spec = init[1].spec() if init else cfg.tokenizer if cfg.tokenizer != "auto" else \
        "char" if cfg.preset in ("tiny", "small") else "gpt2"

    def tokenize():
        return display.tokenize(lambda progress: load_tokens(
            files, tokenizer_spec, encoding=cfg.encoding, column=cfg.text_column,
            workers=cfg.workers, progress=progress, log=display.note))

    if dist.enabled:  # rank 0 fills the token cache once; the others then read it
        dist.main_first(lambda: tokenize() and None)
    data = tokenize()
    model = build_model(cfg, init, data.tokenizer.vocab_size, device, dtype)
    train_tokens, val_tokens = data.split(cfg.val_fraction)
    T = model.config.context_length
    check_enough(len(train_tokens), len(val_tokens), T, cfg.val_fraction)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * T
    max_steps = cfg.max_steps if cfg.epochs is None else \
        max(1, math.ceil(cfg.epochs * len(train_tokens) / tokens_per_step))
    parts = step_parts(model, cfg, device, dtype)
    runner = parts.runner
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    s = Session(cfg=cfg, run=run, dist=dist, display=display, model=model, runner=runner,
                parts=parts, tokenizer=data.tokenizer, val_tokens=val_tokens, device=device,
                dtype=dtype, max_steps=max_steps, tokens_per_step=tokens_per_step,
                sampler=BatchSampler(train_tokens, T, cfg.batch_size, cfg.seed, rank=dist.rank,
                                     world=dist.world),
                run_id=(run.read_config() or {}).get("run_id") if resume else new_run_id())
    if resume:
        restore_state(s)
    if dist.is_main:
        run.write_config({"run_id": s.run_id, "train": cfg.model_dump(),
                          "model": model.config.model_dump(), "tokenizer": data.tokenizer.spec(),
                          "world_size": dist.world, "tokens_per_step": tokens_per_step,
                          "max_steps": max_steps, "data": [str(f) for f in data.files],
                          "shards": [s.name for s in data.shards],
                          "validation": {"fraction": cfg.val_fraction, "tokens": len(val_tokens),
                                         "from": "the end of the data"}})
        s.metrics = run.open_metrics(s.step if resume else None)
        s.trackers = Trackers(cfg.log_to, run.path, s.run_id, config=cfg.model_dump(),
                              resume_step=s.step if resume else None)
        for line in s.trackers.notes:
            display.note(line)
    return s


def build_model(cfg: TrainConfig, init, vocab_size: int, device: torch.device,
                dtype: torch.dtype) -> GPT:
    """The model to train (a new one, or the checkpoint's), after checking that a training step
    of this shape fits in the device's memory."""
    config = init[0].config if init else ModelConfig.from_preset(
        cfg.preset, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, context_length=cfg.context_length, dropout=cfg.dropout)
    check_memory(train_memory_estimate(config, cfg.batch_size, dtype), device,
                 f"a training step at --batch-size {cfg.batch_size} with context "
                 f"{config.context_length} and {config.num_params():,} parameters",
                 "Try a smaller --batch-size (raise --grad-accum to keep the effective batch), "
                 "--context-length or model.")
    if init is None:
        model = GPT(config)
    elif cfg.dropout != config.dropout:  # fine-tuning with another dropout rate
        model = GPT(config.model_copy(update={"dropout": cfg.dropout}))
        model.load_state_dict(init[0].state_dict())
    else:
        model = init[0]
    return model.to(device).train()


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


# ----------------------------------------------------------------------------- fit

class _Stop:
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


def fit(cfg: TrainConfig, *, out: RunFolder | Path, resume: bool = False, display=None,
        stop_after: int | None = None) -> FitResult:
    """Train as ``cfg`` says in the run folder ``out`` (already prepared). Under torchrun every
    rank runs this same loop on its own slice of each batch; rank 0 alone writes files."""
    s = setup(cfg, out if isinstance(out, RunFolder) else RunFolder(out), resume, display)
    display = s.display
    display.start(step=s.step, max_steps=s.max_steps, device=s.device, dtype=s.dtype,
                  params=s.model.num_params(), tokens_per_step=s.tokens_per_step, out=s.run.path,
                  batch=(cfg.batch_size, cfg.grad_accum, s.dist.world,
                         s.model.config.context_length))
    s.t0 = t_log = time.perf_counter()
    since_log, last_val, stopped_by = 0, None, None
    with _Stop() as stop, s:
        while s.step < s.max_steps:
            for group in s.parts.optimizer.param_groups:
                group["lr"] = lr = lr_at(s.step, cfg, s.max_steps)
            loss, grad_norm = train_step(
                s.runner, s.parts.optimizer, s.sampler.next_batch, grad_accum=cfg.grad_accum,
                grad_clip=cfg.grad_clip, amp=s.parts.amp, scaler=s.parts.scaler, device=s.device)
            s.step += 1
            since_log += 1
            final = s.step == s.max_steps
            if s.step % cfg.log_interval == 0 or final:
                loss_value = s.mean_over_ranks(loss.item())
                s.check_finite("training loss", loss_value)
                now = time.perf_counter()
                tok_s, t_log, since_log = since_log * s.tokens_per_step / (now - t_log), now, 0
                norm = grad_norm.item()
                s.log(step=s.step, train_loss=loss_value, lr=lr, tokens_per_s=tok_s,
                      grad_norm=norm if math.isfinite(norm) else None, elapsed=s.elapsed())
                display.step(s.step, loss=loss_value, lr=lr, tokens_per_s=tok_s)
            if s.step % cfg.eval_interval == 0 or final:
                last_val = s.validate()
                s.log(step=s.step, val_loss=last_val)
                display.eval(s.step, last_val)
                if last_val is not None and (s.best_val is None or last_val < s.best_val):
                    s.best_val = last_val
                    s.save(s.run.best, last_val)
                s.save_last(last_val)
            if cfg.save_interval and s.step % cfg.save_interval == 0:
                s.save(s.run.snapshot(s.step), last_val)
            if cfg.sample_interval and s.step % cfg.sample_interval == 0:
                display.sample(s.step, s.sample())
            if reason := s.stop_reason(stop.signal, stop_after):
                if not final:
                    stopped_by = reason
                    s.save_last(last_val)
                break
    return finish(s, stopped_by)


def finish(s: Session, stopped_by: str | None) -> FitResult:
    synchronize(s.device)
    s.close_logs()
    s.display.finish()
    if not len(s.val_tokens) and not s.run.best.exists():
        s.save(s.run.best, None)
    if s.dist.is_main:
        _plot_losses(s.run.path)
    best = s.run.best
    return FitResult(out=s.run.path, step=s.step, best_val=s.best_val, stopped_by=stopped_by,
                     is_main=s.dist.is_main, checkpoint=best if best.exists() else s.run.last)


def launch(explicit: dict, *, config_file: Path | None = None, resume: str | None = None,
           force: bool = False, display=None) -> FitResult:
    """What `gpt train` does: join the torchrun job (if any), lock and check the run folder,
    merge the settings, fit, and leave the job. ``resume`` is None, "yes" or "auto"."""
    cfg = merge_config(explicit, config_file, None)
    run = RunFolder(cfg.out or default_out(cfg))
    dist = setup_distributed(cfg.device)
    try:
        dist.main_first(run.lock)  # one process trains in a folder at a time
        if dist.main_first(lambda: run.prepare(resume=resume, force=force)):
            cfg = merge_config(explicit, config_file, run.read_config())
            result = fit(cfg, out=run, resume=True, display=display)
        else:
            result = fit(cfg, out=run, display=display)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's save may not have finished
        teardown_distributed(clean=False)
        raise Interrupted(interrupted_message(run)) from None
    except BaseException:
        teardown_distributed(clean=False)
        raise
    finally:
        run.unlock()
    teardown_distributed()
    return result


def interrupted_message(run: RunFolder) -> str:
    if not run.has_state():
        return "interrupted before the first checkpoint was saved"
    from .checkpoint import read_safetensors

    step = read_safetensors(run.last, tensors=False)[1].get("step", "?")
    return (f"interrupted; the checkpoint of step {step} is saved. Resume with: gpt train --out "
            f"{run.path} --resume")


def _plot_losses(out: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # optional: the plot extra
        from .plot import plot_runs

        plot_runs([out], out / "loss.png")
