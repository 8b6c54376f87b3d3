"""Decoding speed on a CPU: gptcli against llama.cpp and transformers, same random GPT-2 124M
weights, in alternating rounds on one machine.

Every measurement is its own process, and the rounds alternate the variants so that a busy
machine hits them alike; the 1-minute load average is recorded before each one, and the CPU's
model name and instruction-set flags (lscpu's) head the output.

- gptcli: ``gpt bench --model FILE --only generate [--quantize half|int8|int4] --batch-size 4
  --json``: the real decode loop (`gpt generate`'s), batch 1 and 4, kernels as chosen (and
  cached) on this machine. FILE is made once from the Hugging Face folder with ``gpt download
  DIR --out FILE``. Modes named in ``--compiled`` are also timed with ``--compile`` (a
  compiled step; ``gpt bench`` leaves its compile time out of the figure), those named in
  ``--inductor`` with ``--compile --kernel inductor`` (the weights frozen into the compiled
  step, inductor's own products).
- llama.cpp: ``llama-bench -m gpt2-<type>.gguf -p 0 -n 128 -r 1`` (tg128, one sequence) for
  f32, f16, q8_0 and q4_0, and ``llama-batched-bench -npp 16 -ntg 128 -npl 4`` for 4 sequences
  where that tool is built. Without a llama-bench (``--llama-bench`` / ``$LLAMA_BENCH``), the
  llama.cpp columns are left out with a note.
- transformers: ``GPT2LMHeadModel.generate`` (greedy, float32, its default attention):
  (n - 1) / (t_n - t_1) tokens/s per sequence, times the batch.

All decode 128 new tokens (gptcli and transformers after a 16-token prompt), with the same
threads. The quality of each gptcli mode is its top-1 agreement with float32, teacher-forced
over 512 positions of the bundled Shakespeare (``generate_vs_transformers.agreement``).

``--isa avx2`` runs gptcli and transformers as on a CPU with AVX2 but no AVX-512 (most laptops):
gptcli's C built with ``-mno-avx512f -mno-avxvnni`` (``$CC``), torch's own kernels at AVX2
(``ATEN_CPU_CAPABILITY``), oneDNN's too (``ONEDNN_MAX_CPU_ISA``), kernels chosen afresh in a
store of their own; fbgemm cannot be held back (it reads the CPU itself). Give it a llama.cpp
built the same way (``cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
-DGGML_AVX512=OFF``). The memory is still this machine's.

    python benchmarks/decode_vs_llamacpp.py --hf-dir /work/llamacpp/gpt2-random \\
        --gguf-dir /work/llamacpp/gguf --llama-bench /work/llamacpp/src/build/bin/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF = {"float32": "f32", "half": "f16", "int8": "q8_0", "int4": "q4_0"}
HF_SCRIPT = r"""
import json, statistics, sys, time, torch
from transformers import GPT2LMHeadModel
torch.set_num_threads(int(sys.argv[3]))
m = GPT2LMHeadModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
batch, n = int(sys.argv[2]), 128
ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(batch, 1)
def gen(k):
    t = time.perf_counter()
    with torch.inference_mode():
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                   do_sample=False, num_beams=1, pad_token_id=50256)
    return time.perf_counter() - t
