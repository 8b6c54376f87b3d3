"""Running a sweep's points (``sweep_plan.py`` plans them): each unfinished point as a
`gpt train --resume auto` process, several side by side with --jobs, stopped cleanly on Ctrl-C.

Points run as processes, not in this one: each has its own threads, its own peak memory (the
RSS measured on CPUs), its own Ctrl-C handling (finish the step, save) and its own run-folder
lock, exactly as a `gpt train` typed by hand, or run by a job scheduler from
``--print-commands``; a `kill -9` of the sweep takes its points with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .runs import RunFolder, read_records
from .sweep import LOGS, finished, write_manifest
from .sweep_plan import argv

PROCESS_BASE = 512 * 2 ** 20  # what a `gpt train` process holds besides its model
POLL_S = 0.5


@dataclass
class Outcome:
    finished: int  # points finished, before and now
    total: int
    ran: int  # points started by this call
    failed: dict[str, str]
    stopped_by: str | None = None
    seconds: float = 0.0  # this call's wall time
    point_seconds: float = 0.0  # the wall time of its points' processes, added up


def run_points(folder: Path, manifest: dict, *, jobs: int, progress) -> Outcome:
    """Run the unfinished points, up to ``jobs`` at a time, each with 1/jobs of the CPU threads
    (the cores, or $OMP_NUM_THREADS when set); on a CPU a point starts only while the machine
    has memory for it. ``progress`` shows them.
    Ctrl-C (SIGINT) or SIGTERM is passed on to every running point (each finishes its step and
    saves), and no new point starts; a second one is passed on too (they stop at once)."""
    t0 = time.perf_counter()
    points = manifest["points"]
    todo = [p for p in points if not finished(RunFolder(folder / p["run"]), p)]
    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or _cores()  # split what there is
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // jobs))}
    progress.begin(total=len(points), todo=len(todo), jobs=jobs,
                   threads=env["OMP_NUM_THREADS"])
    running: dict[str, tuple[dict, subprocess.Popen, float]] = {}
    failed, ran, point_seconds = dict(manifest.get("failed", {})), 0, 0.0
    with Signals() as stop:
        while running or (todo and stop.count == 0):
            while todo and len(running) < jobs and stop.count == 0 and \
                    _room(todo[0], len(running)):
                point = todo.pop(0)
                running[point["name"]] = (point, _start(folder, manifest, point, env),
                                          time.perf_counter())
                ran += 1
                progress.started(point)
            stop.forward([proc for _, proc, _ in running.values()])
            _wait(running)
            for name, (point, proc, started) in list(running.items()):
                progress.update(point, _records(folder, point))
                if proc.poll() is None:
                    continue
                del running[name]
                point_seconds += time.perf_counter() - started
                why = _failure(folder, point, proc.returncode, stop.count)
                if why:
                    failed[name] = why
                else:
                    failed.pop(name, None)
                progress.ended(point, proc.returncode, why)
                if failed != manifest.get("failed", {}):
                    manifest["failed"] = dict(failed)
                    write_manifest(folder, manifest)
    progress.finish()
    done = sum(finished(RunFolder(folder / p["run"]), p) for p in points)
    return Outcome(done, len(points), ran, failed, stop.name, time.perf_counter() - t0,
                   point_seconds)


def _wait(running: dict) -> None:
    """Until the first running point ends, or POLL_S (to show progress and start the next
    point at once)."""
    if not running:
        return
    try:
        next(iter(running.values()))[1].wait(POLL_S)
    except subprocess.TimeoutExpired:
        pass


def _failure(folder: Path, point: dict, code: int, stopping: int) -> str | None:
    """Why a point's process failed (the last error line of its log), or None when it ended
    well or was stopped by us."""
    if code == 0 or (stopping and code in (130, 143, -2, -15)):
        return None
    log = folder / LOGS / f"{point['name']}.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else f"gpt train ended with status {code} (see {log})"


def _start(folder: Path, manifest: dict, point: dict, env: dict) -> subprocess.Popen:
    fresh = _fresh_start(RunFolder(folder / point["run"]))
    log = open(folder / LOGS / f"{point['name']}.log", "a")
    if fresh:
        log.write(f"note: {point['run']} cannot be resumed (stopped between two checkpoint "
                  "writes); starting it again\n")
        log.flush()
    try:
        return subprocess.Popen(argv(manifest, point, sys.executable, fresh), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    finally:
        log.close()  # the child has its own copy


def _die_with_parent(parent: int):
    """A point dies with the sweep (a `kill -9` of it, a crash): Linux's parent-death signal.
    Each point runs in a session of its own, so a Ctrl-C reaches the sweep alone, which passes
    it on once."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def set_signal() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before that took effect
            os._exit(1)

    return set_signal


def _room(point: dict, running: int) -> bool:
    """Whether another point fits beside those running (CPU memory; the first always starts,
    and `gpt train` checks its own fit)."""
    if not running or point["device"] != "cpu":
        return True
    import torch

    from .hardware import available_memory

    free = available_memory(torch.device("cpu"))
    return free is None or free >= point["memory"] + PROCESS_BASE


def _records(folder: Path, point: dict) -> list[dict]:
    path = folder / point["run"] / "metrics.jsonl"
    try:
        return list(read_records(path)) if path.is_file() else []
    except OSError:
        return []


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


class Signals:
    """Counts SIGINT/SIGTERM and passes each one on, once, to the running points."""

    def __init__(self) -> None:
        self.count, self.sent, self.signum, self._old = 0, 0, None, {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count, self.signum = self.count + 1, signum

    def forward(self, processes: list[subprocess.Popen]) -> None:
        while self.sent < self.count:
            self.sent += 1
            for proc in processes:
                if proc.poll() is None:
                    proc.send_signal(self.signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _fresh_start(run: RunFolder) -> bool:
    """A point's run folder that cannot be resumed (killed between the writes of a checkpoint:
    no training state beside it, or one from another step) is started again."""
    if not run.files() or run.never_saved():
        return False
    if not run.has_state():
        return True
    try:
        run.check_state_pair()
    except UserError:
        return True
    return False
