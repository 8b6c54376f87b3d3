"""The run folder: one owner for a training run's files.

``config.json`` (the resolved settings, the run id), ``metrics.jsonl`` (one JSON record per log
or evaluation), ``last.safetensors`` with ``last.state.safetensors`` (what a resume needs),
``best.safetensors``, ``step-N.safetensors`` snapshots, ``loss.png``, and ``.lock`` while a
process trains in it. The rules: a folder with files is never overwritten without ``force``; a
resume needs a last checkpoint and a training state from the same run and step; one process at a
time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import GptcliError, UserError, path_error
from .files import make_folder, process_alive, write_text

RUNS_DIR = Path("runs")  # where runs go by default, relative to the working folder
LOCK = ".lock"
RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "last.state.safetensors",
             "best.safetensors", "loss.png")
TENSORBOARD_DIR = "tensorboard"
# The checkpoint files of a run folder (and their int8 copies made by `gpt quantize`).
CHECKPOINT_NAME = re.compile(r"(best|last|step-\d+)(-int8)?")


def read_records(path: Path) -> Iterator[dict]:
    """The records of a metrics.jsonl file; a blank or cut-off line (a run killed mid-write) is
    skipped."""
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record


class RunLocked(UserError):
    pass


class RunFolder:
    """The files of one training run, at ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._locked = self._created = False

    @classmethod
    def default_for(cls, data: list[str] | None) -> RunFolder:
        """The folder a run goes to without ``--out``: ``runs/<name of its first data>``."""
        if not data:
            return cls(RUNS_DIR / "shakespeare")
        return cls(RUNS_DIR / (Path(data[0].rstrip("/")).stem.replace("--", "-") or "run"))

    @classmethod
    def holding(cls, checkpoint: str | os.PathLike) -> RunFolder | None:
        """The run folder a checkpoint file is in, or None when it is not in one."""
        run = cls(Path(checkpoint).parent)
        return run if run.config_path.is_file() else None

    def made(self, checkpoint: str | os.PathLike) -> bool:
        """Whether ``checkpoint`` is one of the files the run wrote (best, last, step-N, or an
        int8 copy of one), not another file someone put in the folder."""
        path = Path(checkpoint)
        return path.parent == self.path and bool(CHECKPOINT_NAME.fullmatch(path.stem))

    @staticmethod
    def all(runs_dir: str | os.PathLike = RUNS_DIR) -> list[RunFolder]:
        """The runs under ``runs_dir`` that have a checkpoint, least recently written first."""
        newest: dict[Path, float] = {}
        for p in Path(runs_dir).glob("*/*.safetensors"):
            if p.name in ("best.safetensors", "last.safetensors"):
                newest[p.parent] = max(newest.get(p.parent, 0.0), p.stat().st_mtime)
        return [RunFolder(p) for p in sorted(newest, key=newest.__getitem__)]

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # paths
    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def last_state(self) -> Path:
        return self.path / "last.state.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def snapshot(self, step: int) -> Path:
        return self.path / f"step-{step}.safetensors"

    def checkpoint(self) -> Path | None:
        """The checkpoint a command uses: best.safetensors, else last.safetensors."""
        for path in (self.best, self.last):
            if path.is_file():
                return path
        return None

    def has_state(self) -> bool:
        return self.last.is_file() and self.last_state.is_file()

    def files(self) -> list[Path]:
        """What is in the folder, less the lock."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name != LOCK)

    def never_saved(self) -> bool:
        """A run that stopped before its first checkpoint (a missing extra, a crash, a double
        Ctrl-C): the folder holds only what a run writes before it saves (its config, metrics,
        tracker logs, leftovers of an interrupted write), so starting it again loses nothing."""
        files = self.files()
        return bool(files) and all(
            p.name in (*RUN_FILES, TENSORBOARD_DIR, "wandb") or p.name.endswith(".tmp")
            for p in files) and not any(p.suffix == ".safetensors" for p in files)

    # the overwrite / resume rules
    def prepare(self, *, resume: str | None, force: bool) -> bool:
        """Check the folder before a run; returns True when the run resumes from it.

        ``resume`` is None (a fresh run), "yes" (must resume) or "auto" (resume if there is a
        state, else start fresh). A folder with files is never overwritten without ``force``,
        except one whose run stopped before its first checkpoint (``never_saved``): it is
        started again, with a note, whether or not ``resume`` was asked for.
        """
        if resume and self.has_state():
            self.check_state_pair()
            return True
        never_saved = self.never_saved()
        if resume == "yes" and not never_saved:
            raise UserError(f"nothing to resume in {self.path}: it has no last.safetensors with "
                            "its training state; start a new run without --resume")
        if never_saved:
            print(f"note: {self.path} holds a run that stopped before its first checkpoint; "
                  "starting it again", file=sys.stderr)
        files = self.files()
        if files and not (force or never_saved):
            raise UserError(f"run folder {self.path} already has files; pass --resume to "
                            "continue that run, --force to overwrite it, or --out to pick "
                            "another folder")
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for snap in self.path.glob("step-*.safetensors"):
            snap.unlink()
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)  # the old run's events
        shutil.rmtree(self.path / "wandb", ignore_errors=True)
        self.mkdir()
        return False

    def mkdir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"cannot use {self.path} as a run folder: it is a file; give --out "
                            "a folder")
        make_folder(self.path, "create run folder")

    def check_state_pair(self) -> None:
        """Refuse a last.safetensors and last.state.safetensors that do not belong together
        (another run, or another step: a crash between the two writes)."""
        from .checkpoint import read_safetensors

        _, model_meta = read_safetensors(self.last, tensors=False)
        _, state_meta = read_safetensors(self.last_state, tensors=False)
        model_step = _as_int(model_meta.get("step"))
        state_step = _as_int(state_meta.get("step"))
        model_run, state_run = model_meta.get("run_id"), _unquote(state_meta.get("run_id"))
        if model_run == state_run and model_step == state_step:
            return
        if model_run != state_run:
            newer = "last.safetensors" if model_meta.get("created", "") >= \
                _unquote(state_meta.get("created")) else "last.state.safetensors"
            why = f"they come from different runs ({model_run} and {state_run})"
        else:
            newer = "last.safetensors" if (model_step or 0) > (state_step or 0) else \
                "last.state.safetensors"
            why = f"they are from different steps ({model_step} and {state_step})"
        raise UserError(f"cannot resume {self.path}: last.safetensors and last.state.safetensors "
                        f"do not belong together: {why}, and {newer} is newer; start again with "
                        "--force, or fine-tune from a checkpoint with --init-from")

    # one process at a time
    def lock(self) -> None:
        """Take the folder's lock: a file holding our PID and host, which appears whole or not
        at all (written beside it, then hard-linked into place, which fails if a lock exists).
        A lock left by a process that no longer runs on this host, or one that cannot be read
        (left empty by a writer of an older gptcli that died, e.g. on a full disk), is taken
        over, with a note."""
        self._created = not self.path.exists()
        self.mkdir()
        path = self.path / LOCK
        tmp = self.path / f".lock.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise path_error(e, "lock run folder", self.path) from None
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    holder = _read_lock(path)
                    if not _is_stale(holder):
                        raise RunLocked(
                            f"run folder {self.path} is in use by process {holder['pid']} on "
                            f"{holder.get('host')} (lock file {path}); wait for it to finish, or "
                            "pick another --out") from None
                    why = f"left by process {holder['pid']}, which is no longer running" \
                        if holder else "which is empty or unreadable (its writer died)"
                    print(f"note: taking over the lock of {self.path}, {why}", file=sys.stderr)
                    path.unlink(missing_ok=True)
                    continue
                except OSError as e:
                    raise path_error(e, "lock run folder", self.path) from None
                self._locked = True
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise RunLocked(f"run folder {self.path} was locked by another process just now; pick "
                        "another --out")

    def unlock(self) -> None:
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False
            if self._created and not any(self.path.iterdir()):  # e.g. a refused --resume
                self.path.rmdir()

    def __enter__(self) -> RunFolder:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    # config.json
    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except ValueError:
            return None

    def write_config(self, config: dict[str, Any]) -> None:
        write_text(self.config_path, json.dumps(config, indent=2), what="run config")

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields the run was trained with ({} when unknown)."""
        return dict((self.read_config() or {}).get("train") or {})

    def tokenizer_spec(self) -> dict | None:
        return (self.read_config() or {}).get("tokenizer")

    def settings(self) -> dict[str, Any]:
        """Every setting of the run, flat: the TrainConfig fields and ``model.<field>``."""
        config = self.read_config() or {}
        return {**config.get("train", {}),
                **{f"model.{k}": v for k, v in config.get("model", {}).items()}}

    # metrics.jsonl
    def records(self) -> list[dict]:
        if not self.metrics_path.is_file():
            raise UserError(f"{self.path} is not a run folder (it has no metrics.jsonl)")
        return list(read_records(self.metrics_path))

    def losses(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(step, train loss) and (step, validation loss) pairs, from metrics.jsonl."""
        records = self.records()
        return ([(r["step"], r["train_loss"]) for r in records
                 if r.get("train_loss") is not None and "step" in r],
                [(r["step"], r["val_loss"]) for r in records
                 if r.get("val_loss") is not None and "step" in r])

    def open_metrics(self, resume_step: int | None) -> MetricsLog:
        return MetricsLog(self.metrics_path, resume_step)


class MetricsLog:
    """Appends one JSON record per line; on resume, first forgets what came after the saved
    state (those steps are trained again), rewriting the file atomically. A write that fails
    (a full disk) is one sentence naming the file; the checkpoints are untouched by it."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.note = f"the checkpoints in {path.parent} are intact"
        if resume_step is not None and path.is_file():
            kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
            try:
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept),
                           what="metrics file")
            except GptcliError as e:
                raise type(e)(f"{e}; {self.note}") from None
        try:
            self.file = open(path, "a", buffering=1)
        except OSError as e:
            raise path_error(e, "write metrics to", path, note=self.note) from None

    def write(self, **record) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise path_error(e, "write metrics to", self.path, note=self.note) from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the line that could not be written was reported when it failed
            pass


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _read_lock(path: Path) -> dict:
    """The lock's holder ({"pid", "host"}), or {} when the file is empty or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def _is_stale(holder: dict) -> bool:
    """A lock whose process is gone (only decidable on the same host), or one without a
    readable holder: locks appear whole (``RunFolder.lock``), so nobody is writing it now."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    return not process_alive(holder["pid"])


def _as_int(value) -> int | None:
    try:
        return int(_unquote(value))
    except (TypeError, ValueError):
        return None


def _unquote(value):
    """Training-state metadata is JSON-encoded; checkpoint metadata is plain strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
