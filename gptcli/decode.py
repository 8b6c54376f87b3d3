"""The one decode loop: rows of tokens advanced together through a shared KV cache.

An ``Engine`` holds a KV cache with one row per sequence it may decode at once. ``add`` prefills
prompts into free rows; ``pick`` chooses every row's next token from its latest logits; ``advance``
runs one batched forward to get the next logits; ``remove`` frees a row (the last row's cache
moves into the gap, so the rows in use are always the first ones and the batch is a view).
Rows may sit at different positions (requests that joined at different times): the model then
gets per-row positions and a per-row mask. A row whose sequence outgrows the context slides its
window (see ``window_start``) and is prefilled again on its own. A freed row's keys and values
are kept: a prompt that starts with its tokens (a chat's next turn) is fed from where they part
(``KVCache.reuse``). `gpt generate`, `gpt chat`, `gpt serve`, `gpt bench` and samples during
training all decode through this.

With a draft model (speculative decoding, ``speculative.py``), ``advance`` runs a round instead
of a step for the rows that need tokens: the draft proposes a few, the model verifies them in one
forward, and the tokens kept (and one more from the model) wait in the row's queue, with the
model's logits of each; ``pick`` hands them out one per call, so everything above the engine sees
one token per row and step, as without a draft. A row's sequence is its tokens and its queue;
the last one has not been through the model yet, so a round feeds it first and the proposals
after it (K + 1 positions). Greedy output is the same token for token; sampled output is
distributed the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from .config import SampleConfig
from .kernel_layer import frozen_compile
from .kv_cache import KVCache, contiguous, window_start
from .model import GPT
from .sampling import next_token
from .speculative import Draft, padded, propose, verify


class Row:
    """One sequence being decoded: its tokens, its window, its latest logits, and how its next
    token is picked. Rows added together form a group that samples together (one call of
    ``next_token`` with the group's generator), as `gpt generate --num-samples` always has."""

    def __init__(self, tokens: Sequence[int], config: SampleConfig,
                 generator: torch.Generator | None, group: object) -> None:
        self.tokens = list(tokens)
        self.config, self.generator, self.group = config, generator, group
        self.start = -1  # where its window starts (cache: tokens[start:]); -1 until prefilled
        self.logits: torch.Tensor | None = None  # (V,): the next token's
        # With a draft: tokens decided but not handed out yet, each with the model's logits it
        # was chosen from; the draft cache's window start and how far it has been fed; where
        # proposing stops (the sample's length).
        self.queue: deque[tuple[int, torch.Tensor]] = deque()
        self.draft_start = self.draft_fed = 0
        self.limit = len(self.tokens) + config.max_new_tokens
        self.cached = 0  # of its (last) prefill's positions, how many the cache held already

    def sequence(self) -> list[int]:
        return self.tokens + [token for token, _ in self.queue]


class Engine:
    """Decode state for up to ``rows`` sequences at once (module docstring; ``cache_dtype``:
    ``KVCache.for_step``'s)."""

    def __init__(self, model: GPT, rows: int, *, step: Callable | None = None,
                 vocab_size: int | None = None, draft: Draft | None = None,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.model, self.compiled = model, step is not None
        # A compiled step off the CPU gets a static cache and a tensor position: the same shapes
        # and inputs at every token, so CUDA graphs can replay it (``compile_step``).
        self.step = getattr(model, "decode_step", model) if step is None else step
        self.static = self.compiled and model.device.type != "cpu"
        self.cache = KVCache.for_step(model, self.step, rows, dtype=cache_dtype, static=self.static,
                                      positions=1 if draft is None else draft.tokens + 1)
        self.vocab_size = vocab_size
        self.rows: list[Row] = []
        self._views: dict[tuple[int, int], KVCache] = {}
        self.draft = draft
        self.proposed = self.accepted = 0  # draft tokens proposed and kept, for the stats
        if draft is not None:
            self.vocab = vocab_size or model.config.vocab_size  # what both distributions cover
            if draft.model.config.vocab_size < self.vocab:
                raise ValueError(f"the draft model has {draft.model.config.vocab_size} token "
                                 f"ids, fewer than the {self.vocab} the model may pick")
            self.draft_cache = KVCache.for_step(
                draft.model, draft.stepper, rows,
                dtype=cache_dtype, static=draft.step is not None and model.device.type != "cpu")
            self._draft_views: dict[tuple[int, int], KVCache] = {}

    @property
    def free(self) -> int:
        return self.cache.batch_size - len(self.rows)

    def view(self, first: int, stop: int, draft: bool = False) -> KVCache:
        """The cache rows [first, stop) (the draft's cache: ``draft``), as one object per range
        (a compiled step sees the same cache object at every token)."""
        views, cache = (self._draft_views, self.draft_cache) if draft else (self._views, self.cache)
        if (first, stop) not in views:
            views[first, stop] = cache.rows(first, stop)
        return views[first, stop]

    def add(self, prompts: Sequence[Sequence[int]], config: SampleConfig,
            generator: torch.Generator | None = None, group: object = None) -> list[Row]:
        """Prefill ``prompts`` into free rows as one group (their first logits ready for
        ``pick``)."""
        return self.add_groups([(prompts, config, generator, group)])[0]

    @torch.no_grad()
    def add_groups(self, groups: Sequence[tuple]) -> list[list[Row]]:
        """``add`` for several groups (prompts, config, generator, group) at once: prompts of
        one length are prefilled together, in one forward (requests that arrive together start
        together)."""
        new = [[Row(p, config, generator, shared) for p in prompts]
               for prompts, config, generator, group in groups
               for shared in [group if group is not None else object()]]  # one per group
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
        for row in rows:  # (as a new row's, until the forward is done)
            row.start = -1
        windows = [r.tokens[start:] for r in rows]
        # one prompt in several rows (--num-samples) is fed once and copied; a window that
        # starts as an earlier one did is fed from where they part
        fed = 1 if all(w == windows[0] for w in windows) else len(rows)
        cached = self.cache.reuse(first, first + len(rows), windows[0] if fed == 1 else None,
                                  range(len(self.rows), self.cache.batch_size))
        idx = torch.tensor([w[cached:] for w in windows[:fed]], device=self.model.device)
        logits = self.model(idx, kv_cache=self.view(first, first + fed), start_pos=cached,
                            last_only=True)[:, -1]
        for i in range(fed, len(rows)):
            self.cache.move(first, first + i, len(windows[0]))
        for i, row in enumerate(rows):  # (copies: each row its own logits)
            row.start, row.cached, row.logits = start, cached, logits[min(i, fed - 1)].clone()
        if self.draft is not None:
            self._fill_draft(first, rows, [r.tokens for r in rows], length,
                             window_start(length, self.draft.model.config.context_length))

    def _groups(self, indices) -> list[list[int]]:
        """``indices`` of rows grouped by the group they sample in, in row order."""
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(id(self.rows[i].group), []).append(i)
        return list(groups.values())

    @torch.no_grad()
    def pick(self) -> list[int]:
        """Choose and append every row's next token (one ``next_token`` call per group); a row
        with queued tokens (speculative decoding) takes the first of them instead."""
        picked = [0] * len(self.rows)
        fresh = []
        for i, row in enumerate(self.rows):
            if row.queue:
                picked[i], row.logits = row.queue.popleft()
                row.tokens.append(picked[i])
            else:
                fresh.append(i)
        for members in self._groups(fresh):
            lead = self.rows[members[0]]
            logits = torch.stack([self.rows[i].logits for i in members])
            chosen = next_token(logits, lead.config, self._seen([self.rows[i].tokens
                                                                 for i in members], lead),
                                lead.generator, self.vocab_size)
            for i, token in zip(members, chosen.tolist()):  # one host sync per group and step
                picked[i] = token
                self.rows[i].tokens.append(token)
        return picked

    def _seen(self, sequences: list[list[int]], lead: Row) -> torch.Tensor:
        """What the repetition penalty looks at (nothing when it is off)."""
        if lead.config.repetition_penalty != 1.0:
            return padded(sequences, self.model.device)
        return torch.empty(len(sequences), 0, dtype=torch.long, device=self.model.device)

    @torch.no_grad()
    def advance(self) -> None:
        """One forward for every row, on the token ``pick`` appended: rows that outgrew their
        window are prefilled again, the rest go through one batched step. With a draft: a
        speculative round for the rows that need tokens (see the module docstring)."""
        if self.draft is not None:
            return self._speculate()
        context = self.model.config.context_length
        stepping = []
        for i, row in enumerate(self.rows):
            if window_start(len(row.tokens), context) != row.start:
                self._prefill(i, [row])
            else:
                stepping.append(i)
        for run in contiguous(stepping):  # each one batched step
            self._step(run[0], run[-1] + 1)

    def _step(self, first: int, stop: int) -> None:
        rows = self.rows[first:stop]
        idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.model.device)
        logits = self._forward(self.step, self.view(first, stop), idx,
                               [len(r.tokens) - 1 - r.start for r in rows])
        if self.static:  # a CUDA graph's output is overwritten by its next replay (another run)
            logits = logits.clone()
        for row, row_logits in zip(rows, logits[:, -1]):
            row.logits = row_logits

    def _forward(self, step: Callable, view: KVCache, idx: torch.Tensor, positions: list[int],
                 **kwargs) -> torch.Tensor:
        """``step`` over ``idx`` (B, T), row b's tokens placed from ``positions[b]`` on."""
        if len(set(positions)) == 1:  # all at one position: the plain causal step
            pos = positions[0]
            start_pos = torch.tensor(pos, device=idx.device) if view.static else pos
        else:
            start_pos = torch.tensor(positions, device=idx.device)
            # The view is cached per row range (so a compiled step sees one cache object), so
            # its length must be set for this step: the rows attend over this many positions,
            # each under its own mask.
            view.length = max(positions) + idx.size(1)
        return step(idx, kv_cache=view, start_pos=start_pos, **kwargs)

    # ------------------------------------------------------------------ speculative decoding

    def _speculate(self) -> None:
        """A round for every row without queued tokens, and for the others whose queue is short
        enough to take a full round (they share its forwards). A round proposes as many
        tokens as fit: the draft's ``tokens``, the model's window (so every position is
        predicted from the window it would have without a draft), the sample's length."""
        if all(row.queue for row in self.rows):
            return
        context = self.model.config.context_length
        draft_context = self.draft.model.config.context_length
        most = min(self.draft.tokens, draft_context - max(1, draft_context // 4))
        plan: dict[int, int] = {}
        for i, row in enumerate(self.rows):
            length = len(row.tokens) + len(row.queue)
            start = window_start(length, context)
            k = max(0, min(most, context - (length - start), row.limit - length - 1))
            if row.queue and (k < most or start != row.start or len(row.queue) > most):
                continue  # it has tokens to hand out; it joins a later round
            if start != row.start:  # the window slides: the model sees it again, but the last
                sequence = row.sequence()  # token, which the round feeds
                row.start = -1  # (until it is done, as in _prefill)
                if length - 1 > start:
                    self.model(torch.tensor([sequence[start:-1]], device=self.model.device),
                               kv_cache=self.view(i, i + 1), last_only=True)
                row.start = start
            plan[i] = k
        for run in contiguous(list(plan)):  # each one batched round
            self._round(run[0], run[-1] + 1, min(plan[i] for i in run))

    def _round(self, first: int, stop: int, k: int) -> None:
        """One round for rows [first, stop): ``k`` proposals each, verified in one forward."""
        rows = self.rows[first:stop]
        sequences = [row.sequence() for row in rows]
        drafts, q = self._propose(first, rows, sequences, k) if k else ([[]] * len(rows), None)
        idx = torch.tensor([[seq[-1]] + d for seq, d in zip(sequences, drafts)],
                           device=self.model.device)  # (B, k + 1)
        # a compiled step for its two usual shapes only (others would each compile again)
        step = self.step if not self.compiled or idx.size(1) in (1, self.draft.tokens + 1) \
            else self.model
        logits = self._forward(step, self.view(first, stop), idx,
                               [len(seq) - 1 - row.start for seq, row in zip(sequences, rows)])
        logits = logits.clone() if self.static else logits  # as in _step
        for members in self._groups(range(first, stop)):
            at = [i - first for i in members]
            lead = rows[at[0]]
            if k == 0:  # nothing proposed: the plain step
                kept = torch.zeros(len(at), dtype=torch.long)
                chosen = next_token(logits[at, 0], lead.config,
                                    self._seen([sequences[j] for j in at], lead),
                                    lead.generator, self.vocab_size)
            else:
                seen = self._seen([sequences[j] + drafts[j][:i] for j in at
                                   for i in range(k + 1)], lead)
                kept, chosen = verify(logits[at], lead.config, seen, self.vocab,
                                      torch.tensor([drafts[j] for j in at], device=logits.device),
                                      None if q is None else q[at], lead.generator)
            for j, n, token in zip(at, kept.tolist(), chosen.tolist()):
                rows[j].queue.extend(zip(drafts[j][:n] + [token], logits[j, :n + 1]))
                if k:
                    rows[j].draft_fed = len(sequences[j]) + min(n, k - 1)
                self.proposed += k
                self.accepted += n

    def _propose(self, first: int, rows: list[Row], sequences: list[list[int]],
                 k: int) -> tuple[list[list[int]], torch.Tensor | None]:
        """The draft's ``k`` proposals for each row, one token at a time, and the distributions
        (B, k, V) they were drawn from (None if every row is greedy). The draft first catches up
        with the tokens it has not seen (one or two after a round: every row feeds as many, some
        again, so that they go through together)."""
        context = self.draft.model.config.context_length
        for i, (row, seq) in enumerate(zip(rows, sequences)):
            if len(seq) + k - 1 - row.draft_start > context:  # the draft's window slides
                self._fill_draft(first + i, [row], [seq], len(seq) - 1,
                                 window_start(len(seq) + k - 1, context))
        behind = max(1, max(len(seq) - row.draft_fed for row, seq in zip(rows, sequences)))
        starts = [max(row.draft_start, len(seq) - behind) for row, seq in zip(rows, sequences)]
        logits = self._feed(first, [seq[s:] for seq, s in zip(sequences, starts)],
                            [s - row.draft_start for s, row in zip(starts, rows)])  # (B, V)
        drafts: list[list[int]] = [[] for _ in rows]
        q = None
        for i in range(k):
            for members in self._groups(range(first, first + len(rows))):
                at = [j - first for j in members]
                lead = rows[at[0]]
                seen = self._seen([sequences[j] + drafts[j] for j in at], lead)
                picked, dist = propose(logits[at], lead.config, seen, self.vocab, lead.generator)
                if dist is not None:  # sampling (greedy picks need no distributions)
                    q = dist.new_zeros(len(rows), k, self.vocab) if q is None else q
                    q[at, i] = dist
                for j, token in zip(at, picked.tolist()):
                    drafts[j].append(token)
            if i + 1 < k:  # the proposal at sequence index len(seq) + i
                logits = self._feed(first, [[d[-1]] for d in drafts],
                                    [len(seq) + i - row.draft_start
                                     for seq, row in zip(sequences, rows)])
        return drafts, q

    def _feed(self, first: int, feeds: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Run the draft over each row's ``feeds``, placed from ``positions`` on in its cache;
        returns each row's last logits (B, V). Contiguous rows feeding as many tokens go
        through together."""
        draft, out, i = self.draft, [], 0
        own = getattr(draft.model, "decode_step", draft.model)  # (native_step.py)
        while i < len(feeds):
            j = i + 1
            while j < len(feeds) and len(feeds[j]) == len(feeds[i]):
                j += 1
            idx = torch.tensor(feeds[i:j], device=self.model.device)
            step = draft.step if draft.step is not None and idx.size(1) == 1 else own
            logits = self._forward(step, self.view(first + i, first + j, draft=True), idx,
                                   positions[i:j], last_only=True)[:, -1, :self.vocab]
            out.append(logits.clone() if step is draft.step else logits)  # as in _step
            i = j
        return torch.cat(out)

    def _fill_draft(self, first: int, rows: list[Row], sequences: list[list[int]], stop: int,
                    start: int) -> None:
        """Prefill the draft's cache rows from ``first`` on with ``sequence[start:stop]``."""
        if stop > start:
            idx = torch.tensor([seq[start:stop] for seq in sequences], device=self.model.device)
            self.draft.model(idx, kv_cache=self.view(first, first + len(rows), draft=True),
                             last_only=True)
        for row in rows:
            row.draft_start, row.draft_fed = start, max(start, stop)

    def remove(self, row: Row) -> None:
        """Free ``row``'s cache row: the last row moves into its place, and ``row``'s keys and
        values into the last cache row, now free, which keeps them for a later prompt
        (``KVCache.reuse``)."""
        i, last = self.rows.index(row), len(self.rows) - 1
        kept = row.tokens[row.start:-1] if row.start >= 0 else []
        saved = self.cache.take(i, len(kept)) if i != last else None
        if i != last:
            row.start, moved = -1, self.rows[last]  # (overwritten next: a retry keeps nothing)
            self.cache.move(last, i, len(moved.sequence()) - moved.start)
            if self.draft is not None:
                self.draft_cache.move(last, i, moved.draft_fed - moved.draft_start)
            self.rows[i] = moved
        self.rows.pop()
        if saved is not None:
            self.cache.put(last, saved)
        self.cache.keep(last, kept)


@torch.no_grad()
def decode_loop(model: GPT, prompt: torch.Tensor, config: SampleConfig, *,
                generator: torch.Generator | None = None, step: Callable | None = None,
                vocab_size: int | None = None, draft: Draft | None = None,
                counts: dict | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence in ``prompt`` (B, T), ``max_new_tokens`` times:
    the Engine driven for one batch that stays together (bench, tests). ``step`` replaces
    ``model`` for the one-token calls (e.g. a torch.compile'd version); ``vocab_size`` limits
    the ids picked to the tokenizer's (see ``sampling.next_token``); ``draft`` decodes
    speculatively, and ``counts`` then receives the draft tokens proposed and accepted."""
    engine = Engine(model, prompt.size(0), step=step, vocab_size=vocab_size, draft=draft)
    engine.add(prompt.tolist(), config, generator)
    for i in range(config.max_new_tokens):
        yield torch.tensor(engine.pick(), device=prompt.device)
        if counts is not None:
            counts.update(proposed=engine.proposed, accepted=engine.accepted)
        if i + 1 < config.max_new_tokens:
            engine.advance()


def compile_step(model: GPT):
    """The compiled one-token step for the Engine: off the CPU over a static cache with a tensor
    position (CUDA graphs replay it); on a CPU over the dynamic cache with symbolic shapes (with
    traced layers, --kernel inductor, frozen: ``kernel_layer.frozen_compile``)."""
    if model.device.type == "cpu":
        traced = any(getattr(m, "traced", False) for m in model.modules())
        return frozen_compile(model) if traced else torch.compile(model, dynamic=True)
    return torch.compile(model, dynamic=False,
                         mode="reduce-overhead" if model.device.type == "cuda" else None)
