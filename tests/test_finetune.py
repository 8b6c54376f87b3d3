"""Instruction and chat fine-tuning through the real `gpt train`: chat records and their target
masks in the token cache, the masked loss, LoRA runs (adapters alone on disk, merged at load,
exact resume, a changed or missing base refused), gradient checkpointing, the memory check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from gptcli import optim
from gptcli.chat import TEMPLATE, render_record
from gptcli.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from gptcli.cli import app
from gptcli.config import ModelConfig
from gptcli.data import load_tokens
from gptcli.data.batches import IGNORE, BatchSampler
from gptcli.frozen import packable_dtypes
from gptcli.model import GPT
from gptcli.models import load_weights
from gptcli.tokenizer import GPT2Tokenizer

from conftest import randomize_

runner = CliRunner()
TOK = GPT2Tokenizer()
SMALL = ["--batch-size", "2", "--context-length", "32", "--device", "cpu", "--sample-interval",
         "0", "--warmup-steps", "2"]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": str(a + b)}]}
        for a in range(1, 7) for b in range(1, 7)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def base(tmp_path):
    """A tiny pretrained-looking model with GPT-2's tokenizer, saved as a checkpoint."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, n_embd=32)
    model = randomize_(GPT(config), seed=4)
    return save_checkpoint(tmp_path / "base.safetensors", model, TOK)


@pytest.fixture
def chat(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", CHAT)


def train(*args):
    return runner.invoke(app, ["train", *SMALL, *map(str, args)])


# ----------------------------------------------------------------------------- data and masks

@pytest.mark.parametrize("rows", [
    CHAT[:5],
    [{"prompt": "Say hi.", "completion": " hi"}, {"prompt": "Say no.", "completion": " no"}],
    [{"instruction": "Add.", "input": "2 3", "output": "5"}, {"instruction": "Greet.",
                                                              "output": "Hello"}],
])
def test_chat_records_give_their_tokens_and_target_masks(tmp_path, rows):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_tokens([path], "gpt2")
    ids, targets = [], []
    for row in rows:
        fmt = next(f for f, key in (("messages", "messages"), ("prompt_completion", "prompt"),
                                    ("alpaca", "instruction")) if key in row)
        row_ids, row_targets = render_record(row, fmt, TOK)
        ids += row_ids
        targets += row_targets
    assert data.tokens.tolist() == ids
    assert data.masks[:].astype(bool).tolist() == targets
    assert data.formats == [fmt] and 0 < data.targets < len(ids)
    everything = load_tokens([path], "gpt2", mask_prompt=False)
    assert everything.tokens.tolist() == ids and everything.masks[:].all()


def test_parquet_with_a_messages_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet needs the data extra")
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT[:4]), path)
    from_parquet = load_tokens([path], "gpt2")
    from_jsonl = load_tokens([write_jsonl(tmp_path / "c.jsonl", CHAT[:4])], "gpt2")
    assert from_parquet.tokens.tolist() == from_jsonl.tokens.tolist()
    assert from_parquet.masks[:].tolist() == from_jsonl.masks[:].tolist()


def test_text_beside_chat_files_is_all_targets_and_the_separator_is_not(tmp_path, chat):
    text = tmp_path / "t.txt"
    text.write_text("plain words here\n")
    data = load_tokens([text, chat], "gpt2")
    n = len(TOK.encode("plain words here\n"))
    masks = data.masks[:].tolist()
    assert masks[:n] == [1] * n and masks[n] == 0  # the end-of-text between files is not a target
    assert data.tokens[n] == TOK.eot_id


