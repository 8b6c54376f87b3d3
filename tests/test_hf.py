"""The Hugging Face map: config fields and tensor names, both directions."""

import pytest

from gptcli.config import ModelConfig
from gptcli.hf import from_hf, to_hf
from gptcli.runtime import UserError


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
