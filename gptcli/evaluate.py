"""Scoring text: mean loss, perplexity and bits per byte with a sliding window.

``evaluate`` is the one implementation: `gpt eval` scores whole files with it, and training uses
it for the validation loss (on an evenly spaced subset of the windows).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .locate import load_model
from .config import EvalConfig, LoadConfig
from .data import load_tokens, resolve_data
from .distributed import current_dist
from .runs import RunFolder
from .errors import UserError


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy (nats per token)
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def eval_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows over ``n_tokens`` tokens: (input start, first scored offset) pairs.

    Every token after the first is scored exactly once, each with as much context as the stride
    allows: a window scores only the targets the previous windows did not."""
    T = min(context, n_tokens - 1)
    if T < 1 or stride < 1:
        raise ValueError(f"eval windows need context >= 1, stride >= 1 and 2+ tokens "
                         f"(got context {context}, stride {stride}, {n_tokens} tokens)")
    windows, covered = [(0, 0)], T  # targets 1..T are scored by the first window
    while covered < n_tokens - 1:
        end = min(covered + stride, n_tokens - 1)  # last target index of this window
        start = end - T
        windows.append((start, covered - start))
        covered = end
    return windows


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, context_length: int, *,
             stride: int | None = None, batch_size: int = 8, max_windows: int | None = None,
             device: torch.device | str = "cpu", amp=None, masks=None) -> EvalResult:
    """Mean loss over ``tokens`` with a sliding window; with ``max_windows``, an evenly spaced
    subset of the windows (used for quick validation during training). With ``masks`` (chat
    and instruction data), only the targets the model should learn are scored."""
    T = min(context_length, len(tokens) - 1)
    windows = eval_windows(len(tokens), T, stride or T)
    if max_windows and len(windows) > max_windows:
        pick = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
        windows = [windows[i] for i in pick]
    dist = current_dist()
    windows = windows[dist.rank::dist.world]  # under torchrun each rank scores its share
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        batch = torch.from_numpy(np.stack([tokens[s: s + T + 1] for s, _ in chunk]).astype(np.int64))
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with amp or contextlib.nullcontext():
            logits = model(x)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="none").view(len(chunk), T)
        scored = torch.arange(T, device=losses.device)[None, :] >= torch.tensor(
            [first for _, first in chunk], device=losses.device)[:, None]
        if masks is not None:
            learn = np.stack([masks[s + 1: s + T + 1] for s, _ in chunk]).astype(bool)
            scored &= torch.from_numpy(learn).to(losses.device)
        total += losses[scored].sum().item()
        count += int(scored.sum().item())
    model.train(was_training)
    total, count = dist.sum([total, float(count)], torch.device(device))
    return EvalResult(loss=total / max(1, count), tokens=int(count))


def evaluate_file(load: LoadConfig, cfg: EvalConfig) -> dict:
    """`gpt eval`: loss, perplexity and bits per byte of a model over whole text files, or over
    its own run's validation split when no data is given and the model is a run."""
    model, tokenizer, path = load_model(load.model, device=load.device, dtype=load.dtype,
                                        quantize=load.quantize, kernel=load.kernel,
                                        steps=False)  # whole texts: no decode steps
    limit = model.config.context_length
    if cfg.window is not None and cfg.window > limit:
        raise UserError(f"--window {cfg.window} is longer than the model's context ({limit}); "
                        f"use at most {limit}")
    T = cfg.window or limit
    if cfg.stride is not None and cfg.stride > T:
        raise UserError(f"--stride must be between 1 and the window length ({T}), got "
                        f"{cfg.stride}")
    tokens, scored, n_bytes, masks = scoring_data(cfg, path, tokenizer)
    if len(tokens) < 2:
        raise UserError(f"{scored} has {len(tokens)} token(s); scoring needs at least 2")
    result = evaluate(model, tokens, T, stride=cfg.stride, batch_size=cfg.batch_size,
                      device=model.device, masks=masks)
    out = {"model": str(path), **({"quantize": load.quantize} if load.quantize else {}),
           "data": scored, "loss": result.loss,
           "perplexity": result.perplexity, "tokens": result.tokens,
           "bits_per_byte": result.loss * result.tokens / math.log(2) / n_bytes,
           "context_length": T, "stride": cfg.stride or T}
    if not cfg.data:
        out["training_estimate"] = training_estimate(path, len(tokens), limit)
    return out


