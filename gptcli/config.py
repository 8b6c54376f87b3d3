"""Configuration models (pydantic): the one place where a setting's default, constraint and help
text live. The CLI derives its flags from these fields (``cli/app.py``): a field's
``description`` is the flag's help, ``json_schema_extra`` gives its help group and metavar.

This module must not import torch: the CLI imports it to validate flags before any heavy work.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Norm = Literal["layernorm", "rmsnorm"]
Position = Literal["learned", "sinusoidal", "rope"]


class Settings(BaseModel):
    """Base of the configs: unknown settings, NaN and infinity are refused, and so is true/false
    where a number belongs (pydantic would read it as 1/0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        for name, value in data.items() if isinstance(data, dict) else ():
            kinds = _kinds(getattr(cls.model_fields.get(name), "annotation", None))
            if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
                raise ValueError(f"{name} must be a number, not {str(value).lower()}")
        return data


def _kinds(kind: Any) -> set:
    args = get_args(kind)  # Optional[Annotated[int, ...]] -> {int, None}
    return {kind} if not args else set().union(
        *map(_kinds, args[:1] if get_origin(kind) is Annotated else args))


class ModelConfig(Settings):
    """Shape and options of a GPT model. The defaults are OpenAI's GPT-2 (124M)."""

    model_config = ConfigDict(frozen=True)

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
        # two norms, then c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj with their biases
        per_block = 2 * norm + 12 * d * d + (3 + 1 + 4 + 1) * d * b
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


def default_workers() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def setting(default: Any = None, help: str = "", *, group: str, metavar: str | None = None,
            **constraints: Any) -> Any:
    """A config field that is also a command-line flag: its help text, its group in ``--help``
    and the placeholder shown for its value (``N``, ``FILE``, ...)."""
    extra = {"group": group, **({"metavar": metavar} if metavar else {})}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


# Options shared by several commands, declared once (each command's config uses these types).
DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."
DTYPE_HELP = ("auto (bfloat16 on GPUs that support it, else float32), float32, bfloat16 or "
              "float16. Inference loads the weights in it; training keeps float32 weights and "
              "computes in it (autocast).")
SEED_LIMIT = 2 ** 63  # torch seeds are 64-bit
KERNEL_ENV = "GPTCLI_KERNEL"  # what --kernel defaults to
Device = Annotated[str, Field(description=DEVICE_HELP,
                              json_schema_extra={"group": "Device", "metavar": "NAME"})]
Dtype = Annotated[str, Field(description=DTYPE_HELP,
                             json_schema_extra={"group": "Device", "metavar": "NAME"})]
Compile = Annotated[bool, Field(description="torch.compile the model (generation: the one-token "
                                "step; pays off on CUDA, about eager's speed on CPUs).",
                                json_schema_extra={"group": "Device"})]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="Random seed (0 <= seed < 2**63): "
                            "the same seed gives the same result on the same device.",
                            json_schema_extra={"group": "Run", "metavar": "N"})]
Quantize = Annotated[Optional[Literal["half", "int8", "int4"]], Field(
    description="Smaller weights for inference, CPU only: half (bf16/fp16), int8 (per channel) or "
                "int4 (groups of 32, output matrix int8). Off by default.",
    json_schema_extra={"group": "Device", "metavar": "SCHEME"})]
KERNEL_INDUCTOR = (" inductor (with --compile, on a CPU): inductor's own products in the compiled "
                   "step, compiled with freezing (faster on some CPUs: see README Performance).")
Kernel = Annotated[Optional[str], Field(description="Force a matrix-product kernel (`gpt bench` "
    "lists them; also $GPTCLI_KERNEL); default: the fastest, measured once per machine. "
    "fused: each block's decode step as one C call (chosen by measurement otherwise)." +
    KERNEL_INDUCTOR, json_schema_extra={"group": "Device", "metavar": "NAME"})]
LogTo = Annotated[list[Literal["tensorboard", "wandb"]], Field(
    description="Also log the run's metrics to tensorboard (event files in the run folder) or "
                "wandb (WANDB_MODE=offline works without a network); repeatable. Needs the "
                "extra of that name.", json_schema_extra={"group": "Run", "metavar": "TRACKER"})]
ModelName = Annotated[Optional[str], Field(
    description="Checkpoint file, run folder, Hugging Face GPT-2 folder, downloaded model name "
                "or Hub id (org/name, downloaded once when online; default: the latest run "
                "under ./runs).",
    json_schema_extra={"group": "Model", "metavar": "MODEL", "short": "-m"})]


