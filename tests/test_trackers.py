"""--log-to tensorboard / wandb: what the trackers hold, read back with their own readers, equals
metrics.jsonl; resumed runs continue the same tracker run; eval results join the run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gptcli.errors import install_command
from gptcli.cli import app
from gptcli.config import TrainConfig
from gptcli.runs import RunFolder, read_records
from gptcli.train import fit

runner = CliRunner()
SMALL = dict(tokenizer="char", n_layer=1, n_head=2, n_embd=32, context_length=16, batch_size=4,
             sample_interval=0, device="cpu", warmup_steps=2, log_interval=2, eval_interval=4,
             eval_steps=2)
NAMES = ("train_loss", "val_loss", "lr", "tokens_per_s", "grad_norm", "elapsed")


def train(corpus, out, **kw) -> None:
    cfg = TrainConfig(data=[str(corpus)], **{**SMALL, **kw})
    assert RunFolder(out).prepare(resume=None, force=False) is False
    fit(cfg, out=out)


def resume(out, max_steps: int) -> None:
    """Through the CLI: the run's settings, --log-to included, come from its config.json."""
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps",
                                 str(max_steps)])
    assert result.exit_code == 0, result.output


def from_metrics(out) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for record in read_records(out / "metrics.jsonl"):
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, {})[record["step"]] = value
    return series


def from_tensorboard(out) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


def assert_same(tracked, metrics, rel=1e-6):
    assert set(tracked) == set(metrics) and set(NAMES) <= set(metrics)
    for name in metrics:
        assert tracked[name].keys() == metrics[name].keys(), name
        for step, value in metrics[name].items():
            assert tracked[name][step] == pytest.approx(value, rel=rel), (name, step)


def test_tensorboard_holds_what_metrics_jsonl_holds(corpus, tmp_path):
    train(corpus, tmp_path / "run", max_steps=8, log_to=["tensorboard"])
    metrics = from_metrics(tmp_path / "run")
    assert sorted(metrics["train_loss"]) == [2, 4, 6, 8] and sorted(metrics["val_loss"]) == [4, 8]
    assert all(v > 0 for v in metrics["grad_norm"].values())
    assert_same(from_tensorboard(tmp_path / "run"), metrics)  # float32 in the event files


def test_a_resumed_run_continues_the_tensorboard_log(corpus, tmp_path):
    out = tmp_path / "run"
    train(corpus, out, max_steps=4, log_to=["tensorboard"])
    saved = {name: (out / name).read_bytes() for name in ("last.safetensors",
                                                          "last.state.safetensors")}
    resume(out, 8)
    first = from_metrics(out)
    # as if the second run had died after logging step 8 but before saving it: restore the
    # step-4 state and train steps 5-8 again; the tracker must not keep two step 8s
    for name, blob in saved.items():
        (out / name).write_bytes(blob)
    resume(out, 8)
    tracked = from_tensorboard(out)
    assert_same(tracked, from_metrics(out))
    assert sorted(tracked["train_loss"]) == [2, 4, 6, 8]
    assert tracked["train_loss"] == pytest.approx(first["train_loss"])
    # each resumed run told TensorBoard to drop what an earlier run logged after step 4
    assert restarts(out) == [None, 5, 5]


def restarts(out) -> list[int | None]:
    """Per event file, in order: the step of its purge marker (a session START), or None."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in sorted((out / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime_ns):
        found.append(next((e.step for e in EventFileLoader(str(path)).Load()
                           if e.HasField("session_log") and e.session_log.status == 1), None))
    return found


def wandb_records(path):
    """The records of a .wandb file: W&B's 7-byte header, then LevelDB-style log blocks of
    32 KiB (each record: crc32, 2-byte length, 1-byte type, data; FULL=1 FIRST=2 MIDDLE=3
    LAST=4), each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_writes_the_run_with_the_metrics(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(corpus, out, max_steps=4, log_to=["wandb"])
    time.sleep(1.1)  # W&B names an offline run's folder by its start time, to the second
    resume(out, 8)
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the first run and its resumption, under the same W&B run id
    history: dict[str, dict[int, float]] = {}
    for folder in runs:
        (file,) = folder.glob(f"run-{run_id}.wandb")
        for record in wandb_records(file):
            if record.WhichOneof("record_type") == "run":
                assert record.run.run_id == run_id
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                for name, value in items.items():
                    if not name.startswith("_"):
                        history.setdefault(name, {})[items["_step"]] = value
    assert_same(history, from_metrics(out), rel=1e-12)


def test_eval_task_results_join_the_run_and_its_tracker(corpus, tmp_path):
    out = tmp_path / "run"
    train(corpus, out, max_steps=4, tokenizer="gpt2", log_to=["tensorboard"])
    lines = [{"text": "the king and the queen of the land said the king"}] * 3
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = runner.invoke(app, ["eval", "--model", str(out), "--task", "lambada", "--task-file",
                                 f"lambada={tmp_path / 'l.jsonl'}", "--log-to", "tensorboard",
                                 "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["tasks"]["lambada"]["metrics"]
    record = list(read_records(out / "metrics.jsonl"))[-1]
    assert record["step"] == 4 and record["checkpoint"] == "best.safetensors"
    assert record["lambada/acc"] == figures["acc"] and record["lambada/perplexity"] == figures["perplexity"]
    tracked = from_tensorboard(out)
    assert tracked["lambada/acc"] == {4: pytest.approx(figures["acc"])}
    assert not (out / ".lock").exists()


def test_log_to_errors_are_one_sentence(corpus, tmp_path):
    from gptcli.checkpoint import save_checkpoint
    from gptcli.model import GPT
    from gptcli.tokenizer import GPT2Tokenizer

    from conftest import tiny_config

    model = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(vocab_size=50257)),
                            GPT2Tokenizer())
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    cases = [
        (["train", "--data", str(corpus), "--log-to", "mlflow"],
         "error: --log-to must be 'tensorboard' or 'wandb', got 'mlflow'"),
        (["eval", "--model", str(model), "--task", "lambada", "--task-file",
          f"lambada={tmp_path / 'l.jsonl'}", "--log-to", "tensorboard"],
         f"error: --log-to adds the results to the run the model comes from, but {model} is not "
         "in a run folder; give --model a run folder or a checkpoint in one"),
        (["eval", "--model", str(model), "--data", str(corpus), "--log-to", "tensorboard"],
         "error: --task-file, --limit, --offline and --log-to go with --task"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1] == message


@pytest.mark.parametrize("tracker,module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_extra_is_named(corpus, tmp_path, tracker, module):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from gptcli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "train", "--data", str(corpus),
                          "--max-steps", "2", "--out", str(tmp_path / "run"), "--log-to", tracker],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --log-to {tracker} needs {module}, which is not installed; install it with "
        f"{install_command(tracker)}")
