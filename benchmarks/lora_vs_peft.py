"""LoRA training step: gptcli against Hugging Face peft on the same GPT-2, in one process.

gptcli's side is what `gpt train --init-from BASE --lora-rank R` builds: ``train.setup`` (the real
setup: the base checkpoint loaded, adapters added by ``finetune.add_adapters``, AdamW, autocast)
and ``optim.train_step``. Full fine-tuning is the same setup without ``--lora-rank``. peft's side
is ``transformers.GPT2LMHeadModel`` holding the same base weights (``hf.to_hf``), wrapped by
``peft.get_peft_model`` with the same rank, alpha, dropout and targets (``c_attn``, ``c_proj``
(attention and MLP), ``c_fc``), and stepped by the same ``optim.train_step`` (same loss, AdamW,
clipping) on the same batches: only the model and its adapters differ. Both start from B = 0, so
their first losses must agree (checked).

Timing: warm-up steps, then rounds; each round times every contender for ``--steps`` steps, in
an order that alternates from round to round, so load on the machine hits all alike. Per-step
medians and the ratio are what to quote. Peak memory is measured apart, one fresh process per
contender (``--only NAME``: the process's maximum resident set size, and its growth over the
model alone).

Also reported: trainable parameters and the LoRA checkpoint's size (``Session.save``, what a run
writes) as fractions of the base model and its file.

    python benchmarks/lora_vs_peft.py                                  # gpt2 (random weights), batch 4 x 256
    python benchmarks/lora_vs_peft.py --preset gpt2 --batch-size 8 --context 128 --rounds 5
    python benchmarks/lora_vs_peft.py --base gpt2                      # a downloaded model's weights
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONTENDERS = ("gptcli-lora", "peft-lora", "gptcli-full")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would include the parent's peak before the
    exec, the same figure for every contender)."""
    import torch

    from gptcli.hardware import peak_memory

    return peak_memory(torch.device("cpu")) / 2**20


def make_base(args, folder: Path) -> Path:
    """The base checkpoint: --base, else a randomly initialised preset saved as a checkpoint."""
    from gptcli.checkpoint import save_checkpoint
    from gptcli.config import ModelConfig
    from gptcli.model import GPT
    from gptcli.models import resolve_model
    from gptcli.tokenizer import GPT2Tokenizer

    if args.base:
        return resolve_model(args.base)
    path = folder / f"{args.preset}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, GPT(ModelConfig.from_preset(args.preset)), GPT2Tokenizer(),
                        source="benchmarks/lora_vs_peft.py (random weights)")
    return path


def gptcli_session(args, base: Path, folder: Path, rank: int):
    """What `gpt train --init-from BASE [--lora-rank R]` sets up, on the bundled corpus."""
    from gptcli.config import TrainConfig
    from gptcli.runs import RunFolder
    from gptcli.train import setup

    cfg = TrainConfig(init_from=str(base), tokenizer="gpt2", lora_rank=rank,
                      lora_alpha=args.alpha, lora_targets=args.targets,
                      batch_size=args.batch_size, device="cpu", dtype="float32",
                      sample_interval=0, workers=1, seed=args.seed)
    run = folder / f"run-{'lora' if rank else 'full'}"
    run.mkdir(parents=True, exist_ok=True)
    return setup(cfg, RunFolder(run), resume=False, display=None)


def peft_model(args, base: Path):
    """GPT2LMHeadModel with the base's weights, wrapped in peft LoRA of the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcli.checkpoint import load_checkpoint, model_tensors
    from gptcli.hf import to_hf
    from gptcli.lora import TARGETS

    model, tokenizer, _ = load_checkpoint(base)
    hf_config, tensors = to_hf(model.config, model_tensors(model), eot_id=tokenizer.eot_id)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in hf_config.items()
                                       if k != "architectures"}))
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and all(m == "lm_head.weight" or m.endswith(".attn.bias")
                                  for m in missing), (missing, unexpected)
    hf.tie_weights()
    names = sorted({TARGETS[t].split(".")[-1] for t in args.targets})  # c_proj: attn and mlp
    if set(args.targets) != set(TARGETS):
        raise SystemExit("peft's c_proj matches both attention's and the MLP's output "
                         "projections: compare with all four --targets")
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                        target_modules=names, fan_in_fan_out=True, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(hf, config).train(), model


class LogitsOnly(torch.nn.Module):
    """A transformers model as ``train_step`` calls models: ids in, logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits


def steppers(args, names, base: Path, folder: Path) -> dict:
    """name -> (model, optimizer, parts) for ``optim.train_step``."""
    from gptcli.config import TrainConfig
    from gptcli.optim import step_parts

    out = {}
    for name in names:
        if name == "peft-lora":
            model, _ = peft_model(args, base)
            runner = LogitsOnly(model)
            cfg = TrainConfig(device="cpu", dtype="float32")  # same AdamW settings as gpt train
            parts = step_parts(runner, cfg, torch.device("cpu"), torch.float32)
            out[name] = (runner, parts)
        else:
            s = gptcli_session(args, base, folder, args.rank if name == "gptcli-lora" else 0)
            out[name] = (s.runner, s.parts, s)
    return out


def one_step(entry, batch) -> float:
    from gptcli.optim import train_step

    runner, parts = entry[0], entry[1]
    x, y = batch
    result = train_step(runner, parts.optimizer, lambda: (x, y), grad_accum=1, grad_clip=1.0,
                        amp=parts.amp, scaler=parts.scaler, device=torch.device("cpu"))
    return float(result.loss)


