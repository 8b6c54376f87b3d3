"""Choosing kernels by measurement, once per machine: which of ``kernels.py``'s candidates is
fastest is never assumed.

For one weight shape and one number of rows, every kernel of the mode is packed with the
model's own weights (every layer of that shape) and timed over them: a warm-up call (which also
checks its result against a float64 product, dropping a kernel that misses its error bound),
then three rounds that alternate the candidates, each preceded by reading a buffer the size of
the model's weights (``flush_buffer``: what decoding reads between two reads of one layer's),
so that a layer's weights come from wherever decoding finds them; the fastest round of each
counts. The fastest kernel wins (or a more precise one within 3% of it: ``pick``), and the
choice is cached in ``$GPTCLI_HOME/kernels.json``, keyed by the CPU model, its instruction-set
flags, the thread count, the torch version (and ``LIMITS`` where set), the mode, the activation
dtype, the shape and the rows. An entry that cannot be read, or names a kernel this gptcli
does not have for that mode, is ignored and measured again, as is one measured on a saturated
machine once it is quieter, or one during which other programs kept this one's threads
waiting for a CPU (``lookup``, ``undisturbed``).
``GPTCLI_KERNEL`` (or ``--kernel``) forces one kernel, for debugging.

A layer holds its weights in one layout, so when it is prepared for several numbers of rows
(``gpt bench --batch-size 4``: 1 and 4) the layout is the one fastest over them together, and each
row count runs its fastest kernel of that layout (``layout_for``). A prompt's products (16 rows
and more, ``PROMPT_ROWS``) run the fastest kernel of that layout as precise as decoding's,
timed at 64 rows; some are for prompts only (oneDNN on weights made float32 for the call): on
an AMD EPYC, torch's F.linear (MKL) took 2.3-2.6x as long as oneDNN on the same weights.
The plain layouts (the model's own (in, out), nn.Linear's (out, in)) are always candidates, so
the choice is never slower than the plain model, as measured.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import hardware, native
from .kernel_layer import KernelLinear
from .kernels import KERNELS, Kernel, candidates
from .store import gptcli_home

CACHE_FORMAT = "gptcli-kernels/2"  # 2: timed after reading the model's size (flush_buffer)
ROUNDS = 3
SLACK = 0.03  # see pick
PROMPT_ROWS = 16  # a prompt's products (a batch's of more rows) run their own choice from here
PROMPT_TIMED = 64  # timed at this many rows, a prompt's (a 16-row timing favours the 1-row code)
FLUSH_MAX = 1 << 30
QUEUED_MAX = 0.1  # see undisturbed


@dataclass
class Choice:
    """The kernel chosen for a shape and a number of rows, and how: ``source`` is measured,
    cached or forced; ``us`` the candidates' microseconds per layer; ``skipped`` why some did
    not run."""

    kernel: Kernel
    source: str
    us: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    measured: dict = field(default_factory=dict)  # when and under what load
    prompt: bool = False  # chosen for prompts (PROMPT_ROWS rows and more), not decoding

    def as_dict(self) -> dict:
        return {"kernel": self.kernel.name, "source": self.source, "us": self.us,
                "skipped": self.skipped, **self.measured, **({"prompt": True} if self.prompt
                                                              else {})}


# ----------------------------------------------------------------------------- the cache

# what holds torch's and oneDNN's kernels to less than the CPU has, or builds gptcli's C another
# way: part of the key where set, so that a choice measured without them is not taken with them
LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CC")


def machine() -> dict:
    """What a measurement holds for: the CPU, its instruction set, threads, torch, the kernels'
    code (and ``LIMITS`` where set)."""
    limits = {name: os.environ[name] for name in LIMITS if os.environ.get(name)}
    return {"cpu": hardware.cpu_model(), "flags": hardware.isa_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "code": code(),
            **({"limits": limits} if limits else {})}


CODE = ("native.c", "native.py", "kernels.py", "kernel_layer.py", "native_step.py")  # in HERE
HERE = Path(__file__).parent


@functools.cache
def code() -> str:
    """A fingerprint of the code that was timed (the kernels, the C products, how they are
    built and called, the C blocks): a gptcli whose kernels changed measures again rather than
    keep a choice made among others (the C bf16 product got 1.27x faster in one release, and
    cached choices would have gone on skipping it)."""
    digest = hashlib.sha256()
    for name in CODE:
        try:
            digest.update((HERE / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:12]


_announced = False  # (see announce)


def announce() -> None:
    """Say, once per process, that kernels are being measured: the first use of a model on a
    machine pauses for seconds (later ones read the cache), and should not look stuck to the
    person watching (on a terminal only: a pipe or a log gets what it always got)."""
    global _announced
    if not _announced and sys.stderr.isatty():
        _announced = True
        print(f"measuring which kernels are fastest on this CPU (once; kept in {cache_path()})",
              file=sys.stderr, flush=True)


def cache_path() -> Path:
    return gptcli_home() / "kernels.json"


def read_cache() -> list[dict]:
    """The cached entries; an unreadable or foreign file reads as none."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return []
    entries = data.get("entries")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def current_load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def lookup(entries: list[dict], key: dict, allowed: list[Kernel],
           load: float | None = None) -> Choice | None:
    """The cached choice for ``key``, if an entry holds one of the ``allowed`` kernels with
    figures that make sense; anything else counts as absent. So does an entry measured while
    the machine was saturated (load at least its CPU count) when it is now quieter by more than
    one, or one that other programs disturbed (``undisturbed``): such timings say more about
    the other programs than the kernels."""
    names = {k.name for k in allowed}
    for e in entries:
        us = e.get("us")
        if e.get("key") != key or e.get("kernel") not in names or not isinstance(us, dict):
            continue
        if not all(isinstance(v, (int, float)) and v > 0 for v in us.values()) or \
                untrusted(e, load):
            continue
        skipped = e.get("skipped") if isinstance(e.get("skipped"), dict) else {}
        when = {k: e[k] for k in ("measured_at", "load", "queued", "timed_rows") if k in e}
        return Choice(KERNELS[e["kernel"]], "cached", dict(us), dict(skipped), when)
    return None


