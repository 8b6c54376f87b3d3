"""Generation speed: gptcli's decode loop against transformers' generate, same weights, one process.

Random GPT-2 (124M) weights are loaded into transformers.GPT2LMHeadModel and, through gptcli's
Hugging Face key map, into gptcli's GPT. Both generate greedily from the same 16-token prompt,
alternating runs, and the tokens are checked to be identical. Figures are tokens per second over
the whole call (prefill + decode), as a user sees them.

    python benchmarks/generate_vs_transformers.py              # float32, CPU, 128 new tokens
    python benchmarks/generate_vs_transformers.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptcli.config import SampleConfig
from gptcli.hub import config_from_hf, state_dict_from_hf
from gptcli.model import GPT
from gptcli.runtime import resolve_device, resolve_dtype, synchronize
from gptcli.sampling import decode_loop


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile gptcli's one-token step")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config()
    hf = transformers.GPT2LMHeadModel(hf_config).eval().to(device=device, dtype=dtype)
    config = config_from_hf(hf_config.to_dict())
    ours = GPT(config)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config), strict=False)
    ours = ours.eval().to(device=device, dtype=dtype)
    step = torch.compile(ours, mode="reduce-overhead" if device.type == "cuda" else None) \
        if args.compile else None
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=device)
    n = args.new_tokens
    sample = SampleConfig(max_new_tokens=n, temperature=0)

    def run_ours():
        return [t.item() for t in decode_loop(ours, prompt, sample, step=step)]

    @torch.no_grad()
    def run_hf():
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones_like(prompt))
        return out[0, args.prompt_tokens:].tolist()

    run_ours(), run_hf()  # warm-up (and compilation)
    times: dict[str, list[float]] = {"gptcli": [], "transformers": []}
    tokens = {}
    for _ in range(args.rounds):
        for name, fn in (("gptcli", run_ours), ("transformers", run_hf)):
            synchronize(device)
            t = time.perf_counter()
            tokens[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    print(f"gpt2 (124M, random weights), {device} {str(dtype).replace('torch.', '')}, batch 1, "
          f"{args.prompt_tokens}-token prompt, {n} new tokens, greedy, threads "
          f"{torch.get_num_threads()}, transformers {transformers.__version__}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>12}: {n / med:7.1f} tokens/s ({med * 1000 / n:.1f} ms/token; runs "
              + ", ".join(f"{t:.2f}s" for t in ts) + ")")
    same = tokens["gptcli"] == tokens["transformers"]
    ratio = statistics.median(times["transformers"]) / statistics.median(times["gptcli"])
    print(f"identical tokens: {same}; gptcli speed / transformers speed = {ratio:.3f}")


if __name__ == "__main__":
    main()
