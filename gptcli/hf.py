"""The Hugging Face GPT-2 <-> gptcli map: data, and one function for each direction.

gptcli's parameters are Hugging Face GPT-2's, with the same names (less the ``transformer.``
prefix) and the same layouts (projection weights (in, out), as GPT-2's Conv1D stores them). The
differences are all listed here: the config field names, the prefix, HF's causal-mask buffers
(gptcli builds its masks), and the tied output matrix (gptcli stores it once). Download, local
folder conversion and export all go through ``from_hf`` / ``to_hf``.

No torch, no huggingface_hub: this is a table and two small functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .config import ModelConfig
from .errors import UserError, validation_message

# HF config.json field -> ModelConfig field.
CONFIG_FIELDS = {"vocab_size": "vocab_size", "n_positions": "context_length",
                 "n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd",
                 "layer_norm_epsilon": "layer_norm_eps", "tie_word_embeddings": "tie_embeddings"}
# What GPT-2 is, in ModelConfig terms: a model that differs cannot be exported.
GPT2_OPTIONS = {"norm": "layernorm", "position": "learned", "bias": True, "tie_embeddings": True}
# GPT-2's activation, as HF's config names it (both are the tanh approximation).
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# HF GPT-2 options that change the model's maths or weights, with GPT-2's own values (what a
# config.json without them means); a model with another value is refused, not converted wrong.
# (n_inner, the MLP width, may also be given as 4 * n_embd.)
HF_DEFAULTS = {"n_inner": None, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
PREFIX = "transformer."  # HF's GPT2LMHeadModel keeps the body under this name
DROPPED = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers: not weights
OUTPUT = "lm_head.weight"  # tied to wte.weight unless the config says otherwise
GPT2_VOCAB = 50257


def from_hf(hf_config: Mapping[str, Any], hf_tensors: Mapping[str, Any] | None = None,
            ) -> tuple[ModelConfig, dict[str, Any]]:
    """A Hugging Face GPT-2 ``config.json`` (a dict) and its weights -> gptcli's ModelConfig and
    tensors under gptcli's names. Refuses models that are not GPT-2 (or are GPT-2 with options
    gptcli's model does not have) and configs with unusable values."""
    if hf_config.get("model_type") != "gpt2":
        raise UserError(f"this is not a GPT-2 model: config.json says model_type "
                        f"{hf_config.get('model_type')!r}; gptcli converts only model_type "
                        "'gpt2'")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UserError(f"unsupported activation_function {act!r}: gptcli's GPT-2 uses the "
                        "tanh-approximated GELU (gelu_new)")
    fields = {ours: hf_config[theirs] for theirs, ours in CONFIG_FIELDS.items()
              if theirs in hf_config}
    try:
        config = ModelConfig(**{"tie_embeddings": True, **fields})
    except ValidationError as e:
        raise UserError(f"config.json has values gptcli cannot use: {validation_message(e)}"
                        ) from None
    other = [f"{name}={hf_config[name]!r}" for name, value in HF_DEFAULTS.items()
             if hf_config.get(name, value) != value
             and not (name == "n_inner" and hf_config[name] == 4 * config.n_embd)]
    if other:
        raise UserError(f"this GPT-2 variant is not supported: config.json sets "
                        f"{', '.join(other)}; gptcli converts plain GPT-2 only")
    tensors = {}
    for name, tensor in (hf_tensors or {}).items():
        name = name.removeprefix(PREFIX)
        if name.endswith(DROPPED) or (name == OUTPUT and config.tie_embeddings):
            continue
        tensors[name] = tensor
    return config, tensors


def to_hf(config: ModelConfig, tensors: Mapping[str, Any] | None = None, *,
          eot_id: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """gptcli's ModelConfig and tensors -> a Hugging Face GPT-2 config dict (for
    GPT2LMHeadModel) and its tensors. ``eot_id`` is the tokenizer's end-of-text token, GPT-2's
    bos and eos (None for tokenizers without one). Refuses options GPT-2 cannot express."""
    unsupported = [f"{name}={getattr(config, name)}" for name, gpt2 in GPT2_OPTIONS.items()
                   if getattr(config, name) != gpt2]
    if unsupported:
        raise UserError(f"Hugging Face GPT-2 cannot express this model ({', '.join(unsupported)})")
    hf = {theirs: getattr(config, ours) for theirs, ours in CONFIG_FIELDS.items()}
    hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=config.context_length,
              activation_function=ACTIVATIONS[0], resid_pdrop=config.dropout,
              embd_pdrop=config.dropout, attn_pdrop=config.dropout, bos_token_id=eot_id,
              eos_token_id=eot_id)
    hf_tensors = {PREFIX + name: t for name, t in (tensors or {}).items() if name != OUTPUT}
    return hf, hf_tensors
