"""Loss curves of one or several runs, and a sweep's picture (needs matplotlib:
``pip install "gptcli[plot]"``). A sweep folder stands for its points' run folders."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError, require
from .runs import RunFolder
from .sweep import LOG_SCALE, is_sweep, point_folders, results

X_AXES = {"step": "step", "tokens": "tokens trained", "flops": "training FLOPs"}


def expand_runs(runs: list[Path]) -> list[Path]:
    """The run folders meant: a sweep folder's points in its place."""
    return [p for r in runs for p in (point_folders(r) if is_sweep(r) else [Path(r)])]


def compare_runs(runs: list[Path]) -> tuple[list[str], list[dict]]:
    """The settings that differ between runs, and one row per run with them and its best val."""
    folders = [RunFolder(r) for r in expand_runs(runs)]
    settings = [f.settings() for f in folders]
    keys = sorted({k for s in settings for k in s})
    differ = [k for k in keys if k not in ("out",) and len({json.dumps(s.get(k)) for s in settings}) > 1]
    rows = []
    for folder, s in zip(folders, settings):
        _, val = folder.losses()
        rows.append({"run": str(folder.path), "best_val": min((v for _, v in val), default=None),
                     **{k: s.get(k) for k in differ}})
    return differ, rows


def x_scale(run: RunFolder, x: str) -> float:
    """What one step is on the ``x`` axis: 1 step, its tokens, or its training FLOPs."""
    if x not in X_AXES:
        raise UserError(f"--x {x}: choose step, tokens or flops")
    if x == "step":
        return 1.0
    from .bench import training_flops_per_token
    from .config import ModelConfig

    config = run.read_config() or {}
    if not config.get("tokens_per_step") or not config.get("model"):
        raise UserError(f"{run.path}/config.json does not say how many tokens a step takes; "
                        "plot it against --x step")
    per_step = float(config["tokens_per_step"])
    return per_step * (training_flops_per_token(ModelConfig(**config["model"]))
                       if x == "flops" else 1)


def plot_runs(runs: list[Path], out: Path, x: str = "step") -> Path:
    """Train (thin) and validation (thick, dots) loss of each run on one set of axes; a sweep
    folder alone gets its own picture (``plot_sweep``)."""
    if len(runs) == 1 and is_sweep(runs[0]):
        return plot_sweep(runs[0], out, x)
    runs = expand_runs(runs)
    scales = [x_scale(RunFolder(r), x) for r in runs]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (run, scale) in enumerate(zip(runs, scales)):
        label = Path(run).name if len(runs) > 1 else ""
        _curves(ax, RunFolder(run), scale, f"C{i % 10}", label, sweep=False)
    _finish_curves(ax, x)
    return _save(fig, plt, out)


def plot_sweep(folder: Path, out: Path, x: str = "step") -> Path:
    """A sweep's picture: every point's loss curves (validation thick, train faint; the seeds
    of one setting in one colour) and, when one setting varies, the final validation loss against it (mean, with the
    seeds' standard deviation as error bars; a log axis for learning rates)."""
    table = results(folder)
    varied = [k for k in table["varied"] if k not in table["derived"]]  # (not --match-params')
    started = {p["point"] for p in table["points"] if RunFolder(p["run"]).metrics_path.is_file()}
    scales = {p["point"]: x_scale(RunFolder(p["run"]), x) for p in table["points"]
              if p["point"] in started}
    plt = pyplot()
    one = len(varied) == 1 and any(g["val_loss"] is not None for g in table["groups"])
    fig, axes = plt.subplots(1, 2 if one else 1, figsize=(13 if one else 8, 5), squeeze=False)
    groups = sorted(table["groups"], key=lambda g: [
        (0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v))
        for v in g["settings"].values()])
    rows = {p["point"]: p for p in table["points"]}
    for i, group in enumerate(groups):
        label = ", ".join(f"{k.replace('_', '-')}={_value(v)}" for k, v in
                          group["settings"].items()) or "points"
        for j, name in enumerate(n for n in group["points"] if n in started):
            _curves(axes[0][0], RunFolder(rows[name]["run"]), scales[name], f"C{i % 10}",
                    label if j == 0 else "", sweep=True)
    _finish_curves(axes[0][0], x)
    axes[0][0].set_title(f"{Path(folder).name}: validation (thick) and train loss")
    if one:
        _final_against(axes[0][1], groups, varied[0], table["seeds"])
    return _save(fig, plt, out)


def _final_against(ax, groups: list[dict], name: str, seeds: int) -> None:
    done = [g for g in groups if g["val_loss"] is not None]
    values = [g["settings"][name] for g in done]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        order = sorted(range(len(done)), key=lambda i: values[i])
        xs = [values[i] for i in order]
        done = [done[i] for i in order]
    else:
        xs = list(range(len(done)))
        ax.set_xticks(xs, [_value(v) for v in values])
    ax.errorbar(xs, [g["val_loss"] for g in done], yerr=[g["val_std"] or 0 for g in done],
                marker="o", capsize=4, lw=1.5)
    if numeric and (name in LOG_SCALE or (min(xs) > 0 and max(xs) / min(xs) >= 20)):
        ax.set_xscale("log")
    ax.set_xlabel(name.replace("_", "-"))
    ax.set_ylabel("final validation loss (nats/token)")
    spread = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    ax.set_title(f"final validation loss{spread}")
    ax.grid(alpha=0.3)


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else ", ".join(map(str, v)) \
        if isinstance(v, list) else str(v)


def _curves(ax, run: RunFolder, scale: float, color: str, label: str, *, sweep: bool) -> None:
    """A run's train loss (thin; faint and unlabelled in a sweep's picture) and validation
    loss (thick, dots)."""
    train_loss, val = run.losses()
    if train_loss:
        ax.plot([s * scale for s, _ in train_loss], [v for _, v in train_loss], color=color,
                alpha=0.2 if sweep else 0.5, lw=1,
                label=None if sweep else f"{label} train".strip())
    if val:
        ax.plot([s * scale for s, _ in val], [v for _, v in val], color=color, lw=2, marker="o",
                ms=3, label=(label if sweep else f"{label} val".strip()) or None)


def _finish_curves(ax, x: str) -> None:
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (a run stopped before its first log has none)
        ax.legend(fontsize="small")


def pyplot():
    """matplotlib's pyplot, drawing to files; without it a UserError naming the extra."""
    matplotlib = require("matplotlib", "plot", needed_for="plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, out: Path) -> Path:
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)