def training_estimate(path: Path, n_tokens: int, context: int) -> dict | None:
    """What the checkpoint's own ``val_loss`` (the figure `gpt info` shows) was: the estimate
    made during training on an evenly spaced subset of this split's windows, which is why it
    differs a little from scoring every token."""
    from .checkpoint import read_safetensors

    run = RunFolder.holding(path)
    metadata = read_safetensors(path, tensors=False)[1]
    if run is None or metadata.get("val_loss") in (None, "None"):
        return None
    train = run.train_settings()
    windows = len(eval_windows(n_tokens, context, context))
    used = min(windows, train.get("eval_steps", 20) * train.get("batch_size", 12))
    step = metadata.get("step")
    return {"val_loss": float(metadata["val_loss"]),
            "step": int(step) if str(step).isdigit() else step,
            "windows": used, "of": windows}


def scoring_data(cfg: EvalConfig, model_path: Path, tokenizer) -> tuple:
    """The tokens to score, a phrase saying what they are, their size in bytes (for bits per
    byte) and, for chat and instruction data, which of them are targets: ``--data``'s files,
    else the validation split of the run the model came from (its --val-data, if it had one)."""
    if cfg.data:
        files = resolve_data(cfg.data)
        data = load_tokens(files, tokenizer.spec(), encoding=cfg.encoding,
                           column=cfg.text_column)
        utf8 = cfg.encoding.lower().replace("-", "").replace("_", "") == "utf8"
        plain = all(f.suffix == ".txt" for f in files)  # the bytes are the files' (no separators)
        n_bytes = sum(f.stat().st_size for f in files) if utf8 and plain else \
            _target_bytes(tokenizer, data.tokens, data.masks, skip=tokenizer.separator_id)
        return data.tokens, ", ".join(str(f) for f in files), n_bytes, data.masks
    run = RunFolder.holding(model_path)
    train = run.train_settings() if run is not None else {}
    fraction = train.get("val_fraction", 0)
    if not fraction and not train.get("val_data"):
        raise UserError(f"say what to score with --data FILE: {model_path} is not in a run "
                        "folder with a validation split")
    try:
        files = resolve_data(train.get("val_data") or train.get("data"))
    except UserError as e:
        raise UserError(f"the data of run {model_path.parent} is not there any more ({e}); "
                        "pass --data") from None
    data = load_tokens(files, tokenizer.spec(), encoding=train.get("encoding", "utf-8"),
                       column=train.get("text_column", "text"),
                       mask_prompt=train.get("mask_prompt", True))
    names = ", ".join(f.name for f in files)
    if train.get("val_data"):
        tokens, masks = data.tokens, data.masks
        what = f"the validation data of run {model_path.parent} ({names})"
    else:
        (_, tokens), (_, masks) = data.split(fraction), data.split_masks(fraction)
        what = (f"the validation split of run {model_path.parent} (the last {fraction:.0%} of "
                f"{names})")
    return tokens, what, _target_bytes(tokenizer, tokens, masks), masks


def _target_bytes(tokenizer, tokens, masks, skip: int | None = None) -> int:
    """The UTF-8 bytes of the tokens scored: the targets of chat data, else every token but
    ``skip`` (the separator between documents)."""
    ids = tokens.tolist()
    keep = masks[:].tolist() if masks is not None else [t != skip for t in ids]
    return len(tokenizer.decode_bytes([t for t, k in zip(ids, keep) if k]))
