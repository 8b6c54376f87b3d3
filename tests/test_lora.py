"""LoRA adapters: exact no-op at start, merge parity, frozen base, state round trips, the base
fingerprint, and compile/DDP compatibility."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_, tiny_config

from gptcli.config import ModelConfig, TrainConfig
from gptcli.lora import (TARGETS, LoRAProjection, adapter_settings, adapter_state, apply_lora,
                         base_fingerprint, check_base, load_adapter, lora_modules, merge_lora,
                         trainable_parameters)
from gptcli.model import GPT, Projection
from gptcli.errors import UserError

IDX = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny(seed: int = 0, **overrides) -> GPT:
    return randomize_(GPT(tiny_config(**overrides)), seed).eval()


def perturb_adapters_(model: GPT, seed: int = 5) -> None:
    """Stand-in for training: non-zero A and B of a realistic size (B ~ 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_A.add_(torch.randn(module.lora_A.shape, generator=g) * 0.05)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.02)


def test_wraps_every_target_of_every_block():
    model = tiny()
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0)
    assert names == [f"h.{i}.{path}" for i in range(2) for path in TARGETS.values()]
    assert set(lora_modules(model)) == set(names)
    assert adapter_settings(model) == {"rank": 4, "alpha": 8, "dropout": 0.0,
                                       "targets": list(TARGETS)}
    model = tiny()
    assert apply_lora(model, 2, 2, 0.0, targets=["mlp-out", "qkv"]) == \
        ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    assert isinstance(model.h[0].attn.c_proj, Projection)


def test_zero_b_leaves_logits_exactly_unchanged():
    model = tiny()
    before = model(IDX)
    apply_lora(model, rank=4, alpha=16, dropout=0.0)
    assert torch.equal(model(IDX), before)
    # the adapter's dropout only touches the adapter path, so it is still exact in train mode
    model = tiny()
    apply_lora(model, rank=4, alpha=16, dropout=0.5)
    model.train()
    assert torch.equal(model(IDX), before)


def test_a_is_initialised_like_peft():
    model = tiny()
    apply_lora(model, rank=8, alpha=8, generator=torch.Generator().manual_seed(0))
    module = model.h[0].mlp.c_proj  # in = 4 * 48
    bound = 1 / math.sqrt(4 * 48)
    assert module.lora_A.shape == (192, 8) and module.lora_B.shape == (8, 48)
    assert module.lora_A.abs().max() <= bound
    assert module.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not module.lora_B.any()
    again = tiny()
    apply_lora(again, rank=8, alpha=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adapter_state(again)["h.1.attn.c_attn.lora_A"],
                       adapter_state(model)["h.1.attn.c_attn.lora_A"])


def test_merged_and_unmerged_logits_agree():
    model = tiny()
    base = model(IDX)
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    assert not any(m.training for m in model.modules())  # adapters follow the model's mode
    perturb_adapters_(model)
    unmerged = model(IDX)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do change the model
    assert merge_lora(model) == [f"h.{i}.{p}" for i in range(2) for p in TARGETS.values()]
    assert not lora_modules(model)
    assert all(type(m) is Projection for n, m in model.named_modules() if n.endswith(
        ("c_attn", "c_proj", "c_fc")))
    assert "h.0.attn.c_attn.weight" in model.state_dict()  # the plain names again
    merged = model(IDX)
    assert (merged - unmerged).abs().max().item() < 1e-5, (merged - unmerged).abs().max()


