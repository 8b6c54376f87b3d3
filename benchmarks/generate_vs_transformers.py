"""Generation speed: gptcli's decode loop against transformers' generate, same weights, one process.

Random GPT-2 (124M) weights are loaded into transformers.GPT2LMHeadModel and, through gptcli's
Hugging Face map, into gptcli's GPT. Each variant generates greedily from the same 16-token
prompt (repeated for batch > 1), alternating runs; figures are tokens per second over the whole
call (prefill + decode), as a user sees them, summed over the batch. Variants:

- transformers: ``GPT2LMHeadModel.generate`` (the reference, float);
- gptcli training layout: the model as built for training (what generate loaded before
  inference layouts existed);
- gptcli: the float inference layout ``gpt generate`` loads (``quantize.prepare``);
- gptcli int8: ``--quantize int8``.

Float variants must produce tokens identical to transformers'; int8 reports how many agree.

    python benchmarks/generate_vs_transformers.py                    # CPU, batch 1 and 4
    python benchmarks/generate_vs_transformers.py --device cuda --dtype bfloat16 --batch 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from gptcli.config import SampleConfig
from gptcli.hf import from_hf
from gptcli.model import GPT
from gptcli.quantize import prepare
from gptcli.devices import resolve_device, resolve_dtype, synchronize
from gptcli.decode import decode_loop


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config()
    hf = transformers.GPT2LMHeadModel(hf_config).eval().to(device=device, dtype=dtype)
    config, state = from_hf(hf_config.to_dict(), hf.state_dict())
    plain = GPT(config)
    plain.load_state_dict(state, strict=False)
    plain = plain.eval().to(device=device, dtype=dtype)
    variants = {"gptcli training layout": plain}
    variants["gptcli"] = copy.deepcopy(plain)
    prepare(variants["gptcli"], None)
    if device.type == "cpu":
        variants["gptcli int8"] = copy.deepcopy(plain)
        prepare(variants["gptcli int8"], "int8")
    n = args.max_new_tokens
    sample = SampleConfig(max_new_tokens=n, temperature=0)
    print(f"gpt2 (124M, random weights), {device} {str(dtype).removeprefix('torch.')}, "
          f"{args.prompt_tokens}-token prompt, {n} new tokens, greedy, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}")

    for batch in args.batch:
        prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens),
                               device=device).repeat(batch, 1)

        def ours(model):
            return lambda: torch.stack(list(decode_loop(model, prompt, sample)), 1).tolist()

        @torch.no_grad()
        def reference():
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))
            return out[:, args.prompt_tokens:].tolist()

        runs = {"transformers": reference, **{k: ours(m) for k, m in variants.items()}}
        times = {name: [] for name in runs}
        tokens = {name: fn() for name, fn in runs.items()}  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                synchronize(device)
                t0 = time.perf_counter()
                tokens[name] = fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["transformers"])
        print(f"batch {batch}:")
        for name, ts in times.items():
            med = statistics.median(ts)
            same = sum(a == b for ra, rb in zip(tokens[name], tokens["transformers"])
                       for a, b in zip(ra, rb)) / (batch * n)
            print(f"  {name:>24}: {batch * n / med:7.1f} tokens/s, {base / med:5.2f}x "
                  f"transformers; tokens equal to transformers': {same:.0%}  (runs "
                  + ", ".join(f"{t:.2f}s" for t in ts) + ")")


    if "gptcli int8" in variants:  # free-running tokens diverge at the first near-tie; this does not
        print("int8 against float32, teacher-forced: " + agreement(plain, variants["gptcli int8"]))


def agreement(reference, quantized, n: int = 512) -> str:
    """Top-1 agreement of the int8 model's logits with float32's at every position of n tokens
    of the bundled Shakespeare (the same input for both)."""
    from gptcli.data import bundled_corpus
    from gptcli.tokenizer import GPT2Tokenizer

    ids = torch.tensor([GPT2Tokenizer().encode(bundled_corpus().read_text()[:20000])[:n]])
    with torch.no_grad():
        a, b = reference(ids), quantized(ids)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rms = ((a - b).pow(2).mean().sqrt() / a.std()).item()
    return (f"top-1 equal at {same:.1%} of {n} positions; logit error RMS {rms:.1%} of the "
            "logits' spread")


if __name__ == "__main__":
    main()
