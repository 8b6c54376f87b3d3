"""Loss curves of one or several runs (needs matplotlib: ``pip install "gptcli[plot]"``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import require
from .runs import RunFolder


def compare_runs(runs: list[Path]) -> tuple[list[str], list[dict]]:
    """The settings that differ between runs, and one row per run with them and its best val."""
    folders = [RunFolder(r) for r in runs]
    settings = [f.settings() for f in folders]
    keys = sorted({k for s in settings for k in s})
    differ = [k for k in keys if k not in ("out",) and len({json.dumps(s.get(k)) for s in settings}) > 1]
    rows = []
    for folder, s in zip(folders, settings):
        _, val = folder.losses()
        rows.append({"run": str(folder.path), "best_val": min((v for _, v in val), default=None),
                     **{k: s.get(k) for k in differ}})
    return differ, rows


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Train (thin) and validation (thick, dots) loss of each run on one set of axes."""
    matplotlib = require("matplotlib", "plot", needed_for="plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        train, val = RunFolder(run).losses()
        color = f"C{i % 10}"
        label = Path(run).name if len(runs) > 1 else ""
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, lw=1, label=f"{label} train".strip())
        if val:
            ax.plot(*zip(*val), color=color, lw=2, marker="o", ms=3, label=f"{label} val".strip())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
