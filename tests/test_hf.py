"""The Hugging Face map: config fields and tensor names, both directions."""

import pytest

from gptcli.config import ModelConfig
from gptcli.hf import from_hf, to_hf
from gptcli.errors import UserError


def test_round_trip_of_config_and_names():
    config = ModelConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=4, n_embd=32)
    names = {"wte.weight": 1, "wpe.weight": 2, "h.0.attn.c_attn.weight": 3, "ln_f.bias": 4}
    hf, hf_tensors = to_hf(config, names, eot_id=50256)
    assert hf["model_type"] == "gpt2" and hf["n_positions"] == 64 and hf["n_ctx"] == 64
    assert hf["bos_token_id"] == hf["eos_token_id"] == 50256
    assert set(hf_tensors) == {"transformer." + k for k in names}
    hf_tensors.update({"transformer.h.0.attn.bias": 0, "lm_head.weight": 1})  # HF's extras
    back, tensors = from_hf(hf, hf_tensors)
    assert back == config and tensors == names


def test_untied_output_matrix_is_kept():
    config, tensors = from_hf({"model_type": "gpt2", "tie_word_embeddings": False},
                              {"lm_head.weight": 1, "transformer.wte.weight": 2})
    assert not config.tie_embeddings and tensors == {"lm_head.weight": 1, "wte.weight": 2}


@pytest.mark.parametrize("hf,message", [
    ({"model_type": "llama"}, "this is not a GPT-2 model: config.json says model_type 'llama'"),
    ({"model_type": "gpt2", "activation_function": "relu"}, "unsupported activation_function"),
])
def test_not_gpt2_is_refused(hf, message):
    with pytest.raises(UserError, match=message):
        from_hf(hf)


def test_what_gpt2_cannot_express_is_refused():
    with pytest.raises(UserError, match=r"cannot express this model \(norm=rmsnorm, bias=False\)"):
        to_hf(ModelConfig(norm="rmsnorm", bias=False))


@pytest.mark.parametrize("hf,message", [
    ({"n_embd": 50, "n_head": 3}, "config.json has values gptcli cannot use: n_embd (50) must be "
                                  "divisible by n_head (3)"),
    ({"n_layer": "x"}, "config.json has values gptcli cannot use: n_layer must be a valid "
                       "integer, unable to parse string as an integer, got 'x'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "this GPT-2 variant is not supported: "
     "config.json sets scale_attn_by_inverse_layer_idx=True; gptcli converts plain GPT-2 only"),
    ({"n_embd": 32, "n_head": 4, "n_inner": 64, "add_cross_attention": True},
     "this GPT-2 variant is not supported: config.json sets n_inner=64, "
     "add_cross_attention=True; gptcli converts plain GPT-2 only"),
])
def test_configs_gptcli_cannot_convert_are_one_sentence(hf, message):
    with pytest.raises(UserError) as err:
        from_hf({"model_type": "gpt2", **hf})
    assert str(err.value) == message


def test_gpt2_defaults_written_out_are_accepted():
    """transformers writes every option into config.json, GPT-2's values included."""
    config, _ = from_hf({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_inner": 128,
                         "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                         "add_cross_attention": False, "reorder_and_upcast_attn": False})
    assert config.n_embd == 32


def test_the_map_needs_neither_torch_nor_huggingface_hub():
    import subprocess
    import sys

    code = ("import sys, gptcli.hf, gptcli.hub; "
            "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
