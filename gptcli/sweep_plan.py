"""Planning a sweep (``sweep.py`` says what one is): ``plan`` checks every point's settings
against TrainConfig, its model shape and the device's memory before anything runs, and works out
budgets and --match-params; ``prepare`` writes the manifest (or finds the same sweep there, to
resume it); ``commands`` gives each point's `gpt train` command, for a job scheduler or for
``sweep_run`` to run."""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, TrainConfig
from .errors import UserError, validation_message
from .sweep import (FORMAT, LOGS, Budget, budget_steps, expand, field_kind, is_sweep,
                    match_params, parse_budget, parse_dimension, point_name, read_manifest,
                    train_flags, write_manifest)


@dataclass
class Request:
    """What `gpt sweep` was asked: the `gpt train` flags given (TrainConfig fields) and the
    sweep's own options."""

    given: dict
    sets: list[str] = field(default_factory=list)
    random: int | None = None
    seeds: int = 1
    budget: str | None = None
    match_params: int | None = None
    nproc: int = 1
    config_file: Path | None = None
    out: Path | None = None
    print_only: bool = False  # --print-commands: the points run elsewhere


# ----------------------------------------------------------------------------- planning

def plan_or_resume(req: Request, *, jobs: int = 1) -> tuple[Path, dict, bool]:
    """The sweep to run: planned from ``req``, or, when ``req`` names only an existing sweep
    folder (no settings, no sweep options), that sweep as its manifest recorded it."""
    for name, value in (("--seeds", req.seeds), ("--jobs", jobs), ("--random", req.random),
                        ("--match-params", req.match_params), ("--nproc-per-node", req.nproc)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    bare = not (req.sets or req.given or req.budget or req.config_file) and req.seeds == 1 and \
        req.random is None and req.match_params is None and req.nproc == 1
    if bare and req.out is not None and is_sweep(req.out):
        return Path(req.out), read_manifest(req.out), True
    folder, manifest = plan(req)
    return folder, manifest, False


def plan(req: Request) -> tuple[Path, dict]:
    """The sweep folder and its manifest: every point's settings validated, its steps from the
    budget, its width or depth from --match-params. Errors are one sentence, before anything
    runs or is written."""
    dims = [parse_dimension(text) for text in req.sets]
    names = [d.name for d in dims]
    for d in dims:
        if names.count(d.name) > 1:
            raise UserError(f"--set {d.flag} is given twice; list all its values in one --set")
        if d.name in req.given:
            raise UserError(f"{d.flag} is given both as --{d.flag} and as --set {d.flag}=...; "
                            "give it once")
    if not dims and req.seeds < 2:
        raise UserError("nothing to sweep: give at least one --set NAME=A,B (e.g. --set "
                        "lr=3e-4,1e-3) or --seeds N")
    if req.random is not None and not dims:
        raise UserError("--random K draws points from the --set ranges; give at least one")
    budget = parse_budget(req.budget) if req.budget else None
    _check_budget(budget, set(names) | set(req.given))
    solve = _solving(req, set(names) | set(req.given))
    combos = expand(dims, req.random, _seed(req))
    folder = Path(req.out) if req.out else Path("sweeps") / ("-".join(d.flag for d in dims)
                                                              or "seeds")
    total, points = len(combos) * req.seeds, []
    shapes: dict = {}
    for values in combos:
        for s in range(req.seeds):
            seed = _seed(req) + s
            name = point_name(len(points), total, values, seed if req.seeds > 1 else None)
            points.append(_point(req, values, seed, folder / name, budget, solve, shapes))
    notes = _one_dtype(points) + _far_from(req.match_params, solve, points)
    return folder, {"notes": notes, "format": FORMAT, "varied": names + ([solve] if solve else []),
                    "derived": [solve] if solve else [],
                    "seeds": req.seeds, "random": req.random,
                    "budget": {"kind": budget.kind, "amount": budget.amount} if budget else None,
                    "match_params": req.match_params, "nproc": req.nproc, "points": points,
                    "failed": {}}


def _far_from(target: int | None, solve: str | None, points: list[dict]) -> list[str]:
    """A note for each point whose nearest size is more than 10% from --match-params: the
    count cannot get there (a vocabulary alone can outweigh it, or a width is too coarse)."""
    far = [p for p in points if target and abs(p["params"] - target) > 0.1 * target]
    return [f"point {p['name']}: --match-params {target:,} cannot be met; the nearest is "
            f"{p['params']:,} parameters (--{solve.replace('_', '-')} {p['settings'][solve]})"
            for p in far]


def _one_dtype(points: list[dict]) -> list[str]:
    """Points compared in different precisions are not a fair comparison: where ``--dtype
    auto`` would train some points in bfloat16 (wide models on a CPU with native bf16) and
    others in float32, every point trains in float32, with a note."""
    dtypes = sorted({p["dtype"] for p in points})
    if len(dtypes) < 2 or not all(p["dtype_auto"] for p in points):
        return []
    for p in points:
        p["argv"] += ["--dtype", "float32"]
        p["dtype"] = "float32"
    return [f"note: --dtype auto would train these points in {' and '.join(dtypes)} (by "
            "width); all train in float32 so they compare alike (give --dtype to choose)"]


def _seed(req: Request) -> int:
    """The first seed: --seed, the --config file's, or the default (read through the settings,
    which may be incomplete without a point's values)."""
    try:
        return _validated(req.given, req.config_file, "the sweep's flags").seed
    except UserError:
        return int(req.given.get("seed", TrainConfig.model_fields["seed"].default))


def _check_budget(budget: Budget | None, named: set[str]) -> None:
    if budget is None:
        return
    owned = ("max_steps", "epochs") if budget.kind != "time" else ("max_time",)
    for name in owned:
        if name in named:
            sets = "--max-steps" if budget.kind != "time" else "--max-time"
            raise UserError(f"--budget {budget.kind}=... sets each point's {sets}; leave "
                            f"--{name.replace('_', '-')} out")


def _solving(req: Request, named: set[str]) -> str | None:
    """Which of width and depth --match-params chooses: the one not set."""
    if req.match_params is None:
        return None
    given = [n for n in ("n_layer", "n_embd") if n in named]
    if len(given) != 1 or "init_from" in named:
        raise UserError("--match-params N chooses the width for each depth (--set n-layer=...) "
                        "or the depth for each width (--set n-embd=...): set exactly one of "
                        "them, on a new model")
    return "n_embd" if given == ["n_layer"] else "n_layer"


def _validated(explicit: dict, config_file: Path | None, where: str) -> TrainConfig:
    from pydantic import ValidationError

    from .run_settings import merge_config

    try:
        return merge_config(explicit, config_file, None)
    except ValidationError as e:
        raise UserError(f"{where}: {validation_message(e, flags=True)}") from None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _point(req: Request, values: dict[str, str], seed: int, run: Path, budget: Budget | None,
           solve: str | None, shapes: dict) -> dict:
    """One point of the manifest: its settings, budget and the `gpt train` flags that run it
    in its run folder ``run``."""
    from .bench import training_flops_per_token
    from .devices import resolve_device, resolve_dtype
    from .finetune import check_fits, memory_breakdown

    name = run.name
    where = f"point {name}"
    explicit = {**req.given, **{k: [v] if field_kind(k) is list else v
                                for k, v in values.items()}, "seed": seed}
    cfg = _validated(explicit, req.config_file, where)
    shape = _shape(cfg, where, shapes, tokenize_data=not req.print_only)
    if solve:
        shape = match_params(shape, req.match_params, solve)
        explicit[solve] = getattr(shape, solve)
        cfg = _validated(explicit, req.config_file, where)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * req.nproc * shape.context_length
    flops_per_token = training_flops_per_token(shape)
    if budget is not None and budget.kind == "time":
        explicit["max_time"] = budget.amount
    elif budget is not None:
        explicit["max_steps"] = budget_steps(budget, tokens_per_step, flops_per_token)
    explicit["out"] = str(run)
    cfg = _validated(explicit, req.config_file, where)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, train_width=shape.n_embd)  # as `gpt train` will
    try:
        check_fits(shape, cfg, device, dtype)  # as `gpt train` will, before anything runs
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    settings = {k: getattr(cfg, k) for k in (*values, *([solve] if solve else []))}
    return {"name": name, "run": name, "values": values, "settings": settings, "seed": seed,
            "max_steps": cfg.max_steps, "max_time": cfg.max_time,
            "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
            "params": shape.num_params(),
            "memory": sum(memory_breakdown(shape, cfg, dtype).values()), "device": device.type,
            "dtype": str(dtype).removeprefix("torch."), "dtype_auto": cfg.dtype == "auto",
            "argv": (["--config", str(Path(req.config_file).resolve())] if req.config_file
                     else []) + train_flags(explicit)}


