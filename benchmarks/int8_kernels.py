"""Batch-1 matrix products on the CPU: why gptcli's inference layouts are what they are.

For each of GPT-2 124M's projection shapes (and the 50257 x 768 output matrix), many distinct
weight matrices are multiplied in turn, so the weights come from memory as in a real decode
step, not from cache. Compared, in one process:

- float32 ``x @ W`` with W (in, out) (the training layout) and ``F.linear`` with W (out, in);
- float32 ``bmm`` over one chunk of W's outputs per thread (gptcli's float inference layout);
- int8 ``torch._int_mm`` with W stored (out, in) and (in, out), at 1 and 2 rows, and two 1-row
  products back to back (gptcli's int8 layout: two activation parts at batch 1);
- ``torch.ao``'s deprecated dynamic int8 linear (fbgemm), and ``torch._weight_int8pack_mm``.

    python benchmarks/int8_kernels.py
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from gptcli.quantize import chunked, chunked_matmul

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]


def per_call_us(fn, items, repeats: int = 5) -> float:
    def once() -> float:
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(repeats)) / len(items) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megabytes", type=int, default=200, help="float32 weights per shape")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notice
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; microseconds per product, weights "
          "read from memory")
    for n_in, n_out in SHAPES:
        copies = max(2, args.megabytes * 2 ** 20 // (n_in * n_out * 4))
        weights = [torch.randn(n_in, n_out) * 0.02 for _ in range(copies)]  # (in, out)
        rows = [w.t().contiguous() for w in weights]  # (out, in)
        packed = [chunked(w, threads) for w in weights]
        q_rows = [torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8) for _ in weights]
        q_cols = [q.t().contiguous() for q in q_rows]
        x = torch.randn(1, n_in)
        x1 = torch.randint(-127, 128, (1, n_in), dtype=torch.int8)
        x2 = torch.randint(-127, 128, (2, n_in), dtype=torch.int8)
        scales = torch.rand(n_out) + 0.5
        figures = {
            "f32 x@W(in,out)": per_call_us(lambda w: x @ w, weights),
            "f32 linear(out,in)": per_call_us(lambda w: F.linear(x, w), rows),
            "f32 bmm chunks": per_call_us(lambda p: chunked_matmul(x, p, n_out), packed),
            "i8 (out,in) 1 row": per_call_us(lambda q: torch._int_mm(x1, q.t()), q_rows),
            "i8 (in,out) 1 row": per_call_us(lambda q: torch._int_mm(x1, q), q_cols),
            "i8 (out,in) 2 rows": per_call_us(lambda q: torch._int_mm(x2, q.t()), q_rows),
            "i8 (in,out) 2 rows": per_call_us(lambda q: torch._int_mm(x2, q), q_cols),
            "i8 (out,in) 2x1 row": per_call_us(
                lambda q: (torch._int_mm(x1, q.t()), torch._int_mm(x1, q.t())), q_rows),
            "i8 int8pack_mm": per_call_us(
                lambda q: torch._weight_int8pack_mm(x, q, scales), q_rows[:2]),
        }
        try:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            layers = []
            for w in rows[:8]:
                linear = torch.nn.Linear(n_in, n_out, bias=False)
                linear.weight.data = w
                linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                layers.append(DynamicLinear.from_float(linear))
            figures["i8 torch.ao dynamic"] = per_call_us(lambda layer: layer(x), layers)
        except Exception as e:  # noqa: BLE001 - it is deprecated and may be gone
            figures["i8 torch.ao dynamic"] = float("nan")
            print(f"  (torch.ao dynamic linear unavailable: {e})")
        print(f"{n_in} -> {n_out}: " + ", ".join(f"{k} {v:,.0f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
