"""What a training run shows on stderr: a live rich progress line in a terminal, plain log lines
otherwise (CI logs, pipes). ``NullDisplay`` shows nothing (library use, tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class NullDisplay:
    def tokenize(self, work: Callable):
        return work(None)

    def start(self, **info) -> None: ...

    def step(self, step: int, **metrics) -> None: ...

    def eval(self, step: int, val_loss: float | None) -> None: ...

    def sample(self, step: int, text: str) -> None: ...

    def finish(self) -> None: ...


class TrainDisplay(NullDisplay):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.val: float | None = None
        self.metrics: dict = {}
        self.max_steps = 0

    def tokenize(self, work: Callable):
        if not self.live:
            return work(None)
        with Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeRemainingColumn(), console=self.console, transient=True) as progress:
            task = progress.add_task("tokenize", total=1)
            return work(lambda done, total: progress.update(task, completed=done, total=total))

    def start(self, *, step: int, max_steps: int, device, dtype, params: int,
              tokens_per_step: int, out: Path, batch: str = "") -> None:
        self.max_steps = max_steps
        self.t0 = time.perf_counter()
        dtype_name = str(dtype).replace("torch.", "")
        self.console.print(
            f"training {params:,} parameters on {device} ({dtype_name}); effective batch "
            f"{batch}{tokens_per_step:,} tokens per step; steps {step}->{max_steps}; run folder {out}",
            highlight=False, soft_wrap=True)
        if self.live:
            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=max_steps, completed=step, info="")
            self.progress.start()

    def _info(self) -> str:
        m = self.metrics
        parts = [f"loss {m['loss']:.4f}" if "loss" in m else "loss -",
                 f"val {self.val:.4f}" if self.val is not None else "val -",
                 f"lr {m['lr']:.2e}" if "lr" in m else "",
                 f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else ""]
        return " | ".join(p for p in parts if p)

    def step(self, step: int, **metrics) -> None:
        self.metrics = metrics
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=self._info())

    def eval(self, step: int, val_loss: float | None) -> None:
        self.val = val_loss
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=self._info())
        else:
            elapsed = time.perf_counter() - self.t0
            self.console.print(f"step {step}/{self.max_steps} | {self._info()} | {elapsed:.0f}s",
                               highlight=False, soft_wrap=True)

    def sample(self, step: int, text: str) -> None:
        self.console.print(f"[dim]--- sample at step {step} ---[/dim]")
        self.console.print(text, markup=False, highlight=False)
        self.console.print("[dim]---[/dim]")

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
