"""Training: ``fit()`` is the visible loop; ``setup()`` builds what it needs before it starts,
as named steps; ``launch()`` is what `gpt train` does around them (torchrun, the run folder's
lock and rules, settings).

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay, gradient
accumulation and clipping, autocast (bf16, or fp16 with a GradScaler), optional torch.compile,
DDP under torchrun. The run folder (``runs.RunFolder``) owns the files; the run's state while it
runs is a ``session.Session``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .config import PRESETS, ModelConfig, TrainConfig
from .run_settings import SHAPE, check_same_shape, merge_config
from . import finetune
from .data import BatchSampler, TokenData, check_enough, load_tokens, resolve_data
from .data.sources import file_format
from .display import NullDisplay
from .devices import cpu_bf16_isa, resolve_dtype, seed_everything, synchronize
from .distributed import Dist, current_dist, setup_distributed, teardown_distributed
from .errors import Interrupted, UserError
from .model import GPT
from .hardware import peak_memory
from .lora import lora_modules, trainable_parameters
from .locate import find_model
from .models import load_weights
from .optim import lr_at, step_parts, train_step
from .quantize import is_quantized
from .runs import RunFolder, new_run_id
from .session import (FitResult, Session, StopSignals, check_left, interrupted_message,
                      more_time, restore_state, resume_command, try_command)
from .tokenizer import Tokenizer
from .trackers import Trackers, check_installed


# ----------------------------------------------------------------------------- setup

class Start(NamedTuple):
    """The checkpoint a run starts from: its own last one (resume) or --init-from's."""

    model: GPT
    tokenizer: Tokenizer
    metadata: dict
    path: Path


def setup(cfg: TrainConfig, run: RunFolder, resume: bool, display) -> Session:
    """Device, data, model, optimizer, sampler, a resume's saved state; config.json (rank 0)."""
    dist = current_dist()
    display = display if display is not None and dist.is_main else NullDisplay()
    device = dist.device(cfg.device)
    seed_everything(cfg.seed + dist.rank)
    start = starting_point(cfg, run, resume)
    dtype = resolve_dtype(cfg.dtype, device, train_width=start.model.config.n_embd if start
                          else cfg.n_embd or PRESETS[cfg.preset]["n_embd"])
    if cfg.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        display.note(f"note: bfloat16 autocast (weights stay float32): this CPU computes bf16 "
                     f"natively ({cpu_bf16_isa()}); --dtype float32 trains in float32")
    data = tokenize(cfg, start, dist, display)
    model = build_model(cfg, start, data.tokenizer.vocab_size, device, dtype)
    base = finetune.add_adapters(model, cfg, start.path if start else None) or (
        json.loads(start.metadata["base"]) if start and "base" in start.metadata else None)
    (train_tokens, val_tokens), (train_masks, val_masks) = validation_split(cfg, data, dist,
                                                                          display)
    T = model.config.context_length
    check_enough(len(train_tokens), len(val_tokens), T, cfg.val_fraction,
                 val_data=bool(cfg.val_data))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * T
    max_steps = cfg.max_steps if cfg.epochs is None else \
        max(1, math.ceil(cfg.epochs * len(train_tokens) / tokens_per_step))
    parts = step_parts(model, cfg, device, dtype)
    s = Session(cfg=cfg, run=run, dist=dist, display=display, model=model,
                runner=wrap_distributed(parts.runner, dist, device), parts=parts,
                tokenizer=data.tokenizer, val_tokens=val_tokens, device=device, dtype=dtype,
                max_steps=max_steps, tokens_per_step=tokens_per_step,
                sampler=BatchSampler(train_tokens, T, cfg.batch_size, cfg.seed, rank=dist.rank,
                                     world=dist.world, masks=train_masks),
                run_id=(run.read_config() or {}).get("run_id") if resume else new_run_id(),
                val_masks=val_masks, base=base,
                chat_template=finetune.chat_template(data.formats,
                                                     start.metadata if start else None))
    if (lora := finetune.describe(model)) is not None:
        display.note(lora)
    if (packing := finetune.pack_frozen(model, cfg, device, dtype)) is not None:
        display.note(packing)
    if resume:
        restore_state(s)
        check_left(s)  # (before config.json records the smaller numbers)
    if dist.is_main:
        open_logs(s, data, resume)
    return s


def starting_point(cfg: TrainConfig, run: RunFolder, resume: bool) -> Start | None:
    """The checkpoint to start from, if any; an int8 one is refused (inference only)."""
    if not resume and not cfg.init_from:
        return None
    path = run.last if resume else find_model(cfg.init_from)
    start = Start(*load_weights(path, merge=not resume), path)  # a LoRA run resumes unmerged
    if cfg.lora_rank and not resume and "base" in start.metadata:
        raise UserError(f"{cfg.init_from} holds LoRA adapters; make it a whole model first "
                        f"(gpt merge {cfg.init_from} --out FILE) and start the new adapters "
                        "from that file")
    if is_quantized(start.model):
        raise UserError(f"{cfg.init_from} is an int8 checkpoint, for inference only; train from "
                        f"the float checkpoint it was made from "
                        f"({start.metadata.get('quantized_from', 'see gpt info')})")
    if not resume:  # (a resume's settings were checked against its model: merge_config)
        have = {k: getattr(start.model.config, k) for k in SHAPE}
        check_same_shape(cfg.model_dump(include=cfg.model_fields_set),
                         have | {"tokenizer": start.tokenizer.name},
                         cfg.init_from, resume=False)
    return start


