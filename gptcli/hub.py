"""Hugging Face GPT-2 <-> gptcli: the key map (data, not code) and the conversions.

gptcli's parameter names are Hugging Face GPT-2's without the ``transformer.`` prefix. The
differences are listed below: GPT-2's Conv1D layers store weights as (in, out), nn.Linear as
(out, in), and HF keeps causal-mask buffers that gptcli rebuilds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .config import ModelConfig
from .runtime import UserError

HF_PREFIX = "transformer."
# Weights stored transposed by GPT-2's Conv1D.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                 "mlp.c_proj.weight")
# Buffers in HF files that are not weights.
HF_DROPPED = (".attn.bias", ".attn.masked_bias")
# HF config.json field -> ModelConfig field.
HF_CONFIG_MAP = {"vocab_size": "vocab_size", "n_positions": "context_length",
                 "n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd",
                 "layer_norm_epsilon": "layer_norm_eps",
                 "tie_word_embeddings": "tie_embeddings"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a Hugging Face GPT-2 ``config.json`` (as a dict)."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"this is not a GPT-2 model: config.json says model_type "
                        f"{hf.get('model_type')!r}; gptcli converts only model_type 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"unsupported activation_function {act!r}: gptcli's GPT-2 uses "
                        "the tanh-approximated GELU (gelu_new)")
    fields = {ours: hf[theirs] for theirs, ours in HF_CONFIG_MAP.items() if theirs in hf}
    fields.setdefault("tie_embeddings", True)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face GPT-2 config dict; refuses options GPT-2 cannot express."""
    unsupported = [f"{name}={getattr(config, name)}" for name, gpt2 in
                   (("norm", "layernorm"), ("position", "learned"), ("bias", True),
                    ("tie_embeddings", True)) if getattr(config, name) != gpt2]
    if unsupported:
        raise UserError(f"Hugging Face GPT-2 cannot express this model ({', '.join(unsupported)})")
    hf = {theirs: getattr(config, ours) for theirs, ours in HF_CONFIG_MAP.items()}
    hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=config.context_length,
              activation_function="gelu_new", resid_pdrop=config.dropout,
              embd_pdrop=config.dropout, attn_pdrop=config.dropout,
              bos_token_id=50256, eos_token_id=50256)
    return hf


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor],
                       config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights -> gptcli names and layouts."""
    out = {}
    for key, tensor in hf_state.items():
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if name.endswith(HF_DROPPED):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        out[name] = tensor.t() if name.endswith(HF_TRANSPOSED) else tensor
    return out


def state_dict_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptcli weights -> Hugging Face GPT-2 names and layouts (tied lm_head left out)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        out[HF_PREFIX + name] = tensor.t().contiguous() if name.endswith(HF_TRANSPOSED) else tensor
    return out
