"""Token selection: from a row of logits to the next token (repetition penalty, temperature,
top-k, top-p). The lowest layer of generation: ``decode.Engine`` calls ``next_token`` once per
group of rows and step; ``generate.py`` drives the engine."""

from __future__ import annotations

import torch

from .config import SampleConfig


# ----------------------------------------------------------------------------- token selection

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id in ``seen`` (B, t): positive logits are divided by
    ``penalty``, negative ones multiplied, so a penalty > 1 always makes repeats less likely."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sum
    reaches ``p`` (the most likely token is always kept)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, config: SampleConfig, seen: torch.Tensor,
               generator: torch.Generator | None, vocab_size: int | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): returns (B,) ids. With ``vocab_size``, ids
    from there on (the padding rows of a padded vocabulary, which no tokenizer can decode) are
    never picked."""
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits[..., :vocab_size]
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k(logits / config.temperature, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