def _shape(cfg: TrainConfig, where: str, shapes: dict, tokenize_data: bool) -> ModelConfig:
    """The model a point trains. Its vocabulary comes from its data, tokenized here once for
    every point that reads the same data (the points then find it in the token cache, rather
    than tokenizing it side by side); for points that run elsewhere (``tokenize_data`` off),
    only a char vocabulary is read from the data, GPT-2's is known."""
    from .display import NullDisplay
    from .distributed import Dist
    from .models import model_info
    from .tokenizer import get_tokenizer
    from .train import model_shape, tokenize

    if cfg.init_from:
        return ModelConfig(**model_info(cfg.init_from)[0]["config"])
    key = repr((cfg.data, cfg.tokenizer, cfg.preset, cfg.encoding, cfg.text_column,
                cfg.mask_prompt))
    gpt2 = cfg.tokenizer == "gpt2" or (cfg.tokenizer == "auto" and cfg.preset not in
                                       ("tiny", "small"))
    if key not in shapes:
        shapes[key] = get_tokenizer("gpt2").vocab_size if gpt2 and not tokenize_data else \
            tokenize(cfg, None, Dist(), NullDisplay()).tokenizer.vocab_size
    try:
        return model_shape(cfg, shapes[key])
    except ValueError as e:
        raise UserError(f"{where}: {validation_message(e)}") from None