def untrusted(entry: dict, load: float | None) -> bool:
    """Whether ``entry`` was measured on a saturated machine that is now quieter, or while
    other programs disturbed it (``undisturbed``): see ``lookup``."""
    then, queued = entry.get("load"), entry.get("queued")
    return (isinstance(then, (int, float)) and load is not None and
            then >= (os.cpu_count() or 1) and load < then - 1) or \
        (isinstance(queued, (int, float)) and queued >= QUEUED_MAX)


def undisturbed(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """``fn()`` (a measurement) and the time this process's threads waited for a CPU while it
    ran, as a share of its time (None where the system does not say). Where other programs
    kept them waiting ``QUEUED_MAX`` of it or more, ``fn`` runs once more: a thread kept off
    the CPU for a time slice turns a 20 us product into milliseconds (seen on a 2-core VM with
    a second process busy), and load averages, a minute behind, miss short bursts. What is
    still disturbed the second time is used and cached, but measured again next time."""
    for _ in range(2):
        t0, q0 = time.perf_counter(), hardware.queued_ns()
        out = fn()
        q1 = hardware.queued_ns()
        queued = None if q0 is None or q1 is None else \
            round(max(0, q1 - q0) / 1e9 / max(time.perf_counter() - t0, 1e-9), 3)
        if queued is None or queued < QUEUED_MAX:
            break
    return out, queued


def when(load: float | None, queued: float | None) -> dict:
    """How a measurement was made, as its cache entry and ``gpt bench`` hold it."""
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "load": load,
            **({"queued": queued} if queued is not None else {})}


def find(entries: list[dict], key: dict, fields: tuple[str, ...],
         load: float | None = None) -> dict | None:
    """The entry for ``key`` that holds ``fields`` (another measurement than the kernels':
    ``native_step.py``'s), or None; an untrusted one counts as absent, as in ``lookup``."""
    return next((e for e in entries if e.get("key") == key and all(f in e for f in fields)
                 and not untrusted(e, load)), None)


def remember(key: dict, choice: Choice) -> None:
    store(key, choice.as_dict())


def store(key: dict, record: dict) -> None:
    """Add (or replace) the entry for ``key``; written atomically. A store that cannot be
    written only costs measuring again next time."""
    entries = [e for e in read_cache() if e.get("key") != key]
    entries.append({"key": key, **record})
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- measuring