def test_batches_ignore_what_is_not_a_target(tmp_path, chat):
    data = load_tokens([chat], "gpt2")
    sampler = BatchSampler(data.tokens, 16, 4, seed=0, masks=data.masks)
    x, y = sampler.next_batch()
    plain = BatchSampler(data.tokens, 16, 4, seed=0).next_batch()[1]
    keep = y != IGNORE
    assert torch.equal(y[keep], plain[keep]) and 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "completion": "b"}, {"messages": CHAT[0]["messages"]}],
     "{path} line 2 is a messages record but the lines before it are prompt_completion "
     "records; keep one format per file"),
    ([{"question": "a", "answer": "b"}],
     "{path} line 1: the record has none of the known fields"),
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     "{path} line 1: the conversation has no assistant turn, so there is nothing to learn"),
])
def test_bad_chat_data_is_one_sentence_naming_file_and_line(base, tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = train("--init-from", base, "--data", path, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error: " + message.format(path=path))
    assert len(result.stderr.strip().splitlines()) == 1


def test_chat_data_with_a_char_tokenizer_is_refused(tmp_path, chat):
    result = train("--data", chat, "--tokenizer", "char", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {chat} holds messages records, which the chat template ends with an "
        "end-of-text token the char tokenizer does not have; train them with a GPT-2 "
        "tokenizer (--tokenizer gpt2)")


# ----------------------------------------------------------------------------- the masked loss

def test_the_loss_is_a_direct_masked_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = IGNORE
    loss, count = optim.loss_fn(logits, targets)
    keep = targets != IGNORE
    direct = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, direct) and count.item() == int(keep.sum())
    unmasked = torch.randint(0, 11, (2, 5))
    assert torch.equal(optim.loss_fn(logits, unmasked)[0],
                       F.cross_entropy(logits.view(-1, 11), unmasked.view(-1)))


def test_an_all_masked_micro_batch_gives_zero_loss_and_zero_gradients():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=8))
    x = torch.randint(0, 11, (2, 8))
    loss, count = optim.loss_fn(model(x), torch.full((2, 8), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ----------------------------------------------------------------------------- runs

def test_a_chat_fine_tune_records_its_template_and_counts_target_tokens(base, chat, tmp_path):
    out = tmp_path / "run"
    result = train("--init-from", base, "--data", chat, "--out", out, "--max-steps", "4",
                   "--eval-interval", "2", "--log-interval", "2")
    assert result.exit_code == 0, result.output
    meta = read_safetensors(out / "last.safetensors", tensors=False)[1]
    assert meta["chat_template"] == TEMPLATE
    assert f"try it: gpt chat --model {out}" in result.stderr
    assert all(r["tokens_per_s"] > 0 for r in map(json.loads, (out / "metrics.jsonl")
               .read_text().splitlines()) if "tokens_per_s" in r)


def test_val_data_is_a_separate_validation_set(base, chat, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", CHAT[:6])
    out = tmp_path / "run"
    result = train("--init-from", base, "--data", chat, "--val-data", val, "--out", out,
                   "--max-steps", "2", "--eval-interval", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["val_data"] == [str(val)]


def adapter_names(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_a_lora_run_saves_adapters_and_generates_as_its_merged_model(base, chat, tmp_path):
    out = tmp_path / "run"
    result = train("--init-from", base, "--data", chat, "--out", out, "--max-steps", "4",
                   "--eval-interval", "2", "--lora-rank", "2", "--lora-targets", "qkv",
                   "--lora-targets", "mlp-out", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert "LoRA: 1,152 adapter parameters train" in result.stderr  # 2 x (2*128 + 2*160)
    base_params = load_checkpoint(base)[0].num_params()
    assert f"training 1,152 of {base_params + 1152:,} params" in result.stderr  # adapters too
    if packable_dtypes():  # oneDNN is there: the frozen products run on packed copies
        assert "frozen weights: products on oneDNN-packed copies" in result.stderr
    names = adapter_names(out / "last.safetensors")
    assert sorted(names) == sorted(f"h.{i}.{p}.lora_{m}" for i in range(2)
                                   for p in ("attn.c_attn", "mlp.c_proj") for m in "AB")
    assert (out / "last.safetensors").stat().st_size < 0.02 * base.stat().st_size
    with safe_open(str(out / "last.state.safetensors"), "pt") as f:  # AdamW moments: adapters only
        moments = [k for k in f.keys() if k.startswith("optimizer.")]
    assert len(moments) == 3 * len(names)  # step, exp_avg, exp_avg_sq per adapter tensor
    merged = tmp_path / "merged.safetensors"
    assert runner.invoke(app, ["merge", str(out), "--out", str(merged)]).exit_code == 0
    args = ["--prompt", "User: 2 plus 2?", "--max-new-tokens", "8", "--temperature", "0",
            "--json"]
    a = runner.invoke(app, ["generate", "--model", str(out), *args])
    b = runner.invoke(app, ["generate", "--model", str(merged), *args])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert json.loads(a.stdout)["samples"] == json.loads(b.stdout)["samples"]
    model, _, _ = load_weights(out / "last.safetensors")
    plain, _, _ = load_checkpoint(base)
    assert not torch.equal(model.h[0].attn.c_attn.weight, plain.h[0].attn.c_attn.weight)
    assert torch.equal(model.h[0].attn.c_proj.weight, plain.h[0].attn.c_proj.weight)
    # gpt export merges first: the adapter run's folder holds the merged checkpoint's weights
    for name in (out, merged):
        result = runner.invoke(app, ["export", str(name), "--out", str(tmp_path / f"hf-{name.stem}")])
        assert result.exit_code == 0, result.output
    a, _ = read_safetensors(tmp_path / "hf-run" / "model.safetensors")
    b, _ = read_safetensors(tmp_path / "hf-merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "hf-run" / "README.md").read_text()
    assert "chat" in card.lower()
    # gpt quantize measures the int8 file against the merged float model, not the adapters
    result = runner.invoke(app, ["quantize", str(out), "--out", str(tmp_path / "q.safetensors")])
    assert result.exit_code == 0, result.output
    float_size = sum(t.nbytes for t in read_safetensors(merged)[0].values())
    share = (tmp_path / "q.safetensors").stat().st_size / float_size
    assert 0.2 < share < 0.6  # (int8 matrices, float32 vectors and scales; a tiny model)
    assert f"{share:.0%} of the float model's {float_size / 1e6:,.1f} MB)" in result.stdout


def test_a_lora_resume_equals_an_uninterrupted_run(base, chat, tmp_path):
    """Adapters, their AdamW moments, the random state (LoRA dropout) and the sampler resume
    exactly: the resumed run's losses and adapters equal the uninterrupted run's."""
    from gptcli.config import TrainConfig
    from gptcli.runs import RunFolder
    from gptcli.train import fit

    cfg = TrainConfig(init_from=str(base), data=[str(chat)], lora_rank=2, lora_dropout=0.1,
                      lr=1e-2, max_steps=8, eval_interval=4, batch_size=2, device="cpu",
                      sample_interval=0, warmup_steps=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    RunFolder(straight).prepare(resume=None, force=False)
    fit(cfg, out=straight)
    RunFolder(split).prepare(resume=None, force=False)
    assert fit(cfg, out=split, stop_after=3).step == 3
    assert RunFolder(split).prepare(resume="yes", force=False) is True
    fit(cfg, out=split, resume=True)

    def losses(run):
        return [(r["step"], r.get("train_loss"), r.get("val_loss"))
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(split) == losses(straight)
    a = read_safetensors(straight / "last.safetensors")[0]
    b = read_safetensors(split / "last.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_resume_keeps_its_base_and_adapters(base, chat, tmp_path):
    """On --resume, LoRA's flags and --init-from that repeat the run's settings are fine (they
    were refused: "--lora-rank ... give it with --init-from"); other ones are refused, as shape
    flags are, and config.json is left as it was (it recorded them, unused)."""
    out = tmp_path / "run"
    lora = ["--lora-rank", "2", "--lora-targets", "qkv", "--lora-targets", "mlp-out"]
    assert train("--init-from", base, "--data", chat, "--out", out, "--max-steps", "2",
                 *lora).exit_code == 0
    same = ["--lora-rank", "2", "--lora-targets", "mlp-out", "--lora-targets", "qkv"]
    result = train("--out", out, "--resume", "--max-steps", "3", *same, "--init-from",
                   base.name)  # (the same base by another path: the run folder's is absolute)
    assert result.exit_code == 0, result.output
    config_file = out / "config.json"
    recorded = config_file.read_text()
    other = save_checkpoint(tmp_path / "other.safetensors", randomize_(GPT(ModelConfig(
        vocab_size=50257, context_length=32, n_layer=2, n_head=2, n_embd=32)), seed=9), TOK)
    kept = "a resumed run keeps its checkpoint's shape, tokenizer, base model and LoRA " \
        "adapters: leave these flags out"
    for flags, wrong in (
            (["--lora-rank", "4"], "--lora-rank 4 (it has 2)"),
            (["--lora-alpha", "8", "--lora-targets", "qkv"],
             "--lora-alpha 8.0 (it has 16.0), --lora-targets qkv (it has qkv,mlp-out)"),
            (["--init-from", other], f"--init-from {other} (it has {base})")):
        result = train("--out", out, "--resume", "--max-steps", "4", *flags)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {out} is not {wrong}; {kept}"
        assert config_file.read_text() == recorded
    # --resume auto with nothing to resume is a fresh run, checked as one
    result = train("--data", chat, "--out", tmp_path / "fresh", "--resume-auto",  # (main: auto)
                   "--lora-rank", "2")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: --lora-rank trains adapters on a pretrained "
                                            "model: give it with --init-from MODEL")


def test_adapters_refuse_a_changed_or_missing_base(base, chat, tmp_path):
    out = tmp_path / "run"
    assert train("--init-from", base, "--data", chat, "--out", out, "--max-steps", "2",
                 "--eval-interval", "2", "--lora-rank", "2").exit_code == 0
    tensors, meta = read_safetensors(base)
    tensors["ln_f.weight"][0] += 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(base), metadata=meta)
    result = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "a"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {out / 'best.safetensors'} holds LoRA adapters trained on base model {base} "
        f"({base}), which has changed since (its weights differ); put back the base they "
        "were trained on, or train the adapters again")
    base.unlink()
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0  # the header alone: info works without the base
    result = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "a"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {out / 'best.safetensors'} holds LoRA adapters for base model {base} "
        f"({base}), which is not there any more; put it back at {base} to use them")


@pytest.mark.parametrize("args,message", [
    (["--lora-alpha", "8"], "error: --lora-alpha set LoRA adapters, which need --lora-rank R "
                            "(R > 0)"),
    (["--lora-rank", "4"], "error: --lora-rank trains adapters on a pretrained model: give it "
                           "with --init-from MODEL (a downloaded model, a run or a checkpoint)"),
    (["--lora-rank", "-1"], "error: --lora-rank must be at least 0, got -1"),
    (["--lora-rank", "2", "--lora-targets", "ffn"], "error: --lora-targets must be 'qkv', "
                                                   "'attn-out', 'mlp-in' or 'mlp-out', got 'ffn'"),
])
def test_bad_lora_settings_are_one_sentence_before_anything_runs(chat, tmp_path, args, message):
    result = train("--data", chat, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert not (tmp_path / "run").exists()


def test_a_lora_rank_over_the_models_width_is_refused(base, chat, tmp_path):
    """Rank 33 on a 32-wide model: adapters would train more than the weights they adapt."""
    result = train("--init-from", base, "--data", chat, "--out", tmp_path / "run",
                   "--lora-rank", "33")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: a LoRA rank of 33 is more than the 32 inputs or outputs of the projections it "
        "adapts, where adapters train more than the weights; give a rank up to 32 (4-64 is "
        "usual), or leave LoRA out to train every weight")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- memory

def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Exactly the same in float32 (the same operations, run again in the backward pass)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=3, n_head=2, n_embd=32,
                            dropout=0.1)).train()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))

    def step():
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss = optim.loss_fn(model(x), y)[0]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = step()
    model.grad_checkpoint = True
    loss, grads = step()
    assert loss == plain_loss and all(torch.equal(a, b) for a, b in zip(plain_grads, grads))


def test_the_memory_check_suggests_lora_and_checkpointing(tmp_path, chat, monkeypatch):
    """gpt2-xl full fine-tuning does not fit 24 GiB; with --lora-rank 8 --grad-checkpoint it
    does: the refusal says so, before anything is built."""
    from gptcli import finetune, hardware

    monkeypatch.setattr(finetune, "available_memory", lambda device: 24 * 2 ** 30)
    monkeypatch.setattr(hardware, "available_memory", lambda device: 24 * 2 ** 30)
    config = ModelConfig.from_preset("gpt2-xl")
    from gptcli.config import TrainConfig

    cfg = TrainConfig(batch_size=4, init_from="x")
    full = sum(finetune.memory_breakdown(config, cfg, torch.float32).values())
    lora = sum(finetune.memory_breakdown(config, cfg, torch.float32, lora_rank=8,
                                         grad_checkpoint=True).values())
    assert full > 24 * 2 ** 30 > lora
    from gptcli.errors import UserError

    with pytest.raises(UserError, match=r"needs about \d+\.\d GiB; cpu has 24.0 GiB available\. "
                                        r"With --lora-rank 8( --grad-checkpoint)? it would need "):
        finetune.check_fits(config, cfg, torch.device("cpu"), torch.float32)
    breakdown = finetune.memory_breakdown(config, cfg.model_copy(update={"lora_rank": 8}),
                                          torch.float32)
    adapters = finetune.adapter_parameters(config, 8, cfg.lora_targets)
    assert breakdown["gradients"] == 4 * adapters and breakdown["optimizer"] == 8 * adapters
    assert breakdown["weights"] == 4 * (config.num_params() + adapters)


def test_masks_shift_with_the_targets(tmp_path):
    """A window's target i is token i+1: its mask is the mask of token i+1."""
    rows = [{"prompt": "a", "completion": "b"}]
    data = load_tokens([write_jsonl(tmp_path / "d.jsonl", rows * 20)], "gpt2")
    ids, targets = render_record(rows[0], "prompt_completion", TOK)
    sampler = BatchSampler(data.tokens, len(ids) - 1, 1, seed=0, masks=data.masks)
    for _ in range(10):
        x, y = sampler.next_batch()
        start = int(np.flatnonzero([np.array_equal(data.tokens[s:s + len(ids) - 1], x[0].numpy())
                                    for s in range(len(data.tokens) - len(ids) + 1)])[0])
        expected = [t if m else IGNORE for t, m in zip(data.tokens[start + 1:start + len(ids)],
                                                       data.masks[start + 1:start + len(ids)])]
        assert y[0].tolist() == expected


def test_shape_flags_that_differ_from_the_starting_checkpoint_are_refused(base, chat, tmp_path):
    result = train("--init-from", base, "--data", chat, "--out", tmp_path / "r", "--n-layer", "4",
                   "--context-length", "16")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {base} is not --n-layer 4 (it has 2), --context-length 16 (it has 32); a run "
        "started from a checkpoint keeps its checkpoint's shape and tokenizer: leave these flags "
        "out")
    assert not (tmp_path / "r").exists()
    result = train("--init-from", base, "--data", chat, "--out", tmp_path / "r", "--tokenizer",
                   "char")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {base} is not --tokenizer char (it has gpt2); a run started from a checkpoint "
        "keeps its checkpoint's shape and tokenizer: leave these flags out")
    result = train("--init-from", base, "--data", chat, "--out", tmp_path / "r", "--preset",
                   "small")  # (it was ignored)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {base} is not --preset small (it has a shape of its own); a run started from a "
        "checkpoint keeps its checkpoint's shape and tokenizer: leave these flags out")
    assert not (tmp_path / "r").exists()


