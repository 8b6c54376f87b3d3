"""Load on `gpt serve`: N concurrent streaming clients, against `gpt generate` on the same model.

Starts `gpt serve` (a subprocess on a free 127.0.0.1 port) on a `gpt2`-preset checkpoint with
random weights (or --model), then for each N (default 1, 4, 8) runs N clients at once, each
streaming a 64-token completion of its own prompt (greedy). Reports aggregate tokens/s, median
and p95 time to first token, and the median time per token after the first. Then runs `gpt
generate` on the same model and prompt for its decode tokens/s (the server's overhead at N = 1).

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --clients 1 2 4 8 16 --tokens 128 --quantize int8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The history of the city begins with a small settlement by the river, where"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_once(port: int, prompt: str, tokens: int) -> dict:
    """One streaming request: when its chunks arrived, and how many tokens it got."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    stamps, usage = [], None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    conn.close()
    n = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - t0, "end": stamps[-1], "start": t0, "tokens": n,
            "per_token": (stamps[-1] - stamps[0]) / max(1, n - 1)}


def load(port: int, clients: int, tokens: int) -> dict:
    prompts = [f"{PROMPT} ({i})" for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda p: stream_once(port, p, tokens), prompts))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttfts = sorted(r["ttft"] for r in runs)
    return {"clients": clients, "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
            "ttft_median_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "per_token_ms": 1000 * statistics.median(r["per_token"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint (default: the gpt2 preset, random weights)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", default=None)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp())
    model = args.model
    if model is None:
        import torch

        from gptcli.checkpoint import save_checkpoint
        from gptcli.config import ModelConfig
        from gptcli.model import GPT
        from gptcli.tokenizer import GPT2Tokenizer

        torch.manual_seed(0)
        model = str(save_checkpoint(scratch / "gpt2.safetensors", GPT(ModelConfig()),
                                    GPT2Tokenizer()))
    quantize = ["--quantize", args.quantize] if args.quantize else []
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "--model", model,
                               "--port", str(port), "--max-batch", str(max(args.clients)),
                               "--device", "cpu", *quantize], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/health")
                break
            except OSError:
                time.sleep(0.2)
        stream_once(port, PROMPT, 8)  # warm-up
        results = [load(port, n, args.tokens) for n in args.clients]
    finally:
        server.terminate()
        server.communicate(timeout=60)
    gen = subprocess.run([sys.executable, "-m", "gptcli", "generate", "--model", model,
                          "--prompt", PROMPT, "--max-new-tokens", str(args.tokens),
                          "--temperature", "0", "--json", "--device", "cpu", *quantize],
                         capture_output=True, text=True, check=True)
    generate_tps = json.loads(gen.stdout)["stats"]["decode_tokens_per_s"]
    print(f"gpt serve on {model} ({args.quantize or 'float32'}), {args.tokens} tokens per "
          "request, greedy, streaming")
    base = results[0]
    for r in results:
        print(f"  {r['clients']:>2} clients: {r['tokens_per_s']:7.1f} tokens/s "
              f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x {base['clients']} client), "
              f"time to first token median {r['ttft_median_s'] * 1000:6.0f} ms "
              f"({r['ttft_median_s'] / base['ttft_median_s']:.1f}x), p95 "
              f"{r['ttft_p95_s'] * 1000:6.0f} ms, {r['per_token_ms']:.1f} ms per token")
    one = next((r for r in results if r["clients"] == 1), None)
    if one:
        served = 1000 / one["per_token_ms"]
        print(f"  one client decodes at {served:.1f} tokens/s; gpt generate at "
              f"{generate_tps:.1f} tokens/s: the server gets {served / generate_tps:.0%} of it")


if __name__ == "__main__":
    main()
