"""The one decode loop: rows of tokens advanced together through a shared KV cache.

An ``Engine`` holds a KV cache with one row per sequence it may decode at once. ``add`` prefills
prompts into free rows; ``pick`` chooses every row's next token from its latest logits; ``advance``
runs one batched forward to get the next logits; ``remove`` frees a row (the last row's cache
moves into the gap, so the rows in use are always the first ones and the batch is a view).
Rows may sit at different positions (requests that joined at different times): the model then
gets per-row positions and a per-row mask. A row whose sequence outgrows the context slides its
window (see ``window_start``) and is prefilled again on its own.

`gpt generate`, samples during training, `gpt bench` and `gpt serve` all decode through this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .config import SampleConfig
from .kv_cache import KVCache
from .model import GPT
from .sampling import next_token


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


class Row:
    """One sequence being decoded: its tokens, its window, its latest logits, and how its next
    token is picked. Rows added together form a group that samples together (one call of
    ``next_token`` with the group's generator), as `gpt generate --num-samples` always has."""

    def __init__(self, tokens: Sequence[int], config: SampleConfig,
                 generator: torch.Generator | None, group: object) -> None:
        self.tokens = list(tokens)
        self.config, self.generator, self.group = config, generator, group
        self.start = 0  # the cache holds tokens[start:]
        self.logits: torch.Tensor | None = None  # (V,): the next token's


class Engine:
    """Decode state for up to ``rows`` sequences at once (see the module docstring)."""

    def __init__(self, model: GPT, rows: int, *, step: Callable | None = None,
                 vocab_size: int | None = None) -> None:
        self.model = model
        # A compiled step gets a static cache and a tensor position: the same shapes and inputs
        # at every token, so it compiles once (and CUDA graphs can replay it).
        self.step = model if step is None else step
        self.static = step is not None
        self.cache = KVCache.for_model(model.config, rows, device=model.device,
                                       dtype=model.dtype, static=self.static)
        self.vocab_size = vocab_size
        self.rows: list[Row] = []
        self._views: dict[tuple[int, int], KVCache] = {}

    @property
    def free(self) -> int:
        return self.cache.k.size(1) - len(self.rows)

    def view(self, first: int, stop: int) -> KVCache:
        """The cache rows [first, stop), as one object per range (a compiled step sees the same
        cache object at every token)."""
        if (first, stop) not in self._views:
            self._views[first, stop] = self.cache.rows(first, stop)
        return self._views[first, stop]

    def add(self, prompts: Sequence[Sequence[int]], config: SampleConfig,
            generator: torch.Generator | None = None, group: object = None) -> list[Row]:
        """Prefill ``prompts`` into free rows, as one group; their first logits are then ready
        for ``pick``."""
        return self.add_groups([(prompts, config, generator, group)])[0]

    @torch.no_grad()
    def add_groups(self, groups: Sequence[tuple]) -> list[list[Row]]:
        """``add`` for several groups (prompts, config, generator, group) at once: prompts of
        one length are prefilled together, in one forward (requests that arrive together start
        together)."""
        new = [[Row(p, config, generator, group if group is not None else object())
                for p in prompts] for prompts, config, generator, group in groups]
        rows = sorted((r for g in new for r in g), key=lambda r: len(r.tokens))
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} prompts, {self.free} free rows")
        first = len(self.rows)
        self.rows.extend(rows)
        while rows:  # one prefill per prompt length, over a contiguous block of rows
            same = [r for r in rows if len(r.tokens) == len(rows[0].tokens)]
            self._prefill(first, same)
            first, rows = first + len(same), rows[len(same):]
        return new

    def _prefill(self, first: int, rows: list[Row]) -> None:
        length = len(rows[0].tokens)
        start = window_start(length, self.model.config.context_length)
        idx = torch.tensor([r.tokens[start:] for r in rows], device=self.model.device)
        logits = self.model(idx, kv_cache=self.view(first, first + len(rows)), last_only=True)
        for row, row_logits in zip(rows, logits[:, -1]):
            row.start, row.logits = start, row_logits

    @torch.no_grad()
    def pick(self) -> list[int]:
        """Choose and append every row's next token (one ``next_token`` call per group)."""
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(id(row.group), []).append(i)
        picked = [0] * len(self.rows)
        for members in groups.values():
            lead = self.rows[members[0]]
            logits = torch.stack([self.rows[i].logits for i in members])
            seen = torch.tensor([self.rows[i].tokens for i in members], device=logits.device) \
                if lead.config.repetition_penalty != 1.0 else \
                torch.empty(len(members), 0, dtype=torch.long, device=logits.device)
            chosen = next_token(logits, lead.config, seen, lead.generator, self.vocab_size)
            for i, token in zip(members, chosen.tolist()):  # one host sync per group and step
                picked[i] = token
                self.rows[i].tokens.append(token)
        return picked

    @torch.no_grad()
    def advance(self) -> None:
        """One forward for every row, on the token ``pick`` appended: rows that outgrew their
        window are prefilled again, the rest go through one batched step."""
        context = self.model.config.context_length
        stepping = []
        for i, row in enumerate(self.rows):
            if window_start(len(row.tokens), context) != row.start:
                self._prefill(i, [row])
            else:
                stepping.append(i)
        runs: list[list[int]] = []  # contiguous blocks of rows: each one batched step
        for i in stepping:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            self._step(run[0], run[-1] + 1)

    def _step(self, first: int, stop: int) -> None:
        rows = self.rows[first:stop]
        positions = [len(r.tokens) - 1 - r.start for r in rows]
        idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.model.device)
        view = self.view(first, stop)
        if len(set(positions)) == 1:  # all at one position: the plain causal step
            pos = positions[0]
            start_pos = torch.tensor(pos, device=idx.device) if self.static else pos
        else:
            start_pos = torch.tensor(positions, device=idx.device)
            # The view is cached per row range (so a compiled step sees one cache object), so
            # its length must be set for this step: the rows attend over this many positions,
            # each under its own mask.
            view.length = max(positions) + 1
        logits = self.step(idx, kv_cache=view, start_pos=start_pos)
        for row, row_logits in zip(rows, logits[:, -1]):
            row.logits = row_logits

    def remove(self, row: Row) -> None:
        """Free ``row``'s cache row: the last row moves into its place."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self.cache.move(last, i, len(moved.tokens) - moved.start)
            self.rows[i] = moved
        self.rows.pop()


@torch.no_grad()
def decode_loop(model: GPT, prompt: torch.Tensor, config: SampleConfig, *,
                generator: torch.Generator | None = None, step: Callable | None = None,
                vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence in ``prompt`` (B, T), ``max_new_tokens`` times:
    the Engine driven for one batch that stays together (bench, tests). ``step`` replaces
    ``model`` for the one-token calls (e.g. a torch.compile'd version); ``vocab_size`` limits
    the ids picked to the tokenizer's (see ``sampling.next_token``)."""
    engine = Engine(model, prompt.size(0), step=step, vocab_size=vocab_size)
    engine.add(prompt.tolist(), config, generator)
    for i in range(config.max_new_tokens):
        yield torch.tensor(engine.pick(), device=prompt.device)
        if i + 1 < config.max_new_tokens:
            engine.advance()


def compile_step(model: GPT):
    """The compiled one-token step for the Engine: compiled once, since the Engine gives it a
    static cache and a tensor position; on CUDA with CUDA graphs ("reduce-overhead")."""
    return torch.compile(model, dynamic=False,
                         mode="reduce-overhead" if model.device.type == "cuda" else None)
