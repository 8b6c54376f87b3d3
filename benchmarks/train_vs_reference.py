"""Training speed: gptcli's real train step against a plain PyTorch reference, in one process.

The reference is the textbook implementation (nanoGPT-style: one module, AdamW with default
kernels, no tricks) of exactly the same model and batch. The two are timed in alternating
blocks so that machine noise hits both alike; the ratio is what to quote.

    python benchmarks/train_vs_reference.py                 # tiny preset, char vocab, batch 12, ctx 64
    python benchmarks/train_vs_reference.py --compile       # also gptcli with torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.config import ModelConfig, TrainConfig
from gptcli.data import BatchSampler, load_tokens, resolve_data
from gptcli.model import GPT
from gptcli.optim import make_optimizer, train_step
from gptcli.devices import autocast


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.context_length, c.n_embd)
        self.blocks = nn.Sequential(*[RefBlock(c.n_embd, c.n_head) for _ in range(c.n_layer)])
        self.ln, self.head = nn.LayerNorm(c.n_embd), nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--context-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time gptcli with torch.compile")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    data = load_tokens(resolve_data(None), "char")
    tokens, _ = data.split(0.1)
    config = ModelConfig.from_preset(args.preset, vocab_size=data.tokenizer.vocab_size,
                                     context_length=args.context_length)
    cfg = TrainConfig(batch_size=args.batch_size, lr=1e-3, weight_decay=0.1, beta2=0.99)

    def gptcli_step(compile: bool):
        torch.manual_seed(0)
        model = GPT(config).train()
        optimizer = make_optimizer(model, cfg, device)
        runner = torch.compile(model) if compile else model
        sampler = BatchSampler(tokens, config.context_length, args.batch_size, seed=1)
        amp = autocast(device, torch.float32)
        return lambda: train_step(runner, optimizer, sampler.next_batch, grad_accum=1,
                                  grad_clip=1.0, amp=amp, scaler=None, device=device)

    torch.manual_seed(0)
    ref = RefGPT(config).train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ref_data = BatchSampler(tokens, config.context_length, args.batch_size, seed=1)

    def ref_step():
        x, y = ref_data.next_batch()
        loss = ref(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return loss.detach()

    contenders = {"gptcli": gptcli_step(False), "reference": ref_step}
    if args.compile:
        contenders["gptcli+compile"] = gptcli_step(True)
    warm = {}
    for name, fn in contenders.items():
        t = time.perf_counter()
        for _ in range(3):
            fn()
        warm[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = fn()
            loss.item()
            times[name].append((time.perf_counter() - t) / args.steps)
    tokens_per_step = args.batch_size * config.context_length
    print(f"preset {args.preset}, vocab {config.vocab_size}, batch {args.batch_size}, context "
          f"{config.context_length}, threads {torch.get_num_threads()}; warm-up (3 steps, incl. "
          "compile): " + ", ".join(f"{k} {v:.1f}s" for k, v in warm.items()))
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>14}: {med * 1000:6.1f} ms/step (min {min(ts) * 1000:.1f}, max "
              f"{max(ts) * 1000:.1f}), {tokens_per_step / med:8,.0f} tokens/s")
    for name in contenders:
        if name != "reference":
            ratio = statistics.median(times["reference"]) / statistics.median(times[name])
            print(f"{name} speed / reference speed = {ratio:.3f}")


if __name__ == "__main__":
    main()
