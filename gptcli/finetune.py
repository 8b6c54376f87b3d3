"""What fine-tuning adds to a training run, kept out of the loop: LoRA adapters on the model it
starts from (with the reference to that base a LoRA checkpoint keeps), gradient checkpointing,
the memory a step will need with either, and which chat template the checkpoints carry."""

from __future__ import annotations

from pathlib import Path

import torch

from .chat import METADATA_KEY, TEMPLATE
from .config import ModelConfig, TrainConfig
from .errors import UserError
from .hardware import available_memory, check_memory, train_memory_breakdown
from .frozen import packable_dtypes
from .lora import (TARGETS, apply_lora, base_fingerprint, lora_modules, packed_bytes,
                   trainable_parameters, use_packs)
from .checkpoint import model_tensors

LORA_FLAGS = ("lora_alpha", "lora_dropout", "lora_targets")
SUGGESTED_RANK = 8  # what the memory check suggests when LoRA would make a run fit
NEEDS_BASE = ("--lora-rank trains adapters on a pretrained model: give it with --init-from MODEL "
              "(a downloaded model, a run or a checkpoint)")


def check_flags(explicit: dict, cfg: TrainConfig) -> None:
    """LoRA's other flags mean nothing without a rank: one sentence, before anything runs."""
    given = [f for f in LORA_FLAGS if f in explicit]
    if given and not cfg.lora_rank:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UserError(f"{flags} set LoRA adapters, which need --lora-rank R (R > 0)")
    if cfg.lora_rank and not cfg.init_from:
        raise UserError(NEEDS_BASE)


def adapter_parameters(config: ModelConfig, rank: int, targets: list[str]) -> int:
    """How many parameters rank-``rank`` adapters on ``targets`` of every block add."""
    sizes = {"qkv": 4 * config.n_embd, "attn-out": 2 * config.n_embd,
             "mlp-in": 5 * config.n_embd, "mlp-out": 5 * config.n_embd}  # (in + out) per target
    return config.n_layer * rank * sum(sizes[t] for t in targets)


def memory_breakdown(config: ModelConfig, cfg: TrainConfig, dtype: torch.dtype, *,
                     lora_rank: int | None = None, grad_checkpoint: bool | None = None,
                     ) -> dict[str, int]:
    """``hardware.train_memory_breakdown`` for this run's settings (or for other ones: what the
    memory check tries before suggesting them)."""
    rank = cfg.lora_rank if lora_rank is None else lora_rank
    adapters = adapter_parameters(config, rank, cfg.lora_targets) if rank else 0
    return train_memory_breakdown(
        config, cfg.batch_size, dtype, trainable=adapters if rank else None, extra_params=adapters,
        grad_checkpoint=cfg.grad_checkpoint if grad_checkpoint is None else grad_checkpoint)


def check_fits(config: ModelConfig, cfg: TrainConfig, device: torch.device,
               dtype: torch.dtype) -> None:
    """Refuse, before allocating anything, a run whose training step cannot fit; the refusal
    names what would make it fit (--lora-rank, --grad-checkpoint, or both) when one would."""
    need = sum(memory_breakdown(config, cfg, dtype).values())
    hint = "Try a smaller --batch-size (raise --grad-accum to keep the effective batch), " \
           "--context-length or model."
    available = available_memory(device)
    if available is not None and need > available:
        options = [{"grad_checkpoint": True}, {"lora_rank": SUGGESTED_RANK},
                   {"lora_rank": SUGGESTED_RANK, "grad_checkpoint": True}]
        for change in options:
            if all(getattr(cfg, k) == v for k, v in change.items()):
                continue
            estimate = sum(memory_breakdown(config, cfg, dtype, **change).values())
            if estimate <= available:
                flags = " ".join(f"--lora-rank {v}" if k == "lora_rank" else "--grad-checkpoint"
                                 for k, v in change.items())
                hint = (f"With {flags} it would need about {estimate / 2**30:,.1f} GiB (LoRA "
                        "trains small adapters beside frozen weights; --grad-checkpoint "
                        "recomputes activations). Or try a smaller --batch-size, "
                        "--context-length or model.")
                break
    check_memory(need, device, f"a training step at --batch-size {cfg.batch_size} with context "
                 f"{config.context_length} and {config.num_params():,} parameters", hint)


def add_adapters(model: torch.nn.Module, cfg: TrainConfig, start_path: Path | None,
                 ) -> dict | None:
    """For a LoRA run (``--lora-rank``): freeze ``model`` and wrap its projections in fresh
    adapters (seeded by ``--seed``); returns the base reference its checkpoints keep (None for
    full fine-tuning, and for a resumed LoRA run, whose model has its adapters already)."""
    if not cfg.lora_rank or lora_modules(model):
        return None
    if start_path is None:
        raise UserError(NEEDS_BASE)
    base = {"model": cfg.init_from, "path": str(Path(start_path).resolve()),
            "fingerprint": base_fingerprint(model_tensors(model))}
    generator = torch.Generator().manual_seed(cfg.seed)
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
               [t for t in TARGETS if t in cfg.lora_targets], generator=generator)
    return base


def pack_frozen(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                dtype: torch.dtype) -> str | None:
    """On a CPU, a LoRA run's frozen weights get packed copies for faster products
    (``kernels.FrozenPacks``) when the copies and the step's estimate fit in three quarters of
    the available memory; returns a note saying which (None for other runs)."""
    if (device.type != "cpu" or not lora_modules(model) or dtype not in packable_dtypes()
            or cfg.compile):  # a compiled step takes the plain products (inductor's own)
        return None
    extra = packed_bytes(model, dtype)
    need = sum(memory_breakdown(model.config, cfg, dtype).values()) + extra
    available = available_memory(device)
    # a quarter kept free: the estimate is rough (gpt2-xl with LoRA and checkpointing: 6.9 GiB
    # estimated, 10.4 GiB measured), and the copies are a speed-up, never worth a swap
    if available is not None and need > 0.75 * available:
        return (f"note: the frozen weights' products run unpacked: packed copies (about "
                f"{extra / 2**30:,.1f} GiB more) would not fit in memory")
    use_packs(model, dtype)
    return (f"frozen weights: products on oneDNN-packed copies (about {extra / 2**30:,.1f} GiB; "
            "faster on CPUs)")


def describe(model: torch.nn.Module) -> str | None:
    """A note on what trains, for a LoRA run."""
    adapters = lora_modules(model)
    if not adapters:
        return None
    trained, total = trainable_parameters(model), trainable_parameters(model, every=True)
    return (f"LoRA: {trained:,} adapter parameters train ({trained / (total - trained):.2%} of "
            f"the {total - trained:,} frozen ones) in {len(adapters)} projections")


def chat_template(data_formats: list[str], start_metadata: dict | None) -> str | None:
    """The chat template a run's checkpoints record: the one its chat/instruction data was
    rendered with, or the one the model it starts from was fine-tuned with."""
    if any(fmt != "text" for fmt in data_formats):
        return TEMPLATE
    return (start_metadata or {}).get(METADATA_KEY)
