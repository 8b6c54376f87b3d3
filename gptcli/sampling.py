"""Token selection: from a row of logits to the next token. The lowest layer of generation:
``decode.Engine`` calls ``next_token`` once per group of rows and step; ``generate.py`` drives
the engine.

The filters run in this order:

1. repetition penalty, on the model's logits;
2. temperature (below ``GREEDY_BELOW``: greedy, the most likely token after step 1);
3. top-k; 4. top-p; 5. min-p (relative to the most likely token *after* temperature);

then one draw from what is left. This is transformers' order (``GenerationMixin.
_get_logits_processor`` in ``generation/utils.py`` adds the repetition penalty among the logits
processors, then the temperature, top-k, top-p and min-p warpers, min-p "applied after
temperature scaling"). llama.cpp's default chain (``common_params_sampling::samplers`` in
``common/common.h``: penalties, DRY, top-n-sigma, top-k, typical-p, top-p, min-p, XTC,
temperature) keeps the same penalty, top-k, top-p, min-p order but scales by the temperature
last, so its min-p threshold is computed before temperature; ours follows transformers.

Every setting a ``SampleConfig`` allows is safe, and so are logits that are not finite (a
broken model, or a division that overflows float32): ``next_token`` never raises on them.

- A temperature below ``GREEDY_BELOW`` (1e-5, vLLM's ``_SAMPLING_EPS``) is greedy, as 0 is:
  dividing by it would overflow float32, and sampling at it is greedy except on exact ties.
- top-p always keeps the most likely token, so a tiny top-p is greedy too; min-p (at most 1)
  always keeps it as well.
- NaN logits are never picked; tokens at +inf share all of the probability; a row with nothing
  usable left (every logit NaN or -inf) is uniform (greedy: id 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import native
from .config import SampleConfig

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (SampleConfig's help says so)
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- filters

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id in ``seen`` (B, t): positive logits are divided by
    ``penalty``, negative ones multiplied, so a penalty > 1 always makes repeats less likely."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def usable(logits: torch.Tensor) -> torch.Tensor:
    """Logits that always make a distribution (see the module docstring): NaN becomes -inf,
    a row with +inf keeps only those tokens (equally likely), an empty row becomes uniform.
    Finite logits come back unchanged, bit for bit."""
    # The common case in one pass: a finite maximum in every row means no NaN (max propagates
    # it), no +inf and no empty row. (The check syncs with the device, as the draw after it
    # does anyway.)
    if bool(torch.isfinite(logits.amax(dim=-1)).all()):
        return logits
    logits = torch.where(torch.isnan(logits), NEG_INF, logits)
    certain = logits == float("inf")
    logits = torch.where(certain.any(dim=-1, keepdim=True),
                         torch.where(certain, 0.0, NEG_INF), logits)
    return logits.masked_fill((logits == NEG_INF).all(dim=-1, keepdim=True), 0.0)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sum
    reaches ``p``. The most likely token is always kept, whatever ``p`` (one below float32's
    smallest number would otherwise compare as 0 and drop it)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p: keep the tokens whose probability is at least ``min_p`` times the most likely
    token's. Compared as logits (at least the top logit plus log(min_p)), which is the same
    test without the probabilities that underflow; 0 is off."""
    if min_p <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits < top + math.log(min_p), NEG_INF)


# ----------------------------------------------------------------------------- token selection

def next_token(logits: torch.Tensor, config: SampleConfig, seen: torch.Tensor,
               generator: torch.Generator | None, vocab_size: int | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): returns (B,) ids, the filters applied in
    the order of the module docstring. With ``vocab_size``, ids from there on (the padding rows
    of a padded vocabulary, which no tokenizer can decode) are never picked."""
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits[..., :vocab_size]
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.temperature < GREEDY_BELOW:
        picked = native.argmax(logits)  # (one C call, where it can)
        return picked if picked is not None else most_likely(usable(logits))
    logits = usable(logits / config.temperature)
    logits = filter_top_k(logits, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    logits = filter_min_p(logits, config.min_p)
    return sample(torch.softmax(logits, dim=-1), generator)


def most_likely(scores: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest value (the first of equal ones), for ``scores`` (B, V)
    without NaN: ``scores.argmax(dim=-1)``. On a CPU through numpy, whose argmax takes 9 us
    for GPT-2's 50,257 logits where torch's (2.13) takes 85 us; a greedy token on a 4-bit model
    takes ~5 ms in all (``benchmarks/``)."""
    if scores.device.type != "cpu" or scores.dtype is not torch.float32:
        return scores.argmax(dim=-1)
    return torch.from_numpy(np.argmax(scores.detach().numpy(), axis=-1).astype(np.int64))


def sample(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``weights`` (B, V), non-negative, each row with a positive sum (not
    necessarily 1), drawn with probability proportional to its weight: by the inverse of the
    cumulative sum (in float64) at one uniform number per row. The same distribution as
    ``torch.multinomial``, which draws a random number per token: 1.0 ms for GPT-2's 50,257
    tokens on a CPU, against ~0.1 ms here (a decoded int8 token takes ~5 ms). An index of
    weight 0 is never drawn; a row that is not a distribution (a sum of 0, inf or NaN) raises
    ValueError, as torch.multinomial does. On Apple GPUs (no float64) torch.multinomial."""
    if weights.device.type == "mps":
        return torch.multinomial(weights, 1, generator=generator).squeeze(-1)
    cdf = weights.double().cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    if not bool(((total > 0) & total.isfinite()).all()):
        raise ValueError("sampling needs weights with a positive, finite sum in every row")
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64,
                   device=weights.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # below the sum, rounded
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # the first cdf above u
