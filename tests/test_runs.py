"""The run folder's rules, through the real `gpt train`: resume auto, mismatched state files, one
process at a time, unusable --out paths."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gptcli.errors import install_command
from gptcli.checkpoint import read_safetensors
from gptcli.cli import app
from gptcli.runs import LOCK, RunFolder, read_records

runner = CliRunner()
TINY = ["--n-layer", "1", "--n-embd", "32", "--context-length", "16", "--batch-size", "2",
        "--device", "cpu", "--sample-interval", "0"]


def train(corpus, out, *args):
    return runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), *TINY, *args])


@pytest.mark.parametrize("how", [[], ["--resume"], ["--resume-auto"]])
def test_a_run_stopped_before_its_first_checkpoint_is_started_again(corpus, tmp_path, how):
    """A folder holding only what a run writes before it saves (a missing extra, a crash, a
    double Ctrl-C) is no dead end: a plain run, --resume and --resume auto all start it again,
    with a note."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {"lr": 0.5}}')  # what a killed run leaves
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    (out / "tensorboard").mkdir()
    result = train(corpus, out, *how, "--max-steps", "2", "--eval-interval", "2")
    assert result.exit_code == 0, result.output
    assert (f"note: {out} holds a run that stopped before its first checkpoint; starting it "
            "again") in result.stderr
    records = list(read_records(out / "metrics.jsonl"))
    assert records[0]["train_loss"] != 9.0 and records[-1]["step"] == 2


def test_other_files_are_not_a_run_to_start_again(corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for how in ([], ["--resume"]):
        result = train(corpus, out, *how, "--max-steps", "2")
        assert result.exit_code == 2
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]


def test_a_missing_tracker_extra_fails_before_the_run_folder_exists(corpus, tmp_path):
    out = tmp_path / "tb"
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from gptcli.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "train", "--data", str(corpus), "--out",
                             str(out), *TINY, "--max-steps", "2", "--log-to", "tensorboard"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: --log-to tensorboard needs tensorboard, which is '
                                     'not installed; install it with '
                                     f'{install_command("tensorboard")}')
    assert not out.exists()




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
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "metrics.jsonl").exists(), "the first run wrote no metrics in 3 minutes"
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
    assert (f"note: taking over the lock of {out}, left by process {pid}, which is no longer "
            "running") in result.stderr
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("content", ["", '{"pid": ', "\x00\x00"])
def test_an_empty_or_unreadable_lock_is_taken_over_at_once(corpus, tmp_path, content):
    """A lock left empty or half-written (an older gptcli died writing it, e.g. on a full
    disk) no longer locks the folder forever: it is taken over at once, with a note."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(content)  # fresh: written just now
    result = train(corpus, out, "--max-steps", "2", "--eval-interval", "2")
    assert result.exit_code == 0, result.output
    assert (f"note: taking over the lock of {out}, which is empty or unreadable (its writer "
            "died)") in result.stderr
    assert not (out / LOCK).exists()


def test_the_lock_appears_whole(tmp_path):
    """The lock is written beside the folder's lock file and linked into place: whoever sees
    the lock file sees a holder, and no temporary file is left behind."""
    folder = RunFolder(tmp_path / "run")
    with folder:
        holder = json.loads((folder.path / LOCK).read_text())
        assert holder["pid"] == os.getpid()
        assert [p.name for p in folder.path.iterdir()] == [LOCK]
    assert not folder.path.exists()  # created for the lock, left as it was found


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


def test_a_full_disk_while_resuming_names_the_file_and_keeps_the_checkpoint(corpus, tmp_path):
    """A resumed run first rewrites metrics.jsonl without the steps it will train again; when
    the disk is full (here: a real file-size limit, RLIMIT_FSIZE) that is one sentence naming
    the file, and the checkpoint and the old metrics are untouched."""
    import resource

    out = tmp_path / "run"
    assert train(corpus, out, "--max-steps", "40", "--log-interval", "1",
                 "--eval-interval", "40").exit_code == 0
    metrics = (out / "metrics.jsonl").read_bytes()
    checkpoint = (out / "last.safetensors").read_bytes()
    limit = len(metrics) - 100
    assert len((out / "config.json").read_bytes()) < limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "gptcli", "train", "--out", str(out),
                             "--resume", "--max-steps", "60"], capture_output=True, text=True,
                            timeout=120, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write metrics file to {out / 'metrics.jsonl'}: file too large; the "
        f"previous metrics file is intact; the checkpoints in {out} are intact")
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "last.safetensors").read_bytes() == checkpoint
    assert not (out / LOCK).exists()
