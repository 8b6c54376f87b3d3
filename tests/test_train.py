import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gptcli import optim, run_settings, train
from gptcli.checkpoint import load_checkpoint
from gptcli.cli import app
from gptcli.config import TrainConfig
from gptcli.model import GPT
from gptcli.errors import RuntimeFailure, UserError
from gptcli.optim import lr_at
from gptcli.runs import RunFolder
from gptcli.train import fit

from conftest import tiny_config

runner = CliRunner()
SMALL = dict(tokenizer="char", n_layer=1, n_head=2, n_embd=32, context_length=16, batch_size=4,
             sample_interval=0, device="cpu", warmup_steps=2, log_interval=1)


def config(corpus, **kw) -> TrainConfig:
    return TrainConfig(data=[str(corpus)], **{**SMALL, **kw})


def losses(out):
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r], \
        [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def test_loss_falls(corpus, tmp_path):
    out = tmp_path / "run"
    RunFolder(out).prepare(resume=None, force=False)
    result = fit(config(corpus, max_steps=60, eval_interval=30, lr=3e-3), out=out)
    train_losses, val_losses = losses(out)
    assert train_losses[-1][1] < train_losses[0][1] - 0.5
    assert val_losses[-1][1] < val_losses[0][1]
    assert result.best_val == min(v for _, v in val_losses)
    for name in ("config.json", "last.safetensors", "last.state.safetensors", "best.safetensors",
                 "loss.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["model"]["n_embd"] == 32


def test_resume_equals_uninterrupted_run(corpus, tmp_path):
    cfg = config(corpus, max_steps=12, eval_interval=4, dropout=0.1)  # dropout: RNG must resume
    straight = tmp_path / "straight"
    RunFolder(straight).prepare(resume=None, force=False)
    fit(cfg, out=straight)

    split = tmp_path / "split"
    RunFolder(split).prepare(resume=None, force=False)
    first = fit(cfg, out=split, stop_after=6)
    assert first.stopped_by == "stop-after" and first.step == 6
    assert RunFolder(split).prepare(resume="yes", force=False) is True
    fit(cfg, out=split, resume=True)

    assert losses(split) == losses(straight)
    a, _, _ = load_checkpoint(straight / "last.safetensors")
    b, _, _ = load_checkpoint(split / "last.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_nan_stops_cleanly_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    RunFolder(out).prepare(resume=None, force=False)
    real_loss = optim.loss_fn
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss, count = real_loss(logits, targets)
        return (loss * float("nan") if calls["n"] > 4 else loss), count

    monkeypatch.setattr(optim, "loss_fn", poisoned)
    with pytest.raises(RuntimeFailure) as err:
        fit(config(corpus, max_steps=20, eval_interval=2), out=out)
    assert str(err.value) == ("the training loss became nan at step 5; stopped without saving "
                              f"(the last good checkpoint, {out / 'last.safetensors'}, is kept); "
                              "try a lower --lr")
    model, _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == "4"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_before_any_checkpoint_says_there_is_none(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    RunFolder(out).prepare(resume=None, force=False)
    real_loss = optim.loss_fn

    def infinite(logits, targets):
        loss, count = real_loss(logits, targets)
        return loss * float("inf"), count

    monkeypatch.setattr(optim, "loss_fn", infinite)
    with pytest.raises(RuntimeFailure) as err:
        fit(config(corpus, max_steps=20, eval_interval=10), out=out)
    assert str(err.value) == ("the training loss became inf at step 1; stopped without saving "
                              "(no checkpoint had been saved yet); try a lower --lr")
    assert not (out / "last.safetensors").exists()


@pytest.mark.parametrize("flag", ["--lr", "--epochs", "--weight-decay", "--max-time"])
def test_infinite_settings_are_refused(flag, tmp_path):
    result = runner.invoke(app, ["train", flag, "inf", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {flag} must be a finite number, got inf"
    assert not (tmp_path / "r").exists()


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    opt = optim.make_optimizer(GPT(tiny_config()), TrainConfig(weight_decay=0.1),
                               torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


def cli(*args):
    return runner.invoke(app, ["train", *args])


def test_cli_refuses_to_overwrite_a_run(corpus, tmp_path):
    args = ["--data", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--eval-interval", "2", "--n-layer", "1", "--n-embd", "32", "--context-length", "16",
            "--batch-size", "2", "--device", "cpu"]
    assert cli(*args).exit_code == 0
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    result = cli(*args)
    assert result.exit_code == 2
    assert f"run folder {tmp_path / 'run'} already has files; pass --resume" in result.stderr
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == before
    assert cli(*args, "--force").exit_code == 0
    result = cli(*args, "--max-steps", "4", "--resume")
    assert result.exit_code == 0, result.output
    config_file = tmp_path / "run" / "config.json"
    assert json.loads(config_file.read_text())["train"]["max_steps"] == 4
    # a resume keeps the run's shape and tokenizer, and cannot go back in steps: refused,
    # with config.json as it was (it recorded such flags beside the shape the run has)
    recorded, last = config_file.read_text(), (tmp_path / "run" / "last.safetensors").read_bytes()
    for flags, message in (
            (["--n-layer", "2", "--tokenizer", "gpt2"], "is not --n-layer 2 (it has 1), "
             "--tokenizer gpt2 (it has char); a resumed run keeps its checkpoint's shape and "
             "tokenizer: leave these flags out"),
            (["--preset", "small"], "is not --preset small (it has a shape of its own); a "
             "resumed run keeps its checkpoint's shape and tokenizer: leave these flags out"),
            (["--max-steps", "3"], "is already at step 4, past --max-steps 3: nothing to "
             "train; ask for more steps to go on")):
        result = cli("--out", str(tmp_path / "run"), "--resume", *flags)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {tmp_path / 'run'} {message}"
        assert config_file.read_text() == recorded
        assert (tmp_path / "run" / "last.safetensors").read_bytes() == last
    # a shape an older version recorded beside the model (resumed with --n-layer 3, which it
    # ignored) is the run's own setting, not a flag: the run resumes, and config.json is put right
    saved = json.loads(recorded)
    saved["train"]["n_layer"] = 3
    config_file.write_text(json.dumps(saved))
    result = cli("--out", str(tmp_path / "run"), "--resume", "--max-steps", "5")
    assert result.exit_code == 0, result.output
    assert json.loads(config_file.read_text())["train"]["n_layer"] == 1


def test_a_preset_is_checked_against_the_checkpoints_shape():
    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, context_length=1024, position="learned")
    run_settings.check_same_shape({"preset": "gpt2", "n_layer": 12}, gpt2, "g.safetensors", resume=False)
    with pytest.raises(UserError) as err:
        run_settings.check_same_shape({"preset": "tiny"}, gpt2, "g.safetensors", resume=False)
    assert str(err.value).startswith("g.safetensors is not --preset tiny (it has gpt2); a run "
                                     "started from a checkpoint keeps its checkpoint's shape")


def test_cli_config_file_and_flags(corpus, tmp_path):
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"max_steps": 3, "lr": 5e-4, "n_layer": 1, "n_embd": 32,
                                "context_length": 16, "batch_size": 2, "eval_interval": 3}))
    result = cli("--config", str(conf), "--data", str(corpus), "--lr", "2e-4", "--out",
                 str(tmp_path / "r"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["max_steps"] == 3 and saved["lr"] == 2e-4
    assert "try it: gpt generate --model" in result.stderr


@pytest.mark.parametrize("make,args,message", [
    (None, ["--data", "nope.txt"], "error: data path nope.txt does not exist"),
    (lambda p: (p / "e.txt").write_text(""), ["--data", "e.txt"], "error: data file e.txt is empty"),
    (lambda p: (p / "d").mkdir(), ["--data", "d"], "error: folder d has no .txt, .jsonl or .parquet"),
    (lambda p: (p / "b.txt").write_bytes(b"ok\xff\xfe"), ["--data", "b.txt"],
     "error: b.txt is not valid utf-8 text (byte offset 2)"),
    (lambda p: (p / "s.txt").write_text("too short"), ["--data", "s.txt"],
     "error: not enough data: 9 tokens, but context length 64"),
    (None, ["--lr", "-1"], "error: --lr must be greater than 0, got -1.0"),
    (None, ["--preset", "huge"], "error: unknown preset 'huge'; choose one of: tiny"),
    (None, ["--device", "cuda"], "error: device 'cuda' is not available"),
    (None, ["--resume"], "error: nothing to resume in runs/shakespeare"),
])
def test_cli_bad_input_exits_2(tmp_path, make, args, message):
    if make:
        make(tmp_path)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_sigint_saves_a_resumable_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gptcli", "train", "--data", str(corpus), "--out", str(out),
            "--max-steps", "100000", "--eval-interval", "5", "--n-layer", "1", "--n-embd", "32",
            "--context-length", "16", "--batch-size", "2", "--device", "cpu",
            "--sample-interval", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        deadline = time.time() + 180
        while not (out / "last.state.safetensors").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "last.state.safetensors").exists(), "no checkpoint within 3 minutes"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Resume with: gpt train --out" in stderr and "Traceback" not in stderr
    _, _, meta = load_checkpoint(out / "last.safetensors")
    stopped = int(meta["step"])
    assert stopped >= 5
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps",
                                 str(stopped + 2)])
    assert result.exit_code == 0, result.output
    _, _, meta = load_checkpoint(out / "last.safetensors")
    assert int(meta["step"]) == stopped + 2


def test_a_display_whose_reader_goes_away_stops_and_saves(corpus, tmp_path):
    """`gpt train 2>&1 | head -1`: the progress lines' reader goes away after the first line;
    the run stops after that step as on Ctrl-C, saved and resumable, with SIGPIPE's status
    (before: rich's own broken-pipe exit, status 1, in the middle of a step, nothing saved)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gptcli", "train", "--data", str(corpus), "--out", str(out),
            "--max-steps", "100000", "--eval-interval", "1", "--n-layer", "1", "--n-embd", "32",
            "--context-length", "16", "--batch-size", "2", "--device", "cpu",
            "--sample-interval", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ.copy())
    try:
        first = proc.stderr.readline()
        proc.stderr.close()  # as head does after its line
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first.startswith(b"training "), first
    assert proc.returncode == 141
    _, _, meta = load_checkpoint(out / "last.safetensors")
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps",
                                 str(int(meta["step"]) + 1)])
    assert result.exit_code == 0, result.output


def test_a_batch_that_cannot_fit_is_refused_before_allocating(corpus, monkeypatch):
    from gptcli import train as train_module

    monkeypatch.setattr(train_module, "GPT", lambda config: pytest.fail("allocated the model"))
    result = cli("--data", str(corpus), "--batch-size", "1000000000", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: a training step at --batch-size 1000000000 with context 64 "
                           "and 808,960 parameters needs about ")
    assert "GiB available. Try a smaller --batch-size (raise --grad-accum to keep the effective " \
           "batch), --context-length or model." in line
    assert len(line.splitlines()) == 1


def test_a_real_out_of_memory_is_one_line(corpus, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 123456789 bytes")

    monkeypatch.setattr(optim, "train_step", oom)
    monkeypatch.setattr(train, "train_step", oom)
    result = cli("--data", str(corpus), *TINY_ARGS, "--max-steps", "2")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: out of memory on the device; try a smaller "
                                     "--batch-size (raise --grad-accum to keep the effective "
                                     "batch), --context-length or model")


@pytest.mark.parametrize("args,message", [
    (["--n-embd", "100", "--n-head", "3"], "error: n_embd (100) must be divisible by n_head (3)"),
    (["--tokenizer", "bpe"], "error: --tokenizer must be 'auto', 'gpt2' or 'char', got 'bpe'"),
    (["--seed", "-5"], "error: --seed must be at least 0, got -5"),
])
def test_validation_errors_are_one_line_naming_the_setting(corpus, args, message):
    result = cli("--data", str(corpus), "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == message


def test_a_bad_config_file_names_the_file(corpus, tmp_path):
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"lr": 0, "n_layers": 2}))
    result = cli("--config", str(conf), "--data", str(corpus))
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: config file {conf}: lr must be greater than 0, got "
                                     "0; n_layers is not a setting")
    result = cli("--config", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot read config file {tmp_path}: it is a folder"


def test_a_config_file_true_where_a_number_belongs_is_refused(corpus, tmp_path):
    """pydantic on its own reads true as 1: {"max_steps": true} would train one step."""
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"max_steps": True}))
    result = cli("--config", str(conf), "--data", str(corpus), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: config file {conf}: max_steps must be a number, "
                                     "not true")
    assert not (tmp_path / "r").exists()


TINY_ARGS = ["--n-layer", "1", "--n-embd", "32", "--context-length", "16", "--batch-size", "2",
             "--device", "cpu", "--sample-interval", "0"]


def test_a_run_stopped_by_max_time_says_how_to_go_on(corpus, tmp_path):
    out = tmp_path / "run"
    result = cli("--data", str(corpus), "--out", str(out), *TINY_ARGS, "--max-steps", "100000",
                 "--eval-interval", "100000", "--max-time", "0.2")
    assert result.exit_code == 0, result.output
    stopped = re.search(r"stopped by max-time at step (\d+); saved .*\. Resume with: gpt train "
                        rf"--out {re.escape(str(out))} --resume --max-time ([0-9.]+)\n",
                        result.stderr)
    assert stopped, result.stderr
    step, more = int(stopped[1]), float(stopped[2])
    assert more >= 0.4
    # --max-time is the run's time in all: resumed as it was (config.json keeps 0.2), nothing
    # is left, which is said, with the files as they were
    last = (out / "last.safetensors").read_bytes()
    result = cli("--out", str(out), "--resume")
    assert result.exit_code == 2, result.output
    refused = re.fullmatch(rf"error: {re.escape(str(out))} has trained for ([0-9.]+) s already, "
                           r"past --max-time 0\.2 \(the run's time in all, across resumes\): "
                           r"nothing to train; give a larger --max-time to go on, e\.g\. "
                           r"--max-time ([0-9.]+)", result.stderr.strip())
    assert refused, result.stderr
    assert float(refused[1]) >= 0.2 and float(refused[2]) >= 2 * 0.2
    assert (out / "last.safetensors").read_bytes() == last
    # the suggested command trains on
    result = cli("--out", str(out), "--resume", "--max-time", f"{more:g}", "--max-steps",
                 str(step + 2))
    assert result.exit_code == 0, result.output
    assert f"done: {step + 2} steps" in result.stderr


def test_a_second_ctrl_c_still_says_how_to_resume(corpus, tmp_path, monkeypatch):
    """The first Ctrl-C asks the loop to stop after saving; a second one interrupts whatever
    runs. The message still points at the checkpoint that is on disk."""
    out = tmp_path / "run"
    assert cli("--data", str(corpus), "--out", str(out), *TINY_ARGS, "--max-steps", "2",
               "--eval-interval", "2").exit_code == 0
    real_setup = train.setup

    def interrupted(*args, **kwargs):
        real_setup(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "setup", interrupted)
    result = cli("--out", str(out), "--resume", "--max-steps", "4")
    assert result.exit_code == 130
    assert result.stderr.strip() == (f"error: interrupted; the checkpoint of step 2 is saved. "
                                     f"Resume with: gpt train --out {out} --resume")


@pytest.mark.parametrize("extra,hint", [
    ([], 'try it: gpt generate --model {out}\n'),  # char model on the user's data: no prompt
    (["--tokenizer", "gpt2"], 'try it: gpt generate --model {out} --prompt "The"\n'),
])
def test_the_closing_hint_suits_the_tokenizer(corpus, tmp_path, extra, hint):
    out = tmp_path / "run"
    result = cli("--data", str(corpus), "--out", str(out), *TINY_ARGS, "--max-steps", "2",
                 "--eval-interval", "2", *extra)
    assert result.exit_code == 0, result.output
    assert result.stderr.endswith(hint.format(out=out))
