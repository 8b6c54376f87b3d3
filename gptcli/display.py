"""What long-running commands show: a training run's live progress line (plain log lines when
stderr is not a terminal; ``NullDisplay`` shows nothing), and `gpt bench`'s progress and table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from .files import STDOUT_CLOSED, silence_stdout

GiB = 1024 ** 3


class Stdout(Console):
    """A console on stdout that ends quietly when its reader goes away (`gpt info | head`),
    as every gptcli command does (rich's own default ends with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence_stdout()
        raise SystemExit(STDOUT_CLOSED)


class NullDisplay:
    def tokenize(self, work: Callable):
        return work(None)

    def note(self, message: str) -> None: ...

    def start(self, **info) -> None: ...

    def step(self, step: int, **metrics) -> None: ...

    def eval(self, step: int, val_loss: float | None) -> None: ...

    def sample(self, step: int, text: str) -> None: ...

    def finish(self) -> None: ...


class TrainDisplay(NullDisplay):
    """A live status line on a terminal (plain log lines otherwise). The line is laid out for
    the terminal's width: step/total, loss, val, tokens/s and ETA always fit in 80 columns; the
    bar, lr and elapsed time are added only when there is room."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.is_live = self.console.is_terminal
        self.live: Live | None = None
        self.val: float | None = None
        self.metrics: dict = {}
        self.step_no = self.first_step = self.max_steps = 0
        self.t0 = self.t_first = time.perf_counter()

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
              tokens_per_step: int, out: Path, batch: tuple[int, int, int, int]) -> None:
        self.step_no = self.first_step = step
        self.max_steps = max_steps
        self.t0 = self.t_first = time.perf_counter()
        size, accum, world, context = batch
        dtype_name = str(dtype).replace("torch.", "")
        parts = [f"{size} sequences"] + ([f"{accum} micro-batches"] if accum > 1 else []) + \
            ([f"{world} processes"] if world > 1 else []) + [f"{context} tokens"]
        self.console.print(f"training {params:,} parameters on {device} ({dtype_name}), step "
                           f"{step} -> {max_steps}")
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
        return _clock(left)

    def _pieces(self) -> list[tuple[str, bool]]:
        """The status as (text, essential) pieces, in the order shown."""
        m = self.metrics
        return [(f"step {self.step_no}/{self.max_steps}", True),
                (f"loss {m['loss']:.4f}" if "loss" in m else "loss -", True),
                (f"val {self.val:.4f}" if self.val is not None else "val -", True),
                (f"lr {m['lr']:.1e}" if "lr" in m else "", False),
                (f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else "- tok/s", True),
                (f"eta {self._eta()}", True),
                (f"elapsed {_clock(time.perf_counter() - self.t0)}", False)]

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

    def step(self, step: int, **metrics) -> None:
        self.step_no, self.metrics = step, metrics
        if self.live is not None:
            self.live.update(self._line(), refresh=True)

    def eval(self, step: int, val_loss: float | None) -> None:
        self.step_no, self.val = step, val_loss
        if self.live is not None:
            self.live.update(self._line(), refresh=True)
        else:
            self.console.print(" | ".join(t for t, _ in self._pieces() if t), soft_wrap=True)

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

    def report(self, result, prompt: str | None) -> None:
        """The last lines of `gpt train`: where the model is, or how to resume."""
        if result.stopped_by:
            self.console.print(
                f"stopped by {result.stopped_by} at step {result.step}; saved "
                f"{Path(result.out) / 'last.safetensors'}. Resume with: gpt train --out "
                f"{result.out} --resume", soft_wrap=True)
            return
        best = f"best val loss {result.best_val:.4f}, " if result.best_val is not None else ""
        hint = f"gpt generate --model {result.out}" + (f' --prompt "{prompt}"' if prompt else "")
        self.console.print(f"done: {result.step} steps, {best}checkpoint {result.checkpoint}",
                           soft_wrap=True)
        self.console.print(f"try it: {hint}", soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# ----------------------------------------------------------------------------- gpt bench

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


# ----------------------------------------------------------------------------- results on stdout

def render_info(info: dict, title: str, console=None) -> None:
    """`gpt info`: the config fields that mean something for this model, rounded figures."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("file size", f"{info['file_size'] / 1e6:,.1f} MB")
    table.add_row("tokenizer", info["tokenizer"])
    config = dict(info["config"])
    if config.get("position") != "rope":
        config.pop("rope_theta", None)
    for key, value in {**config, **info["provenance"]}.items():
        table.add_row(key, _rounded(value))
    (console or Stdout()).print(table)


def _rounded(value) -> str:
    """Floats stored as text (e.g. a val loss in checkpoint metadata) shown to 4 decimals."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, bool) or float(number).is_integer() or "e" in str(value).lower():
        return str(value)
    return f"{number:.4f}"


def render_eval(result: dict) -> None:
    print(f"{result['model']}: loss {result['loss']:.4f} nats/token, perplexity "
          f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte")
    print(f"scored {result['tokens']:,} tokens of {result['data']} (window "
          f"{result['context_length']}, stride {result['stride']})")


def render_listing(info: dict) -> None:
    """`gpt download --list`."""
    for kind in ("models", "datasets"):
        for key, entry in info[kind].items():
            print(f"{key:<12} {entry['repo']:<30} {'stored' if entry['stored'] else ''}".rstrip())
    print(f"in {info['models_dir']}: {', '.join(info['stored_models']) or '(nothing)'}")
    print(f"in {info['datasets_dir']}: {', '.join(info['stored_datasets']) or '(nothing)'}")


def render_download(result: dict) -> None:
    if result["kind"] == "dataset":
        print(f"stored dataset {result['name']} ({result['size'] / 1e6:,.1f} MB) in "
              f"{result['path']}; train on it with `gpt train --data {result['name']}`")
    else:
        print(f"stored {result['name']}: {result['parameters']:,} parameters, "
              f"{result['size'] / 1e6:,.1f} MB, {result['path']}")


def render_comparison(differ: list[str], rows: list[dict]) -> None:
    """`gpt plot`: one row per run, with its best val loss and the settings that differ."""
    from rich.table import Table

    table = Table("run", "best val", *differ)
    for row in rows:
        best = f"{row['best_val']:.4f}" if row["best_val"] is not None else "-"
        table.add_row(row["run"], best, *(str(row[k]) for k in differ))
    Stdout().print(table)


def render_tasks(model: str, results: list) -> None:
    """`gpt eval --task`: one row per task, then the published figures to compare with."""
    from rich.table import Table

    table = Table("task", "items", "figures", "items/s", title=model, title_justify="left")
    for r in results:
        figures = ", ".join(f"{k} {v:.2%}" if k.startswith("acc") else f"{k} {v:,.4g}"
                            for k, v in r.metrics.items() if k not in ("tokens", "words",
                                                                       "bytes"))
        table.add_row(r.task, f"{r.items:,}", figures, f"{r.items / max(r.seconds, 1e-9):,.1f}")
    out = Stdout()
    out.print(table)
    for r in results:
        where = r.source.get("repo", r.source.get("file"))
        out.print(f"{r.task}: data {where}" + (f" @ {r.source['revision'][:12]}" if
                                                r.source.get("revision") else "") +
                  f"; published {r.published}", highlight=False, soft_wrap=True)
