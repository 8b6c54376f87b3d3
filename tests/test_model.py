import math

import pytest
import torch
from torch import nn

from gptcli.config import ModelConfig
from gptcli.hf import from_hf
from gptcli.kv_cache import KVCache
from gptcli.model import GPT

from conftest import randomize_, tiny_config

transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

PARITY_CONFIGS = [
    # vocabulary not a multiple of 64, head size 16 (not 64)
    dict(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=3),
    dict(vocab_size=256, n_positions=24, n_embd=64, n_layer=3, n_head=2),
]


def hf_pair(hf_fields, seed=0):
    """A randomly initialised transformers GPT-2 and our model with the same weights."""
    hf_config = transformers.GPT2Config(**hf_fields, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    hf = randomize_(transformers.GPT2LMHeadModel(hf_config), seed).eval()
    config, state = from_hf(hf_config.to_dict(), hf.state_dict())
    ours = GPT(config).eval()
    result = ours.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    return hf, ours


@pytest.mark.parametrize("hf_fields", PARITY_CONFIGS)
def test_logits_match_transformers(hf_fields):
    hf, ours = hf_pair(hf_fields)
    idx = torch.randint(0, hf_fields["vocab_size"], (2, hf_fields["n_positions"]))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("hf_fields", PARITY_CONFIGS)
def test_greedy_tokens_match_transformers(hf_fields):
    hf, ours = hf_pair(hf_fields, seed=1)
    prompt = torch.randint(0, hf_fields["vocab_size"], (1, 5))
    new = 12
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)
        idx = prompt
        for _ in range(new):
            idx = torch.cat([idx, ours(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert idx.tolist() == expected.tolist()


ALL_OPTIONS = [dict(), dict(position="sinusoidal"), dict(position="rope"), dict(norm="rmsnorm"),
               dict(bias=False), dict(tie_embeddings=False)]


def make(seed=0, **options) -> GPT:
    torch.manual_seed(seed)
    return randomize_(GPT(tiny_config(**options)), seed).eval()


@pytest.mark.parametrize("options", ALL_OPTIONS)
def test_sdpa_path_equals_manual_path(options):
    model = make(**options)
    idx = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        fast = model(idx)
        manual, weights = model(idx, need_weights=True)
    torch.testing.assert_close(fast, manual, atol=1e-5, rtol=1e-5)
    assert len(weights) == model.config.n_layer
    for w in weights:
        assert w.shape == (2, 3, 17, 17)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 17))
        assert (w.triu(diagonal=1) == 0).all()  # nothing attends to the future


@pytest.mark.parametrize("options", ALL_OPTIONS)
def test_causality(options):
    model = make(**options)
    idx = torch.randint(0, 101, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 101
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("options", ALL_OPTIONS)
def test_kv_cache_chunks_equal_one_full_forward(options, static):
    model = make(**options)
    idx = torch.randint(0, 101, (2, 23))
    cache = KVCache.for_model(model.config, batch_size=2, static=static)
    with torch.no_grad():
        full = model(idx)
        pieces, pos = [], 0
        for size in (7, 1, 5, 1, 1, 8):  # prefill, single steps and multi-token chunks
            pieces.append(model(idx[:, pos:pos + size], kv_cache=cache, start_pos=pos))
            pos += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_manual_attention_with_cache_offset_equals_fast_path():
    model = make()
    idx = torch.randint(0, 101, (1, 12))
    c1, c2 = (KVCache.for_model(model.config, 1) for _ in range(2))
    with torch.no_grad():
        model(idx[:, :5], kv_cache=c1)
        model(idx[:, :5], kv_cache=c2)
        fast = model(idx[:, 5:], kv_cache=c1, start_pos=5)
        manual, weights = model(idx[:, 5:], kv_cache=c2, start_pos=5, need_weights=True)
    torch.testing.assert_close(fast, manual, atol=1e-5, rtol=1e-5)
    assert weights[0].shape == (1, 3, 7, 12)
    assert (weights[0][..., 0, 6:] == 0).all() and (weights[0][..., 0, :6] > 0).all()


def test_last_only_and_context_limit():
    model = make()
    idx = torch.randint(0, 101, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])
        with pytest.raises(ValueError, match="exceed the context length"):
            model(torch.zeros(1, 33, dtype=torch.long))


def test_gpt2_structure_and_names():
    model = GPT(tiny_config())
    names = set(dict(model.named_parameters()))
    assert {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias",
            "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias", "h.1.ln_2.weight",
            "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "ln_f.weight"} <= names
    assert model.lm_head.weight is model.wte.weight
    assert model.h[0].ln_1.eps == 1e-5


def test_options_change_the_modules():
    assert isinstance(GPT(tiny_config(norm="rmsnorm")).ln_f, nn.RMSNorm)
    no_bias = GPT(tiny_config(bias=False))
    assert all(not n.endswith("bias") for n, _ in no_bias.named_parameters())
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    for position in ("sinusoidal", "rope"):
        assert not hasattr(GPT(tiny_config(position=position)), "wpe")
    # dropout is active in training and off in eval
    model = GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, 101, (1, 10))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1000, context_length=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.h[0].attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.h[0].attn.c_attn.bias.abs().max().item() == 0
    assert torch.equal(model.ln_f.weight, torch.ones(256))
