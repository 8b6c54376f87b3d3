"""Log-probabilities for `gpt serve`'s ``logprobs`` and ``echo``: of each token a job decodes
(from the row's logits at that step) and of a prompt's tokens (one forward pass), each with the
most likely tokens at its step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decode import Row
from ..model import GPT


@dataclass
class Logprob:
    """A token's log-probability under the model (before temperature and filtering) and the
    ``top`` most likely tokens at that step, as (id, log-prob) pairs. The first prompt token
    has no log-prob (nothing comes before it)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def _top(logp: torch.Tensor, top: int) -> list[tuple[int, float]]:
    if not top:
        return []
    best = torch.topk(logp, min(top, logp.size(-1)))  # a vocabulary smaller than top
    return list(zip(best.indices.tolist(), best.values.tolist()))


def token_logprob(row: Row, token: int, vocab_size: int, top: int) -> Logprob:
    """The log-prob of the token ``row`` just picked, and the ``top`` most likely ones, from the
    model's distribution at that step (before temperature and filtering)."""
    logp = torch.log_softmax(row.logits[:vocab_size].float(), dim=-1)
    return Logprob(token, logp[token].item(), _top(logp, top))


@torch.no_grad()
def prompt_logprobs(model: GPT, vocab_size: int, prompt: list[int], top: int) -> list[Logprob]:
    """Log-probs of each prompt token given the ones before it (the first has none): what
    `echo` with `logprobs` returns, for scoring text (lm-evaluation-harness)."""
    if not prompt:
        return []
    idx = torch.tensor([prompt], device=model.device)
    logp = torch.log_softmax(model(idx)[0, :, :vocab_size].float(), dim=-1)
    return [Logprob(prompt[0], None)] + [
        Logprob(prompt[i], logp[i - 1, prompt[i]].item(), _top(logp[i - 1], top))
        for i in range(1, len(prompt))]
