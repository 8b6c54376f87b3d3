"""Training: ``fit()`` is the visible loop; the small helpers around it do one thing each.

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay, gradient
accumulation and clipping, autocast (bf16, or fp16 with a GradScaler), optional torch.compile.
The run folder holds config.json, metrics.jsonl, last/best checkpoints with training state.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import (load_checkpoint, load_training_state, resolve_model, save_checkpoint,
                         save_training_state)
from .config import ModelConfig, SampleConfig, TrainConfig
from .data import BatchSampler, check_enough, load_tokens, resolve_data
from .evaluate import evaluate
from .model import GPT
from .runtime import (RuntimeFailure, UserError, autocast, current_dist,
                      resolve_dtype, seed_everything, synchronize)

RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "last.state.safetensors",
             "best.safetensors", "loss.png")


# ----------------------------------------------------------------------------- small helpers

def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on tensors with >= 2 dims (matrices, embeddings), not on biases
    and norm gains. Fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


@dataclass
class StepParts:
    """What ``train_step`` needs besides the model and the batches: built once by
    ``step_parts`` for fit() and for `gpt bench`, so both time the same thing."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: object
    runner: torch.nn.Module  # the model, compiled when asked


def step_parts(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
               dtype: torch.dtype) -> StepParts:
    """AdamW, a GradScaler for float16 only, autocast, and the (optionally compiled) model."""
    return StepParts(optimizer=make_optimizer(model, cfg, device),
                     scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
                     amp=autocast(device, dtype),
                     runner=torch.compile(model) if cfg.compile else model)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, grad_accum: int,
               grad_clip: float, amp, scaler: torch.amp.GradScaler | None,
               device: torch.device) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (a tensor, so
    reading it is the caller's choice of when to synchronise)."""
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = next_batch()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # DDP: all-reduce only on the last micro-step
        sync = getattr(model, "no_sync", None)
        ctx = sync() if sync is not None and micro < grad_accum - 1 else contextlib.nullcontext()
        with ctx:
            with amp:
                loss = loss_fn(model(x), y) / grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if grad_clip > 0:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# ----------------------------------------------------------------------------- run folder

def default_out(cfg: TrainConfig) -> Path:
    if not cfg.data:
        return Path("runs") / "shakespeare"
    return Path("runs") / (Path(cfg.data[0].rstrip("/")).stem.replace("--", "-") or "run")


def prepare_run_folder(out: Path, *, resume: str | None, force: bool) -> bool:
    """Check the run folder; returns True when the run resumes from it.

    ``resume`` is None (fresh run), "yes" (must resume) or "auto" (resume if there is a state).
    A folder with files is never overwritten without ``force``.
    """
    has_state = (out / "last.safetensors").is_file() and (out / "last.state.safetensors").is_file()
    if resume == "yes" and not has_state:
        raise UserError(f"nothing to resume in {out}: it has no last.safetensors with its "
                        "training state; start a new run without --resume")
    if resume and has_state:
        return True
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"run folder {out} already has files; pass --resume to continue "
                            "that run, --force to overwrite it, or --out to pick another folder")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for snap in out.glob("step-*.safetensors"):
            snap.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return False


def merge_config(explicit: dict, config_file: Path | None, resume_from: Path | None) -> TrainConfig:
    """Saved run config (when resuming) < --config file < flags given on the command line."""
    fields: dict = {}
    if resume_from is not None and (resume_from / "config.json").is_file():
        fields.update(json.loads((resume_from / "config.json").read_text())["train"])
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"config file {config_file} does not exist")
        try:
            loaded = json.loads(config_file.read_text())
        except ValueError as e:
            raise UserError(f"config file {config_file} is not valid JSON: {e}") from None
        fields.update(loaded.get("train", loaded))
    fields.update(explicit)
    return TrainConfig(**fields)