def tokenize(cfg: TrainConfig, start: Start | None, dist: Dist, display) -> TokenData:
    """The training data as tokens (the token cache fills on first use), in the tokenizer of the
    checkpoint it starts from, else the one asked for (auto: char for the CPU presets)."""
    files = resolve_data(cfg.data)
    chat = any(file_format(f, cfg.text_column) != "text" for f in files)
    spec = start.tokenizer.spec() if start else cfg.tokenizer if cfg.tokenizer != "auto" else \
        "char" if cfg.preset in ("tiny", "small") and not chat else "gpt2"
    return load_data(files, spec, cfg, dist, display)


def load_data(files: list[Path], spec, cfg: TrainConfig, dist: Dist, display) -> TokenData:
    """``files`` as tokens (and target masks), through the token cache."""
    def load():
        return display.tokenize(lambda progress: load_tokens(
            files, spec, encoding=cfg.encoding, column=cfg.text_column, workers=cfg.workers,
            progress=progress, log=display.note, mask_prompt=cfg.mask_prompt))

    if dist.enabled:  # rank 0 fills the token cache once; the others then read it
        dist.main_first(lambda: load() and None)
    return load()


def validation_split(cfg: TrainConfig, data: TokenData, dist: Dist, display) -> tuple:
    """(train, validation) tokens and their masks: the last --val-fraction of the data, or
    all of it with --val-data's files for validation."""
    if not cfg.val_data:
        return data.split(cfg.val_fraction), data.split_masks(cfg.val_fraction)
    val = load_data(resolve_data(cfg.val_data), data.tokenizer.spec(), cfg, dist, display)
    data.formats += val.formats
    return (data.tokens, val.tokens), (data.masks, val.masks)