class TrainConfig(Settings):
    """Every setting of a training run; each field is also a `gpt train` flag."""

    # data
    data: list[str] | None = setting(
        None, "A .txt, .jsonl or .parquet file, a folder or glob of them, or a downloaded "
        "dataset's name; repeat for several (default: the bundled Shakespeare).", group="Data",
        metavar="PATH")
    tokenizer: Literal["auto", "gpt2", "char"] = setting(
        "auto", "gpt2, char, or auto (char for the tiny and small presets on plain text, "
        "else gpt2: chat data needs its end-of-text token).", group="Data", metavar="NAME")
    val_fraction: float = setting(0.1, "Share of the tokens held out for validation, from the "
                                  "end.", group="Data", ge=0.0, lt=1.0)
    val_data: list[str] | None = setting(
        None, "Validate on these files (or folders, globs, a dataset's name) instead of the "
        "last --val-fraction of --data; repeatable.", group="Data", metavar="PATH")
    mask_prompt: bool = setting(True, "Chat and instruction data: learn only what the "
                                "assistant says (--no-mask-prompt: every token).", group="Data")
    encoding: str = setting("utf-8", "Text encoding of the data.", group="Data", metavar="NAME")
    text_column: str = setting("text", "The text field of .jsonl and .parquet data.",
                               group="Data", metavar="NAME")
    workers: int = setting(default_workers(), "Processes that tokenize the data (default: the "
                           "number of CPU cores).", group="Data", ge=1)
    # model
    preset: str = setting("tiny", "Model shape: " + ", ".join(PRESETS) + ".", group="Model",
                          metavar="NAME")
    n_layer: int | None = setting(None, "Transformer blocks (default: the preset's).",
                                  group="Model", ge=1)
    n_head: int | None = setting(None, "Attention heads (default: the preset's).", group="Model",
                                 ge=1)
    n_embd: int | None = setting(None, "Embedding width (default: the preset's).", group="Model",
                                 ge=1)
    context_length: int | None = setting(None, "Context length in tokens (default: the "
                                         "preset's).", group="Model", ge=1)
    dropout: float = setting(0.0, "Dropout rate.", group="Model", ge=0.0, lt=1.0)
    position: Position | None = setting(None, "Position encoding: learned, sinusoidal or rope "
                                        "(default: the preset's).", group="Model", metavar="NAME")
    init_from: str | None = setting(None, "Start from this checkpoint, run folder or downloaded "
                                    "model (fine-tuning).", group="Model", metavar="MODEL")
    # fine-tuning with adapters
    lora_rank: int = setting(0, "LoRA: train rank-R adapters beside frozen weights (0: train "
                             "every weight).", group="LoRA", metavar="R", ge=0)
    lora_alpha: float = setting(16.0, "LoRA: the adapters' scale is alpha / rank.",
                                group="LoRA", gt=0.0)
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input.", group="LoRA",
                                  ge=0.0, lt=1.0)
    lora_targets: list[Literal["qkv", "attn-out", "mlp-in", "mlp-out"]] = setting(
        ["qkv", "attn-out", "mlp-in", "mlp-out"], "LoRA: the projections that get adapters: "
        "qkv, attn-out, mlp-in, mlp-out (repeatable).", group="LoRA", metavar="NAME")
    # optimisation
    batch_size: int = setting(12, "Sequences per micro-batch.", group="Optimisation", ge=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", group="Optimisation", ge=1)
    lr: float = setting(1e-3, "Peak learning rate.", group="Optimisation", gt=0.0)
    min_lr: float = setting(1e-4, "Learning rate at the end of the cosine decay.",
                            group="Optimisation", ge=0.0)
    warmup_steps: int = setting(100, "Linear warm-up steps.", group="Optimisation", ge=0)
    max_steps: int = setting(2000, "Optimizer steps.", group="Optimisation", ge=1)
    epochs: float | None = setting(None, "Train for this many passes over the data instead of "
                                   "--max-steps.", group="Optimisation", gt=0.0)
    max_time: float | None = setting(None, "Stop (and save) once the run has trained this many "
                                     "seconds in all (a resumed run counts its earlier time).",
                                     group="Optimisation", metavar="SECONDS", gt=0.0)
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only).",
                                  group="Optimisation", ge=0.0)
    beta1: float = setting(0.9, "AdamW beta1.", group="Optimisation", ge=0.0, lt=1.0)
    beta2: float = setting(0.99, "AdamW beta2.", group="Optimisation", ge=0.0, lt=1.0)
    grad_clip: float = setting(1.0, "Clip the gradient norm to this; 0 disables clipping.",
                               group="Optimisation", ge=0.0)
    grad_checkpoint: bool = setting(False, "Recompute each block's activations in the backward "
                                    "pass: less memory, about a third more compute.",
                                    group="Optimisation")
    # evaluation, saving, sampling
    eval_interval: int = setting(250, "Steps between evaluations (and saves).", group="Run",
                                 ge=1)
    eval_steps: int = setting(20, "Validation batches per evaluation.", group="Run", ge=1)
    log_interval: int = setting(10, "Steps between log lines.", group="Run", ge=1)
    save_interval: int | None = setting(None, "Also keep step-N.safetensors every N steps.",
                                        group="Run", ge=1)
    sample_interval: int = setting(500, "Steps between generated samples; 0 disables them.",
                                   group="Run", ge=0)
    sample_tokens: int = setting(200, "Length of each sample in tokens.", group="Run", ge=1)
    out: str | None = setting(None, "Run folder (default: runs/<data name>).", group="Run",
                              metavar="DIR")
    log_to: LogTo = []
    seed: Seed = 1337
    # device
    device: Device = "auto"
    dtype: Dtype = "auto"
    compile: Compile = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        return self


