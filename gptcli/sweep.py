"""What a sweep is and what it found. A sweep is a set of `gpt train` runs ("points") that differ
in a few settings: a grid of listed values (or values spaced over a range), or ``--random K``
points drawn from ranges, each repeated with ``--seeds`` seeds. Every point is an ordinary run
folder under the sweep folder; ``sweep.json`` beside them (the manifest) records the points and
the `gpt train` flags of each. Budgets turn tokens or FLOPs into each point's steps;
``--match-params`` picks the width (or depth) that gives a parameter count. Results are read back
from the run folders alone (config.json, metrics.jsonl, the checkpoint header), so a sweep whose
points ran elsewhere reads the same. ``sweep_run.py`` plans a sweep and runs its points.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import random
import re
import statistics
import typing
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, TrainConfig
from .errors import UserError
from .files import write_text
from .runs import LOCK, RunFolder, read_records

MANIFEST = "sweep.json"
FORMAT = "gptcli-sweep/1"
LOGS = "logs"  # each point's `gpt train` output, outside its run folder
NOT_DIMENSIONS = {"out": "--out is the sweep's folder; the points' run folders go inside it"}
LOG_SCALE = ("lr", "min_lr", "weight_decay")  # settings shown on a log axis
BUDGETS = ("tokens", "flops", "time")


# ----------------------------------------------------------------------------- dimensions

def field_kind(name: str) -> type:
    """int, float, bool, str or list: what a TrainConfig field holds (Optional unwrapped)."""
    annotation = TrainConfig.model_fields[name].annotation
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is list:
            return list
        if origin is typing.Annotated:
            annotation = args[0]
        elif args and origin is not typing.Literal:  # a union: the one that is not None
            annotation = next(a for a in args if a is not type(None))
        else:
            return str if origin is typing.Literal else annotation


@dataclass(frozen=True)
class Dimension:
    """One setting a sweep varies: listed values, or a range (low..high, optionally log-spaced,
    with ``count`` values in a grid)."""

    name: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    count: int | None = None
    text: str = ""  # as given

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    def grid(self) -> list[str]:
        """The values a grid takes: the listed ones, or ``count`` evenly (log-)spaced ones."""
        if self.low is None:
            return list(self.values)
        if self.count is None:
            raise UserError(f"--set {self.text} is a range: give the number of values for a "
                            f"grid ({self.text}:5) or draw points from it with --random K")
        n = self.count
        fractions = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
        values = [self._at(f) for f in fractions]
        return list(dict.fromkeys(values))  # an int range may give the same value twice

    def draw(self, rng: random.Random) -> str:
        """One random value: a listed one, or a uniform (log-uniform) one in the range."""
        if self.low is None or self.count is not None:
            return rng.choice(self.grid())
        return self._at(rng.random())

    def _at(self, fraction: float) -> str:
        lo, hi = self.low, self.high
        x = math.exp(math.log(lo) + fraction * (math.log(hi) - math.log(lo))) if self.log \
            else lo + fraction * (hi - lo)
        return str(round(x)) if field_kind(self.name) is int else f"{x:.3g}"


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # (refused as the setting's own error later)


def parse_dimension(text: str) -> Dimension:
    """``NAME=V1,V2,...`` or ``NAME=LOW..HIGH[:log][:COUNT]``; NAME is a `gpt train` flag
    (``n-layer``, ``--n-layer`` or ``n_layer``). Errors are one sentence."""
    name, sep, spec = text.partition("=")
    field = name.strip().lstrip("-").replace("-", "_")
    if not sep or not field:
        raise UserError(f"--set {text}: write NAME=VALUE,VALUE,... (e.g. --set lr=3e-4,1e-3) or "
                        "NAME=LOW..HIGH[:log][:COUNT]")
    if field not in TrainConfig.model_fields:
        close = difflib.get_close_matches(field, list(TrainConfig.model_fields), n=1)
        hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else \
            "; `gpt train --help` lists them"
        raise UserError(f"--set {text}: {name.strip()} is not a gpt train setting{hint}")
    if field in NOT_DIMENSIONS:
        raise UserError(f"--set {text}: {NOT_DIMENSIONS[field]}")
    flag = field.replace("_", "-")
    if ".." not in spec:
        values = tuple(v.strip() for v in spec.split(","))
        if not any(values):
            raise UserError(f"--set {text}: {flag} has no values; list them, e.g. "
                            f"{flag}=A,B,C")
        if "" in values:
            raise UserError(f"--set {text}: {flag} has an empty value (two commas in a row?)")
        seen: dict = {}
        for v in values:
            key = _number(v) if field_kind(field) in (int, float) else v
            if key in seen:
                twice = v if seen[key] == v else f"{seen[key]} and {v} are one value"
                raise UserError(f"--set {text}: {twice} listed twice; every value is one point "
                                "(--seeds N repeats each with other seeds)")
            seen[key] = v
        return Dimension(field, values, text=text)
    match = re.fullmatch(r"(.+?)\.\.([^:]+)((?::[^:]*)*)", spec.strip())
    options = match.group(3).split(":")[1:] if match else []
    try:
        low, high = float(match.group(1)), float(match.group(2))
        count = [int(o) for o in options if o != "log"]
    except (AttributeError, ValueError):
        raise UserError(f"--set {text}: a range is LOW..HIGH, optionally :log and :COUNT "
                        f"(e.g. {flag}=1e-4..1e-2:log:5)") from None
    log = "log" in options
    if field_kind(field) not in (int, float):
        raise UserError(f"--set {text}: {flag} takes values, not a range; list them")
    if low >= high or (log and low <= 0) or len(count) > 1 or any(c < 1 for c in count):
        raise UserError(f"--set {text}: a range needs LOW < HIGH (both above 0 on a log scale) "
                        "and at most one COUNT of 1 or more")
    return Dimension(field, low=low, high=high, log=log, count=count[0] if count else None,
                     text=text)


def expand(dims: list[Dimension], random_points: int | None, seed: int) -> list[dict[str, str]]:
    """The points' values (setting -> value as written): the grid of every dimension's values
    (the last one varying fastest), or ``random_points`` draws (seeded by ``seed``)."""
    if random_points is None:
        return [dict(zip((d.name for d in dims), combo))
                for combo in itertools.product(*(d.grid() for d in dims))]
    rng = random.Random(seed)
    return [{d.name: d.draw(rng) for d in dims} for _ in range(random_points)]


def point_name(index: int, total: int, values: dict[str, str], seed: int | None) -> str:
    """A point's folder name: its index, then its settings (and seed) as written."""
    parts = [f"{k.replace('_', '-')}={re.sub(r'[^A-Za-z0-9.+-]', '-', v)}"
             for k, v in values.items()]
    parts += [f"seed={seed}"] if seed is not None else []
    return "_".join([f"{index:0{max(2, len(str(total - 1)))}d}", *parts])


