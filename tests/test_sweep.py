"""`gpt sweep`: points from grids and ranges, budgets against hand arithmetic, --match-params,
the one-sentence refusals, and real sweeps of real `gpt train` processes: --jobs 2 against
--jobs 1, the table against each run's metrics.jsonl, a second call, Ctrl-C, a SIGKILL and the
rerun, commands run elsewhere, `gpt plot` and `gpt info` of the points."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import ModelConfig, TrainConfig
from gptcli.files import process_alive
from gptcli.runs import RunFolder, read_records
from gptcli.sweep import Budget, budget_steps, expand, parse_dimension

runner = CliRunner()
TINY = ["--n-layer", "1", "--n-embd", "32", "--context-length", "16", "--device", "cpu",
        "--sample-interval", "0", "--eval-steps", "2"]  # batch 12 x 16 tokens
GPT = [sys.executable, "-m", "gptcli"]


def tiny(without: str) -> list[str]:
    """TINY less one flag (and its value), for a sweep that varies it."""
    i = TINY.index(without)
    return TINY[:i] + TINY[i + 2:]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread per `gpt train` (2 threads on a busy 2-core machine are many times slower)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def records(run) -> list[dict]:
    return list(read_records(run / "metrics.jsonl"))


# ----------------------------------------------------------------------------- points

def test_a_grid_is_every_combination_last_setting_fastest():
    points = expand([parse_dimension("lr=3e-4,1e-3"), parse_dimension("--n-layer=2,4,8")],
                    None, 0)
    assert len(points) == 6
    assert points[:3] == [{"lr": "3e-4", "n_layer": "2"}, {"lr": "3e-4", "n_layer": "4"},
                          {"lr": "3e-4", "n_layer": "8"}]
    assert points[3]["lr"] == "1e-3"


def test_ranges_in_a_grid_are_spaced_evenly_or_on_a_log_scale():
    assert parse_dimension("lr=1e-4..1e-2:log:3").grid() == ["0.0001", "0.001", "0.01"]
    assert parse_dimension("lr=1e-4..1e-2:log:5").grid()[1] == "0.000316"
    assert parse_dimension("dropout=0..0.2:3").grid() == ["0", "0.1", "0.2"]
    assert parse_dimension("n_layer=1..8:4").grid() == ["1", "3", "6", "8"]  # whole numbers
    assert parse_dimension("n-layer=1..2:5").grid() == ["1", "2"]  # each value once


def test_random_points_are_drawn_from_ranges_log_uniformly_and_reproducibly():
    dims = [parse_dimension("lr=1e-4..1e-2:log"), parse_dimension("n-layer=2..8"),
            parse_dimension("position=learned,rope")]
    points = expand(dims, 400, seed=7)
    assert len(points) == 400 and points == expand(dims, 400, seed=7)
    assert points != expand(dims, 400, seed=8)
    lrs = [float(p["lr"]) for p in points]
    assert all(1e-4 <= x <= 1e-2 for x in lrs)
    below = sum(x < 1e-3 for x in lrs)  # the log-scale middle: half on each side
    assert 160 < below < 240, below
    assert {p["n_layer"] for p in points} == {str(n) for n in range(2, 9)}
    assert {p["position"] for p in points} == {"learned", "rope"}
    assert all(len(p["lr"].replace("0.", "").lstrip("0")) <= 3 for p in points)  # 3 digits


# ----------------------------------------------------------------------------- budgets

def flops_per_token(vocab: int, layers: int, d: int = 32, context: int = 16) -> int:
    """By hand: 6 x (parameters without the position table) + 12 L d T."""
    blocks = layers * (12 * d * d + 13 * d)  # qkv, proj, mlp weights and biases, two norms
    return 6 * (vocab * d + blocks + 2 * d) + 12 * layers * d * context


def printed(result) -> list[dict[str, str]]:
    """The flags of each printed `gpt train` command."""
    assert result.exit_code == 0, result.output
    out = []
    for line in result.stdout.strip().splitlines():
        words = shlex.split(line)
        assert words[:2] == ["gpt", "train"] and words[-2:] == ["--resume", "auto"]
        out.append({w: words[i + 1] for i, w in enumerate(words[2:-2], 2) if w.startswith("--")})
    return out


def test_token_and_flop_budgets_give_each_point_its_steps(corpus, tmp_path):
    vocab = len(set(corpus.read_text()))
    tokens = printed(sweep("--data", corpus, *TINY, "--set", "batch-size=2,4", "--budget",
                           "tokens=640", "--out", tmp_path / "t", "--print-commands"))
    assert [c["--max-steps"] for c in tokens] == ["20", "10"]  # 640 / (2 x 16), 640 / (4 x 16)
    result = sweep("--data", corpus, *tiny("--n-layer"), "--set", "n-layer=1,3", "--budget",
                   "flops=3e9", "--out", tmp_path / "f", "--print-commands")
    steps = [int(c["--max-steps"]) for c in printed(result)]
    assert steps == [round(3e9 / (12 * 16 * flops_per_token(vocab, n))) for n in (1, 3)]
    assert steps[0] > steps[1] > 1
    manifest = json.loads((tmp_path / "f" / "sweep.json").read_text())
    assert [p["flops_per_token"] for p in manifest["points"]] == [flops_per_token(vocab, 1),
                                                                 flops_per_token(vocab, 3)]
    assert budget_steps(Budget("tokens", 1e6), 768, 0) == 1302  # to the nearest step
    assert budget_steps(Budget("flops", 1.0), 768, 1000) == 1  # at least one


@pytest.mark.parametrize("vary,target", [("n-layer=1,2,4", 120_000), ("n-embd=32,64", 53_000)])
def test_match_params_gives_every_point_about_the_target(corpus, tmp_path, vary, target):
    import torch

    from gptcli.model import GPT

    result = sweep("--data", corpus, "--context-length", "16", "--device", "cpu", "--set", vary,
                   "--match-params", target, "--out", tmp_path / "m", "--print-commands")
    vocab = len(set(corpus.read_text()))
    for flags in printed(result):
        config = ModelConfig.from_preset("tiny", vocab_size=vocab, context_length=16,
                                         n_layer=int(flags["--n-layer"]),
                                         n_embd=int(flags["--n-embd"]))
        with torch.device("meta"):
            real = sum(p.numel() for p in GPT(config).parameters())  # from the real tensors
        assert abs(real - target) / target < 0.05, (flags, real)
    assert "cannot be met" not in result.stderr


def test_a_match_params_target_out_of_reach_is_noted(corpus, tmp_path):
    """100 parameters: the smallest width of a one-layer model already has several hundred."""
    result = sweep("--data", corpus, "--context-length", "16", "--device", "cpu", "--set",
                   "n-layer=1,2", "--match-params", "100", "--out", tmp_path / "m",
                   "--print-commands")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "m" / "sweep.json").read_text())["notes"]
    assert len(notes) == 2 and notes[0].startswith(
        "point 00_n-layer=1: --match-params 100 cannot be met; the nearest is ")
    assert notes[0].endswith(" parameters (--n-embd 4)") and notes[0] in result.stderr


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("args,message", [
    (["--set", "lrr=1e-3"], "--set lrr=1e-3: lrr is not a gpt train setting (did you mean lr?)"),
    (["--set", "n-head=4,3"], "point 01_n-head=3: n_embd (32) must be divisible by n_head (3)"),
    (["--set", "lr=1e-3,fast"], "point 01_lr=fast: --lr must be a valid number"),
    (["--set", "lr=0,1e-3"], "point 00_lr=0: --lr must be greater than 0, got 0"),
    (["--set", "lr=1e-3,3e-3", "--min-lr", "2e-3"],
     "point 00_lr=1e-3: min_lr (0.002) must not exceed lr (0.001)"),
    (["--set", "lr="], "--set lr=: lr has no values; list them, e.g. lr=A,B,C"),
    (["--set", "lr=1e-3,1e-3"], "--set lr=1e-3,1e-3: 1e-3 listed twice; every value is one "
                                "point (--seeds N repeats each with other seeds)"),
    (["--set", "lr=1e-3,3e-3,0.001"], "--set lr=1e-3,3e-3,0.001: 1e-3 and 0.001 are one value "
                                      "listed twice"),
    (["--set", "position=rope,learned,rope"], "--set position=rope,learned,rope: rope listed "
                                              "twice"),
    (["--set", "n-layer=1,1"], "--set n-layer=1,1: 1 listed twice"),
    ([], "nothing to sweep: give at least one --set NAME=A,B"),
    (["--set", "lr=1e-4..1e-2:log"], "--set lr=1e-4..1e-2:log is a range: give the number of"),
    (["--set", "out=a,b"], "--set out=a,b: --out is the sweep's folder"),
    (["--set", "lr=1e-3,3e-3", "--lr", "1e-3"], "lr is given both as --lr and as --set lr="),
    (["--set", "lr=1e-3", "--budget", "steps=5"], "--budget steps=5: write tokens=N, flops=N"),
    (["--set", "lr=1e-3", "--budget", "tokens=100", "--max-steps", "5"],
     "--budget tokens=... sets each point's --max-steps; leave --max-steps out"),
    (["--set", "lr=1e-3", "--match-params", "1e5"], "--match-params N chooses the width"),
    (["--set", "batch-size=2,100000000"], "point 01_batch-size=100000000: a training step at "
     "--batch-size 100000000 with context 16 and 15,136 parameters needs about"),
])
def test_bad_inputs_are_one_sentence_before_anything_runs(corpus, tmp_path, args, message):
    out = tmp_path / "sw"
    result = sweep("--data", corpus, *TINY, "--max-steps", "2", *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not out.exists()


def test_show_of_a_folder_that_is_missing_or_not_a_sweep(tmp_path):
    for folder, what in ((tmp_path / "nothere", "does not exist"),
                         (tmp_path, "is not a sweep folder (it has no sweep.json)")):
        result = runner.invoke(app, ["sweep", "show", str(folder)])
        assert (result.exit_code, result.stderr.strip()) == (
            2, f"error: {folder} {what}; make one with gpt sweep --set NAME=A,B --out FOLDER")


def test_another_sweep_in_the_same_folder_is_refused(corpus, tmp_path):
    out = tmp_path / "sw"
    assert sweep("--data", corpus, *TINY, "--set", "lr=1e-3", "--out", out,
                 "--print-commands").exit_code == 0
    manifest = (out / "sweep.json").read_text()
    result = sweep("--data", corpus, *TINY, "--set", "lr=3e-3", "--out", out, "--print-commands")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {out} holds another sweep (other points or "
                                    "settings); run its own command again to resume it")
    assert (out / "sweep.json").read_text() == manifest


# ----------------------------------------------------------------------------- real sweeps

POINTS = ["--set", "lr=1e-3,3e-3", "--seeds", "2", "--max-steps", "8", "--eval-interval", "4",
          "--log-interval", "2"]


@pytest.fixture(scope="module")
def finished_sweeps(tmp_path_factory):
    """The same four points (two learning rates, two seeds) run with --jobs 1 and --jobs 2, as
    real `gpt sweep` processes."""
    from gptcli.data import bundled_corpus

    root = tmp_path_factory.mktemp("sweeps")
    corpus = root / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text()[:30_000])
    env = {**os.environ, "GPTCLI_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
    args = [*GPT, "sweep", "--data", str(corpus), *TINY, *POINTS]
    done = {}
    for jobs in ("1", "2"):
        done[jobs] = subprocess.run([*args, "--jobs", jobs, "--out", str(root / f"jobs{jobs}")],
                                    env=env, cwd=root, capture_output=True, text=True,
                                    timeout=900)
        assert done[jobs].returncode == 0, done[jobs].stderr
    return SimpleNamespace(root=root, env=env, args=args, done=done)


def test_jobs_2_gives_the_same_points_as_jobs_1(finished_sweeps):
    root = finished_sweeps.root
    assert "4 to run, 2 at a time" in finished_sweeps.done["2"].stderr
    names = sorted(p.name for p in (root / "jobs1").iterdir() if p.name[:2].isdigit())
    assert len(names) == 4 and names == sorted(
        p.name for p in (root / "jobs2").iterdir() if p.name[:2].isdigit())
    for name in names:
        one, two = records(root / "jobs1" / name), records(root / "jobs2" / name)
        assert [r.get("val_loss") for r in one] == [r.get("val_loss") for r in two], name
        assert [r.get("train_loss") for r in one] == [r.get("train_loss") for r in two], name

    def overlap(jobs: str) -> bool:  # the second point was started before the first one ended
        lines = finished_sweeps.done[jobs].stderr.splitlines()
        second = next(i for i, line in enumerate(lines) if line.startswith("[2/4]")
                      and line.endswith(": started"))
        first_done = next(i for i, line in enumerate(lines) if line.startswith("[1/4]")
                          and line.endswith("| done"))
        return second < first_done

    assert overlap("2") and not overlap("1")  # side by side, and one after the other
    seeds = {name: json.loads((root / "jobs1" / name / "config.json").read_text())["train"]
             ["seed"] for name in names}
    assert sorted(seeds.values()) == [1337, 1337, 1338, 1338]


def test_the_table_is_each_runs_metrics(finished_sweeps):
    folder = finished_sweeps.root / "jobs1"
    result = runner.invoke(app, ["sweep", "show", str(folder), "--json", "--csv",
                                 str(folder / "t.csv")])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout.strip().splitlines()[-1])
    assert table["varied"] == ["lr"] and len(table["points"]) == 4
    for row in table["points"]:
        run = folder / row["point"]
        recs = records(run)
        train = [r for r in recs if "train_loss" in r]
        vals = [r["val_loss"] for r in recs if "val_loss" in r]
        config = json.loads((run / "config.json").read_text())
        assert row["status"] == "finished" and row["step"] == 8
        assert row["val_loss"] == vals[-1] and row["best_val"] == min(vals)
        assert row["tokens"] == 8 * config["tokens_per_step"] == 8 * 12 * 16
        assert row["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in train)
        assert row["peak_memory"] == max(r["peak_memory"] for r in train)
        assert row["elapsed"] == train[-1]["elapsed"]
        assert row["settings"]["lr"] == config["train"]["lr"]
    assert [r["val_loss"] for r in table["points"]] == sorted(r["val_loss"]
                                                              for r in table["points"])
    for group in table["groups"]:
        losses = [r["val_loss"] for r in table["points"] if r["point"] in group["points"]]
        assert group["val_loss"] == statistics.fmean(losses) and group["seeds"] == 2
        assert group["val_std"] == statistics.stdev(losses)
    text = runner.invoke(app, ["sweep", "show", str(folder)]).stdout
    for group in table["groups"]:
        assert f"{group['val_loss']:.4f} ± {group['val_std']:.4f}" in text
    csv_lines = (folder / "t.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("lr,point,seed,status")
    assert str(table["points"][0]["val_loss"]) in csv_lines[1]
    (folder / "t.csv").write_text("mine")  # an existing --csv needs --force
    again = runner.invoke(app, ["sweep", "show", str(folder), "--csv", str(folder / "t.csv")])
    assert (again.exit_code, again.stderr.strip()) == (
        2, f"error: --csv {folder / 't.csv'} already exists and gptcli did not write it; pass "
           "--force to overwrite it")
    assert (folder / "t.csv").read_text() == "mine"
    again = runner.invoke(app, ["sweep", "show", str(folder), "--csv", str(folder / "t.csv"),
                                "--force"])
    assert again.exit_code == 0 and (folder / "t.csv").read_text().count("\n") == 5
    again = runner.invoke(app, ["sweep", "show", str(folder), "--csv", str(folder / "t.csv")])
    assert again.exit_code == 0, again.output  # its own table: refreshed without --force


def test_a_second_call_skips_finished_points(finished_sweeps):
    folder = finished_sweeps.root / "jobs1"
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/*.safetensors")}
    again = subprocess.run([*finished_sweeps.args, "--out", str(folder)],
                           env=finished_sweeps.env, cwd=finished_sweeps.root,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "sweep: 4 points, 4 finished already, 0 to run" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/*.safetensors")} == before


def test_gpt_plot_draws_a_sweep_against_tokens(finished_sweeps, tmp_path):
    folder = finished_sweeps.root / "jobs1"
    result = runner.invoke(app, ["plot", str(folder), "--x", "tokens", "--out",
                                 str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in folder.glob("0*"):  # the table: every point of the sweep
        assert f"{min(r['val_loss'] for r in records(run) if 'val_loss' in r):.4f}" in \
            result.stdout
    assert (folder / "sweep.png").is_file()  # drawn at the end of the sweep
    bad = runner.invoke(app, ["plot", str(folder), "--x", "time"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --x time: choose step, " \
        "tokens or flops"


def test_gpt_info_breaks_a_runs_memory_down_into_the_memory_checks_estimate(finished_sweeps):
    import torch

    from gptcli.finetune import memory_breakdown

    run = finished_sweeps.root / "jobs1" / "00_lr=1e-3_seed=1337"
    result = runner.invoke(app, ["info", str(run), "--json"])
    assert result.exit_code == 0, result.output
    memory = json.loads(result.stdout)["memory"]
    parts = {k: memory[k] for k in ("weights", "gradients", "optimizer", "activations")}
    assert sum(parts.values()) == memory["estimate"]
    config = json.loads((run / "config.json").read_text())
    assert parts == memory_breakdown(ModelConfig(**config["model"]),
                                     TrainConfig(**config["train"]), torch.float32)
    assert memory["peak"] == max(r["peak_memory"] for r in records(run) if "peak_memory" in r)
    text = " ".join(runner.invoke(app, ["info", str(run)]).stdout.split())
    assert "training memory" in text and "measured peak" in text


def test_the_memory_check_refuses_with_the_breakdowns_sum(corpus, tmp_path):
    """The figure `gpt train` refuses a run with is the sum of the parts `gpt info` shows."""
    import torch

    from gptcli.finetune import memory_breakdown

    result = runner.invoke(app, ["train", "--data", str(corpus), *TINY, "--batch-size",
                                 "100000000", "--out", str(tmp_path / "big")])
    assert result.exit_code == 2
    need = sum(memory_breakdown(
        ModelConfig.from_preset("tiny", vocab_size=len(set(corpus.read_text())), n_layer=1,
                                n_embd=32, context_length=16),
        TrainConfig(batch_size=100_000_000), torch.float32).values())
    assert f"needs about {need / 2 ** 30:,.1f} GiB" in result.stderr


def wait_for(condition, timeout=180.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_sweep_killed_with_sigkill_and_run_again_trains_every_point_once(corpus, tmp_path):
    out = tmp_path / "sw"
    args = [*GPT, "sweep", "--data", str(corpus), *TINY, "--max-steps", "300",
            "--eval-interval", "50", "--log-interval", "1", "--set", "lr=1e-3,2e-3,3e-3",
            "--out", str(out)]
    first, second, third = (out / n for n in ("00_lr=1e-3", "01_lr=2e-3", "02_lr=3e-3"))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: RunFolder(second).has_state() and (second / ".lock").is_file())
        child = json.loads((second / ".lock").read_text())["pid"]
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    wait_for(lambda: not process_alive(child), timeout=30)  # the point died with the sweep
    finished = {p: p.read_bytes() for p in first.iterdir() if p.is_file()}
    assert any(r.get("step") == 300 for r in records(first))
    assert not any(r.get("step") == 300 for r in records(second))
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "sweep: 3 points, 1 finished already, 2 to run" in again.stderr
    assert {p: p.read_bytes() for p in first.iterdir() if p.is_file()} == finished
    for run in (first, second, third):
        recs = records(run)
        assert [r["step"] for r in recs if "train_loss" in r] == list(range(1, 301)), run
        assert [r["step"] for r in recs if "val_loss" in r] == [50, 100, 150, 200, 250, 300]
    log = (out / "logs" / "01_lr=2e-3.log").read_text()
    assert "step 0 -> 300" in log and re.search(r"step [1-9]\d* -> 300", log)  # resumed
    show = runner.invoke(app, ["sweep", "show", str(out), "--json"])
    assert [r["status"] for r in json.loads(show.stdout)["points"]] == ["finished"] * 3


def test_ctrl_c_stops_every_point_with_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.Popen([*GPT, "sweep", "--data", str(corpus), *TINY, "--max-steps",
                             "100000", "--eval-interval", "1000", "--set", "lr=1e-3,2e-3,3e-3",
                             "--jobs", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [out / "00_lr=1e-3", out / "01_lr=2e-3"]
    try:
        wait_for(lambda: all(r.joinpath("metrics.jsonl").is_file() and records(r)
                             for r in runs))
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGINT; run the same command " \
        "again to resume"
    assert not (out / "02_lr=3e-3").exists()  # no new point starts
    for run in runs:
        assert RunFolder(run).has_state()
        assert "stopped by SIGINT at step" in (out / "logs" / f"{run.name}.log").read_text()
        assert not (run / ".lock").exists()


def test_printed_commands_run_elsewhere_and_show_reads_them_back(corpus, tmp_path):
    out = tmp_path / "sw"
    result = sweep("--data", corpus, *tiny("--n-layer"), "--max-steps", "4", "--eval-interval",
                   "2", "--set", "n-layer=1,2", "--out", out, "--print-commands")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(f"--out {out}/0" in line for line in lines)
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)  # a job scheduler runs them in any order
    for i in order:
        command = shlex.split(lines[i])
        done = subprocess.run([*GPT, *command[1:]], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    show = runner.invoke(app, ["sweep", "show", str(out), "--json"])
    table = json.loads(show.stdout)
    assert [r["status"] for r in table["points"]] == ["finished"] * 2
    assert {r["settings"]["n_layer"] for r in table["points"]} == {1, 2}


@pytest.mark.parametrize("isa", ["avx512_bf16", None])
def test_points_that_auto_would_train_in_two_precisions_all_train_in_float32(
        corpus, tmp_path, monkeypatch, isa):
    """On a CPU with native bf16, `--dtype auto` trains wide models in bf16 and narrow ones in
    float32: a depth-against-width sweep would compare precisions too. It trains every point
    in float32, and says so; --dtype given, or one precision for all, changes nothing."""
    from gptcli import devices

    monkeypatch.setattr(devices, "cpu_bf16_isa", lambda: isa)
    args = ["--data", corpus, *tiny("--n-embd"), "--set", "n-embd=64,256"]
    result = sweep(*args, "--out", tmp_path / "a", "--print-commands")
    flags = printed(result)
    if isa:
        assert [c.get("--dtype") for c in flags] == ["float32", "float32"]
        assert ("note: --dtype auto would train these points in bfloat16 and float32 (by "
                "width); all train in float32 so they compare alike (give --dtype to choose)"
                ) in result.stderr
    else:
        assert [c.get("--dtype") for c in flags] == [None, None] and "note:" not in result.stderr
    given = printed(sweep(*args, "--dtype", "bfloat16", "--out", tmp_path / "b",
                          "--print-commands"))
    assert [c.get("--dtype") for c in given] == ["bfloat16", "bfloat16"]


def test_a_lora_sweep_shows_each_points_adapters_beside_the_base(corpus, tmp_path):
    """--set lora-rank=2,4 on one base: the params column says what trains (the adapters),
    which the sweep varies, beside the frozen base, which it does not."""
    from gptcli.finetune import adapter_parameters

    base = tmp_path / "base"
    assert runner.invoke(app, ["train", "--data", str(corpus), *TINY, "--max-steps", "1",
                               "--out", str(base)]).exit_code == 0
    out = tmp_path / "sw"
    result = sweep("--data", corpus, "--init-from", base, "--device", "cpu", "--max-steps", "1",
                   "--eval-steps", "1", "--sample-interval", "0", "--set", "lora-rank=2,4",
                   "--out", out)
    assert result.exit_code == 0, result.output
    table = json.loads(runner.invoke(app, ["sweep", "show", str(out), "--json"]).stdout)
    model = ModelConfig(**json.loads((base / "config.json").read_text())["model"])
    targets = TrainConfig().lora_targets
    assert sorted(g["adapters"] for g in table["groups"]) == [
        adapter_parameters(model, r, targets) for r in (2, 4)]
    assert {g["params"] for g in table["groups"]} == {model.num_params()}
    text = runner.invoke(app, ["sweep", "show", str(out)]).stdout
    assert f" + {adapter_parameters(model, 4, targets) / 1e3:.1f}k LoRA" in text
