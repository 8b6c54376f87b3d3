"""What long-running commands show: a training run's live progress line (plain log lines when
stderr is not a terminal; ``NullDisplay`` shows nothing), and `gpt bench`'s progress and table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

GiB = 1024 ** 3

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


# ----------------------------------------------------------------------------- gpt bench

class ProgressBars:
    """A rich progress bar per phase on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)

    def __enter__(self) -> Callable[[str, int], Callable[[], None]]:
        self.progress.__enter__()

        def phase(label: str, total: int) -> Callable[[], None]:
            task = self.progress.add_task(f"bench: {label}", total=total)
            return lambda: self.progress.advance(task)

        return phase

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _fmt(x: float | None, unit: str = "", digits: int = 1) -> str:
    return "unknown" if x is None else f"{x:,.{digits}f}{unit}"


def _spread_ms(d: dict, scale: float = 1e3) -> str:
    return f"{d['median'] * scale:,.2f} ms (min {d['min'] * scale:,.2f}, max {d['max'] * scale:,.2f})"


def render(result: dict, console) -> None:
    """The figures as a rich table."""
    from rich.table import Table

    s = result["settings"]
    table = Table(title=f"gpt bench: {result['device_name']} ({result['device']}), torch "
                        f"{result['torch']}, {result['dtype']}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{s['preset']}: {result['parameters'] / 1e6:,.1f}M parameters, "
                  f"{s['n_layer']} layers, {s['n_head']} heads, width {s['n_embd']}, vocabulary "
                  f"{s['vocab_size']}, context {s['context_length']}")
    table.add_row("settings", f"batch {s['batch_size']}, {s['steps']} timed steps after "
                  f"{s['warmup']} warm-up, compile {'on' if s['compile'] else 'off'}, "
                  f"{result['threads']} CPU threads")
    table.add_row("peak compute", f"{_fmt(result['peak_tflops'])} TFLOPs "
                  f"({result['peak_tflops_source']})")
    table.add_row("memory bandwidth", f"{_fmt(result['bandwidth_gbs'])} GB/s "
                  f"({result['bandwidth_source']})")
    if t := result.get("train"):
        table.add_section()
        table.add_row("train step", _spread_ms(t["step_time_s"]))
        table.add_row("train tokens/s", f"{t['tokens_per_s']:,.0f} ({t['tokens_per_step']:,} "
                      f"tokens per step, {t['flops_per_token'] / 1e6:,.1f} MFLOPs per token)")
        table.add_row("MFU", "unknown (peak unknown)" if t["mfu"] is None else
                      f"{t['mfu'] * 100:.1f}%")
        first = f"{t['first_step_s']:.2f} s" + (f" (compile about {t['compile_s']:.1f} s)"
                                                 if "compile_s" in t else "")
        table.add_row("first step", first)
        table.add_row("train peak memory", f"{t['peak_memory_bytes'] / GiB:,.2f} GiB")
    for g in result.get("generate", []):
        table.add_section()
        b = f"batch {g['batch_size']}"
        table.add_row(f"time to first token, {b}", f"{_spread_ms(g['time_to_first_token_s'])} "
                      f"for {g['prompt_tokens']} prompt tokens")
        table.add_row(f"prefill, {b}", f"{g['prefill_tokens_per_s']:,.0f} tokens/s")
        if "decode_tokens_per_s" in g:
            table.add_row(f"decode, {b}", f"{g['decode_tokens_per_s']:,.1f} tokens/s, "
                          f"{_spread_ms(g['decode_ms_per_token'], 1)} per token "
                          f"({g['new_tokens']} new tokens)")
            util = g["bandwidth_utilisation"]
            table.add_row(f"bandwidth use, {b}", f"{'unknown' if util is None else f'{util:.1%}'}"
                          f" (weights {result['weight_bytes_per_step'] / 1e6:,.0f} MB per step)")
        if "compile_s" in g:
            table.add_row(f"first run, {b}", f"{g['first_run_s']:.2f} s (compile about "
                          f"{g['compile_s']:.1f} s)")
        table.add_row(f"generate peak memory, {b}", f"{g['peak_memory_bytes'] / GiB:,.2f} GiB")
    console.print(table)
    notes = []
    if result["device"] == "cpu":
        notes.append("peak memory on the CPU is the process's max RSS since it started")
    if result["peak_tflops"] is None and "train" in result:
        notes.append("MFU needs the device's peak: pass --peak-tflops")
    if result["bandwidth_gbs"] is None and "generate" in result:
        notes.append("bandwidth use needs the device's bandwidth: pass --bandwidth-gbs")
    for note in notes:
        console.print(f"note: {note}", style="dim")
