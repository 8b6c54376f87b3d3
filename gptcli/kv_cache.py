"""A preallocated key/value cache for incremental decoding.

The model writes the keys and values of new positions into the cache and attends over everything
written so far. Allocating once (instead of concatenating every step) keeps decoding free of
reallocations and gives torch.compile / CUDA graphs fixed shapes to work with. Its rows are the
sequences of a batch; ``rows`` gives a view of some of them (the decode engine prefills a new
request into a free row while others are decoding), and rows may be at different positions.
A sequence longer than the model's context is held as a window of it (``window_start``).

A free row keeps what its last sequence wrote (``keep``), so that a prompt that starts with those
tokens, such as a conversation's next turn, is fed only from where the two part (``reuse``); a
row about to be written first hands what it holds to another free row, one that holds nothing or
else the one kept longest ago, so the cache keeps as many conversations as it has free rows, and
a new one pushes out the one left longest ago (least recently used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import ModelConfig


def window_start(length: int, context_length: int) -> int:
    """Where the model's view starts once a sequence of ``length`` tokens no longer fits.

    The window jumps forward by a quarter of the context at a time (not one token at a time), so
    the KV cache is rebuilt once per jump rather than at every token.
    """
    if length <= context_length:
        return 0
    shift = max(1, context_length // 4)
    # the smallest multiple of the shift that brings the view back within the context
    return -(-(length - context_length) // shift) * shift


def contiguous(indices: list[int]) -> list[list[int]]:
    """Ascending row indices as blocks of consecutive ones (a cache view each)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class KVCache:
    """Keys and values: per layer, two tensors of shape (B, nh, max_len, hs).

    One pair per layer, not one (n_layer, ...) tensor: a compiled step writes a layer's new
    positions in place, while a write through a view of one big tensor made inductor copy the
    whole cache for every layer (gpt2 on a CPU: 0.9 GB per token, 126 ms a token instead of 41).
    ``static=True`` makes :meth:`update` return the whole buffer (fixed shape, for CUDA graphs);
    the model then masks positions that were not written yet.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int,
                 head_size: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, static: bool = False,
                 buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k, self.v = buffers if buffers is not None else (
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)])
        self.batch_size = batch_size
        self.max_len = max_len
        self.static = static
        self.length = 0  # with per-row positions: how many positions the rows attend over
        # per row, the tokens whose keys and values it holds from position 0 while no sequence
        # uses it (empty: nothing known)
        self.held: list[list[int]] = [[] for _ in range(batch_size)]
        self.kept_at = [0] * batch_size  # when each row's held tokens were kept (``keep``)
        self.clock = 0
        if static:
            # The compiled step writes into these buffers; marking their addresses static lets
            # CUDA graphs replay the writes instead of refusing graphs with mutated inputs.
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, *, max_len: int | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  static: bool = False) -> KVCache:
        return cls(config.n_layer, batch_size, config.n_head, max_len or config.context_length,
                   config.head_size, device=device, dtype=dtype, static=static)

    @classmethod
    def for_step(cls, model: torch.nn.Module, step, batch_size: int, *, positions: int = 1,
                 dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """A cache for ``model`` decoded by ``step`` (``positions`` a row at a step), in
        ``dtype``, else in the one the step says it reads fastest for such steps
        (``native_step.BlockStep.cache_dtype``: fp16 for a quantized model's C blocks), else
        in the model's."""
        reads = getattr(step, "cache_dtype", None)
        return cls.for_model(model.config, batch_size, device=model.device, static=static,
                             dtype=dtype or (reads and reads(batch_size * positions))
                             or model.dtype)

    def rows(self, first: int, stop: int) -> KVCache:
        """Rows [first, stop) as a cache of their own, sharing this one's memory."""
        _, n_head, max_len, head_size = self.k[0].shape
        return KVCache(len(self.k), stop - first, n_head, max_len, head_size, static=self.static,
                       buffers=([t[first:stop] for t in self.k], [t[first:stop] for t in self.v]))

    def move(self, source: int, target: int, length: int) -> None:
        """Copy row ``source``'s first ``length`` positions into row ``target``."""
        for t in (*self.k, *self.v):
            t[target, :, :length] = t[source, :, :length]

    def exchange(self, a: int, b: int, a_length: int, b_length: int) -> None:
        """Row ``a``'s first ``a_length`` positions into row ``b``, and row ``b``'s first
        ``b_length`` into row ``a``, one layer's tensor at a time (a copy of one at most)."""
        for t in (*self.k, *self.v):
            kept = t[b, :, :b_length].clone()
            t[b, :, :a_length] = t[a, :, :a_length]
            t[a, :, :b_length] = kept

    def take(self, row: int, length: int) -> list[torch.Tensor]:
        """A copy of row ``row``'s first ``length`` positions (for ``put``)."""
        return [t[row, :, :length].clone() for t in (*self.k, *self.v)]

    def put(self, row: int, taken: list[torch.Tensor]) -> None:
        """Write what ``take`` copied into row ``row``."""
        for t, part in zip((*self.k, *self.v), taken):
            t[row, :, :part.size(1)] = part

    def keep(self, row: int, tokens: Sequence[int]) -> None:
        """Row ``row``, now free, holds the keys and values of ``tokens`` from position 0."""
        self.clock += 1
        self.held[row], self.kept_at[row] = list(tokens), self.clock

    def forget(self, first: int, stop: int) -> None:
        """Rows [first, stop) hold nothing known (they are about to be written, or were partly)."""
        self.held[first:stop] = [[] for _ in range(first, stop)]

    def reuse(self, first: int, stop: int, window: Sequence[int] | None,
              spare: Sequence[int]) -> int:
        """Make rows [first, stop) ready to be written, row ``first`` with ``window`` (tokens
        from position 0 on; None: the rows take several). Returns how many of the window's first
        positions a free row holds already (all but the last at most: its logits are wanted),
        copied into row ``first`` when they are another row's (which then takes what row
        ``first`` held: the two swap). What else the rows held that the window does not carry on
        moves to a ``spare`` row (a free one) that holds nothing, or else over the one kept
        longest ago if that is older, newest first: a later prompt may still want it (another
        conversation). (An add of several prompt lengths calls this once per length, so across
        them the order is only nearly least recently used.)"""
        best, source = 0, first
        for row, held in enumerate(self.held if window is not None else []):
            n = next((i for i, (a, b) in enumerate(zip(held, window)) if a != b),
                     min(len(held), len(window)))
            if n > best:
                best, source = n, row
        best = min(best, len(window) - 1) if window is not None else 0
        # a free row whose tokens all go into row first takes what row first held (a swap)
        swap = bool(best) and not first <= source < stop and best == len(self.held[source])
        # what else the rows held goes to free rows holding nothing, then over the longest
        # kept, newest first (several rows written at once: the oldest is what is lost)
        others = sorted((r for r in spare if not first <= r < stop and r != source),
                        key=lambda r: (bool(self.held[r]), self.kept_at[r]))
        moving = sorted((r for r in range(first, stop) if self.held[r]
                         and not (r == source and best >= len(self.held[r]))
                         and not (swap and r == first)), key=lambda r: -self.kept_at[r])
        for row, to in zip(moving, others):
            if self.held[to] and self.kept_at[to] > self.kept_at[row]:
                break  # every other row was kept later: this row's tokens are the oldest
            self.forget(to, to + 1)  # (before a copy that may stop half way)
            self.move(row, to, len(self.held[row]))
            self.held[to], self.kept_at[to] = self.held[row], self.kept_at[row]
        was = self.held[first], self.kept_at[first]
        self.forget(first, stop)  # (before a copy that may stop half way)
        if swap:  # (both rows unknown until it is done)
            self.forget(source, source + 1)
            self.exchange(source, first, best, len(was[0]))
            self.held[source], self.kept_at[source] = was
        elif best and source != first:
            self.move(source, first, best)
        return best

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions [start_pos, start_pos + T) of ``layer``.

        Returns the keys and values to attend over: (B, nh, start_pos + T, hs), or the whole
        buffer (B, nh, max_len, hs) when the cache is static. A static cache also takes
        ``start_pos`` as a 0-d tensor, so a compiled step sees the same inputs at every position.
        ``start_pos`` may also be a (B,) tensor, one position per row; then the rows attend over
        the first ``self.length`` positions (or the whole static buffer), under the model's mask.
        """
        keys, values = self.k[layer], self.v[layer]
        if k.dtype != keys.dtype:  # (an fp16 cache of a quantized model: model.py rounds alike)
            k, v = k.to(keys.dtype), v.to(keys.dtype)
        if isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1:  # one per row
            pos = start_pos[:, None] + torch.arange(k.size(2), device=k.device)  # (B, T)
            rows = torch.arange(k.size(0), device=k.device)[:, None]
            keys[rows, :, pos] = k.transpose(1, 2)  # (B, T, nh, hs) at [b, :, pos]
            values[rows, :, pos] = v.transpose(1, 2)
            end = self.max_len if self.static else self.length
            return keys[:, :, :end], values[:, :, :end]
        if not isinstance(start_pos, torch.Tensor) and start_pos + k.size(2) > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to "
                             f"{start_pos + k.size(2)}")
        if self.static:
            pos = start_pos + torch.arange(k.size(2), device=k.device)
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            return keys, values
        end = start_pos + k.size(2)
        keys.narrow(2, start_pos, k.size(2)).copy_(k)  # (narrow: one op, where [:, :, a:b] is
        values.narrow(2, start_pos, k.size(2)).copy_(v)  # several)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)
