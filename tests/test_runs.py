"""The run folder's rules, through the real `gpt train`: resume auto, mismatched state files, one
process at a time, unusable --out paths."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gptcli.checkpoint import read_safetensors
from gptcli.cli import app
from gptcli.runs import LOCK, RunFolder, read_records

runner = CliRunner()
TINY = ["--n-layer", "1", "--n-embd", "32", "--context-length", "16", "--batch-size", "2",
        "--device", "cpu", "--sample-interval", "0"]


def train(corpus, out, *args):
    return runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), *TINY, *args])


def test_resume_auto_starts_fresh_after_a_run_killed_before_its_first_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {"lr": 0.5}}')  # what a killed run leaves
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    result = train(corpus, out, "--resume", "--max-steps", "2", "--eval-interval", "2")
    assert result.exit_code == 2  # plain --resume: nothing to resume
    assert "nothing to resume" in result.stderr
    result = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), *TINY,
                                 "--resume-auto", "--max-steps", "2", "--eval-interval", "2"])
    assert result.exit_code == 0, result.output
    records = list(read_records(out / "metrics.jsonl"))
    assert records[0]["train_loss"] != 9.0 and records[-1]["step"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3


def test_resume_auto_via_main_rewrites_the_argument(corpus, tmp_path):
    """`--resume auto` is spelled with a value; main() turns it into the hidden switch."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gptcli", "train", "--data", str(corpus), "--out", str(out),
            *TINY, "--max-steps", "2", "--eval-interval", "2", "--resume", "auto"]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr  # nothing to resume: a fresh run
    args[args.index("--max-steps") + 1] = "4"
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "step 2 -> 4" in second.stderr  # resumed at step 2


def test_a_mismatched_checkpoint_and_state_are_refused(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(corpus, a, "--max-steps", "4", "--eval-interval", "2").exit_code == 0
    assert train(corpus, b, "--max-steps", "2", "--eval-interval", "2").exit_code == 0
    (a / "last.state.safetensors").write_bytes((b / "last.state.safetensors").read_bytes())
    before = (a / "last.safetensors").read_bytes()
    result = train(corpus, a, "--resume", "--max-steps", "6")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"error: cannot resume {a}: last.safetensors and last.state."
                           "safetensors do not belong together: they come from different runs")
    assert len(line.splitlines()) == 1
    assert (a / "last.safetensors").read_bytes() == before  # nothing lost


def test_a_state_from_another_step_names_the_newer_file(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, out, "--max-steps", "2", "--eval-interval", "2").exit_code == 0
    old_state = (out / "last.state.safetensors").read_bytes()
    assert train(corpus, out, "--resume", "--max-steps", "4").exit_code == 0
    (out / "last.state.safetensors").write_bytes(old_state)  # step 2's state, step 4's weights
    result = train(corpus, out, "--resume", "--max-steps", "6")
    assert result.exit_code == 2
    assert ("they are from different steps (4 and 2), and last.safetensors is newer"
            in result.stderr)


def test_checkpoint_and_state_record_step_and_run_id(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, out, "--max-steps", "2", "--eval-interval", "2").exit_code == 0
    _, model_meta = read_safetensors(out / "last.safetensors", tensors=False)
    _, state_meta = read_safetensors(out / "last.state.safetensors", tensors=False)
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    assert model_meta["run_id"] == json.loads(state_meta["run_id"]) == run_id
    assert model_meta["step"] == state_meta["step"] == "2"


def test_a_second_process_on_the_same_run_folder_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--data", str(corpus),
                              "--out", str(out), *TINY, "--max-steps", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "gptcli", "train", "--data", str(corpus),
                                 "--out", str(out), *TINY, "--max-steps", "10", "--force"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: run folder {out} is in use by process {first.pid} on ")
        assert first.poll() is None  # the first run goes on untouched
    finally:
        first.send_signal(2)
        first.communicate(timeout=60)
    assert not (out / LOCK).exists()  # released on exit
    assert first.returncode == 130


def test_a_stale_lock_is_taken_over_with_a_note(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    result = train(corpus, out, "--max-steps", "2", "--eval-interval", "2")
    assert result.exit_code == 0, result.output
    assert (f"note: taking over the lock of {out} left by process {pid}, which is no longer "
            "running") in result.stderr
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("make,message", [
    (lambda p: (p / "f").write_text("x"), "error: cannot use {out} as a run folder: it is a file"),
    (lambda p: (p / "f").write_text("x"), None),
])
def test_an_out_path_that_cannot_be_a_folder(corpus, tmp_path, make, message):
    make(tmp_path)
    out = tmp_path / "f" if message else tmp_path / "f" / "run"
    result = train(corpus, out, "--max-steps", "2")
    assert result.exit_code == 2
    expected = message.format(out=out) if message else \
        f"error: cannot create run folder {out}: a part of the path is a file, not a folder"
    assert result.stderr.strip().startswith(expected)
    assert (tmp_path / "f").read_text() == "x"


def test_run_folder_refuses_to_overwrite_without_force(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.mkdir()
    (folder.path / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="already has files"):
        folder.prepare(resume=None, force=False)
    assert folder.prepare(resume=None, force=True) is False
    assert (folder.path / "notes.txt").read_text() == "mine"  # not a run file: kept
