"""Batches for training: random windows of ``context_length + 1`` tokens, and the check that
the data holds at least one window."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

IGNORE = -100  # a target the loss leaves out (PyTorch's cross_entropy ignore_index default)


def check_enough(n_train: int, n_val: int, context_length: int, val_fraction: float, *,
                 val_data: bool = False) -> None:
    """At least one training window (and one validation window when asked for: a fraction of
    the data, or ``val_data``, a file of its own, when each side is checked by itself)."""
    need = context_length + 1
    if val_data:
        for flag, n in (("--data", n_train), ("--val-data", n_val)):
            if n < need:
                raise UserError(f"not enough data: {flag} has {n} tokens, but context length "
                                f"{context_length} needs at least {need}; add text or lower "
                                "--context-length")
        return
    if n_train < need or (val_fraction > 0 and n_val < need):
        total = n_train + n_val
        needed = need if val_fraction == 0 else max(int(need / val_fraction) + 1, 2 * need)
        raise UserError(
            f"not enough data: {total} tokens, but context length {context_length} with "
            f"--val-fraction {val_fraction} needs at least {needed}; add text or lower "
            "--context-length"
        )


class BatchSampler:
    """Random windows of ``context_length + 1`` tokens.

    Every rank of a distributed job draws the same ``batch_size * world`` window starts from the
    same generator and keeps its own slice, so ranks see different windows, the generator state
    (part of the training state) is the same everywhere, and 2 ranks with batch b see exactly
    the windows of 1 process with batch 2b. With ``masks`` (chat and instruction data), a target
    that is not one the model should learn is ``IGNORE`` (the loss leaves it out).
    """

    def __init__(self, tokens, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, masks=None):
        self.tokens, self.masks = tokens, masks
        self.context_length = context_length
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (batch_size, context_length) int64 on the CPU."""
        T, B = self.context_length, self.batch_size
        starts = torch.randint(len(self.tokens) - T, (B * self.world,), generator=self.generator)
        mine = starts[self.rank * B:(self.rank + 1) * B].tolist()
        windows = np.stack([self.tokens[s: s + T + 1] for s in mine]).astype(np.int64)
        batch = torch.from_numpy(windows)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.masks is not None:
            learn = np.stack([self.masks[s + 1: s + T + 1] for s in mine]).astype(bool)
            y = y.masked_fill(~torch.from_numpy(learn), IGNORE)
        return x, y

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
