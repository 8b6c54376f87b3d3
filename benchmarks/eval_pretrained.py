"""Check downloaded GPT-2 weights against published figures: `gpt eval --task` on the benchmarks.

Needs internet once (the model and the task data come from the Hugging Face Hub, then work
offline). Downloads the model with `gpt download`, runs `gpt eval --task lambada --task hellaswag
--task wikitext-2 --task wikitext-103 --json`, and prints each figure next to the published one:

    python benchmarks/eval_pretrained.py                         # gpt2 (124M), every task
    python benchmarks/eval_pretrained.py --task hellaswag --quantize int8
    python benchmarks/eval_pretrained.py --model gpt2-medium --device cuda --limit 500

Published (GPT-2 124M): lm-evaluation-harness lambada_openai acc 32.56%, perplexity 40.06;
hellaswag acc 28.92%, acc_norm 31.14%. GPT-2 paper (Table 3, its own preprocessing and
detokenisation, so only roughly comparable): LAMBADA acc 45.99%, perplexity 35.13; WikiText-2
29.41; WikiText-103 37.50 (word-level perplexity).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PUBLISHED = {  # gpt2 (124M); see the docstring for the sources
    ("lambada", "acc"): "32.56% (harness), 45.99% (paper)",
    ("lambada", "perplexity"): "40.06 (harness), 35.13 (paper)",
    ("hellaswag", "acc"): "28.92% (harness)",
    ("hellaswag", "acc_norm"): "31.14% (harness)",
    ("wikitext-2", "word_perplexity"): "29.41 (paper)",
    ("wikitext-103", "word_perplexity"): "37.50 (paper)",
}


def gpt(*args: str) -> str:
    """Run the `gpt` CLI (this checkout's) and return its stdout; stop on failure."""
    print("$ gpt " + " ".join(args), file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, "-m", "gptcli", *args], stdout=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return result.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", help="a name for `gpt download`")
    ap.add_argument("--task", action="append",
                    choices=["lambada", "hellaswag", "wikitext-2", "wikitext-103"])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantize")
    args = ap.parse_args()

    gpt("download", args.model)
    flags = ["--batch-size", str(args.batch_size), "--device", args.device]
    for task in args.task or ["lambada", "hellaswag", "wikitext-2", "wikitext-103"]:
        flags += ["--task", task]
    if args.limit:
        flags += ["--limit", str(args.limit)]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    tasks = json.loads(gpt("eval", "--model", args.model, "--json", *flags))["tasks"]
    for name, result in tasks.items():
        print(f"{name} ({result['items']:,} items, {result['seconds']:.0f} s):")
        for metric, value in result["metrics"].items():
            if metric in ("tokens", "words", "bytes"):
                continue
            shown = f"{value:.2%}" if metric.startswith("acc") else f"{value:,.2f}"
            print(f"  {metric:>16}: {shown:>10}   published: "
                  f"{PUBLISHED.get((name, metric), '-')}")


if __name__ == "__main__":
    main()