class SampleConfig(Settings):
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = setting(200, "Tokens to generate per sample.", group="Sampling", ge=1)
    temperature: float = setting(0.8, "Sampling temperature; 0 (or below 1e-5) is greedy.",
                                 group="Sampling", ge=0.0)
    top_k: int = setting(0, "Sample among the k most likely tokens; 0 is off.",
                         group="Sampling", ge=0)
    top_p: float = setting(1.0, "Nucleus sampling: the smallest set of tokens with this "
                           "probability (the top one always).", group="Sampling", gt=0.0, le=1.0)
    min_p: float = setting(0.0, "Min-p: keep the tokens at least this fraction as likely as the "
                           "top one, after temperature; 0 is off.", group="Sampling", ge=0.0,
                           le=1.0)
    repetition_penalty: float = setting(1.0, "Above 1 discourages repeating earlier tokens (0.01 "
                                        "to 100).", group="Sampling", ge=0.01, le=100.0)
    num_samples: int = setting(1, "Samples generated together as one batch.", group="Sampling",
                               ge=1)
    seed: Seed | None = Field(None, json_schema_extra={"group": "Sampling"})  # help: Seed's
    stop: list[str] = setting([], "End a sample just before this text (repeatable).",
                              group="Sampling", metavar="TEXT")
    ignore_eos: bool = setting(False, "Go on past the end-of-text token.", group="Sampling")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("must not be an empty string (it would stop at once)")
        return stop


class LoadConfig(Settings):
    """Which model to load for inference, and where."""

    model: ModelName = None
    device: Device = "auto"
    dtype: Dtype = "auto"
    compile: Compile = False
    quantize: Quantize = None
    kernel: Kernel = None
    draft_model: str | None = setting(
        None, "A smaller model with the same tokenizer that proposes tokens for the model to "
        "verify several at a time (speculative decoding): the same greedy output, the same "
        "distribution of sampled output, faster when it guesses well.", group="Model",
        metavar="MODEL")
    draft_tokens: int = setting(4, "Tokens the draft model proposes per verification.",
                                group="Model", ge=1, le=16)

    @model_validator(mode="after")
    def _inductor_compiles(self) -> LoadConfig:
        if (self.kernel or os.environ.get(KERNEL_ENV)) == "inductor" and not self.compile:
            raise ValueError("--kernel inductor needs --compile (gpt generate, chat and bench): "
                             "inductor puts its own products in when it compiles the step")
        return self