def _parse(line: str) -> dict | None:
    """One metrics.jsonl record; None for a blank or cut-off line (a run killed mid-write)."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None) -> None:
        if resume_step is not None and path.is_file():  # forget what came after the saved state
            lines = [ln for ln in path.read_text().splitlines()
                     if (record := _parse(ln)) is not None and record.get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in lines))
        self.file = open(path, "a", buffering=1)

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    out: Path
    step: int
    best_val: float | None
    last_val: float | None
    tokens_per_s: float
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "max-time" or None
    checkpoint: Path | None = None


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


def fit(cfg: TrainConfig, *, out: Path, resume: bool = False, display=None,
        stop_after: int | None = None) -> FitResult:
    """Train as ``cfg`` says, writing the run folder ``out`` (already prepared).

    Under torchrun (see ``runtime.setup_distributed``) every rank runs this same loop on its own
    slice of each batch; rank 0 alone writes files and shows progress.
    """
    from .display import NullDisplay
    from .sampling import generate, prompt_ids

    dist = current_dist()
    display = display if display is not None and dist.is_main else NullDisplay()
    device = dist.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed + dist.rank)

    # data and model
    init = None
    if resume:
        init = load_checkpoint(out / "last.safetensors")
    elif cfg.init_from:
        init = load_checkpoint(resolve_model(cfg.init_from))
    files = resolve_data(cfg.data)
    tok_spec = init[1].spec() if init else (cfg.tokenizer if cfg.tokenizer != "auto" else
                                            ("char" if cfg.preset in ("tiny", "small") else "gpt2"))

    def tokenize():
        return display.tokenize(lambda progress: load_tokens(
            files, tok_spec, encoding=cfg.encoding, progress=progress))

    if dist.enabled:  # rank 0 fills the token cache once; the others then read it
        dist.main_first(lambda: tokenize() and None)
    data = tokenize()
    tokenizer = data.tokenizer
    if init:
        model = init[0]
        if cfg.dropout != model.config.dropout:
            model = _with_dropout(model, cfg.dropout)
    else:
        model = GPT(ModelConfig.from_preset(
            cfg.preset, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, context_length=cfg.context_length, dropout=cfg.dropout))
    mcfg = model.config
    train_tokens, val_tokens = data.split(cfg.val_fraction)
    check_enough(len(train_tokens), len(val_tokens), mcfg.context_length, cfg.val_fraction)
    model.to(device).train()

    # effective batch: batch x grad-accum x world size, in tokens
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * mcfg.context_length
    max_steps = cfg.max_steps
    if cfg.epochs is not None:
        max_steps = max(1, math.ceil(cfg.epochs * len(train_tokens) / tokens_per_step))
    parts = step_parts(model, cfg, device, dtype)
    optimizer, scaler, amp, runner = parts.optimizer, parts.scaler, parts.amp, parts.runner
    sampler = BatchSampler(train_tokens, mcfg.context_length, cfg.batch_size, cfg.seed,
                           rank=dist.rank, world=dist.world)
    step, best_val, elapsed_before = 0, None, 0.0
    if resume:
        rng, meta = load_training_state(out / "last.state.safetensors", optimizer, scaler)
        sampler.load_state(rng["sampler"])
        torch.set_rng_state(rng.get(f"torch.{dist.rank}", rng["torch.0"]))
        if device.type == "cuda" and f"cuda.{dist.rank}" in rng:  # dropout masks on the GPU
            torch.cuda.set_rng_state(rng[f"cuda.{dist.rank}"], device)
        step, best_val, elapsed_before = meta["step"], meta["best_val"], meta["elapsed"]
    metrics = None
    if dist.is_main:
        (out / "config.json").write_text(json.dumps(
            {"train": cfg.model_dump(), "model": mcfg.model_dump(), "tokenizer": tokenizer.spec(),
             "world_size": dist.world, "tokens_per_step": tokens_per_step,
             "max_steps": max_steps}, indent=2))
        metrics = MetricsLog(out / "metrics.jsonl", step if resume else None)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda"
                                         else None)

    def save(name: str, val: float | None) -> None:
        if dist.is_main:
            save_checkpoint(out / name, model, tokenizer, step=step, val_loss=val,
                            source=f"gpt train ({out})")

    def save_last(val: float | None) -> None:
        save("last.safetensors", val)
        rng = {f"torch.{r}": s for r, s in enumerate(dist.gather(torch.get_rng_state()))}
        if device.type == "cuda":
            states = dist.gather(torch.cuda.get_rng_state(device))
            rng.update({f"cuda.{r}": s for r, s in enumerate(states)})
        if dist.is_main:
            save_training_state(out / "last.state.safetensors", optimizer, scaler,
                                rng={**rng, "sampler": sampler.state()},
                                meta={"step": step, "best_val": best_val, "train_config":
                                      cfg.model_dump(), "elapsed": elapsed_before + time.perf_counter() - t0})

    def fail(message: str) -> None:
        if metrics:
            metrics.close()
        raise RuntimeFailure(f"{message} at step {step}; stopped without saving (the last good "
                             f"checkpoint in {out} is kept); try a lower --lr")

    sample_cfg = SampleConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, seed=cfg.seed)
    prompt, _ = prompt_ids(tokenizer, "", mcfg.context_length)  # end-of-text, or a newline
    display.start(step=step, max_steps=max_steps, device=device, dtype=dtype,
                  params=model.num_params(), tokens_per_step=tokens_per_step, out=out,
                  batch=f"{cfg.batch_size} x {cfg.grad_accum} grad-accum x {dist.world} "
                        f"process(es) x {mcfg.context_length} context = ")
    t0 = time.perf_counter()
    t_log, steps_since_log = t0, 0
    last_val, tok_s, stopped_by = None, 0.0, None
    with _Stop() as stop:
        while step < max_steps:
            lr = lr_at(step, cfg, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(runner, optimizer, sampler.next_batch, grad_accum=cfg.grad_accum,
                              grad_clip=cfg.grad_clip, amp=amp, scaler=scaler, device=device)
            step += 1
            steps_since_log += 1
            if step % cfg.log_interval == 0 or step == max_steps:
                loss_value = dist.sum([loss.item()], device)[0] / dist.world
                if not math.isfinite(loss_value):
                    fail(f"the training loss became {loss_value}")
                now = time.perf_counter()
                tok_s = steps_since_log * tokens_per_step / (now - t_log)
                t_log, steps_since_log = now, 0
                if metrics:
                    metrics.write(step=step, train_loss=loss_value, lr=lr, tokens_per_s=tok_s,
                                  elapsed=elapsed_before + now - t0)
                display.step(step, loss=loss_value, lr=lr, tokens_per_s=tok_s)
            if step % cfg.eval_interval == 0 or step == max_steps:
                last_val = evaluate(model, val_tokens, mcfg.context_length,
                                    batch_size=cfg.batch_size, device=device, amp=amp,
                                    max_windows=cfg.eval_steps * cfg.batch_size,
                                    ).loss if len(val_tokens) else None
                if last_val is not None and not math.isfinite(last_val):
                    fail(f"the validation loss became {last_val}")
                if metrics:
                    metrics.write(step=step, val_loss=last_val)
                display.eval(step, last_val)
                if last_val is not None and (best_val is None or last_val < best_val):
                    best_val = last_val
                    save("best.safetensors", last_val)
                save_last(last_val)
            if cfg.save_interval and step % cfg.save_interval == 0:
                save(f"step-{step}.safetensors", last_val)
            if cfg.sample_interval and step % cfg.sample_interval == 0 and dist.is_main:
                model.eval()
                samples, _ = generate(model, tokenizer, prompt, sample_cfg)
                model.train()
                display.sample(step, samples[0].text)
            out_of_time = bool(cfg.max_time) and elapsed_before + time.perf_counter() - t0 > cfg.max_time
            # every rank must agree to stop at the same step, or the others would hang
            if dist.any(stop.signal is not None or step == stop_after or out_of_time, device):
                if step < max_steps:
                    stopped_by = (signal.Signals(stop.signal).name if stop.signal is not None
                                  else "max-time" if out_of_time else
                                  "stop-after" if step == stop_after else "another rank")
                    save_last(last_val)
                break
    synchronize(device)
    if metrics:
        metrics.close()
    display.finish()
    if len(val_tokens) == 0 and not (out / "best.safetensors").exists():
        save("best.safetensors", None)
    if dist.is_main:
        _plot_losses(out)
    best = out / "best.safetensors"
    return FitResult(out=out, step=step, best_val=best_val, last_val=last_val,
                     tokens_per_s=tok_s, stopped_by=stopped_by,
                     checkpoint=best if best.exists() else out / "last.safetensors")


def _with_dropout(model: GPT, dropout: float) -> GPT:
    """The same weights in a model whose config has another dropout rate (for fine-tuning)."""
    new = GPT(model.config.model_copy(update={"dropout": dropout}))
    new.load_state_dict(model.state_dict())
    return new


def _plot_losses(out: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # optional: the plot extra
        from .plot import plot_runs

        plot_runs([out], out / "loss.png")
