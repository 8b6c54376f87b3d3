"""Check downloaded GPT-2 weights against the GPT-2 paper: perplexity with `gpt eval`.

Needs internet (the Hugging Face Hub). Downloads the model with `gpt download`, gets a
WikiText-style text file, scores it with `gpt eval --json` and prints gptcli's token-level
perplexity plus a word-level perplexity, the unit of the paper's table:

    117M (our `gpt2`, 124M): WikiText-2 29.41, WikiText-103 37.50, LAMBADA 35.13

Usage:
    python benchmarks/eval_pretrained.py --wikitext 2              # needs pyarrow
    python benchmarks/eval_pretrained.py --data wiki.test.raw      # any text file
    python benchmarks/eval_pretrained.py --wikitext 103 --model gpt2-medium --stride 512

The numbers will not match the paper exactly: the paper applies invertible de-tokenizers to
WikiText and reports per-word perplexity over the original tokens, while `gpt eval` scores the raw
text with GPT-2's BPE in sliding windows. A smaller --stride gives each token more context and
a lower perplexity (slower). The word-level figure converts the total loss in nats to a
per-word average: exp(loss * scored_tokens / whitespace_words).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

PAPER = {  # GPT-2 paper, Table 3, smallest model (117M)
    "wikitext-2": 29.41,
    "wikitext-103": 37.50,
    "lambada": 35.13,
}
WIKITEXT_FILES = {
    "2": "wikitext-2-raw-v1/test-00000-of-00001.parquet",
    "103": "wikitext-103-raw-v1/test-00000-of-00001.parquet",
}


def gpt(*args: str) -> str:
    """Run the `gpt` CLI (this checkout's) and return its stdout; stop on failure."""
    cmd = [sys.executable, "-m", "gptcli", *args]
    print("$ gpt " + " ".join(args), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return result.stdout


def wikitext(version: str) -> Path:
    """The raw WikiText-{2,103} test split as one text file in gptcli's dataset store."""
    from huggingface_hub import hf_hub_download

    home = Path(os.environ.get("GPTCLI_HOME") or Path.home() / ".cache" / "gptcli")
    out = home / "datasets" / f"wikitext-{version}-raw-test" / "test.txt"
    if out.is_file():
        return out
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("--wikitext needs pyarrow (pip install pyarrow), or pass --data FILE")
    parquet = hf_hub_download("Salesforce/wikitext", WIKITEXT_FILES[version],
                              repo_type="dataset")
    lines = pq.read_table(parquet).column("text").to_pylist()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")  # each row is one line with its newline
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="model name for `gpt download`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wikitext", choices=sorted(WIKITEXT_FILES), help="WikiText test split")
    source.add_argument("--data", type=Path, help="a text file to score")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens scored per window (default: the window length)")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    gpt("download", args.model)
    data = wikitext(args.wikitext) if args.wikitext else args.data
    flags = ["--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype]
    if args.stride:
        flags += ["--stride", str(args.stride)]
    if args.context_length:
        flags += ["--context-length", str(args.context_length)]
    result = json.loads(gpt("eval", "--model", args.model, "--data", str(data), "--json", *flags))

    words = len(data.read_text(encoding="utf-8").split())
    word_ppl = math.exp(result["loss"] * result["tokens"] / max(1, words))
    report = {"model": args.model, "data": str(data), "tokens": result["tokens"], "words": words,
              "loss": result["loss"], "token_perplexity": result["perplexity"],
              "word_perplexity": word_ppl, "bits_per_byte": result["bits_per_byte"],
              "stride": result.get("stride"), "context_length": result.get("context_length")}
    if args.wikitext:
        report["paper_word_perplexity_117M"] = PAPER[f"wikitext-{args.wikitext}"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