class EvalConfig(Settings):
    """What `gpt eval` scores and how."""

    data: list[str] | None = setting(
        None, "Text file(s) or folder to score (default: the run's own validation split when "
        "--model is a run).", group="Data", metavar="PATH")
    encoding: str = setting("utf-8", "Text encoding of the data.", group="Data", metavar="NAME")
    text_column: str = setting("text", "The text field of .jsonl and .parquet data.",
                               group="Data", metavar="NAME")
    window: int | None = setting(
        None, "Tokens per scoring window, at most the model's context (default: the model's "
        "context length).", group="Scoring", ge=1)
    stride: int | None = setting(None, "Tokens scored per window; smaller gives each token more "
                                 "context (default: --window).", group="Scoring", ge=1)
    batch_size: int = setting(8, "Windows (or task items) per forward pass.", group="Scoring",
                              ge=1)
    task: list[Literal["lambada", "hellaswag", "wikitext-2", "wikitext-103"]] | None = setting(
        None, "A benchmark to run instead of scoring --data: lambada, hellaswag, wikitext-2 or "
        "wikitext-103 (repeatable).", group="Tasks", metavar="NAME")
    task_file: list[str] | None = setting(
        None, "Use this local file (JSON lines or parquet, the published format) for a task: "
        "NAME=PATH (repeatable).", group="Tasks", metavar="NAME=PATH")
    limit: int | None = setting(None, "Score only the first N items of each task.",
                                group="Tasks", ge=1)
    offline: bool = setting(False, "Use only task data already downloaded (the gptcli store).",
                            group="Tasks")
    harness: list[str] | None = setting(
        None, "Run these lm-evaluation-harness tasks on the model instead (needs the eval "
        "extra; repeatable, or comma-separated).", group="Tasks", metavar="TASKS")
    harness_include: str | None = setting(
        None, "A folder of extra lm-evaluation-harness task configs (its --include_path).",
        group="Tasks", metavar="DIR")
    log_to: LogTo = Field([], description=(
        "Add the task results to the run the model comes from: a record in its metrics.jsonl "
        "and its tensorboard or wandb log (repeatable)."), json_schema_extra={
        "group": "Tasks", "metavar": "TRACKER"})


class BenchConfig(Settings):
    """What `gpt bench` measures; None fields are chosen for the device (bench.resolve)."""

    preset: str | None = setting(None, "Model shape (GPT-2 vocabulary): " + ", ".join(PRESETS)
                                 + " (default: gpt2 on CUDA, small on MPS, tiny on CPU).",
                                 group="Model", metavar="NAME")
    batch_size: int | None = setting(None, "Training batch; generation is timed at batch 1 and "
                                     "also at this one when given (default: fits the device).",
                                     group="Model", ge=1)
    context_length: int | None = setting(None, "Context length (default: the preset's).",
                                         group="Model", ge=1)
    prompt_length: int | None = setting(None, "Prompt tokens to prefill (default: min(128, "
                                        "context/2)).", group="Generation", ge=1)
    max_new_tokens: int | None = setting(None, "Tokens to decode per run (default: min(128, "
                                         "what fits in the context)).", group="Generation",
                                         ge=1)
    steps: int = setting(10, "Timed training steps, and timed generation runs.", group="Run",
                         ge=1)
    warmup: int = setting(3, "Untimed warm-up steps (generation: up to 2 runs).", group="Run",
                          ge=0)
    only: Literal["train", "generate"] | None = setting(None, "Measure only train or generate.",
                                                        group="Run", metavar="WHAT")
    peak_tflops: float | None = setting(None, "The device's dense peak TFLOPs for the dtype, "
                                        "for MFU (default: a datasheet table of GPUs, else "
                                        "measured).", group="Hardware", gt=0.0)
    bandwidth_gbs: float | None = setting(None, "The device's memory bandwidth in GB/s (default: "
                                          "a datasheet table of GPUs, else measured).",
                                          group="Hardware", gt=0.0)
    seed: Seed = 1337


class ServeConfig(Settings):
    """How `gpt serve` listens and what it allows."""

    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0: every interface; give an "
                        "--api-key then).", group="Server", metavar="HOST")
    port: int = setting(8000, "Port to listen on.", group="Server", ge=1, le=65535)
    max_batch: int = setting(8, "Sequences decoded together; more requests queue.",
                             group="Server", ge=1)
    max_tokens: int = setting(1024, "Most tokens a request may ask for (and the default for "
                              "chat).", group="Server", ge=1)
    api_key: str | None = setting(None, "Require this key as 'Authorization: Bearer KEY'.",
                                  group="Server", metavar="KEY")
    max_body: int = setting(1 << 20, "Largest request body in bytes.", group="Server",
                            metavar="BYTES", ge=1024)