def test_only_adapters_train():
    from gptcli.optim import make_optimizer

    model = tiny()
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["qkv", "mlp-in"])
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"h.{i}.{p}.{t}" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")
                         for t in ("lora_A", "lora_B")}
    logits = model(IDX)
    torch.nn.functional.cross_entropy(logits.view(-1, 101), IDX.view(-1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # B starts at zero, so A's first gradient is zero; B's is not
    assert model.h[0].attn.c_attn.lora_B.grad.abs().sum() > 0

    for optimizer in (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                      make_optimizer(model, TrainConfig(), torch.device("cpu"))):
        optimizer.step()
        held = {id(p) for p in optimizer.state}
        adapters = {id(p) for n, p in model.named_parameters() if n in trainable}
        assert held == adapters


def test_adapter_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    apply_lora(model, rank=3, alpha=6, dropout=0.0, targets=["attn-out", "mlp-in"])
    perturb_adapters_(model)
    state = adapter_state(model)
    assert sorted(state) == sorted(f"h.{i}.{p}.{t}" for i in range(2) for p in
                                   ("attn.c_proj", "mlp.c_fc") for t in ("lora_A", "lora_B"))
    assert all(not t.requires_grad for t in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "adapter.safetensors")

    fresh = tiny()
    apply_lora(fresh, **adapter_settings(model))
    load_adapter(fresh, load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(fresh(IDX), model(IDX))


def test_load_adapter_is_strict():
    model = tiny()
    apply_lora(model, rank=3, alpha=6, targets=["qkv"])
    state = adapter_state(model)
    other = tiny()
    apply_lora(other, rank=3, alpha=6, targets=["qkv", "mlp-out"])
    with pytest.raises(UserError) as info:
        load_adapter(other, state)
    assert str(info.value) == (
        "the adapter does not fit this model's LoRA layers (missing: h.0.mlp.c_proj.lora_A, "
        "h.0.mlp.c_proj.lora_B, h.1.mlp.c_proj.lora_A, h.1.mlp.c_proj.lora_B); was it made with "
        "other LoRA settings?")
    fewer = tiny()
    apply_lora(fewer, rank=3, alpha=6, targets=["qkv", "attn-out", "mlp-in"])
    with pytest.raises(UserError, match=r"\(missing: h\.0\.attn\.c_proj\.lora_A, .* and 4 more\)"):
        load_adapter(fewer, state)
    bigger = tiny()
    apply_lora(bigger, rank=5, alpha=6, targets=["qkv"])
    with pytest.raises(UserError, match=r"wrong shape: h\.0\.attn\.c_attn\.lora_A \(48, 3\) "
                                        r"\(expected \(48, 5\)\)"):
        load_adapter(bigger, state)
    with pytest.raises(UserError, match=r"unexpected: h\.9\.attn\.c_attn\.lora_A"):
        load_adapter(model, {**state, "h.9.attn.c_attn.lora_A": torch.zeros(1)})


def test_fingerprint(tmp_path):
    from gptcli.checkpoint import model_tensors, read_safetensors, save_checkpoint
    from gptcli.tokenizer import CharTokenizer

    model = tiny()
    tensors = model_tensors(model)
    fingerprint = base_fingerprint(tensors)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert base_fingerprint(dict(reversed(list(tensors.items())))) == fingerprint
    # the checkpoint file's tensors, as read back, give the same fingerprint
    path = save_checkpoint(tmp_path / "base.safetensors", model,
                           CharTokenizer([chr(0x100 + i) for i in range(101)]))
    assert base_fingerprint(read_safetensors(path)[0]) == fingerprint
    # wrapping in adapters (trained or not) does not change the base's fingerprint
    apply_lora(model, rank=2, alpha=2)
    perturb_adapters_(model)
    assert base_fingerprint(model_tensors(model)) == fingerprint
    check_base(fingerprint, model_tensors(model), "adapter.safetensors")
    # one changed value, dtype or name changes it
    with torch.no_grad():
        model.h[1].mlp.c_fc.base.weight[3, 7] += 1e-3
    changed = base_fingerprint(model_tensors(model))
    assert changed != fingerprint
    with pytest.raises(UserError, match=r"adapter\.safetensors was trained on a different base"):
        check_base(fingerprint, model_tensors(model), "adapter.safetensors")
    assert base_fingerprint({k: v.half() for k, v in tensors.items()}) != fingerprint
    renamed = dict(tensors)
    renamed["ln_f.gain"] = renamed.pop("ln_f.weight")
    assert base_fingerprint(renamed) != fingerprint


def test_gpt2_trainable_fraction():
    """GPT-2 124M, rank 8 on all four projections: 12 x (768*8 + 8*2304 + 768*8 + 8*768
    + 768*8 + 8*3072 + 3072*8 + 8*768) = 1,179,648 trainable, 0.95% of the base."""
    with torch.device("meta"):  # shapes only
        model = GPT(ModelConfig.from_preset("gpt2"))
        apply_lora(model, rank=8, alpha=16)
    assert trainable_parameters(model) == 1_179_648
    assert model.num_params() == 124_439_808
    assert trainable_parameters(model) / model.num_params() < 0.01


def test_refusals():
    model = tiny()
    apply_lora(model, 2, 2)
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, 2, 2)
    with pytest.raises(UserError, match=r"unknown LoRA target 'q'; choose from qkv, attn-out, "
                                        r"mlp-in, mlp-out"):
        apply_lora(tiny(), 2, 2, targets=["q"])
    with pytest.raises(UserError, match="rank must be at least 1"):
        apply_lora(tiny(), 0, 2)
    with pytest.raises(UserError, match="alpha must be positive"):
        apply_lora(tiny(), 2, 0)
    projection = Projection(4, 4)
    projection.weight = None  # a quantized layer keeps no float weight
    with pytest.raises(UserError, match="quantized"):
        LoRAProjection(projection, 2, 2)
    model = tiny()
    model.h[1].mlp.c_proj.weight = None
    with pytest.raises(UserError, match="quantized; load it without --quantize"):
        apply_lora(model, 2, 2)
    # checked before anything changed: nothing frozen, nothing wrapped
    assert all(p.requires_grad for p in model.parameters()) and not lora_modules(model)
    model = tiny()
    model.h[0].attn.c_proj = torch.nn.Linear(48, 48)  # stands for an inference layout
    with pytest.raises(UserError, match=r"but h\.0\.attn\.c_proj is a Linear \(a model "
                                        r"prepared for inference\)"):
        apply_lora(model, 2, 2)
    assert all(p.requires_grad for p in model.parameters()) and not lora_modules(model)


def test_no_graph_breaks():
    model = tiny()
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    model.train()
    explanation = torch._dynamo.explain(model)(IDX)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_ddp_with_a_frozen_base(tmp_path):
    """A one-process gloo group: DDP accepts the frozen base, and gradients reach (and are
    reduced for) the adapters only."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    ddp = logits = None
    try:
        model = tiny()
        apply_lora(model, rank=4, alpha=8, targets=["qkv", "mlp-out"])
        model.train()
        ddp = DDP(model)
        logits = ddp(IDX)
        torch.nn.functional.cross_entropy(logits.view(-1, 101), IDX.view(-1)).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
        assert with_grad and all("lora_" in n for n in with_grad)
    finally:
        # DDP's reducer holds the process group: freed after destroy_process_group, the gloo
        # group's destructor can wait forever for its worker threads (seen once in a full run)
        ddp = logits = None
        dist.destroy_process_group()


def test_packed_frozen_products_train_as_the_plain_ones():
    """With ``use_packs`` the frozen projections and output matrix run on packed copies: the
    same loss and adapter gradients (float32, 1e-5 relative), no gradient for the base; merging
    gives back the plain output layer and the base's tensor names."""
    from gptcli.lora import FrozenHead, packed_bytes, use_packs

    names = set(tiny().state_dict())
    models = []
    for packed in (False, True):
        model = tiny(dropout=0.1)
        apply_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
        perturb_adapters_(model)
        use_packs(model, torch.float32 if packed else None)
        model.train()
        torch.manual_seed(3)  # the same dropout masks
        logits = model(IDX)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 101), IDX.view(-1))
        loss.backward()
        models.append((model, loss.detach()))
    (plain, loss_plain), (fast, loss_fast) = models
    assert isinstance(fast.lm_head, FrozenHead) and fast.lm_head.packs.packs is not None
    assert all(m.packs.packs is not None for m in lora_modules(fast).values())
    assert plain.lm_head.packs.packs is None
    assert torch.allclose(loss_fast, loss_plain, rtol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert (a.grad is None) == (b.grad is None) == ("lora_" not in name), name
        if a.grad is not None:
            assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-7), name
    c = fast.config
    projections = c.n_layer * (c.n_embd * 3 * c.n_embd + c.n_embd ** 2 + 8 * c.n_embd ** 2)
    assert packed_bytes(fast, torch.float32) == 2 * 4 * (projections + c.vocab_size * c.n_embd)
    merge_lora(fast)
    assert type(fast.lm_head) is torch.nn.Linear and fast.lm_head.weight is fast.wte.weight
    assert set(fast.state_dict()) == names