def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def bound_for(kernel: Kernel, dtype: torch.dtype) -> float:
    """A kernel's error bound with activations in ``dtype`` (bf16 models round every product)."""
    return max(kernel.tolerance, 4 * torch.finfo(dtype).eps)


def packed_layer(kernel: Kernel, storage: dict, rows: int, threads: int) -> KernelLinear:
    layer = KernelLinear.from_storage(kernel.mode, storage)
    layer.use({rows: kernel}, threads, storage)
    return layer


def measure(kernels: list[Kernel], storages: list[dict], reference: torch.Tensor, rows: int,
            dtype: torch.dtype, threads: int, flush: torch.Tensor | None,
            ) -> tuple[dict[str, float], dict[str, str]]:
    """Microseconds per layer of each kernel over ``storages`` (the layers of one shape) at
    ``rows`` rows, and why the others were skipped. ``reference`` is the first layer's weight
    (in, out) as the mode stores it, in float, for the error check."""
    n_in = reference.size(0)
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = storages[0].get("bias")
    exact = x.double() @ reference.double() + (0 if bias is None else bias.double())
    layers, skipped = {}, {}
    for kernel in kernels:
        try:
            packed = [packed_layer(kernel, s, rows, threads) for s in storages]
            with torch.no_grad():
                err = relative_error(kernel.run(x, packed[0]), exact)
        except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
            skipped[kernel.name] = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            continue
        bound = bound_for(kernel, dtype)
        if not err <= bound:
            skipped[kernel.name] = f"relative error {err:.1e} over its bound {bound:.1e}"
            continue
        layers[kernel.name] = (kernel, packed)
    us = {name: math.inf for name in layers}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, (kernel, packed) in layers.items():
                if flush is not None:
                    flush.sum()  # what decoding reads between two uses of these weights
                t0 = time.perf_counter()
                for layer in packed:
                    kernel.run(x, layer)
                us[name] = min(us[name], (time.perf_counter() - t0) / len(packed) * 1e6)
    return {k: round(v, 2) for k, v in us.items()}, skipped


def pick(us: dict[str, float]) -> str:
    """The fastest kernel, or the most precise one within ``SLACK`` of it: a few percent is
    within what timings vary by from one run to the next, while activations kept to 11 bits
    instead of 8 are worth having (in half mode: fp16 against bf16)."""
    fastest = min(us.values())
    near = [name for name, t in us.items() if t <= fastest * (1 + SLACK)]
    return min(near, key=lambda name: (KERNELS[name].tolerance, us[name]))


def flush_buffer(model_bytes: int) -> torch.Tensor | None:
    """What to read before each timing: decoding reads the rest of the model between two reads
    of one layer's weights, so a buffer of the model's size (no more than twice the last-level
    cache the CPU reports, nor 1 GiB; None for an empty model). A layer's weights then stay in
    the cache only where the whole model would. The size the CPU reports is no guide on its
    own: a 2-core VM on a Xeon reporting a 480 MiB cache read a 124 MB model from memory (its
    output matrix took 2.8 ms a token, not the 1.2 ms it took timed straight after a warm-up)."""
    size = model_bytes
    cache = hardware.cpu_cache_bytes()
    if cache:
        size = min(size, 2 * cache)
    size = min(size, FLUSH_MAX) // 4
    return torch.ones(size) if size > 0 else None