def test_frozen_weights_stay_unpacked_when_their_copies_would_not_fit(monkeypatch):
    from gptcli import finetune
    from gptcli.config import TrainConfig
    from gptcli.lora import apply_lora, lora_modules

    if not packable_dtypes():
        pytest.skip("oneDNN is not available in this torch build")
    model = GPT(ModelConfig(vocab_size=101, context_length=32, n_layer=2, n_head=2, n_embd=32))
    apply_lora(model, rank=2, alpha=4)
    cfg = TrainConfig(batch_size=2, init_from="x", lora_rank=2)
    need = sum(finetune.memory_breakdown(model.config, cfg, torch.float32).values())
    monkeypatch.setattr(finetune, "available_memory", lambda device: need)
    note = finetune.pack_frozen(model, cfg, torch.device("cpu"), torch.float32)
    assert note.startswith("note: the frozen weights' products run unpacked: packed copies "
                           "(about 0.0 GiB more) would not fit in memory")
    assert not any(m.packs.dtype for m in lora_modules(model).values())
    monkeypatch.setattr(finetune, "available_memory", lambda device: 2 * need)
    assert finetune.pack_frozen(model, cfg, torch.device("cpu"), torch.float32).startswith(
        "frozen weights: products on oneDNN-packed copies (about 0.0 GiB")
    assert all(m.packs.dtype == torch.float32 for m in lora_modules(model).values())
    assert model.lm_head.packs.dtype == torch.float32
    compiled = cfg.model_copy(update={"compile": True})  # its step takes inductor's products
    finetune.use_packs(model, None)
    assert finetune.pack_frozen(model, compiled, torch.device("cpu"), torch.float32) is None
    assert model.lm_head.packs.dtype is None