# ----------------------------------------------------------------------------- budgets

@dataclass(frozen=True)
class Budget:
    """The same budget for every point: ``tokens`` or ``flops`` (each point's steps follow from
    its tokens per step and FLOPs per token) or ``time`` (seconds: --max-time)."""

    kind: str
    amount: float


def parse_budget(text: str) -> Budget:
    kind, _, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if kind not in BUDGETS or not math.isfinite(value) or value <= 0:
        raise UserError(f"--budget {text}: write tokens=N, flops=N or time=SECONDS with N above "
                        "0 (e.g. --budget flops=3e13)")
    return Budget(kind, value)


def budget_steps(budget: Budget, tokens_per_step: int, flops_per_token: int) -> int:
    """Optimizer steps that spend ``budget`` (tokens or FLOPs), to the nearest step (at least
    one): tokens / tokens per step, or FLOPs / (tokens per step x FLOPs per token)."""
    per_step = tokens_per_step * (flops_per_token if budget.kind == "flops" else 1)
    return max(1, round(budget.amount / per_step))


def match_params(config: ModelConfig, target: int, solve: str) -> ModelConfig:
    """``config`` with the width (``solve="n_embd"``: a multiple of the head count, and of twice
    it for rope) or the depth (``"n_layer"``) whose parameter count is nearest ``target``."""
    step = config.n_head * (2 if config.position == "rope" else 1)
    if config.position == "sinusoidal" and step % 2:
        step *= 2

    def params(k: int) -> int:
        size = k * step if solve == "n_embd" else k
        return config.model_copy(update={solve: size}).num_params()

    lo, hi = 1, 2
    while params(hi) < target:  # the count grows with either: bracket the target, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(params(k) - target))
    return ModelConfig(**{**config.model_dump(), solve: best * step if solve == "n_embd" else best})


def train_flags(settings: dict) -> list[str]:
    """`gpt train` flags for TrainConfig settings (lists repeat their flag; a switch that is off
    by default is given only when on)."""
    args: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value or TrainConfig.model_fields[name].default is True:
                args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            args += [a for v in value for a in (flag, str(v))]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


# ----------------------------------------------------------------------------- the manifest

def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST


def is_sweep(folder: str | Path) -> bool:
    return manifest_path(folder).is_file()


def read_manifest(folder: str | Path) -> dict:
    path = manifest_path(folder)
    if not path.is_file():
        what = "does not exist" if not Path(folder).exists() else \
            f"is not a sweep folder (it has no {MANIFEST})"
        raise UserError(f"{folder} {what}; make one with gpt sweep --set NAME=A,B --out FOLDER")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a gptcli sweep manifest ({FORMAT})")
    return manifest


def write_manifest(folder: str | Path, manifest: dict) -> None:
    write_text(manifest_path(folder), json.dumps(manifest, indent=2), what="sweep manifest")


def point_folders(folder: str | Path) -> list[Path]:
    """The run folders of a sweep's points, in the manifest's order."""
    return [Path(folder) / p["run"] for p in read_manifest(folder)["points"]]


# ----------------------------------------------------------------------------- results

