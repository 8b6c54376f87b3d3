"""Configuration models (pydantic). Defaults are defined once, here.

This module must not import torch: the CLI imports it to validate flags before any heavy work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Norm = Literal["layernorm", "rmsnorm"]
Position = Literal["learned", "sinusoidal", "rope"]


class ModelConfig(BaseModel):
    """Shape and options of a GPT model. The defaults are OpenAI's GPT-2 (124M)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(50257, ge=1, description="number of token ids")
    context_length: int = Field(1024, ge=1, description="longest sequence the model sees")
    n_layer: int = Field(12, ge=1, description="number of transformer blocks")
    n_head: int = Field(12, ge=1, description="attention heads per block")
    n_embd: int = Field(768, ge=1, description="width of the residual stream")
    norm: Norm = "layernorm"
    position: Position = "learned"
    bias: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    rope_theta: float = Field(10000.0, gt=0.0)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(
                f"rope needs an even head size, but n_embd/n_head = {self.head_size}"
            )
        if self.position == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset, with any fields replaced by ``overrides`` (None values are ignored)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**fields)

    def num_params(self) -> int:
        """Parameter count computed from the shapes alone (tied embeddings counted once)."""
        d, L, V, T = self.n_embd, self.n_layer, self.vocab_size, self.context_length
        b = 1 if self.bias else 0
        norm = d * (1 + b) if self.norm == "layernorm" else d
        per_block = (
            2 * norm
            + 3 * d * d + 3 * d * b  # c_attn
            + d * d + d * b  # attn.c_proj
            + 4 * d * d + 4 * d * b  # mlp.c_fc
            + 4 * d * d + d * b  # mlp.c_proj
        )
        total = V * d + L * per_block + norm
        if self.position == "learned":
            total += T * d
        if not self.tie_embeddings:
            total += V * d
        return total


# The published GPT-2 shapes, plus two models sized for a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, context_length=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
}


def validation_message(err: Exception) -> str:
    """One readable sentence from a pydantic ValidationError (or any exception)."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    parts = []
    for e in errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e.get("type") == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class TrainConfig(BaseModel):
    """Every setting of a training run; each field is also a `gpt train` flag."""

    model_config = ConfigDict(extra="forbid")

    # data
    data: list[str] | None = Field(None, description="text files, folders of .txt, or dataset names")
    tokenizer: Literal["auto", "gpt2", "char"] = "auto"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    encoding: str = "utf-8"
    # model
    preset: str = "tiny"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_embd: int | None = Field(None, ge=1)
    context_length: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_from: str | None = None
    # optimisation
    batch_size: int = Field(12, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(2000, ge=1)
    epochs: float | None = Field(None, gt=0.0)
    max_time: float | None = Field(None, gt=0.0, description="seconds")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    # evaluation, saving, sampling
    eval_interval: int = Field(250, ge=1)
    eval_steps: int = Field(20, ge=1)
    log_interval: int = Field(10, ge=1)
    save_interval: int | None = Field(None, ge=1)
    sample_interval: int = Field(500, ge=0, description="0 disables samples")
    sample_tokens: int = Field(200, ge=1)
    # runtime
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    seed: int = 1337
    out: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        return self


class SampleConfig(BaseModel):
    """How to pick each next token, and when to stop."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    num_samples: int = Field(1, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
