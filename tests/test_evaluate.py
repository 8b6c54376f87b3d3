import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptcli.checkpoint import read_safetensors, save_checkpoint
from gptcli.cli import app
from gptcli.evaluate import eval_windows, evaluate
from gptcli.model import GPT
from gptcli.tokenizer import CharTokenizer

from conftest import randomize_, tiny_config

runner = CliRunner()


@pytest.mark.parametrize("n,context,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 4), (10, 16, 3)])
def test_eval_windows_score_every_token_once(n, context, stride):
    T = min(context, n - 1)
    scored = []
    for start, first in eval_windows(n, context, stride):
        assert 0 <= start and start + T <= n - 1
        scored += list(range(start + first + 1, start + T + 1))
    assert scored == list(range(1, n))


def test_evaluate_equals_direct_computation():
    model = randomize_(GPT(tiny_config())).eval()
    tokens = np.random.default_rng(0).integers(0, 101, 70).astype(np.uint16)
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():  # stride = context: non-overlapping windows of 32, then the tail
        direct = []
        for start, first in [(0, 0), (32, 0), (37, 27)]:
            logits = model(t[None, start:start + 32])
            nll = torch.nn.functional.cross_entropy(logits[0], t[start + 1:start + 33], reduction="none")
            direct.append(nll[first:])
        expected = torch.cat(direct).mean().item()
    result = evaluate(model, tokens, 32, batch_size=2)
    assert result.tokens == 69
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_gpt_eval_cli_equals_direct_computation(tmp_path):
    text = "the cat sat on the mat. "
    tok = CharTokenizer.from_text(text)
    model = randomize_(GPT(tiny_config(vocab_size=tok.vocab_size))).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, tok)
    (tmp_path / "t.txt").write_text(text)
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", str(tmp_path / "t.txt"),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(expected * 23 / math.log(2) / 24, rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--window", "-5"], "error: --window must be at least 1, got -5"),
    (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
    (["--stride", "100"], "error: --stride must be between 1 and the window length (32), got 100"),
])
def test_gpt_eval_bad_values_exit_2(tmp_path, args, message):
    tok = CharTokenizer.from_text("abc ")
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(vocab_size=4)), tok)
    (tmp_path / "t.txt").write_text("abc " * 30)
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", str(tmp_path / "t.txt"),
                                 *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == message


def test_gpt_eval_refuses_a_window_longer_than_the_model_context(tmp_path):
    tok = CharTokenizer.from_text("abc ")
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(vocab_size=4)), tok)
    (tmp_path / "t.txt").write_text("abc " * 30)
    result = runner.invoke(app, ["eval", "--model", str(path), "--data", str(tmp_path / "t.txt"),
                                 "--window", "64"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --window 64 is longer than the model's context "
                                     "(32); use at most 32")


def test_gpt_eval_of_a_run_scores_its_own_validation_split(corpus, tmp_path):
    from gptcli.data import load_tokens, resolve_data

    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), "--n-layer",
                                  "1", "--n-embd", "32", "--context-length", "16", "--batch-size",
                                  "2", "--max-steps", "2", "--eval-interval", "2", "--device",
                                  "cpu", "--sample-interval", "0"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["eval", "--model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["data"] == (f"the validation split of run {out} (the last 10% of corpus.txt)")
    model, tok, _ = __import__("gptcli.checkpoint", fromlist=["x"]).load_checkpoint(
        out / "best.safetensors")
    _, val = load_tokens(resolve_data([str(corpus)]), tok.spec()).split(0.1)
    assert got["tokens"] == len(val) - 1  # every token of the split but the first is scored
    assert got["loss"] == pytest.approx(evaluate(model, val, 16).loss, rel=1e-6)
    text = runner.invoke(app, ["eval", "--model", str(out)]).stdout
    assert f"scored {len(val) - 1:,} tokens of the validation split of run {out}" in text


def test_gpt_eval_of_a_model_outside_a_run_needs_data(tmp_path):
    tok = CharTokenizer.from_text("abc ")
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(vocab_size=4)), tok)
    result = runner.invoke(app, ["eval", "--model", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: say what to score with --data FILE: {path} is not "
                                     "in a run folder with a validation split")


def test_gpt_eval_of_a_run_explains_its_checkpoint_val_loss(corpus, tmp_path):
    """`gpt info` shows the val_loss training estimated on a subset of the split's windows;
    `gpt eval` scores every token, and says how the two figures relate."""
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), "--n-layer",
                                  "1", "--n-embd", "32", "--context-length", "16", "--batch-size",
                                  "2", "--max-steps", "2", "--eval-interval", "2", "--eval-steps",
                                  "3", "--device", "cpu", "--sample-interval", "0"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["eval", "--model", str(out)])
    assert result.exit_code == 0, result.output
    meta_loss = float(read_safetensors(out / "best.safetensors", tensors=False)[1]["val_loss"])
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"(its val_loss in the checkpoint, {meta_loss:.4f} at step 2, is "
                           "training's estimate on 6 of the split's ")
    assert last.endswith(" windows; this scores every token)")
    got = json.loads(runner.invoke(app, ["eval", "--model", str(out), "--json"]).stdout)
    assert got["training_estimate"]["step"] == 2 and "quantize" not in got  # (a number)
    quantized = runner.invoke(app, ["eval", "--model", str(out), "--quantize", "int8"])
    assert quantized.stdout.startswith(f"{out / 'best.safetensors'} (--quantize int8): loss ")
    assert json.loads(runner.invoke(app, ["eval", "--model", str(out), "--quantize", "int8",
                                          "--json"]).stdout)["quantize"] == "int8"
