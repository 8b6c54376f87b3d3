"""Real torchrun jobs: 2 processes on the CPU with the gloo backend."""

import os
import subprocess
import sys

import torch

from gptcli.checkpoint import load_checkpoint

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-length", "16",
        "--sample-interval", "0", "--device", "cpu", "--warmup-steps", "1"]


def env():
    e = os.environ.copy()
    e.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return e


def torchrun(*args, nproc=2, timeout=180, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd)


def gpt(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env())


def test_torchrun_trains_writes_one_checkpoint_set_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "gptcli", "train", "--data", str(corpus), "--out", str(out), *TINY,
            "--batch-size", "2", "--max-steps", "4", "--eval-interval", "2"]
    result = torchrun(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "best.safetensors", "config.json", "last.safetensors", "last.state.safetensors",
        "loss.png", "metrics.jsonl"]
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["tokens_per_step"] == 2 * 2 * 16
    assert result.stderr.count("done: 4 steps") == 1  # rank 0 alone reports
    assert "batch: 2 sequences x 2 processes x 16 tokens = 64 tokens per step" in result.stderr
    _, _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == "4"

    result = torchrun("-m", "gptcli", "train", "--out", str(out), "--resume", "--max-steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    _, _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == "6"


def test_two_ranks_equal_one_process_with_twice_the_batch(corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--max-steps", "3", "--eval-interval", "3",
              "--seed", "5"]
    ddp = torchrun("-m", "gptcli", "train", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = gpt("train", *common, "--batch-size", "4", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, _, _ = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    b, _, _ = load_checkpoint(tmp_path / "single" / "last.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


def test_failure_on_one_rank_ends_the_job_with_its_message(corpus, tmp_path):
    # Each rank starts in its own folder; only rank 0's folder has the data file.
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    (tmp_path / "rank0" / "data.txt").write_text(corpus.read_text())
    launcher = tmp_path / "launch.sh"
    launcher.write_text(f'#!/bin/sh\ncd "{tmp_path}/rank$LOCAL_RANK" && exec "{sys.executable}" '
                        f'-m gptcli train --data data.txt --out run {" ".join(TINY)} '
                        '--max-steps 100000 --eval-interval 1000\n')
    launcher.chmod(0o755)
    result = torchrun("--no-python", str(launcher), timeout=120)
    assert result.returncode != 0
    assert "error: rank 1: data path data.txt does not exist" in result.stderr


def test_a_resume_with_another_effective_batch_is_refused(corpus, tmp_path):
    """A 2-process run resumed by one process would silently train on half the tokens per
    step: refused, naming the torchrun command that resumes it and the --grad-accum that keeps
    its batch; with that --grad-accum the single process resumes (with a note)."""
    out = tmp_path / "run"
    result = torchrun("-m", "gptcli", "train", "--data", str(corpus), "--out", str(out), *TINY,
                      "--batch-size", "2", "--max-steps", "2", "--eval-interval", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    result = gpt("train", "--out", str(out), "--resume", "--max-steps", "4")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {out} trained with 64 tokens per step (2 process(es)); this resume would take "
        "32 (batch 2 x grad-accum 1 x 1 process(es) x 16 tokens): resume it as it ran, with "
        f"torchrun --standalone --nproc_per_node 2 -m gptcli train --out {out} --resume, or "
        "keep its batch with --grad-accum 2")
    result = gpt("train", "--out", str(out), "--resume", "--max-steps", "4", "--grad-accum", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"note: {out} trained with 2 process(es); it resumes with 1, at the same 64 tokens "
            "per step") in result.stderr


def test_stopping_a_torchrun_run_says_how_to_resume_it_under_torchrun(corpus, tmp_path):
    """Ctrl-C reaches torchrun and its workers; the ranks finish the step and save, and the
    resume hint is the torchrun command (not the single-process one, which would train on half
    the tokens per step)."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gptcli", "train", "--data", str(corpus), "--out", str(out), *TINY,
           "--batch-size", "2", "--max-steps", "100000", "--eval-interval", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "last.state.safetensors").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "last.state.safetensors").exists(), "no checkpoint within 3 minutes"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (f"Resume with: torchrun --standalone --nproc_per_node 2 -m gptcli train --out {out} "
            "--resume") in stderr
    assert "Resume with: gpt train" not in stderr


def test_lora_under_torchrun_equals_one_process_with_twice_the_batch(corpus, tmp_path):
    from gptcli.models import load_weights

    base = tmp_path / "base"
    made = gpt("train", "--data", str(corpus), *TINY, "--max-steps", "2", "--eval-interval", "2",
               "--out", str(base))
    assert made.returncode == 0, made.stderr[-3000:]
    common = ["--data", str(corpus), *TINY, "--init-from", str(base), "--lora-rank", "2",
              "--lr", "1e-2", "--max-steps", "3", "--eval-interval", "3", "--seed", "5"]
    ddp = torchrun("-m", "gptcli", "train", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = gpt("train", *common, "--batch-size", "4", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, _, meta = load_weights(tmp_path / "ddp" / "last.safetensors")
    b, _, _ = load_weights(tmp_path / "single" / "last.safetensors")
    plain, _, _ = load_checkpoint(base / "last.safetensors")
    assert meta["step"] == "3"
    assert not torch.equal(a.h[0].attn.c_attn.weight, plain.h[0].attn.c_attn.weight)  # it trained
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
