"""`gpt sweep` (run a grid or a random search of `gpt train` settings, each point a run folder)
and `gpt sweep show` (its table, at any time): the flags, the progress lines and the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import TrainConfig
from .app import (Command, Group, Json, app, first_sentence, handle_errors,
                  with_config_flags)

Opt = typer.Option
PANELS = ("Sweep", "Data", "Model", "LoRA", "Optimisation", "Run", "Device", "Output")
OOM_HINT = "try fewer --jobs, or a smaller --batch-size or model"

sweep_app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=False,
                        context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
app.add_typer(sweep_app, name="sweep")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _with_train_flags(fn):
    """``fn`` as the group's callback, under the error policy, with one flag per TrainConfig
    field (less --out: the sweep's folder), those given passed as ``given`` (as ``command``
    does for `gpt train`)."""
    callback = with_config_flags(fn, handle_errors(fn, OOM_HINT), TrainConfig, exclude=("out",),
                                 panels=PANELS)
    return sweep_app.callback(invoke_without_command=True,
                              short_help=first_sentence(fn.__doc__))(callback)


def _opt(*names: str, help: str, metavar: str = "", **kw):
    return Opt(*names, help=help, metavar=metavar, rich_help_panel="Sweep", show_default=False,
               **kw)


@_with_train_flags
def sweep_cmd(
    ctx: typer.Context,
    given: dict,
    set_: Annotated[Optional[list[str]], _opt("--set", metavar="NAME=VALUES", help=(
        "A gpt train setting to vary: NAME=A,B,C, or a range LOW..HIGH[:log][:COUNT] (COUNT "
        "values in a grid; drawn from with --random). Repeat for a grid of several."))] = None,
    random: Annotated[Optional[int], _opt("--random", metavar="K", help=(
        "Draw K points from the --set ranges and lists instead of the full grid."))] = None,
    seeds: Annotated[int, _opt("--seeds", metavar="N", help=(
        "Repeat every point with N seeds (--seed, --seed + 1, ...) to tell differences from "
        "noise (default: 1)."))] = 1,
    budget: Annotated[Optional[str], _opt("--budget", metavar="KIND=N", help=(
        "The same budget for every point: tokens=N or flops=N (each point's steps from its "
        "batch, context and FLOPs per token), or time=SECONDS."))] = None,
    match_params: Annotated[Optional[float], _opt("--match-params", metavar="N", help=(
        "Give every point about N parameters: the width for each --set n-layer (or the depth "
        "for each --set n-embd)."))] = None,
    jobs: Annotated[int, _opt("--jobs", metavar="N", help=(
        "Points run side by side when memory allows, the CPU threads split between them "
        "(default: 1)."))] = 1,
    nproc_per_node: Annotated[int, _opt("--nproc-per-node", metavar="N", help=(
        "Run each point under torchrun with N processes (default: 1, no torchrun)."))] = 1,
    out: Annotated[Optional[Path], _opt("--out", metavar="DIR", help=(
        "The sweep folder: its manifest and one run folder per point (default: "
        "sweeps/<the settings varied>)."))] = None,
    config: Annotated[Optional[Path], _opt("--config", metavar="FILE", help=(
        "Load gpt train settings from a JSON file; flags override it."))] = None,
    print_commands: Annotated[bool, _opt("--print-commands", help=(
        "Write the manifest and print one gpt train command per point (for a job "
        "scheduler) instead of running them."))] = False,
    force: Annotated[bool, _opt("--force", help=(
        "Replace another sweep (or other files) in --out."))] = False,
    as_json: Json = False,
) -> None:
    """Train a grid (or a random draw) of settings, each point an ordinary run folder under
    --out, with the same budget for every point; a second call resumes it. `gpt sweep show
    DIR` prints its table at any time, `gpt plot DIR` draws it."""
    if ctx.invoked_subcommand is not None:
        return
    from ..sweep_plan import Request, commands, plan_or_resume, prepare
    from ..sweep_run import run_points

    req = Request(given, sets=set_ or [], random=random, seeds=seeds, budget=budget,
                  match_params=None if match_params is None else round(match_params),
                  nproc=nproc_per_node, config_file=config, out=out,
                  print_only=print_commands)
    folder, manifest, resumed = plan_or_resume(req, jobs=jobs)
    manifest = manifest if resumed else prepare(folder, manifest, force=force)
    for line in manifest.get("notes", []):
        note(line)
    if print_commands:
        print("\n".join(commands(manifest)))
        note(f"wrote {folder / 'sweep.json'}; see the results with gpt sweep show {folder}")
        return
    from ..display import clock

    outcome = run_points(folder, manifest, jobs=jobs, progress=SweepProgress(manifest))
    show(folder, as_json, None)
    _picture(folder)
    note(f"{outcome.finished} of {outcome.total} points finished; {outcome.ran} ran now, in "
         f"{clock(outcome.seconds)} (their processes: {clock(outcome.point_seconds)} added "
         f"up); gpt sweep show {folder} prints this table again")
    if outcome.stopped_by:
        note(f"stopped by {outcome.stopped_by}; run the same command again to resume")
    raise typer.Exit(130 if outcome.stopped_by == "SIGINT" else 143 if outcome.stopped_by
                     else 1 if outcome.failed else 0)


@sweep_app.command("show", cls=Command)
def show_cmd(
    folder: Annotated[Path, typer.Argument(metavar="DIR", show_default=False,
                                           help="The sweep folder.")],
    csv: Annotated[Optional[Path], Opt("--csv", metavar="FILE", rich_help_panel="Output",
                                       help="Also write one line per point as CSV.")] = None,
    force: Annotated[bool, Opt("--force", metavar="", rich_help_panel="Output", help=(
        "Overwrite --csv even if gptcli did not write it."))] = False,
    as_json: Json = False,
) -> None:
    """The sweep's table, best validation loss first (its points may have run anywhere, as
    long as their run folders are here)."""
    handle_errors(show, OOM_HINT)(folder, as_json, csv, force)


def show(folder: Path, as_json: bool, csv: Path | None, force: bool = False) -> None:
    from ..files import check_new
    from ..sweep import results, to_csv

    check_new(csv, "--csv", force, mark=b"point,seed,status,step")  # (its header)
    table = results(folder)
    if csv is not None:
        from ..files import write_text

        note(f"wrote {write_text(csv, to_csv(table), what='CSV file')}")
    if as_json:
        print(json.dumps(table))
    else:
        render_sweep(table)


def _picture(folder: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        from ..plot import plot_sweep

        note(f"wrote {plot_sweep(folder, folder / 'sweep.png')}")


# ----------------------------------------------------------------------------- rendering

def render_sweep(table: dict, console=None) -> None:
    """One row per setting (its seeds together: mean ± std), best validation loss first; then
    the memory a training step needs, by part, beside the measured peak."""
    from rich.table import Table

    from ..display import Stdout, clock
    from ..tables import setting_text, size_text

    varied, groups = table["varied"], table["groups"]
    seeds = table["seeds"] > 1
    done = all(g["status"] == ["finished"] for g in groups)
    out = console or (Stdout() if sys.stdout.isatty() else Stdout(width=200))  # a file, a
    # pipe: the whole table, not one wrapped at 80 columns
    spread = f" (mean ± std of {table['seeds']} seeds)" if seeds else ""
    grid = Table("#", *(k.replace("_", "-") for k in varied), "val loss",
                 *(["seeds"] if seeds and not done else []), "params", "tokens", "FLOPs",
                 "tok/s", "peak mem", "wall", *(["status"] if not done else []),
                 title=f"sweep {table['sweep']}: final validation loss{spread}",
                 title_justify="left")
    for rank, g in enumerate(groups, 1):
        loss = "-" if g["val_loss"] is None else f"{g['val_loss']:.4f}" + (
            f" ± {g['val_std']:.4f}" if g["val_std"] is not None else "")
        grid.add_row(str(rank), *(setting_text(k, g["settings"].get(k)) for k in varied), loss,
                     *([f"{g['finished']}/{g['seeds']}"] if seeds and not done else []),
                     _count(g["params"]) + (f" + {_count(g['adapters'])} LoRA"
                                            if g.get("adapters") else ""),
                     _count(g["tokens"]), _sci(g["flops"]),
                     _count(g["tokens_per_s"], plain=True),
                     "-" if not g["peak_memory"] else size_text(g["peak_memory"]),
                     "-" if g["elapsed"] is None else clock(g["elapsed"]),
                     *([", ".join(g["status"])] if not done else []))
    out.print(grid)
    memory = Table("points", "weights", "gradients", "optimizer", "activations",
                   "estimate", "measured peak",
                   title="training memory per step: estimate by part (the memory check's) "
                   "and the measured peak", title_justify="left")
    shapes: dict[str, list[dict]] = {}
    for row in table["points"]:
        if row["memory"]:
            key = json.dumps({k: row["memory"][k] for k in ("weights", "gradients", "optimizer",
                                                              "activations")})
            shapes.setdefault(key, []).append(row)
    for rows in shapes.values():
        m, peak = rows[0]["memory"], max((r["memory"]["peak"] or 0 for r in rows), default=0)
        names = "all" if len(rows) == len(table["points"]) else ", ".join(
            sorted(r["point"].split("_", 1)[0] for r in rows))
        memory.add_row(names, *(size_text(m[k]) for k in ("weights", "gradients", "optimizer",
                                                          "activations", "estimate")),
                       size_text(peak) if peak else "-")
    if shapes:
        out.print(memory)
        out.print("measured peak: CUDA max allocated; on a CPU the process's max RSS, which "
                  "includes Python and PyTorch", style="dim")


def _count(n: float | None, plain: bool = False) -> str:
    if n is None:
        return "-"
    if plain or n < 1e3:
        return f"{n:,.0f}"
    return f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n / 1e3:,.1f}k"


def _sci(n: float | None) -> str:
    return "-" if not n else f"{n:.2e}"


class SweepProgress:
    """One line per point on stderr: on a terminal a live line for each running point (step,
    loss, val, tokens/s, eta) and a lasting line when it ends; in a log file, a line when a
    point starts, at each of its evaluations, and when it ends."""

    def __init__(self, manifest: dict, console=None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self.order = {p["name"]: i for i, p in enumerate(manifest["points"])}
        self.total = len(manifest["points"])
        self.lines: dict[str, str] = {}
        self.vals: dict[str, int] = {}
        self.live = None

    def label(self, point: dict) -> str:
        return f"[{self.order[point['name']] + 1}/{self.total}] {point['name'].split('_', 1)[-1]}"

    def begin(self, *, total: int, todo: int, jobs: int, threads: str) -> None:
        each = f"{threads} CPU thread" + ("s" if threads != "1" else "")
        self.console.print(f"sweep: {total} points, {total - todo} finished already, {todo} to "
                           f"run, {jobs} at a time ({each} each)")
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=self.console, auto_refresh=False, transient=True)
            self.live.start()

    def started(self, point: dict) -> None:
        self.lines[point["name"]] = f"{self.label(point)}: starting"
        self._show(f"{self.label(point)}: started", lasting=self.live is None)

    def update(self, point: dict, records: list[dict]) -> None:
        from ..display import clock

        train = [r for r in records if r.get("train_loss") is not None]
        vals = [r for r in records if r.get("val_loss") is not None]
        if not train:
            return
        last, step = train[-1], train[-1]["step"]
        eta = last["elapsed"] / step * max(0, point["max_steps"] - step) if step else 0
        line = (f"{self.label(point)}: step {step}/{point['max_steps']} | loss "
                f"{last['train_loss']:.4f} | val " + (f"{vals[-1]['val_loss']:.4f}" if vals else
                                                       "-") +
                f" | {last.get('tokens_per_s') or 0:,.0f} tok/s | eta {clock(eta)}")
        self.lines[point["name"]] = line
        new_val = len(vals) > self.vals.get(point["name"], 0)
        self.vals[point["name"]] = len(vals)
        self._show(line, lasting=self.live is None and new_val)

    def ended(self, point: dict, code: int, why: str | None) -> None:
        line = self.lines.pop(point["name"], self.label(point))
        status = f"failed: {why}" if why else "done" if code == 0 else f"stopped ({code})"
        self._show(f"{line.split(' | eta')[0]} | {status}", lasting=True)

    def _show(self, line: str, *, lasting: bool) -> None:
        if lasting:
            (self.live.console if self.live else self.console).print(line, soft_wrap=True)
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text("\n".join(self.lines.values())), refresh=True)

    def finish(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

