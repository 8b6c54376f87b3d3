"""Speculative decoding against plain decoding, on the same model, prompt and settings.

    python benchmarks/speculative.py --model runs/big --draft-model runs/draft
    python benchmarks/speculative.py --model preset:gpt2-large --draft-model preset:gpt2
    python benchmarks/speculative.py --model runs/big --draft-model runs/draft --quantize int8

``preset:NAME`` builds a model of that preset with random weights (GPT-2 vocabulary). Each round
decodes the prompt once without and once with the draft for every --draft-tokens (the order is
reversed every other round, since a shared machine's load drifts), through ``generate()``, as
`gpt generate` does. It reports decode tokens/s (after the first token) of both, the speed-up
(median of the rounds' ratios), and the share of draft tokens the model kept; greedy outputs
are checked to be the same tokens. The CPU's name, the thread count and the load average before
and after go with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from gptcli.config import ModelConfig, SampleConfig
from gptcli.generate import generate
from gptcli.model import GPT
from gptcli.quantize import prepare
from gptcli.speculative import Draft
from gptcli.tokenizer import GPT2Tokenizer


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load(name: str, seed: int, quantize: str | None = None):
    """A checkpoint in the inference layout `gpt generate` loads (``--quantize`` as there), or
    a preset's random model."""
    if name.startswith("preset:"):
        torch.manual_seed(seed)
        model = GPT(ModelConfig.from_preset(name.removeprefix("preset:"))).eval()
        prepare(model, quantize)
        return model, GPT2Tokenizer()
    from gptcli.models import load_model

    model, tokenizer, _ = load_model(name, device="cpu", dtype="float32", quantize=quantize)
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft-model", required=True)
    ap.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quantize", choices=["half", "int8", "int4"],
                    help="both models quantized, as `gpt generate --quantize` does")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    model, tokenizer = load(args.model, 0, args.quantize)
    draft_model, draft_tokenizer = load(args.draft_model, 1, args.quantize)
    assert draft_tokenizer.spec() == tokenizer.spec(), "the draft must share the tokenizer"
    ids = tokenizer.encode(args.prompt)
    load_before = os.getloadavg()
    rows = []
    for temperature in args.temperature:
        config = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=temperature,
                              seed=args.seed, ignore_eos=True)
        generate(model, tokenizer, ids, config.model_copy(update={"max_new_tokens": 4}))  # warm
        plain, spec = [], {k: [] for k in args.draft_tokens}
        for r in range(args.rounds):
            runs = [None, *args.draft_tokens]
            for k in (runs if r % 2 == 0 else runs[::-1]):
                draft = None if k is None else Draft(draft_model, k)
                samples, stats = generate(model, tokenizer, ids, config, draft=draft)
                record = (stats.decode_tokens_per_s, stats.acceptance_rate, samples[0].token_ids)
                (plain if k is None else spec[k]).append(record)
        for k, got in spec.items():
            if temperature == 0:
                assert all(g[2] == plain[0][2] for g in got), "greedy tokens differ"
            rows.append({
                "temperature": temperature, "draft_tokens": k,
                "plain_tokens_per_s": statistics.median(p[0] for p in plain),
                "speculative_tokens_per_s": statistics.median(g[0] for g in got),
                "speed_up": statistics.median(g[0] / p[0] for g, p in zip(got, plain)),
                "acceptance_rate": statistics.mean(g[1] for g in got)})
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "model": args.model, "draft_model": args.draft_model, "quantize": args.quantize,
              "model_parameters": model.num_params(), "draft_parameters": draft_model.num_params(),
              "prompt_tokens": len(ids), "new_tokens": args.max_new_tokens,
              "rounds": args.rounds, "results": rows, "when": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{args.model} ({model.num_params() / 1e6:,.1f}M) with draft {args.draft_model} "
          f"({draft_model.num_params() / 1e6:,.1f}M), {args.quantize or 'float32'}, on "
          f"{result['cpu']}, {result['threads']} "
          f"threads, load average {load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}")
    print(f"{'temperature':>11} {'K':>2} {'plain tok/s':>11} {'draft tok/s':>11} "
          f"{'speed-up':>8} {'accepted':>8}")
    for row in rows:
        print(f"{row['temperature']:>11} {row['draft_tokens']:>2} "
              f"{row['plain_tokens_per_s']:>11.1f} {row['speculative_tokens_per_s']:>11.1f} "
              f"{row['speed_up']:>7.2f}x {row['acceptance_rate']:>8.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
