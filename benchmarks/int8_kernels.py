"""Every inference kernel on GPT-2 124M's weight shapes: what ``gptcli.tuning`` measures when
it chooses, shown whole.

For each projection shape (12 layers of it, random weights) and the 50257 x 768 output matrix,
each mode's candidates are timed with ``tuning.measure`` (the same code the choice runs: a
read of ``tuning.flush_buffer``'s size before every pass, here as for a model too large for
the cache (twice the last-level cache the CPU reports, at most 1 GiB), alternating candidates,
the fastest of three rounds), at 1 and 4 rows.

    python benchmarks/int8_kernels.py                  # every mode
    python benchmarks/int8_kernels.py --modes int8 --rows 1
"""

from __future__ import annotations

import argparse
import os

import torch

from gptcli import hardware
from gptcli.kernels import candidates
from gptcli.quantize import BITS, _reference, _storage
from gptcli.tuning import flush_buffer, measure

SHAPES = [(768, 2304, 12), (768, 768, 12), (768, 3072, 12), (3072, 768, 12), (768, 50257, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["float", "half", "int8", "int4"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"{hardware.cpu_model()} ({' '.join(hardware.isa_flags())}), torch {torch.__version__}, "
          f"{threads} threads, load {os.getloadavg()[0]:.2f}; µs per layer, weights read from "
          "memory")
    g = torch.Generator().manual_seed(0)
    for n_in, n_out, layers in SHAPES:
        weights = [torch.randn(n_in, n_out, generator=g) * 0.02 for _ in range(layers)]
        bias = None if n_out == 50257 else torch.zeros(n_out)
        for mode in args.modes:
            if mode == "int4" and n_out == 50257:
                continue  # gptcli keeps the output matrix int8
            storages = [_storage(mode, w, bias) for w in weights]
            bits = BITS[mode] or 32
            flush = flush_buffer(10 ** 9)  # the whole model never fits in the cache
            for rows in args.rows:
                us, skipped = measure(candidates(mode), storages,
                                      _reference(mode, storages[0]), rows, torch.float32,
                                      threads, flush)
                best = min(us, key=us.get)
                gbs = n_in * n_out * bits / 8 / us[best] / 1e3
                print(f"{n_in}x{n_out} {mode} {rows} row(s): " + ", ".join(
                    f"{k} {v:,.0f}" for k, v in sorted(us.items(), key=lambda kv: kv[1]))
                    + f"  -> {best}, {gbs:.1f} GB/s" + (f"; not run: {', '.join(skipped)}"
                                                       if skipped else ""), flush=True)


if __name__ == "__main__":
    main()
