"""One optimizer step and its parts: the learning-rate schedule, AdamW's parameter groups,
autocast and the gradient scaler, and ``train_step``. ``fit()`` and `gpt bench` both build them
with ``step_parts``, so the benchmark times exactly what training runs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data.batches import IGNORE
from .devices import autocast


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


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the targets that count (``IGNORE`` ones are left out: the prompt
    of chat data), and how many counted. A batch with no target counts gives a loss of 0 with
    zero gradients, never NaN (0 / 0). Without ignored targets this is exactly
    ``F.cross_entropy``'s mean."""
    flat = targets.reshape(-1)
    count = (flat != IGNORE).sum()
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat,
                            ignore_index=IGNORE, reduction="sum")
    return total / count.clamp(min=1), count


class StepResult(NamedTuple):
    loss: torch.Tensor  # the mean of the micro-batches' losses
    grad_norm: torch.Tensor  # before clipping
    targets: torch.Tensor  # target tokens the loss counted


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, grad_accum: int,
               grad_clip: float, amp, scaler: torch.amp.GradScaler | None,
               device: torch.device) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches; returns tensors (reading them is
    the caller's choice of when to synchronise). Each micro-batch's loss is its mean over its
    own targets, divided by ``grad_accum``."""
    total = torch.zeros((), device=device)
    targets = torch.zeros((), device=device, dtype=torch.long)
    for micro in range(grad_accum):
        x, y = next_batch()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # DDP: all-reduce only on the last micro-step
        sync = getattr(model, "no_sync", None)
        ctx = sync() if sync is not None and micro < grad_accum - 1 else contextlib.nullcontext()
        with ctx:
            with amp:
                loss, count = loss_fn(model(x), y)
                loss = loss / grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
        targets += count
    if scaler:
        scaler.unscale_(optimizer)
    # the norm before clipping (what trackers plot); clip_grad_norm_ computes it either way
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else math.inf)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm, targets)
