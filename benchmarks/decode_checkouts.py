"""Decoding speed of two gptcli checkouts on one machine, side by side: did a change make
decoding faster here?

Each measurement is ``python -m gptcli bench --model FILE --only generate --batch-size 4
--json`` (the real decode loop, kernels chosen by measurement in each checkout's own way) run in
its own process with ``PYTHONPATH`` set to the checkout, and the rounds alternate the checkouts
so that a busy machine hits both alike. Each checkout keeps its own kernel cache
($GPTCLI_HOME per checkout), so neither reads the other's choices.

    git worktree add /tmp/before HEAD~3
    python benchmarks/decode_checkouts.py --model g.safetensors --before /tmp/before \\
        --after . --modes float32 half int8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(checkout: Path, home: Path, model: Path, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "gptcli", "bench", "--model", str(model), "--device", "cpu",
           "--only", "generate", "--batch-size", "4", "--prompt-length", "16",
           "--max-new-tokens", "128", "--steps", "3", "--warmup", "1", "--json"]
    if mode != "float32":
        cmd += ["--quantize", mode]
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), GPTCLI_HOME=str(home),
               OMP_NUM_THREADS=str(threads))
    # run from the checkout: ``python -m`` puts the working folder first on sys.path, ahead of
    # PYTHONPATH, so run from elsewhere both sides would import the code found there
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         cwd=checkout.resolve()).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {g["batch_size"]: g["decode_tokens_per_s"] for g in result["generate"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a gptcli checkpoint")
    p.add_argument("--before", type=Path, required=True, help="a checkout (git worktree)")
    p.add_argument("--after", type=Path, default=Path("."))
    p.add_argument("--modes", nargs="+", default=["float32", "half", "int8"],
                   choices=["float32", "half", "int8", "int4"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.model = args.model.resolve()  # (each side runs from its own checkout)
    homes = {name: Path(tempfile.mkdtemp(prefix=f"gptcli-{name}-")) for name in ("before", "after")}
    checkouts = {"before": args.before, "after": args.after}
    for name, checkout in checkouts.items():  # each side really runs its own code
        found = subprocess.run([sys.executable, "-c", "import gptcli; print(gptcli.__file__)"],
                               capture_output=True, text=True, check=True, cwd=checkout.resolve(),
                               env=dict(os.environ, PYTHONPATH=str(checkout.resolve()))).stdout
        if checkout.resolve() not in Path(found.strip()).resolve().parents:
            sys.exit(f"{name}: python imports gptcli from {found.strip()}, not {checkout}")
    got: dict = {}
    for r in range(args.rounds):
        for mode in args.modes:
            for name, checkout in checkouts.items():
                figures = measure(checkout, homes[name], args.model, mode, args.threads)
                load = os.getloadavg()[0]
                for batch, tps in figures.items():
                    got.setdefault((mode, batch, name), []).append(tps)
                print(f"round {r + 1} {mode} {name}: " + ", ".join(
                    f"batch {b} {t:.1f}" for b, t in figures.items()) + f" (load {load:.2f})",
                    flush=True)
    print("| mode | batch | before | after | after / before (median of per-round ratios) |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        for batch in sorted({b for (m, b, _) in got if m == mode}):
            before, after = got[mode, batch, "before"], got[mode, batch, "after"]
            ratios = [a / b for a, b in zip(after, before)]
            print(f"| {mode} | {batch} | {statistics.median(before):.1f} "
                  f"({min(before):.1f}-{max(before):.1f}) | {statistics.median(after):.1f} "
                  f"({min(after):.1f}-{max(after):.1f}) | {statistics.median(ratios):.2f}× "
                  f"({', '.join(f'{x:.2f}' for x in ratios)}) |")


if __name__ == "__main__":
    main()
