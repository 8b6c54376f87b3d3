"""CUDA checks, ready for the first GPU this project gets: every test here is marked ``gpu`` and
skipped, with the reason, where torch sees no CUDA device (so a CPU run lists them as skipped
rather than leaving them out). ``python -m pytest -m gpu`` runs them all, in a few minutes on
one GPU: bf16 training against float32, the compiled training step and the CUDA-graph decode
step (no graph breaks, equal to eager), the flash attention kernel, the memory estimate against
the allocator's peak, `gpt bench --device cuda`'s MFU and bandwidth figures, speculative decoding
with CUDA graphs, a conversation kept in the static cache, and a 2-process nccl job where two
GPUs exist.

Tolerances are stated where they are used, with why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import ModelConfig, SampleConfig, TrainConfig
from gptcli.decode import compile_step, decode_loop
from gptcli.model import GPT
from gptcli.optim import step_parts, train_step

from conftest import randomize_, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none on this machine")]

runner = CliRunner()
SMALL = dict(vocab_size=512, context_length=128, n_layer=4, n_head=4, n_embd=256)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch, with the default float32 matmul precision."""
    torch._dynamo.reset()
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
    torch._dynamo.reset()


def batches(config: ModelConfig, batch: int, n: int, device) -> list[tuple]:
    """``n`` batches of a learnable language: each token's successor is fixed (a random
    permutation), each row starts anywhere. Made on the CPU: the same batches on any device."""
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(config.vocab_size, generator=g)
    out = []
    for _ in range(n):
        b = torch.empty(batch, config.context_length + 1, dtype=torch.long)
        b[:, 0] = torch.randint(0, config.vocab_size, (batch,), generator=g)
        for t in range(config.context_length):
            b[:, t + 1] = successor[b[:, t]]
        out.append((b[:, :-1].to(device), b[:, 1:].to(device)))
    return out


def train_losses(config: ModelConfig, dtype: torch.dtype, steps: int, *, compile: bool = False,
                 device: str = "cuda", batch: int = 8) -> list[float]:
    """Losses of ``steps`` optimizer steps of ``optim.train_step`` (what fit() and bench run),
    from the same initial weights and batches whatever the dtype."""
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    cfg = TrainConfig(compile=compile, lr=1e-3)
    parts = step_parts(model, cfg, torch.device(device), dtype)
    data = iter(batches(config, batch, steps, device))
    losses = []
    for _ in range(steps):
        result = train_step(parts.runner, parts.optimizer, lambda: next(data), grad_accum=1,
                            grad_clip=1.0, amp=parts.amp, scaler=parts.scaler,
                            device=torch.device(device))
        losses.append(result[0].item())
    return losses


# ----------------------------------------------------------------------------- training

def test_bf16_training_steps_match_float32():
    """bf16 autocast against float32 (full float32 matmuls, no TF32) over 20 AdamW steps from the
    same weights and batches, while the loss falls from 6.3 to about 2.5. bf16 keeps 8 bits of
    mantissa (a relative error of about 0.4% per rounding), but the matmuls accumulate in
    float32 and the loss is taken on float32 logits: the same steps on a CPU (bf16 autocast,
    oneDNN) stay within 0.002 nats of float32 at every step; allowed here: 0.01 for the first
    loss (the forward alone) and 0.02 at every step, a bf16 fault (a lost scale, a cast in the
    wrong place) moves it by far more."""
    config = ModelConfig(**SMALL)
    torch.set_float32_matmul_precision("highest")
    reference = train_losses(config, torch.float32, 20)
    bf16 = train_losses(config, torch.bfloat16, 20)
    assert abs(bf16[0] - reference[0]) < 0.01, (bf16[0], reference[0])
    assert max(abs(a - b) for a, b in zip(bf16, reference)) < 0.02, list(zip(bf16, reference))
    assert reference[-1] < reference[0] - 2  # it did learn


