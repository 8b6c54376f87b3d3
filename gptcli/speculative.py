"""Speculative decoding's maths: a small draft model proposes a few tokens, the model verifies
them all in one forward, and rejection sampling keeps what the model itself would have drawn.

One round, for a sequence whose last token has not been through the model yet:

1. the draft proposes ``K`` tokens one at a time, each drawn from its own distribution q_i
   (after the same repetition penalty, temperature, top-k, top-p and min-p as the model's);
2. the model runs once over the last token and the K proposals: K + 1 distributions p_0..p_K;
3. proposal i is kept with probability min(1, p_i(x) / q_i(x)), in order, until the first one
   that is not; in its place comes a token drawn from norm(max(0, p_i - q_i)); when all K are
   kept, one more comes from p_K.

Every token that comes out is distributed exactly as one drawn from p (Leviathan, Kalman and
Matias 2023, "Fast inference from transformers via speculative decoding", Appendix A.1; Chen et
al. 2023, "Accelerating large language model decoding with speculative sampling", Algorithm 2
and Theorem 1), so a draft changes the speed, never the output's distribution. The filters are
no exception: p and q are the distributions *after* them, which is what ``next_token`` would
draw from. Greedy decoding (one-hot p and q) keeps a proposal exactly when it is the model's
own pick, so its output is the same token for token; it needs no distributions at all, so the
rounds compare ``next_token``'s picks instead (``accept_greedy``). The shape (draft K, verify K + 1
positions in one forward, ``r < p/q``) is gpt-fast's ``speculative_decode``.

``decode.Engine`` runs the rounds (the caches, windows and rows are its business); this module
holds the draft's settings, the distributions and the acceptance rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import SampleConfig
from .model import GPT
from .sampling import (GREEDY_BELOW, apply_repetition_penalty, filter_min_p, filter_top_k,
                       filter_top_p, next_token, sample, usable)


@dataclass
class Draft:
    """The draft model of speculative decoding, how many tokens it proposes per round, and its
    compiled one-token step (None: the model itself)."""

    model: GPT
    tokens: int = 4
    step: Callable | None = None

    @property
    def stepper(self) -> Callable:
        """What runs its one-token steps: the compiled step, else its C blocks (``decode_step``,
        native_step.py), else the model. (A compiled module has no truth value to test.)"""
        return getattr(self.model, "decode_step", self.model) if self.step is None else self.step


def is_greedy(config: SampleConfig) -> bool:
    return config.temperature < GREEDY_BELOW


def distribution(logits: torch.Tensor, config: SampleConfig, seen: torch.Tensor,
                 vocab_size: int | None = None) -> torch.Tensor:
    """The probabilities (B, V) float32 that ``sampling.next_token`` draws from for these
    ``logits`` (B, V) at a temperature that samples: the same filters in the same order.
    (tests/test_speculative.py checks that draws from it are ``next_token``'s, seed for seed.)
    Greedy decoding has no use for it: see ``accept_greedy``."""
    if is_greedy(config):
        raise ValueError("greedy decoding picks tokens; it draws from no distribution")
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits[..., :vocab_size]
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    logits = usable(logits / config.temperature)
    logits = filter_top_k(logits, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    logits = filter_min_p(logits, config.min_p)
    return torch.softmax(logits, dim=-1)


def padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token lists of different lengths as one tensor for the repetition penalty's ``seen``:
    each padded with its own first token (already among them, so the padding changes
    nothing). Shape (len(rows), longest)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + r[:1] * (width - len(r)) for r in rows], device=device)


def accept(target: torch.Tensor, draft: torch.Tensor, proposed: torch.Tensor,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule (the module docstring's step 3) for B sequences at once, sampling.

    ``target`` (B, K + 1, V): the model's distributions p_0..p_K; ``draft`` (B, K, V): the
    draft's q_0..q_{K-1} that ``proposed`` (B, K) were drawn from. Returns (B,) the number of
    proposals kept and (B,) the token that follows them.
    """
    B, K = proposed.shape
    p = target[:, :K].gather(-1, proposed[..., None]).squeeze(-1)  # (B, K): p_i(x_i)
    q = draft.gather(-1, proposed[..., None]).squeeze(-1)  # (B, K): q_i(x_i) > 0, it was drawn
    r = torch.rand(B, K, generator=generator, device=p.device)
    n = (r * q < p).long().cumprod(dim=-1).sum(dim=-1)  # (B,): kept before the first miss
    rows = torch.arange(B, device=p.device)
    p_n = target[rows, n]  # (B, V)
    q_n = F.pad(draft, (0, 0, 0, 1))[rows, n]  # q is 0 after the last proposal: then p_K
    residual = (p_n - q_n).clamp(min=0)
    # p == q leaves nothing; a rejection is then impossible in exact arithmetic, and p is right
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n, sample(residual, generator)


def accept_greedy(picks: torch.Tensor, proposed: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The acceptance rule of greedy decoding (one-hot p and q: ``r < p/q`` holds exactly when
    the proposal is the model's pick): ``picks`` (B, K + 1) the model's own tokens after each
    prefix, ``proposed`` (B, K). Returns (B,) the proposals kept, the leading ones equal to the
    model's picks, and (B,) the model's pick after them."""
    n = (picks[:, :-1] == proposed).long().cumprod(dim=-1).sum(dim=-1)
    return n, picks.gather(1, n[:, None]).squeeze(1)


def propose(logits: torch.Tensor, config: SampleConfig, seen: torch.Tensor, vocab_size: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 1 for the rows of one group: the draft's token (B,) after its ``logits`` (B, V),
    and the distribution (B, V) it was drawn from (None when greedy: the draft's pick)."""
    if is_greedy(config):
        return next_token(logits, config, seen, None, vocab_size), None
    q = distribution(logits, config, seen, vocab_size)
    return sample(q, generator), q


def verify(logits: torch.Tensor, config: SampleConfig, seen: torch.Tensor, vocab_size: int,
           proposed: torch.Tensor, draft: torch.Tensor | None,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 for the rows of one group, after the model's forward: its ``logits`` (B, K + 1,
    V), ``seen`` for each of the B * (K + 1) prefixes, the ``proposed`` tokens (B, K) and the
    distributions they were drawn from (``propose``'s; None when greedy). Returns ``accept``'s
    (B,) proposals kept and (B,) the token after them."""
    B, K = proposed.shape
    if is_greedy(config):  # the model's own picks after each prefix
        picks = next_token(logits.flatten(0, 1), config, seen, None, vocab_size)
        return accept_greedy(picks.view(B, K + 1), proposed)
    p = distribution(logits.flatten(0, 1), config, seen, vocab_size)
    return accept(p.view(B, K + 1, -1), draft, proposed, generator)