# ----------------------------------------------------------------------------- the folder

def prepare(folder: Path, manifest: dict, *, force: bool) -> dict:
    """Write the manifest of a new sweep; find the same sweep again (resume it: its finished
    points are skipped); refuse another sweep, or other files, without ``force``."""
    if is_sweep(folder):
        old = read_manifest(folder)
        same = [(p["name"], p["argv"]) for p in old["points"]] == \
            [(p["name"], p["argv"]) for p in manifest["points"]]
        if same and not force:
            return {**manifest, "failed": old.get("failed", {})}
        if not force:
            raise UserError(f"{folder} holds another sweep (other points or settings); run its "
                            "own command again to resume it, pass --force to replace it, or "
                            "pick another --out")
        for p in old["points"]:
            shutil.rmtree(folder / p["run"], ignore_errors=True)
        shutil.rmtree(folder / LOGS, ignore_errors=True)
    elif folder.is_dir() and any(folder.iterdir()) and not force:
        raise UserError(f"{folder} already has files and is not a sweep folder; pick another "
                        "--out, or pass --force")
    write_manifest(folder, manifest)
    return manifest


def commands(manifest: dict, *, launcher: str = "gpt") -> list[str]:
    """One shell command per point: `gpt train ... --out RUN --resume auto` (under torchrun
    with --nproc-per-node), for a job scheduler; rerunning one resumes it."""
    return [shlex.join(argv(manifest, p, launcher)) for p in manifest["points"]]


def argv(manifest: dict, point: dict, launcher: str, fresh: bool = False) -> list[str]:
    """A point's command: ``launcher`` is "gpt" (as printed) or this interpreter (as run);
    ``fresh`` starts its run again instead of resuming it."""
    n = manifest.get("nproc", 1)
    head = ([launcher, "train"] if n == 1 else
            ["torchrun", "--standalone", "--nproc_per_node", str(n), "-m", "gptcli", "train"])
    if launcher != "gpt":  # run here: this interpreter
        head = [sys.executable, "-m", "gptcli", "train"] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", *head[1:]]
    return [*head, *point["argv"], *(["--force"] if fresh else ["--resume", "auto"])]