def finished(run: RunFolder, point: dict) -> bool:
    """Whether a point's run has spent its budget: its last checkpoint is at the run's last step
    (config.json's max_steps, which --epochs may have set), or its time (--max-time) is up."""
    from .checkpoint import read_safetensors

    if not run.has_state():
        return False
    step = int(read_safetensors(run.last, tensors=False)[1].get("step", 0))
    if step >= (run.read_config() or {}).get("max_steps", point["max_steps"]):
        return True
    if point.get("max_time"):
        state = read_safetensors(run.last_state, tensors=False)[1]
        return float(json.loads(state.get("elapsed", "0"))) >= point["max_time"]
    return False


def point_result(folder: Path, point: dict, failure: str | None = None) -> dict:
    """One point's figures, from its run folder alone: final and best validation loss,
    parameters, tokens and FLOPs trained, median tokens/s, measured peak memory, the memory
    estimate by part, training time, and its status."""
    from .bench import training_flops_per_token
    from .finetune import adapter_parameters
    from .models import run_memory

    run = RunFolder(folder / point["run"])
    records = list(read_records(run.metrics_path)) if run.metrics_path.is_file() else []
    config = run.read_config() or {}
    train = [r for r in records if r.get("train_loss") is not None and "step" in r]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    step = max((r["step"] for r in records if "step" in r), default=0)
    model = ModelConfig(**config["model"]) if config.get("model") else None
    train_cfg = config.get("train") or {}
    rank = train_cfg.get("lora_rank") or 0
    tokens = step * config.get("tokens_per_step", point["tokens_per_step"])
    speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    peaks = [r["peak_memory"] for r in train if r.get("peak_memory")]
    status = "finished" if finished(run, point) else f"failed: {failure}" if failure else \
        "running" if (run.path / LOCK).exists() else \
        f"stopped at step {step}" if records else "not started"
    return {"point": point["name"], "run": str(run.path), "settings": point["settings"],
            "seed": point["seed"], "status": status, "step": step,
            "max_steps": config.get("max_steps", point["max_steps"]),
            "val_loss": vals[-1] if vals else None, "best_val": min(vals, default=None),
            "train_loss": train[-1]["train_loss"] if train else None,
            "params": model.num_params() if model else point["params"], "tokens": tokens,
            "adapters": adapter_parameters(model, rank, train_cfg.get("lora_targets") or [])
            if model and rank else None,
            "flops": tokens * (training_flops_per_token(model) if model else
                               point["flops_per_token"]),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "peak_memory": max(peaks, default=None),
            "elapsed": train[-1].get("elapsed") if train else None,
            "memory": run_memory(run) if config else None}


def results(folder: str | Path) -> dict:
    """The sweep's table: every point's figures (best validation loss first), and the points
    grouped by settings (the seeds of one setting together: mean and standard deviation)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    failed = manifest.get("failed", {})
    points = [point_result(folder, p, failed.get(p["name"])) for p in manifest["points"]]
    points.sort(key=_by_loss)
    groups: dict[str, list[dict]] = {}
    for row in points:
        groups.setdefault(json.dumps(row["settings"], sort_keys=True), []).append(row)
    summary = [_group(rows) for rows in groups.values()]
    summary.sort(key=_by_loss)
    return {"sweep": str(folder), "varied": manifest["varied"],
            "derived": manifest.get("derived", []), "seeds": manifest["seeds"],
            "budget": manifest.get("budget"), "points": points, "groups": summary}


def _by_loss(row: dict) -> tuple:
    return (row["val_loss"] is None or not math.isfinite(row["val_loss"]), row["val_loss"] or 0)


def _group(rows: list[dict]) -> dict:
    """Points that differ only in their seed: the mean (and spread) of their figures."""
    losses = [r["val_loss"] for r in rows if r["val_loss"] is not None and
              r["status"] == "finished"]

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.fmean(values) if values else None

    return {"settings": rows[0]["settings"], "points": [r["point"] for r in rows],
            "seeds": len(rows), "finished": len(losses),
            "val_loss": statistics.fmean(losses) if losses else None,
            "val_std": statistics.stdev(losses) if len(losses) > 1 else None,
            "params": rows[0]["params"], "adapters": rows[0]["adapters"],
            "tokens": mean("tokens"), "flops": mean("flops"),
            "tokens_per_s": mean("tokens_per_s"), "elapsed": mean("elapsed"),
            "peak_memory": max((r["peak_memory"] for r in rows if r["peak_memory"]), default=None),
            "memory": rows[0]["memory"], "status": sorted({r["status"] for r in rows})}


CSV_FIELDS = ("point", "seed", "status", "step", "max_steps", "val_loss", "best_val",
              "train_loss", "params", "adapters", "tokens", "flops", "tokens_per_s", "peak_memory",
              "elapsed")
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "estimate")


def to_csv(table: dict) -> str:
    """One line per point: its varied settings, its figures and its memory estimate by part."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*table["varied"], *CSV_FIELDS, *(f"memory_{p}" for p in MEMORY_PARTS),
                     "run"])
    for row in table["points"]:
        memory = row["memory"] or {}
        writer.writerow([row["settings"].get(k) for k in table["varied"]] +
                        [row[k] for k in CSV_FIELDS] + [memory.get(p) for p in MEMORY_PARTS] +
                        [row["run"]])
    return out.getvalue()
