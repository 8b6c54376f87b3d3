"""Write a gptcli GPT-2 model as a GGUF file for llama.cpp and Ollama (their ``gpt2`` architecture).

The map, as data (gptcli name -> llama.cpp name; ``N`` is the block):

    wte.weight -> token_embd.weight          wpe.weight -> position_embd.weight
    h.N.ln_1.*  -> blk.N.attn_norm.*         h.N.attn.c_attn.* -> blk.N.attn_qkv.*
    h.N.attn.c_proj.* -> blk.N.attn_output.* h.N.ln_2.* -> blk.N.ffn_norm.*
    h.N.mlp.c_fc.* -> blk.N.ffn_up.*         h.N.mlp.c_proj.* -> blk.N.ffn_down.*
    ln_f.* -> output_norm.*                  lm_head.weight -> output.weight (untied models only)

Layouts: gptcli stores projection weights (in, out), like GPT-2's Conv1D; llama.cpp wants
(out, in) rows (its shape {in, out} lists the fastest dimension first), so projection weights are
transposed and nothing else is. A tied model writes no ``output.weight``: llama.cpp's gpt2
loader then reuses ``token_embd.weight``.

Types follow llama.cpp's own converter (convert_hf_to_gguf.py): 1-D tensors (norms, biases) and
``position_embd`` stay float32 in every file; the other matrices are f32, f16 or q8_0. A matrix
whose rows are not a whole number of q8_0 blocks (32 values) falls back to f16, as there.

The tokenizer is GPT-2's (``tokenizer.ggml.model = gpt2``, pre-tokenizer ``gpt-2``, the merges
from :mod:`gptcli.vocab`). Character models are refused: llama.cpp's BPE vocabularies take
bos/eos ids from the file or else default to id 11, and a character vocabulary has no
end-of-text token to name, so generation would stop at its twelfth character.

``gguf`` (PyPI, the ``gguf`` extra) is imported only when writing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import UserError, require
from .tokenizer import get_tokenizer

DTYPES = ("f32", "f16", "q8_0")
ARCH = "gpt2"
# gptcli suffix within a block -> (llama.cpp suffix, transposed?, shape in units of n_embd)
BLOCK_MAP = {
    "ln_1.weight": ("attn_norm.weight", False, (1,)),
    "ln_1.bias": ("attn_norm.bias", False, (1,)),
    "attn.c_attn.weight": ("attn_qkv.weight", True, (1, 3)),
    "attn.c_attn.bias": ("attn_qkv.bias", False, (3,)),
    "attn.c_proj.weight": ("attn_output.weight", True, (1, 1)),
    "attn.c_proj.bias": ("attn_output.bias", False, (1,)),
    "ln_2.weight": ("ffn_norm.weight", False, (1,)),
    "ln_2.bias": ("ffn_norm.bias", False, (1,)),
    "mlp.c_fc.weight": ("ffn_up.weight", True, (1, 4)),
    "mlp.c_fc.bias": ("ffn_up.bias", False, (4,)),
    "mlp.c_proj.weight": ("ffn_down.weight", True, (4, 1)),
    "mlp.c_proj.bias": ("ffn_down.bias", False, (1,)),
}
TOP_MAP = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
           "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
           "lm_head.weight": "output.weight"}
# Kept float32 in every file, as llama.cpp's converter keeps them (besides all 1-D tensors).
ALWAYS_F32 = ("position_embd.weight",)
GPT2_VOCAB = 50257
GPT2_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex (LLAMA_VOCAB_PRE_TYPE_GPT2)


def gguf_names(config: ModelConfig) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """gptcli tensor name -> (llama.cpp name, whether the weight is transposed, gptcli's shape),
    for exactly the tensors a GGUF of ``config`` holds."""
    d, V, T = config.n_embd, config.vocab_size, config.context_length
    top_shapes = {"wte.weight": (V, d), "wpe.weight": (T, d), "ln_f.weight": (d,),
                  "ln_f.bias": (d,), "lm_head.weight": (V, d)}
    names = {k: (v, False, top_shapes[k]) for k, v in TOP_MAP.items()
             if k != "lm_head.weight" or not config.tie_embeddings}
    for n in range(config.n_layer):
        names.update({f"h.{n}.{ours}": (f"blk.{n}.{theirs}", t, tuple(d * k for k in units))
                      for ours, (theirs, t, units) in BLOCK_MAP.items()})
    return names


def check_exportable(config: ModelConfig, tokenizer_spec: dict, dtype: str = "f32") -> None:
    """Refuse, in one sentence, what llama.cpp's gpt2 architecture cannot run."""
    if dtype not in DTYPES:
        raise UserError(f"unknown GGUF type {dtype!r}; use one of: {', '.join(DTYPES)}")
    other = [f"{name}={getattr(config, name)}" for name, gpt2 in
             (("norm", "layernorm"), ("position", "learned"), ("bias", True))
             if getattr(config, name) != gpt2]
    if other:
        raise UserError(f"llama.cpp's gpt2 architecture cannot express this model "
                        f"({', '.join(other)}); only LayerNorm models with learned positions and "
                        "biases can be written as GGUF")
    kind = get_tokenizer(tokenizer_spec).name
    if kind != "gpt2":
        raise UserError(f"GGUF export needs the GPT-2 tokenizer, but this model uses the {kind} "
                        "tokenizer, which llama.cpp's vocabularies cannot express")
    if config.vocab_size != GPT2_VOCAB:
        raise UserError(f"this model has {config.vocab_size} token ids but the GPT-2 tokenizer "
                        f"has {GPT2_VOCAB}; llama.cpp needs one embedding row per token")


def _arrays(config: ModelConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp name -> float32 numpy array in llama.cpp's layout, after checking that the
    tensors are exactly the model's, with the model's shapes."""
    if any(k.endswith((".qweight", ".scale")) for k in tensors):
        raise UserError("these are int8 weights; write the GGUF from the float checkpoint they "
                        "were made from (dtype q8_0 quantizes it for llama.cpp)")
    names = gguf_names(config)
    missing = [k for k in names if k not in tensors]
    extra = sorted(k for k in tensors if k not in names
                   and not (k == "lm_head.weight" and config.tie_embeddings))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else \
            f"has tensors a GPT-2 model does not ({', '.join(extra[:3])})"
        raise UserError(f"these weights do not fit the model's config: it {what}")
    out = {}
    for ours, (theirs, transpose, shape) in names.items():
        t = tensors[ours].detach().to("cpu").float()
        if tuple(t.shape) != shape:
            raise UserError(f"tensor {ours} has shape {tuple(t.shape)} where the model's config "
                            f"needs {shape}")
        # (in, out) -> (out, in): a GGUF row is one output's weights, as llama.cpp multiplies
        out[theirs] = (t.t() if transpose else t).contiguous().numpy()
    return out


def _encode(gguf, name: str, array, dtype: str):
    """(data, ggml type) for one tensor: the converter's rules for which tensors stay f32."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or name in ALWAYS_F32 or dtype == "f32":
        return array, Q.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:  # rows not a multiple of 32 values: f16, as llama.cpp does
            pass
    return array.astype("float16"), Q.F16


def write_gguf(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Any],
               tokenizer_spec: dict, *, dtype: str = "f32", name: str = "gptcli model",
               chat_template: str | None = None) -> dict[str, Any]:
    """Write ``tensors`` (gptcli's state-dict names, as ``checkpoint.model_tensors`` gives them)
    of a model shaped by ``config`` as one GGUF file at ``path`` that llama.cpp loads as ``gpt2``.

    ``dtype``: f32, f16 or q8_0 for the matrices (1-D tensors and positions stay f32).
    ``chat_template`` (a Jinja template) is stored as ``tokenizer.chat_template``. The file is
    written beside ``path`` and renamed over it, so a failure leaves ``path`` as it was and no
    partial file. Returns ``{"path", "size", "tensors", "dtype"}``. Refuses, as a UserError,
    models llama.cpp's gpt2 cannot express, non-GPT-2 tokenizers, and weights that do not fit
    ``config``; needs the ``gguf`` package (the gguf extra)."""
    check_exportable(config, tokenizer_spec, dtype)
    gguf = require("gguf", "gguf", needed_for="writing GGUF")
    from .files import atomic_write
    from .vocab import GPT2_EOT_ID, gpt2_merges, gpt2_tokens

    arrays = _arrays(config, tensors)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(config.context_length)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)  # gptcli's MLP width
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens = gpt2_tokens()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(GPT2_PRE)
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if i == GPT2_EOT_ID else
                                gguf.TokenType.NORMAL for i in range(len(tokens))])
        writer.add_token_merges(gpt2_merges())
        writer.add_bos_token_id(GPT2_EOT_ID)
        writer.add_eos_token_id(GPT2_EOT_ID)
        writer.add_add_bos_token(False)  # gptcli never prepends a token
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for tensor_name, array in arrays.items():
            data, qtype = _encode(gguf, tensor_name, array, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(None, ARCH)
        try:
            fill(writer)
            writer.write_header_to_file(path=Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    out = atomic_write(path, write, what="GGUF file")
    return {"path": str(out), "size": out.stat().st_size, "tensors": len(arrays), "dtype": dtype}