gen(8)
t1, tn = statistics.median(gen(1) for _ in range(3)), gen(n)
print(json.dumps({"tokens_per_s": batch * (n - 1) / (tn - t1)}))
"""


def load() -> float:
    return round(os.getloadavg()[0], 2)


def lscpu() -> dict:
    from gptcli.hardware import cpu_model, isa_flags

    return {"model_name": cpu_model(), "isa_flags": isa_flags(), "cores": os.cpu_count()}


def run_json(cmd: list[str], env: dict | None = None) -> dict | list:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {out.stderr.strip()[-400:]}")
    text = out.stdout.strip()
    return json.loads(text if text.startswith("[") else text.splitlines()[-1])


ISA_ENV: dict[str, str] = {}  # what --isa sets for gptcli and transformers (main)


def held_back(isa: str, work: Path) -> dict[str, str]:
    """The environment that keeps gptcli and torch to ``isa`` (see the module docstring)."""
    if isa != "avx2":
        return {}
    return {"CC": f"{os.environ.get('CC', 'cc')} -mno-avx512f -mno-avxvnni",
            "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "GPTCLI_HOME": str(work / "home-avx2")}


def gptcli_variant(checkpoint: Path, quantize: str | None, threads: int, compile: bool = False,
                   kernel: str | None = None):
    def measure() -> dict[int, float]:
        cmd = [sys.executable, "-m", "gptcli", "bench", "--model", str(checkpoint), "--device",
               "cpu", "--only", "generate", "--batch-size", "4", "--prompt-length", "16",
               "--max-new-tokens", "128", "--steps", "3", "--warmup", "1", "--json"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **ISA_ENV)
        result = run_json(cmd + (["--quantize", quantize] if quantize else [])
                          + (["--compile"] if compile else [])
                          + (["--kernel", kernel] if kernel else []), env)
        measure.kernels = result.get("kernels")
        return {g["batch_size"]: g["decode_tokens_per_s"] for g in result["generate"]}
    return measure


def llamacpp_variant(bench: Path, gguf: Path, threads: int, batched: Path | None = None):
    """llama-bench for one sequence, llama-batched-bench (``batched``, default: beside
    llama-bench) for 4; a batched run that fails (a build whose AMX code dies with an illegal
    instruction in a VM, say) leaves batch 4 out with a note (``measure.note``)."""
    given, batched = batched is not None, batched or bench.with_name("llama-batched-bench")

    def measure() -> dict[int, float]:
        rows = run_json([str(bench), "-m", str(gguf), "-p", "0", "-n", "128", "-r", "1", "-t",
                         str(threads), "-o", "json"])
        out = {1: rows[0]["avg_ts"]}
        measure.note = None
        if not batched.exists():
            measure.note = f"no {batched} here: no batch 4" if given else None
        else:
            done = subprocess.run([str(batched), "-m", str(gguf), "-c", "1024", "-npp", "16",
                                   "-ntg", "128", "-npl", "4", "-t", str(threads)],
                                  capture_output=True, text=True, timeout=1800)
            # the table's last row: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s
            lines = done.stdout.strip().splitlines()
            cells = [c.strip() for c in lines[-1].strip("|").split("|")] if lines else []
            if done.returncode == 0 and len(cells) >= 8 and re.fullmatch(r"[\d.]+", cells[7]):
                out[4] = float(cells[7])
            else:
                measure.note = f"{batched.name} failed (exit {done.returncode}): no batch 4"
        return out
    return measure


def hf_variant(hf_dir: Path, threads: int):
    def measure() -> dict[int, float]:
        return {b: run_json([sys.executable, "-c", HF_SCRIPT, str(hf_dir), str(b),
                             str(threads)], dict(os.environ, **ISA_ENV))["tokens_per_s"]
                for b in (1, 4)}
    return measure


def quality(checkpoint: Path) -> dict[str, str]:
    """Top-1 agreement of each gptcli mode with float32 (teacher-forced)."""
    import copy

    sys.path.insert(0, str(Path(__file__).parent))
    from generate_vs_transformers import agreement

    from gptcli.models import load_weights
    from gptcli.quantize import prepare

    plain = load_weights(checkpoint)[0].eval()
    out = {}
    for mode in ("half", "int8", "int4"):
        model = copy.deepcopy(plain)
        prepare(model, mode)
        out[mode] = agreement(plain, model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", type=Path, default=Path("/work/llamacpp/gpt2-random"))
    ap.add_argument("--gguf-dir", type=Path, default=Path(os.environ.get(
        "LLAMACPP_GGUF", "/work/llamacpp/gguf")), help="gpt2-{f32,f16,q8_0,q4_0}.gguf")
    ap.add_argument("--llama-bench", type=Path, default=os.environ.get("LLAMA_BENCH") or
                    shutil.which("llama-bench"), help="llama.cpp's llama-bench ($LLAMA_BENCH)")
    ap.add_argument("--llama-batched-bench", type=Path, default=None,
                    help="llama.cpp's llama-batched-bench for batch 4 (default: beside "
                         "llama-bench); another build's where this one's fails")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--modes", nargs="+", default=list(GGUF))
    ap.add_argument("--compiled", nargs="*", default=[], choices=list(GGUF),
                    help="modes also timed with --compile (its compile time left out)")
    ap.add_argument("--inductor", nargs="*", default=[], choices=list(GGUF),
                    help="modes also timed with --compile --kernel inductor")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: as on a CPU without AVX-512 (see above)")
    ap.add_argument("--out", type=Path, help="write every figure here as JSON")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="decode-vs-llamacpp-"))
    ISA_ENV.update(held_back(args.isa, work))
    checkpoint = work / "gpt2-random.safetensors"
    subprocess.run([sys.executable, "-m", "gptcli", "download", str(args.hf_dir), "--out",
                    str(checkpoint)], check=True, capture_output=True)
    variants = {}
    for mode in args.modes:
        variants[f"gptcli {mode}"] = gptcli_variant(
            checkpoint, None if mode == "float32" else mode, args.threads)
        if mode in args.compiled:
            variants[f"gptcli {mode} compiled"] = gptcli_variant(
                checkpoint, None if mode == "float32" else mode, args.threads, compile=True)
        if mode in args.inductor:
            variants[f"gptcli {mode} inductor"] = gptcli_variant(
                checkpoint, None if mode == "float32" else mode, args.threads, compile=True,
                kernel="inductor")
        gguf = args.gguf_dir / f"gpt2-{GGUF[mode]}.gguf"
        if args.llama_bench and Path(args.llama_bench).exists() and gguf.exists():
            variants[f"llama.cpp {GGUF[mode]}"] = llamacpp_variant(
                Path(args.llama_bench), gguf, args.threads, args.llama_batched_bench)
    if not args.no_transformers:
        variants["transformers float32"] = hf_variant(args.hf_dir, args.threads)
    header = {**lscpu(), "threads": args.threads, "torch": _version("torch"),
              "transformers": _version("transformers"), "llama_bench": str(args.llama_bench),
              "llama_batched_bench": str(args.llama_batched_bench or "(beside llama-bench)"),
              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "isa": args.isa}
    print(json.dumps(header))
    if not any(k.startswith("llama.cpp") for k in variants):
        print("note: llama.cpp's llama-bench not found (--llama-bench or $LLAMA_BENCH), or no "
              "GGUF files in --gguf-dir: its columns are left out")
    figures = {name: {"runs": [], "loads": []} for name in variants}
    for r in range(args.rounds):
        for name, measure in variants.items():
            before = load()
            t0 = time.time()
            try:
                tps = measure()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"round {r + 1} {name}: failed ({e})")
                continue
            figures[name]["runs"].append(tps)
            figures[name]["loads"].append(before)
            if getattr(measure, "kernels", None):
                figures[name]["kernels"] = measure.kernels
            print(f"round {r + 1} {name}: " + ", ".join(f"batch {b} {v:.1f}" for b, v in
                                                        tps.items())
                  + f" tokens/s (load {before}, {time.time() - t0:.0f} s)"
                  + (f"; {measure.note}" if getattr(measure, "note", None) else ""), flush=True)
    summary = summarize(figures)
    agreement = quality(checkpoint)
    print_table(summary, agreement, header)
    if args.out:
        args.out.write_text(json.dumps({"machine": header, "figures": figures,
                                        "summary": summary, "agreement": agreement}, indent=1))


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def summarize(figures: dict) -> dict:
    out = {}
    for name, f in figures.items():
        for batch in (1, 4):
            values = [run[batch] for run in f["runs"] if batch in run]
            if values:
                out[f"{name}|{batch}"] = {"median": statistics.median(values),
                                          "min": min(values), "max": max(values),
                                          "runs": values}
    return out


def print_table(summary: dict, agreement: dict, header: dict) -> None:
    held = " held back to AVX2 (--isa avx2)" if header.get("isa") == "avx2" else ""
    print(f"\n{header['model_name']} ({' '.join(header['isa_flags'])}){held}, "
          f"{header['threads']} threads; decode tokens/s, median (min-max) over rounds")
    print("| mode | batch | gptcli | llama.cpp | ratio | transformers | ratio | top-1 vs f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, gguf in GGUF.items():
        for variant, batch in ((v, b) for v in ("", " compiled", " inductor")
                              for b in (1, 4)):
            ours = summary.get(f"gptcli {mode}{variant}|{batch}")
            if ours is None:
                continue
            theirs = summary.get(f"llama.cpp {gguf}|{batch}")
            hf = summary.get(f"transformers float32|{batch}")
            cell = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else "-"
            ratio = lambda s: f"{ours['median'] / s['median']:.2f}x" if s else "-"
            print(f"| {mode}{variant} | {batch} | {cell(ours)} | {gguf}: {cell(theirs)} | "
                  f"{ratio(theirs)} | {cell(hf)} | {ratio(hf)} | "
                  f"{agreement.get(mode, '(reference)')} |")


if __name__ == "__main__":
    main()