def test_the_compiled_training_step_has_no_graph_breaks_and_matches_eager():
    """The model as `--compile` trains it: one graph (torch._dynamo.explain), and 5 compiled
    steps give eager's losses to float32 rounding (inductor fuses and reorders sums:
    relative 1e-4)."""
    config = ModelConfig(**SMALL)
    torch.set_float32_matmul_precision("highest")
    model = GPT(config).cuda().train()
    x, _ = batches(config, 4, 1, "cuda")[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    eager = train_losses(config, torch.float32, 5)
    compiled = train_losses(config, torch.float32, 5, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_training_takes_the_flash_attention_kernel():
    """The causal training forward in bf16 runs with SDPA restricted to flash attention (it
    raises when no kernel of the list can run), and an unrestricted forward and backward
    dispatch to a flash-attention operator (profiler): torch's own, or cuDNN's, which torch
    prefers on Hopper since 2.9 and whose kernel names say "flash" too (so the op is checked,
    not only the kernels' names); never the math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    config = ModelConfig(**{**SMALL, "n_embd": 512, "n_head": 8})  # head size 64
    model = GPT(config).cuda().train()
    x, y = batches(config, 4, 1, "cuda")[0]
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(x).float().mean().backward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().mean().backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    ops = {k for k in names if k.startswith("aten::_scaled_dot_product")}
    flash = {f"aten::_scaled_dot_product_{kind}_attention{part}"
             for kind in ("flash", "cudnn") for part in ("", "_backward")}
    assert len(ops & flash) == 2 and "aten::_scaled_dot_product_attention_math" not in ops, ops
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert any("flash" in k.lower() for k in kernels), kernels


def test_the_memory_estimate_is_within_20_percent_of_the_allocators_peak():
    """``hardware.train_memory_estimate`` (what train and bench check before allocating)
    against ``torch.cuda.max_memory_allocated`` over a training step of the gpt2 shape in bf16
    (the second step: the first also allocates AdamW's moments, which the estimate counts)."""
    from gptcli.hardware import train_memory_estimate

    config = ModelConfig.from_preset("gpt2")
    batch = 4
    estimate = train_memory_estimate(config, batch, torch.bfloat16)
    model = GPT(config).cuda().train()
    parts = step_parts(model, TrainConfig(), torch.device("cuda"), torch.bfloat16)
    data = batches(config, batch, 1, "cuda") * 2
    for i in range(2):
        if i == 1:
            torch.cuda.reset_peak_memory_stats()
        train_step(parts.runner, parts.optimizer, lambda: data.pop(), grad_accum=1,
                   grad_clip=1.0, amp=parts.amp, scaler=parts.scaler, device=torch.device("cuda"))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert 0.8 * peak <= estimate <= 1.2 * peak, f"estimate {estimate / 2**30:.2f} GiB, " \
                                                 f"peak {peak / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- decoding

def test_decoding_on_cuda_gives_the_cpus_greedy_tokens():
    """The KV-cache decode loop on the GPU, float32 without TF32: the CPU's greedy tokens,
    across window slides."""
    torch.set_float32_matmul_precision("highest")
    model = randomize_(GPT(tiny_config())).eval()
    prompt = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    cfg = SampleConfig(max_new_tokens=50, temperature=0)
    cpu = torch.stack(list(decode_loop(model, prompt, cfg)), 1)
    cuda = torch.stack(list(decode_loop(model.cuda(), prompt.cuda(), cfg)), 1)
    assert torch.equal(cuda.cpu(), cpu)


def test_the_cuda_graph_decode_step_has_no_graph_breaks_and_matches_eager():
    """`--compile` on CUDA: the one-token step on the static cache is one graph, replayed as a
    CUDA graph (inductor skips none), compiled once for all positions, and its greedy tokens
    are eager's."""
    from torch._dynamo.utils import counters

    from gptcli.kv_cache import KVCache

    torch.set_float32_matmul_precision("highest")
    model = randomize_(GPT(tiny_config(n_layer=2, context_length=64))).cuda().eval()
    cache = KVCache.for_model(model.config, 1, device="cuda", static=True)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.tensor([[1]], device="cuda"),
                                                 kv_cache=cache,
                                                 start_pos=torch.tensor(3, device="cuda"))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    prompt = torch.randint(0, 101, (1, 5), device="cuda")
    cfg = SampleConfig(max_new_tokens=40, temperature=0)
    eager = [t.item() for t in decode_loop(model, prompt, cfg)]
    counters.clear()
    compiled = [t.item() for t in decode_loop(model, prompt, cfg, step=compile_step(model))]
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were not used"


def test_speculative_decoding_with_cuda_graphs_keeps_the_greedy_tokens():
    """A draft model with both steps compiled (CUDA graphs replay over their own outputs, so the
    engine keeps copies of the logits it queues): the tokens of plain eager decoding."""
    from gptcli.speculative import Draft

    torch.set_float32_matmul_precision("highest")
    model = randomize_(GPT(tiny_config(context_length=64)), seed=5).cuda().eval()
    small = randomize_(GPT(tiny_config(n_layer=1, context_length=64)), seed=6).cuda().eval()
    prompt = torch.randint(0, 101, (1, 5), device="cuda")
    cfg = SampleConfig(max_new_tokens=40, temperature=0)
    eager = [t.item() for t in decode_loop(model, prompt, cfg)]
    for draft_model in (small, model):  # guesses badly; guesses everything
        counts: dict = {}
        draft = Draft(draft_model, 3, compile_step(draft_model))
        got = [t.item() for t in decode_loop(model, prompt, cfg, step=compile_step(model),
                                             draft=draft, counts=counts)]
        assert got == eager
    assert counts["accepted"] == counts["proposed"] > 0


def test_a_conversation_kept_in_the_static_cache_decodes_as_its_whole_prompt():
    """`gpt chat --compile` on CUDA: the engine's static cache (CUDA graphs) keeps the first
    turn, the next prompt feeds only what is new, and its greedy tokens are eager decoding's of
    the whole prompt."""
    from gptcli.decode import Engine

    torch.set_float32_matmul_precision("highest")
    model = randomize_(GPT(tiny_config(context_length=64)), seed=7).cuda().eval()
    engine = Engine(model, 1, step=compile_step(model))
    cfg = SampleConfig(max_new_tokens=12, temperature=0)

    def run(prompt: list[int]) -> tuple[list[int], int]:
        row = engine.add([prompt], cfg)[0]
        for i in range(12):
            engine.pick()
            if i < 11:
                engine.advance()
        engine.remove(row)
        return row.tokens, row.cached

    first, _ = run([1, 2, 3, 4])
    follow = first + [5, 6]
    tokens, cached = run(follow)
    assert cached == len(first) - 1
    eager = [t.item() for t in decode_loop(model, torch.tensor([follow], device="cuda"), cfg)]
    assert tokens[len(follow):] == eager


def decisive_prompt(model: GPT, steps: int, gap: float) -> torch.Tensor:
    """The first of a fixed sequence of random prompts whose first ``steps`` greedy tokens in
    float32 each lead the runner-up by ``gap`` or more: this random model's two top logits are
    often closer than bf16's rounding (0.037 apart at the median; in 7% of random prompts
    bf16's first three greedy tokens differ)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        prompt = ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=g)
        with torch.no_grad():
            for _ in range(steps):
                top = model(ids)[0, -1].topk(2)
                if top.values[0] - top.values[1] < gap:
                    break
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
            else:
                return prompt
    raise AssertionError(f"no prompt of 200 leads by {gap} for {steps} steps")


def test_bf16_generation_runs_and_reads_its_dtype():
    """`gpt generate --dtype bfloat16` on CUDA: weights, cache and logits in bf16 end to end,
    and greedy tokens that start like float32's (bf16 logits differ in the third digit, so only
    the first few tokens of a random model are expected to agree)."""
    model = randomize_(GPT(tiny_config())).eval()
    # bf16's logits are within 0.01 of float32's here (on the CPU: at most 0.0094 over 200
    # prompts), so a lead of 0.04 outlasts the rounding on both sides
    prompt = decisive_prompt(model, 3, 0.04).cuda()
    model = model.cuda()
    cfg = SampleConfig(max_new_tokens=20, temperature=0)
    reference = [t.item() for t in decode_loop(model, prompt, cfg)]
    got = [t.item() for t in decode_loop(model.to(torch.bfloat16), prompt, cfg)]
    assert model.dtype == torch.bfloat16 and len(got) == 20
    assert got[:3] == reference[:3]


# ----------------------------------------------------------------------------- commands

def test_bench_on_cuda_prints_mfu_and_bandwidth():
    """`gpt bench --device cuda`: MFU against the datasheet (or measured) peak and bandwidth use
    against the datasheet (or measured) bandwidth, in the table and in --json."""
    args = ["bench", "--device", "cuda", "--preset", "small", "--steps", "3", "--warmup", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["device"].startswith("cuda") and out["dtype"] == "bfloat16"
    assert 0 < out["train"]["mfu"] < 1
    assert 0 < out["generate"][0]["bandwidth_utilisation"] < 1
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "MFU" in table.stdout and "bandwidth use, batch 1" in table.stdout
    assert "unknown" not in table.stdout.split("MFU", 1)[1].splitlines()[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs for a 2-process nccl job")
def test_torchrun_with_nccl_on_two_gpus_equals_one_process(corpus, tmp_path):
    """2 ranks (nccl, one GPU each) with batch 2 against one process with batch 4: the same
    weights after 3 steps, to float32 all-reduce rounding (nccl sums in another order)."""
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-length", "16",
            "--sample-interval", "0", "--device", "cuda", "--dtype", "float32",
            "--warmup-steps", "1", "--data", str(corpus), "--max-steps", "3",
            "--eval-interval", "3", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "gptcli", "train", *tiny, "--batch-size",
                          "2", "--out", str(tmp_path / "ddp")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stderr
    single = subprocess.run([sys.executable, "-m", "gptcli", "train", *tiny, "--batch-size", "4",
                             "--out", str(tmp_path / "single")], capture_output=True, text=True,
                            timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    from gptcli.checkpoint import load_checkpoint

    a, _, _ = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    b, _, _ = load_checkpoint(tmp_path / "single" / "last.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=name)
