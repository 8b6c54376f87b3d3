"""The GPT model, in forward order: positions, attention, MLP, block, GPT.

Pure ``nn.Module``s: no I/O, no optimizer, no Hugging Face code. Parameter names follow GPT-2
(``wte, wpe, h.N.ln_1, h.N.attn.c_attn, ...``) and their layouts (projection weights are (in, out),
as in GPT-2's Conv1D), so the Hugging Face key map is a short table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kv_cache import KVCache


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


def sinusoidal_positions(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed positions of "Attention is all you need" for positions ``pos`` (T,): (T, dim)
    float32, sin on even dims. Computed, not stored, so they stay float32 in a bf16 model."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device)
                     * (-math.log(10000.0) / dim))
    angles = pos.float()[:, None] * freq  # (T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # interleave sin, cos


def rope_angles(pos: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions ``pos`` (T,) or (B, T): each of shape
    pos.shape + (head_size // 2,), float32 (computed, not stored, so a bf16 model keeps exact
    phases)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32,
                                            device=pos.device) / head_size)
    angles = pos.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles of its T positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Projection(nn.Module):
    """A linear layer whose weight is stored as (in, out), like GPT-2's own Conv1D (so Hugging
    Face weights load untransposed; a batch-1 product also reads this layout 1.0-1.5x faster
    than nn.Linear's (out, in) on CPUs: ``benchmarks/int8_kernels.py``, first two columns).

    A plain layer: inference layouts (int8, chunked) and adapters (LoRA) replace or wrap it from
    outside (``quantize.prepare``, ``lora.apply_lora``); the model does not know them.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))  # (B*T, in)
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return y.view(*x.shape[:-1], self.n_out)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: the one attention class.

    Fast path: ``F.scaled_dot_product_attention``. With ``need_weights=True`` the same maths is
    done by hand (softmax of q k^T / sqrt(hs)) so the attention probabilities can be returned.
    ``kv_dtype`` (set by ``quantize.prepare`` where the weights are rounded): the keys and values
    are rounded to it, cached or not, so a KV cache of that dtype holds them exactly.
    """

    kv_dtype: torch.dtype | None = None

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.c_attn = Projection(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Projection(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.dropout = config.dropout
        self.layer = layer

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None, need_weights: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # q, k, v: (B, nh, T, hs) each, views of one product (few ops: a decoded token's step is
        # mostly per-op overhead outside the products)
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size).permute(
            2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_dtype is not None and (kv_cache is None or
                                          kv_cache.k[self.layer].dtype != self.kv_dtype):
            # keys and values as a cache of kv_dtype holds them (the copy into it rounds)
            k, v = k.to(self.kv_dtype).to(q.dtype), v.to(self.kv_dtype).to(q.dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, start_pos)  # (B, nh, L, hs)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            L = k.size(2)
            if mask is None:  # causal, aligned so the last query sees the last key
                mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(diagonal=L - T)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, T, L)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).type_as(q)
            y = F.dropout(weights, dropout_p, self.training) @ v  # (B, nh, T, hs)
        else:
            # With no mask, is_causal aligns top-left: right only when queries and keys start at
            # the same position, which the caller guarantees by passing a mask otherwise.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None and T > 1)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return (self.resid_dropout(y) if self.training else y), weights


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Projection(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Projection(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT(nn.Module):
    """A GPT-2-family decoder. ``GPT(ModelConfig())`` is GPT-2 124M (untrained)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Training only: recompute each block's activations in the backward pass instead of
        # keeping them (`--grad-checkpoint`): memory for one block's activations, not n_layer's.
        self.grad_checkpoint = False
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output matrix with the token embedding (GPT-2's tying); again after
        loading a checkpoint replaced the embedding's tensors."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Projection)):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def num_params(self) -> int:
        """Parameters, tied weights counted once: the config's count, which also holds after
        ``quantize.prepare`` has turned the weights into buffers (tests check it against the
        tensors)."""
        return self.config.num_params()

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (weights may be int8)."""
        return self.ln_f.weight.dtype

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                start_pos: int | torch.Tensor = 0, last_only: bool = False,
                need_weights: bool = False):
        """Logits for token ids ``idx`` (B, T) placed at positions [start_pos, start_pos + T).

        With ``kv_cache``, keys/values of these positions are written into it and attention
        covers every cached position before them (``start_pos`` may be a 0-d tensor with a
        static cache, for compiled steps, or a (B,) tensor: one start per row, for rows at
        different positions). ``last_only`` returns logits of the last position
        only (B, 1, V). With ``need_weights`` returns ``(logits, weights)`` where weights is a
        list of (B, nh, T, L) attention probabilities, one per layer.
        """
        B, T = idx.shape
        if isinstance(start_pos, torch.Tensor):  # 0-d: one position; (B,): one per row
            pos = start_pos[..., None] + torch.arange(T, device=idx.device)  # (T,) or (B, T)
        else:
            if start_pos + T > self.config.context_length:
                raise ValueError(f"positions up to {start_pos + T} exceed the context length "
                                 f"({self.config.context_length})")
            if start_pos and kv_cache is None:
                raise ValueError("start_pos > 0 needs the kv_cache holding the earlier positions")
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.wte(idx).to(self.dtype)  # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.wpe(pos)
        elif self.config.position == "sinusoidal":
            x = x + sinusoidal_positions(pos.reshape(-1), self.config.n_embd).view(
                *pos.shape, -1).to(x.dtype)
        else:
            cos, sin = rope_angles(pos, self.config.head_size, self.config.rope_theta)
            # (T, hs/2) broadcasts over batch and heads; per-row (B, T, hs/2) over heads
            rope = (cos, sin) if pos.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))
        if self.training:
            x = self.drop(x)
        mask = self.attention_mask(pos, start_pos, kv_cache)
        all_weights = []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.h:
            if recompute:  # (no KV cache or attention maps while training)
                x, weights = checkpoint(block, x, rope=rope, mask=mask, use_reentrant=False)
            else:
                x, weights = block(x, rope=rope, kv_cache=kv_cache, start_pos=start_pos,
                                   mask=mask, need_weights=need_weights)
            all_weights.append(weights)
        if last_only:  # decoding needs the last position's logits only
            logits = self.lm_head(self.ln_f(x[:, -1, :])).unsqueeze(1)  # (B, 1, V)
        else:
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return (logits, all_weights) if need_weights else logits

    @staticmethod
    def attention_mask(pos: torch.Tensor, start_pos: int | torch.Tensor,
                       kv_cache: KVCache | None) -> torch.Tensor | None:
        """Boolean mask for queries at positions ``pos``: (T, L), or (B, 1, T, L) with per-row
        positions (B, T); None when plain causal attention is right.

        Query i may see keys at positions <= pos[i]. None means: no cache offset (is_causal is
        right) or a single query over a dynamic cache (it may see every key).
        """
        if pos.dim() == 2:  # rows at different positions, over the cache's first L positions
            L = kv_cache.max_len if kv_cache.static else kv_cache.length
            return torch.arange(L, device=pos.device) <= pos[:, None, :, None]
        T = pos.size(0)
        if kv_cache is None or (not kv_cache.static and (start_pos == 0 or T == 1)):
            return None
        L = kv_cache.max_len if kv_cache.static else start_pos + T
        return torch.arange(L, device=pos.device)[None, :] <= pos[:, None]