def choose(mode: str, storages: list[dict], reference: Callable[[], torch.Tensor],
           shape: tuple[int, int], rows: tuple[int, ...], dtype: torch.dtype, *,
           forced: str | None = None, model_bytes: int = 0) -> dict[int, Choice]:
    """The kernel for each row count in ``rows`` for layers of one ``shape`` (in, out)
    (``storages``; see ``kernels.py`` for what they hold; ``reference()`` gives the first one's
    weight (in, out) in float, for measuring). Every kernel of ``mode`` is measured (or read
    from the cache) at each row count; one layout is kept for them all (``layout_for``), and
    each row count runs its fastest kernel of that layout. Prompts get their own row count,
    ``PROMPT_ROWS``, where fewer are asked for: the fastest kernel of that layout (timed at
    ``PROMPT_TIMED`` rows) as precise as the largest batch's, which prompts ran before.
    ``forced`` names one kernel to use everywhere."""
    if forced is not None:
        return {m: Choice(KERNELS[forced], "forced") for m in rows}
    threads = torch.get_num_threads()
    # gptcli's own kernels only where their library builds: a choice cached when it did is not
    # taken where it no longer does (the candidates are part of the key), and gpt bench says why
    why = native.unavailable()
    allowed = [k for k in candidates(mode) if not (k.native and why)]
    unbuilt = {k.name: why for k in candidates(mode) if k.native and why}
    base = {**machine(), "mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape)}
    entries, flush = read_cache(), None  # (flush: read before each round, made at the first)

    def at(m: int, kernels: list[Kernel], timed: int | None = None) -> Choice | None:
        """The choice for ``m`` rows among ``kernels``, timed at ``timed`` rows (prompts:
        None where none runs), cached or measured."""
        nonlocal flush
        timed = timed or m
        # the candidates are part of the key: a gptcli with other kernels measures again
        key = {**base, "candidates": [k.name for k in kernels], "rows": m,
               **({"timed_rows": timed} if timed != m else {})}
        choice = lookup(entries, key, kernels, current_load())
        if choice is None:
            announce()
            if flush is None:
                flush = flush_buffer(model_bytes)
            load, weights = current_load(), reference()
            (us, skipped), queued = undisturbed(lambda: measure(kernels, storages, weights, timed,
                                                                dtype, threads, flush))
            if not us:
                if timed != m:
                    return None  # (prompts run the decoding kernels)
                raise RuntimeError(f"no {mode} kernel runs here: " + "; ".join(
                    f"{k}: {why}" for k, why in skipped.items()))
            choice = Choice(KERNELS[pick(us)], "measured", us, {**unbuilt, **skipped}, {
                **when(load, queued), **({"timed_rows": timed} if timed != m else {})})
            remember(key, choice)
        return choice

    decoding = [k for k in allowed if not k.prompt]  # (the prompt-only ones: below)
    measured = {m: at(m, decoding) for m in dict.fromkeys(rows)}
    layout = layout_for([c.us for c in measured.values()])
    out = {}
    for m, c in measured.items():
        # (none of that layout ran at this row count: its own fastest, in a second layout)
        own = fastest(c.us, layout, math.inf) or pick(c.us)
        out[m] = Choice(KERNELS[own], c.source, c.us, c.skipped, c.measured)
    # a prompt's rows: the fastest of the layout's kernels (those for prompts only among them)
    # as precise as the one prompts ran before, the largest batch's; the native layout's are
    # timed too, for where the C blocks take the layers over (native_step._switch)
    bound = out[max(rows)].kernel.tolerance
    native_layouts = {k.layout: k.tolerance for k in allowed if k.native and not k.prompt}
    timed = [k for k in allowed if (k.layout == layout and k.tolerance <= bound)
             or k.tolerance <= native_layouts.get(k.layout, -1.0)]
    prompts = at(PROMPT_ROWS, timed, PROMPT_TIMED) if max(rows) < PROMPT_ROWS and \
        len(timed) > 1 else None
    own = prompts and fastest(prompts.us, layout, bound)
    if own:
        out[PROMPT_ROWS] = replace(prompts, kernel=KERNELS[own], prompt=True)
    return out


def fastest(us: dict[str, float], layout: str, bound: float) -> str | None:
    """``pick`` among the kernels timed in ``us`` of ``layout`` within ``bound``, if any."""
    own = {n: t for n, t in us.items() if n in KERNELS and KERNELS[n].layout == layout
           and KERNELS[n].tolerance <= bound}
    return pick(own) if own else None


def layout_for(timings: list[dict[str, float]]) -> str:
    """The weight layout for layers that run at several row counts (``timings``: microseconds
    per kernel at each, the decoding batch first): the one whose fastest kernels take the least
    time summed over the row counts (a step at each), among layouts that run at all of them.
    The first row count's own choice keeps its layout unless another is more than ``SLACK``
    faster so summed: one row count alone decides as before."""
    def cost(layout: str) -> float:
        return sum(min((t for k, t in us.items() if KERNELS[k].layout == layout),
                       default=math.inf) for us in timings)

    first = KERNELS[pick(timings[0])].layout
    best = min(sorted({KERNELS[k].layout for k in timings[0]}), key=cost)  # ties: by name
    return first if cost(first) <= cost(best) * (1 + SLACK) else best
