import io

import pytest
import torch
from rich.console import Console

from gptcli.display import TrainDisplay
from gptcli.tables import render_info


def live_display(width: int) -> TrainDisplay:
    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    display = TrainDisplay(console)
    display.start(step=0, max_steps=20000, device=torch.device("cpu"), dtype=torch.float32,
                  params=124_439_808, tokens_per_step=491_520, out="runs/a-long-run-name",
                  batch=(12, 40, 1, 1024))
    display.step(12345, loss=2.34567, lr=3.0e-4, tokens_per_s=123456.0)
    display.eval(12345, 2.45678)
    display.finish()
    return display


@pytest.mark.parametrize("width", [80, 76])
def test_the_live_line_keeps_the_essentials_in_narrow_terminals(width):
    line = live_display(width)._line().plain
    assert len(line) < width
    for piece in ("step 12345/20000", "loss 2.3457", "val 2.4568", "123,456 tok/s", "eta "):
        assert piece in line, (piece, line)
    assert not line.endswith("…")


def test_the_live_line_adds_lr_elapsed_and_a_bar_when_there_is_room():
    line = live_display(160)._line().plain
    assert "lr 3.0e-04" in line and "elapsed" in line and "━" in line


def test_the_start_lines_are_short_enough_for_80_columns():
    console = Console(file=io.StringIO(), width=80)
    display = TrainDisplay(console)
    display.start(step=0, max_steps=2000, device=torch.device("cpu"), dtype=torch.float32,
                  params=809_856, tokens_per_step=768, out="runs/shakespeare",
                  batch=(12, 1, 1, 64))
    lines = console.file.getvalue().splitlines()
    assert lines == ["training 809,856 parameters on cpu (float32), step 0 -> 2000",
                     "batch: 12 sequences x 64 tokens = 768 tokens per step",
                     "run folder: runs/shakespeare"]
    console.file = io.StringIO()  # LoRA: the adapters train, the model's weights stay
    display.start(step=0, max_steps=20000, device=torch.device("cuda:0"), dtype=torch.bfloat16,
                  params=124_439_808, tokens_per_step=768, out="runs/shakespeare",
                  batch=(12, 1, 1, 64), trainable=1_179_648)
    assert console.file.getvalue().splitlines()[0] == (
        "training 1,179,648 of 124,439,808 params on cuda:0 (bfloat16), step 0 -> 20000")


def test_info_rounds_figures_and_hides_settings_the_model_does_not_use():
    console = Console(file=io.StringIO(), width=100)
    info = {"parameters": 10, "file_size": 1000, "tokenizer": "gpt2",
            "config": {"position": "learned", "rope_theta": 10000.0, "n_layer": 2},
            "provenance": {"val_loss": "1.8814077766345871", "step": "2000"}}
    render_info(info, title="m", console=console)
    text = console.file.getvalue()
    assert "1.8814 " in text and "1.88140777" not in text and "2000" in text
    assert "rope_theta" not in text
    info["config"]["position"] = "rope"
    render_info(info, title="m", console=console)
    assert "rope_theta" in console.file.getvalue()


def log_display() -> tuple[TrainDisplay, io.StringIO]:
    out = io.StringIO()
    display = TrainDisplay(Console(file=out, width=100, force_terminal=False))
    display.start(step=0, max_steps=200, device=torch.device("cpu"), dtype=torch.float32,
                  params=800_000, tokens_per_step=768, out="runs/x", batch=(12, 1, 1, 64))
    return display, out


def test_a_log_file_gets_a_line_at_least_every_few_seconds(monkeypatch):
    """Without a terminal (stderr to a file), progress is a plain line per evaluation and one
    whenever LOG_EVERY_S has passed since the last line: no long silences between evals."""
    import gptcli.display

    clock = [100.0]
    monkeypatch.setattr(gptcli.display.time, "perf_counter", lambda: clock[0])
    display, out = log_display()
    for step in range(10, 210, 10):  # a log step every 3 s, evaluations only at the end
        clock[0] += 3.0
        display.step(step, loss=2.0, lr=1e-3, tokens_per_s=500.0, evaluating=step == 200)
    display.eval(200, 1.9)  # (one line for step 200, though 12 s had passed: the eval's)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps == [40, 80, 120, 160, 200]  # every 12 s (the first log step past 10 s)
    assert lines[-1].startswith("step 200/200 | loss 2.0000 | val 1.9000")