def batches(args, vocab: int, n: int) -> list:
    g = torch.Generator().manual_seed(args.seed)
    return [(lambda t: (t[:, :-1], t[:, 1:]))(
        torch.randint(0, vocab, (args.batch_size, args.context + 1), generator=g))
        for _ in range(n)]


def sizes(args, base: Path, folder: Path, entry) -> dict:
    """Trainable parameters and the LoRA checkpoint's file size against the base's."""
    from gptcli.lora import trainable_parameters

    s = entry[2]
    path = folder / "lora.safetensors"
    s.save(path, None)
    trained = trainable_parameters(s.model)
    frozen = sum(p.numel() for p in {id(p): p for p in s.model.parameters()}.values()) - trained
    return {"trainable": trained, "base_parameters": frozen,
            "trainable_fraction": trained / frozen, "adapter_bytes": path.stat().st_size,
            "base_bytes": base.stat().st_size,
            "adapter_fraction": path.stat().st_size / base.stat().st_size}


def memory_only(args, name: str, base: Path, folder: Path) -> dict:
    """One contender alone in this process: RSS with the model built, then peak over steps."""
    entry = steppers(args, [name], base, folder)[name]
    ready = rss_mib()
    for batch in batches(args, 50257, args.warmup + 2):
        one_step(entry, batch)
    return {"name": name, "rss_ready_mib": round(ready), "peak_rss_mib": round(peak_rss_mib()),
            "step_growth_mib": round(peak_rss_mib() - ready)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--base", help="a checkpoint or downloaded model instead of random weights")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["qkv", "attn-out", "mlp-in", "mlp-out"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory")
    p.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    own = tempfile.TemporaryDirectory() if args.folder is None else None
    folder = args.folder or Path(own.name)
    base = make_base(args, folder)
    if args.only:
        print(json.dumps(memory_only(args, args.only, base, folder)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load "
          f"{os.getloadavg()[0]:.1f}; base {base.name}", file=sys.stderr)
    entries = steppers(args, CONTENDERS, base, folder)
    data = batches(args, 50257, args.warmup + args.rounds * args.steps)
    first = {name: one_step(entries[name], data[0]) for name in CONTENDERS}  # warm-up 1
    assert abs(first["gptcli-lora"] - first["peft-lora"]) < 1e-3 * abs(first["gptcli-lora"]), \
        first  # the same model before any update: the same loss
    for batch in data[1:args.warmup]:
        for name in CONTENDERS:
            one_step(entries[name], batch)
    times = {name: [] for name in CONTENDERS}
    cpu = {name: [] for name in CONTENDERS}
    rest = data[args.warmup:]
    for r in range(args.rounds):
        order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            for batch in rest[r * args.steps:(r + 1) * args.steps]:
                t, c = time.perf_counter(), time.process_time()
                one_step(entries[name], batch)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    median = {name: statistics.median(v) for name, v in times.items()}
    cpu_median = {name: statistics.median(v) for name, v in cpu.items()}
    result = {"preset": args.preset, "rank": args.rank, "alpha": args.alpha,
              "targets": args.targets, "batch": args.batch_size, "context": args.context,
              "first_loss": first, "step_s_median": median,
              "step_s_min": {n: min(v) for n, v in times.items()},
              "cpu_s_median": cpu_median,
              "peft_over_gptcli": median["peft-lora"] / median["gptcli-lora"],
              "peft_over_gptcli_cpu": cpu_median["peft-lora"] / cpu_median["gptcli-lora"],
              "full_over_lora": median["gptcli-full"] / median["gptcli-lora"],
              **sizes(args, base, folder, entries["gptcli-lora"]),
              "load_after": os.getloadavg()[0]}
    del entries
    if not args.no_memory:
        result["memory"] = {}
        for name in CONTENDERS:
            out = subprocess.run([sys.executable, __file__, "--only", name, "--folder", folder,
                                  *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))]
                                        for k in ("preset", "rank", "alpha", "batch_size",
                                                  "context", "warmup", "seed")), []),
                                  *(["--base", args.base] if args.base else []),
                                  "--targets", *args.targets],
                                 check=True, capture_output=True, text=True).stdout
            result["memory"][name] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.preset}, float32 CPU, batch {args.batch_size} x {args.context}, rank "
          f"{args.rank}, alpha {args.alpha:g}, targets {' '.join(args.targets)}")
    print(f"trainable: {result['trainable']:,} of {result['base_parameters']:,} "
          f"({result['trainable_fraction']:.3%}); adapter file {result['adapter_bytes']:,} B "
          f"of {result['base_bytes']:,} B ({result['adapter_fraction']:.3%})")
    print(f"{'':<12} {'median s/step':>13} {'min':>7} {'CPU s/step':>10} {'peak RSS MiB':>13} "
          f"{'step growth':>12}")
    for name in CONTENDERS:
        mem = result.get("memory", {}).get(name, {})
        print(f"{name:<12} {median[name]:>13.3f} {result['step_s_min'][name]:>7.3f} "
              f"{cpu_median[name]:>10.3f} {mem.get('peak_rss_mib', '-'):>13} "
              f"{mem.get('step_growth_mib', '-'):>12}")
    print(f"gptcli LoRA is {result['peft_over_gptcli']:.2f}x peft's speed by wall time, "
          f"{result['peft_over_gptcli_cpu']:.2f}x by CPU time; full fine-tuning takes "
          f"{result['full_over_lora']:.2f}x LoRA's step time; load {result['load_after']:.1f} "
          "after the timing; first losses "
          f"{first['gptcli-lora']:.4f} (gptcli) {first['peft-lora']:.4f} (peft)")


if __name__ == "__main__":
    main()