def wrap_distributed(runner: torch.nn.Module, dist: Dist, device: torch.device):
    """The model as each rank steps it: DistributedDataParallel under torchrun."""
    if not dist.enabled:
        return runner
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(runner,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def open_logs(s: Session, data: TokenData, resume: bool) -> None:
    """config.json (what the run is), metrics.jsonl and the trackers (rank 0)."""
    cfg, run = s.cfg, s.run
    run.write_config({"run_id": s.run_id, "train": cfg.model_dump(),
                      "model": s.model.config.model_dump(), "tokenizer": data.tokenizer.spec(),
                      "world_size": s.dist.world, "tokens_per_step": s.tokens_per_step,
                      "max_steps": s.max_steps, "data": [str(f) for f in data.files],
                      "shards": [shard.name for shard in data.shards],
                      "validation": {"fraction": cfg.val_fraction, "tokens": len(s.val_tokens),
                                     "from": "the end of the data"}})
    s.metrics = run.open_metrics(s.step if resume else None)
    s.trackers = Trackers(cfg.log_to, run, s.run_id, config=cfg.model_dump(),
                          resume_step=s.step if resume else None)
    for line in s.trackers.notes:
        s.display.note(line)


def model_shape(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The shape of a new model for ``cfg``: its preset, with the flags' changes."""
    return ModelConfig.from_preset(
        cfg.preset, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, context_length=cfg.context_length, dropout=cfg.dropout,
        position=cfg.position)


def build_model(cfg: TrainConfig, start: Start | None, vocab_size: int, device: torch.device,
                dtype: torch.dtype) -> GPT:
    """The model to train (a new one, or the checkpoint's), after checking that a training step
    of this shape fits in the device's memory."""
    config = start.model.config if start else model_shape(cfg, vocab_size)
    finetune.check_fits(config, cfg, device, dtype)
    if start is None:
        model = GPT(config)
    elif cfg.dropout != config.dropout and not lora_modules(start.model):  # another dropout
        model = GPT(config.model_copy(update={"dropout": cfg.dropout}))
        model.load_state_dict(start.model.state_dict())
    else:
        model = start.model
    model.grad_checkpoint = cfg.grad_checkpoint
    return model.to(device).train()


# ----------------------------------------------------------------------------- fit

def fit(cfg: TrainConfig, *, out: RunFolder | Path, resume: bool = False, display=None,
        stop_after: int | None = None) -> FitResult:
    """Train as ``cfg`` says in the run folder ``out`` (already prepared). Under torchrun every
    rank runs this same loop on its own slice of each batch; rank 0 alone writes files."""
    s = setup(cfg, out if isinstance(out, RunFolder) else RunFolder(out), resume, display)
    display = s.display
    display.start(step=s.step, max_steps=s.max_steps, device=s.device, dtype=s.dtype,
                  params=trainable_parameters(s.model, every=True), out=s.run.path,
                  trainable=trainable_parameters(s.model), tokens_per_step=s.tokens_per_step,
                  batch=(cfg.batch_size, cfg.grad_accum, s.dist.world,
                         s.model.config.context_length))
    s.t0 = t_log = time.perf_counter()
    counted, last_val, stopped_by = 0, None, None  # target tokens since the last log line
    with StopSignals() as stop, s:
        while s.step < s.max_steps:
            for group in s.parts.optimizer.param_groups:
                group["lr"] = lr = lr_at(s.step, cfg, s.max_steps)
            loss, grad_norm, targets = train_step(
                s.runner, s.parts.optimizer, s.sampler.next_batch, grad_accum=cfg.grad_accum,
                grad_clip=cfg.grad_clip, amp=s.parts.amp, scaler=s.parts.scaler, device=s.device)
            s.step += 1
            counted += targets
            final = s.step == s.max_steps
            evaluate = s.step % cfg.eval_interval == 0 or final
            if s.step % cfg.log_interval == 0 or final:
                loss_value = s.mean_over_ranks(loss.item())
                s.check_finite("training loss", loss_value)
                now = time.perf_counter()
                tok_s = s.dist.sum([float(counted)], s.device)[0] / (now - t_log)
                t_log, counted, norm = now, 0, grad_norm.item()
                s.log(step=s.step, train_loss=loss_value, lr=lr, tokens_per_s=tok_s,
                      grad_norm=norm if math.isfinite(norm) else None, elapsed=s.elapsed(),
                      peak_memory=peak_memory(s.device))
                display.step(s.step, loss=loss_value, lr=lr, tokens_per_s=tok_s,
                             evaluating=evaluate)  # (its line then has the new val)
            if evaluate:
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
            closed = signal.SIGPIPE if display.closed else None  # (its reader went away)
            if reason := s.stop_reason(stop.signal or closed, stop_after):
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
                     is_main=s.dist.is_main, checkpoint=best if best.exists() else s.run.last,
                     resume_command=resume_command(
                         s.run, s.dist, more_time(s.cfg.max_time, s.elapsed())
                         if stopped_by == "max-time" else None), try_command=try_command(s))


def launch(explicit: dict, *, config_file: Path | None = None, resume: str | None = None,
           force: bool = False, display=None) -> FitResult:
    """What `gpt train` does: join the torchrun job (if any), lock and check the run folder,
    merge the settings, fit, and leave the job. ``resume`` is None, "yes" or "auto"."""
    cfg = merge_config(explicit, config_file, None, check=resume is None)
    check_installed(cfg.log_to)  # a missing extra fails before the run folder is touched
    run = RunFolder(cfg.out) if cfg.out else RunFolder.default_for(cfg.data)
    dist = setup_distributed(cfg.device)
    try:
        dist.main_first(run.lock)  # one process trains in a folder at a time
        if dist.main_first(lambda: run.prepare(resume=resume, force=force)):
            saved = run.read_config()
            cfg = merge_config(explicit, config_file, saved, run.path)
            check_resume_shape(cfg, saved, run, dist)
            result = fit(cfg, out=run, resume=True, display=display)
        else:
            if resume is not None:  # (--resume auto, nothing to resume: a fresh run's checks)
                finetune.check_flags(explicit, cfg)
            result = fit(cfg, out=run, display=display)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's save may not have finished
        teardown_distributed(clean=False)
        raise Interrupted(interrupted_message(run, dist)) from None
    except BaseException:
        teardown_distributed(clean=False)
        raise
    finally:
        run.unlock()
    teardown_distributed()
    return result


def check_resume_shape(cfg: TrainConfig, saved: dict | None, run: RunFolder, dist: Dist) -> None:
    """A resume takes as many tokens per step as the run did: another effective batch (batch x
    grad-accum x processes) would silently change the training, so it is refused with the
    commands that keep it; another number of processes with the same batch gets a note."""
    saved = saved or {}
    context = (saved.get("model") or {}).get("context_length")
    before, world = saved.get("tokens_per_step"), saved.get("world_size", 1)
    if not context or not before:
        return
    now = cfg.batch_size * cfg.grad_accum * dist.world * context
    if now == before:
        if world != dist.world and dist.is_main:
            print(f"note: {run.path} trained with {world} process(es); it resumes with "
                  f"{dist.world}, at the same {now:,} tokens per step", file=sys.stderr)
        return
    per = cfg.batch_size * dist.world * context
    keep = f", or keep its batch with --grad-accum {before // per}" if before % per == 0 else ""
    raise UserError(f"{run.path} trained with {before:,} tokens per step ({world} process(es)); "
                    f"this resume would take {now:,} (batch {cfg.batch_size} x grad-accum "
                    f"{cfg.grad_accum} x {dist.world} process(es) x {context} tokens): resume "
                    f"it as it ran, with {resume_command(run, Dist(0, world, world))}{keep}")


def _plot_losses(out: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # optional: the plot extra
        from .plot import plot_runs

        plot_runs([out], out / "loss.png")
