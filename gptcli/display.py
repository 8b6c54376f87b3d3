"""What long-running commands show while they run: a training run's live progress line (plain
log lines when stderr is not a terminal; ``NullDisplay`` shows nothing), generated samples as
they are made, and progress bars. Finished results are rendered by ``tables.py``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from .files import STDOUT_CLOSED, silence_stdout

class Stdout(Console):
    """A console on stdout that ends quietly when its reader goes away (`gpt info | head`),
    as every gptcli command does (rich's own default ends with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence_stdout()
        raise SystemExit(STDOUT_CLOSED)


class Stderr(Console):
    """The training display's console: when its reader goes away (`gpt train 2>&1 | head`) it
    goes quiet and says so in ``closed``, for fit to stop and save as on Ctrl-C (rich's own
    default ends the run with status 1 in the middle of a step, unsaved)."""

    closed = False

    def on_broken_pipe(self) -> None:
        self.quiet = self.closed = True
        silence_stdout(self.file)


class NullDisplay:
    closed = False  # (see Stderr)

    def tokenize(self, work: Callable):
        return work(None)

    def note(self, message: str) -> None: ...

    def start(self, **info) -> None: ...

    def step(self, step: int, *, evaluating: bool = False, **metrics) -> None: ...

    def eval(self, step: int, val_loss: float | None) -> None: ...

    def sample(self, step: int, text: str) -> None: ...

    def finish(self) -> None: ...


class TrainDisplay(NullDisplay):
    """A live status line on a terminal (plain log lines otherwise: one per evaluation, and one
    at least every ``LOG_EVERY_S`` seconds between them, so a log file shows progress). The line
    is laid out for the terminal's width: step/total, loss, val, tokens/s and ETA always fit in
    80 columns; the bar, lr and elapsed time are added only when there is room."""

    LOG_EVERY_S = 10.0

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Stderr(stderr=True, highlight=False)
        self.is_live = self.console.is_terminal
        self.live: Live | None = None
        self.val: float | None = None
        self.metrics: dict = {}
        self.step_no = self.first_step = self.max_steps = 0
        self.t0 = self.t_first = self.t_printed = time.perf_counter()

    @property
    def closed(self) -> bool:
        return getattr(self.console, "closed", False)

    def note(self, message: str) -> None:
        self.console.print(f"note: {message}", soft_wrap=True)

    def tokenize(self, work: Callable):
        if not self.is_live:
            return work(None)
        with Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeRemainingColumn(), console=self.console, transient=True) as progress:
            task = progress.add_task("tokenize", total=1)
            return work(lambda done, total: progress.update(task, completed=done, total=total))

    def start(self, *, step: int, max_steps: int, device, dtype, params: int,
              tokens_per_step: int, out: Path, batch: tuple[int, int, int, int],
              trainable: int | None = None) -> None:
        self.step_no = self.first_step = step
        self.max_steps = max_steps
        self.t0 = self.t_first = self.t_printed = time.perf_counter()
        size, accum, world, context = batch
        dtype_name = str(dtype).replace("torch.", "")
        parts = [f"{size} sequences"] + ([f"{accum} micro-batches"] if accum > 1 else []) + \
            ([f"{world} processes"] if world > 1 else []) + [f"{context} tokens"]
        count = f"{trainable:,} of {params:,} params" if trainable is not None and \
            trainable < params else f"{params:,} parameters"  # (adapters: 80 columns for gpt2)
        self.console.print(f"training {count} on {device} ({dtype_name}), step {step} -> "
                           f"{max_steps}")
        self.console.print(f"batch: {' x '.join(parts)} = {tokens_per_step:,} tokens per step")
        self.console.print(f"run folder: {out}")
        if self.is_live:
            self.live = Live(self._line(), console=self.console, auto_refresh=False,
                             transient=False)
            self.live.start()

    def _eta(self) -> str:
        done = self.step_no - self.first_step
        if done <= 0:
            return "-"
        left = (time.perf_counter() - self.t_first) / done * (self.max_steps - self.step_no)
        return clock(left)

    def _pieces(self) -> list[tuple[str, bool]]:
        """The status as (text, essential) pieces, in the order shown."""
        m = self.metrics
        return [(f"step {self.step_no}/{self.max_steps}", True),
                (f"loss {m['loss']:.4f}" if "loss" in m else "loss -", True),
                (f"val {self.val:.4f}" if self.val is not None else "val -", True),
                (f"lr {m['lr']:.1e}" if "lr" in m else "", False),
                (f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else "- tok/s", True),
                (f"eta {self._eta()}", True),
                (f"elapsed {clock(time.perf_counter() - self.t0)}", False)]

    def _line(self) -> Text:
        """The live line for this terminal's width: optional pieces (elapsed, then lr) are
        dropped before anything essential; a progress bar is added when there is room."""
        pieces = [p for p in self._pieces() if p[0]]
        width = self.console.width - 1
        text = " | ".join(t for t, _ in pieces)
        while len(text) > width and any(not keep for _, keep in pieces):
            drop = max(i for i, (_, keep) in enumerate(pieces) if not keep)
            pieces.pop(drop)
            text = " | ".join(t for t, _ in pieces)
        bar = min(24, width - len(text) - 2)
        if bar >= 10:
            filled = round(bar * self.step_no / max(1, self.max_steps))
            text = "━" * filled + "─" * (bar - filled) + "  " + text
        return Text(text[:width])

    def step(self, step: int, *, evaluating: bool = False, **metrics) -> None:
        """``evaluating``: an eval follows at this step, and prints its line (one, not two)."""
        self.step_no, self.metrics = step, metrics
        if self.live is not None:
            self.live.update(self._line(), refresh=True)
        elif not evaluating and time.perf_counter() - self.t_printed >= self.LOG_EVERY_S:
            self._print()

    def eval(self, step: int, val_loss: float | None) -> None:
        self.step_no, self.val = step, val_loss
        if self.live is not None:
            self.live.update(self._line(), refresh=True)
        else:
            self._print()

    def _print(self) -> None:
        self.console.print(" | ".join(t for t, _ in self._pieces() if t), soft_wrap=True)
        self.t_printed = time.perf_counter()

    def sample(self, step: int, text: str | None) -> None:
        if text is None:
            return
        self.console.print(f"[dim]--- sample at step {step} ---[/dim]")
        self.console.print(text, markup=False, highlight=False)
        self.console.print("[dim]---[/dim]")

    def finish(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def report(self, result) -> None:
        """The last lines of `gpt train`: where the model is, or how to resume."""
        if result.stopped_by:
            self.console.print(
                f"stopped by {result.stopped_by} at step {result.step}; saved "
                f"{Path(result.out) / 'last.safetensors'}. Resume with: "
                f"{result.resume_command}", soft_wrap=True)
            return
        best = f"best val loss {result.best_val:.4f}, " if result.best_val is not None else ""
        self.console.print(f"done: {result.step} steps, {best}checkpoint {result.checkpoint}",
                           soft_wrap=True)
        self.console.print(f"try it: {result.try_command}", soft_wrap=True)


class SampleWriter:
    """`gpt generate`'s samples on stdout as they are made, one after another: the first streams
    token by token while the batch decodes, the others' text is held until the one before them
    has finished, then shown (and, if still running, streamed). Several samples get a header
    each (``----- sample 2/3 -----``); one sample is just the prompt and its continuation."""

    def __init__(self, count: int, prompt: str) -> None:
        self.count, self.prompt = count, prompt
        self.held: list[list[str]] = [[] for _ in range(count)]
        self.finished: set[int] = set()
        self.shown = 0
        self._start(0)

    def _start(self, i: int) -> None:
        if self.count > 1:
            sys.stdout.write(f"{'' if i == 0 else chr(10)}----- sample {i + 1}/{self.count} -----\n")
        sys.stdout.write(self.prompt + "".join(self.held[i]))
        sys.stdout.flush()

    def text(self, i: int, piece: str) -> None:
        if i == self.shown:
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            self.held[i].append(piece)

    def done(self, i: int) -> None:
        self.finished.add(i)
        while self.shown in self.finished and self.shown + 1 < self.count:
            self.shown += 1
            self._start(self.shown)


def clock(seconds: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour on (to the nearest second)."""
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# ----------------------------------------------------------------------------- progress bars

class ProgressBars:
    """A rich progress bar per phase on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)

    def __enter__(self) -> Callable[[str, int], Callable[..., None]]:
        self.progress.__enter__()

        def phase(label: str, total: int) -> Callable[..., None]:
            task = self.progress.add_task(label, total=total)
            return lambda n=1: self.progress.advance(task, n)

        return phase

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
