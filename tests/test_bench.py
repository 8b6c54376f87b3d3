"""`gpt bench`: the figures exist and are positive, the formulas match hand counts, errors exit
with their messages. Small shapes so the real train step and decode loop run in a second."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptcli import bench, hardware
from gptcli.cli import app
from gptcli.config import ModelConfig
from gptcli.model import GPT

runner = CliRunner()
FAST = ["bench", "--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1",
        "--batch-size", "2", "--context-length", "32", "--prompt-length", "8",
        "--max-new-tokens", "4", "--json"]


def figures(obj, path=""):
    """(path, value) of every number or null in the result, settings and labels aside."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key != "settings":
                yield from figures(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from figures(value, f"{path}[{i}]")
    elif obj is None or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        yield path, obj


def run_json(*extra):
    result = runner.invoke(app, FAST + list(extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_bench_json_every_figure_positive(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_cache_bytes", lambda: 1 << 20)  # weights exceed it
    out = run_json()
    assert out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["settings"]["vocab_size"] == 50257 and out["settings"]["batch_size"] == 2
    assert out["train"]["tokens_per_step"] == 2 * 32
    assert [g["batch_size"] for g in out["generate"]] == [1, 2]  # batch 1, and the one given
    seen = dict(figures(out))
    assert {"train.step_time_s.median", "train.tokens_per_s", "train.peak_memory_bytes",
            "generate[0].prefill_tokens_per_s", "generate[0].time_to_first_token_s.median",
            "generate[0].decode_tokens_per_s", "generate[0].decode_ms_per_token.median",
            "generate[1].decode_tokens_per_s"} <= set(seen)
    for path, value in seen.items():  # a CPU's ceilings are measured, so MFU etc. exist
        assert value is not None and value > 0, path
    assert out["peak_tflops_source"] == "measured" and out["bandwidth_source"] == "measured"
    t = out["train"]
    assert t["mfu"] == pytest.approx(t["flops_per_token"] * t["tokens_per_s"]
                                     / (out["peak_tflops"] * 1e12))


def test_measured_ceilings_are_positive_and_flags_override_them():
    cpu = torch.device("cpu")
    assert hardware.measure_tflops(cpu, torch.float32) > 0
    assert hardware.measure_bandwidth(cpu) > 0
    out = run_json("--peak-tflops", "3", "--bandwidth-gbs", "40")
    assert (out["peak_tflops"], out["peak_tflops_source"]) == (3, "--peak-tflops")
    assert (out["bandwidth_gbs"], out["bandwidth_source"]) == (40, "--bandwidth-gbs")


def test_int8_bench_times_generation_of_the_quantized_model():
    out = run_json("--quantize", "int8", "--bandwidth-gbs", "20")
    assert "train" not in out and out["settings"]["quantize"] == "int8"
    g = out["generate"][0]
    assert g["decode_tokens_per_s"] > 0 and g["bandwidth_utilisation"] > 0
    float_bytes = run_json("--only", "generate")["weight_bytes_per_step"]
    assert out["weight_bytes_per_step"] < 0.3 * float_bytes  # int8 weights, float scales
    result = runner.invoke(app, FAST + ["--quantize", "int8", "--only", "train"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --model and --quantize time generation only; leave "
                                     "out --only train")
    result = runner.invoke(app, FAST + ["--quantize", "int5"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --quantize must be 'half', 'int8' or 'int4', got 'int5'"


def test_given_peak_makes_mfu_positive():
    out = run_json("--only", "train", "--peak-tflops", "1.5")
    assert "generate" not in out
    for path, value in figures(out):
        if path != "bandwidth_gbs":
            assert value is not None and value > 0, path
    t = out["train"]
    assert t["mfu"] == pytest.approx(t["flops_per_token"] * t["tokens_per_s"] / 1.5e12)


def test_given_bandwidth_makes_utilisation_positive():
    i = FAST.index("--batch-size")
    args = FAST[:i] + FAST[i + 2:]  # no --batch-size: generation at batch 1 only
    result = runner.invoke(app, args + ["--only", "generate", "--bandwidth-gbs", "20"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "train" not in out and [g["batch_size"] for g in out["generate"]] == [1]
    for path, value in figures(out):
        if path != "peak_tflops":
            assert value is not None and value > 0, path
    g = out["generate"][0]
    assert g["bandwidth_utilisation"] == pytest.approx(
        out["weight_bytes_per_step"] * g["decode_steps_per_s"] / 20e9)


def test_weights_that_fit_in_the_cpu_cache_get_their_bandwidth_share_with_a_caveat(monkeypatch):
    """Weights that fit in the cache the CPU reports may be read from there (a share of 122.6%
    was once shown bare), or not (a VM reporting its host's 480 MiB read a 124 MB model from
    memory at 60% of the measured bandwidth): the share is shown, with the caveat."""
    monkeypatch.setattr(hardware, "cpu_cache_bytes", lambda: 1 << 40)
    monkeypatch.setattr(bench, "peak_bandwidth", lambda *a: (20.0, "datasheet"))
    out = run_json("--only", "generate")
    assert out["weights_fit_in_cache_bytes"] == 1 << 40
    g = out["generate"][0]
    assert g["bandwidth_utilisation"] == pytest.approx(
        out["weight_bytes_per_step"] * g["decode_steps_per_s"] / 20e9)
    table = runner.invoke(app, FAST[:-1] + ["--only", "generate"]).stdout
    assert "% of memory's; the weights fit in" in table and "1,048,576 MiB cache" in table
    monkeypatch.setattr(hardware, "cpu_cache_bytes", lambda: 1 << 10)
    out = run_json("--only", "generate")
    assert "weights_fit_in_cache_bytes" not in out and \
        out["generate"][0]["bandwidth_utilisation"] > 0


def test_flops_per_token_equals_hand_count():
    # V=10, C=4, L=1, H=2 (Q=2), T=8, biases, learned positions, tied embeddings.
    # Matmul weights: wte/lm_head 10*4 = 40; block: ln_1 8, c_attn 4*12+12 = 60,
    # attn.c_proj 16+4 = 20, ln_2 8, c_fc 4*16+16 = 80, mlp.c_proj 16*4+4 = 68 -> 244; ln_f 8.
    # N = 40 + 244 + 8 = 292 (the 8*4 position table is a lookup: not counted).
    # 6N = 1752; attention 12*L*H*Q*T = 12*1*2*2*8 = 384; total 2136.
    cfg = ModelConfig(vocab_size=10, context_length=8, n_layer=1, n_head=2, n_embd=4)
    assert bench.training_flops_per_token(cfg) == 2136
    model = GPT(cfg)
    assert model.num_params() - model.wpe.weight.numel() == 292


def test_bandwidth_formula_equals_hand_count():
    from gptcli.quantize import prepare

    cfg = ModelConfig(vocab_size=10, context_length=8, n_layer=1, n_head=2, n_embd=4)
    model = GPT(cfg)
    prepare(model, None, kernel="linear")
    # every weight once, the output matrix (nn.Linear's layout: the embedding table itself,
    # read once), not the 32 position weights (a step looks up one row): 292 * 4 bytes
    assert bench.decode_bytes(model) == 1168
    model = GPT(cfg)
    prepare(model, "int8", kernel="int8-intmm2")  # a kernel that keeps no extra buffers
    # int8: output 10*4, c_attn 12*4, attn.c_proj 4*4, c_fc 16*4, mlp.c_proj 4*16 = 232 weights
    # of one byte; float32 scales for each output channel (10 + 12 + 4 + 16 + 4 = 46), and
    # float32 biases and norms (12 + 4 + 16 + 4 + 8 + 8 + 8 = 60)
    assert bench.decode_bytes(model) == 232 + 46 * 4 + 60 * 4
    # 1296 bytes per step at 1e6 steps/s = 1.296 GB/s, on a 2.592 GB/s device: one half
    assert bench.bandwidth_utilisation(1296, 1e6, 2.592) == pytest.approx(0.5)


@pytest.mark.parametrize("name, label, bf16, gbs", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989, 3350),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756, 2000),
    ("NVIDIA H200", "H200 SXM", 989, 4800),
    ("NVIDIA A100-SXM4-40GB", "A100", 312, 1555),
    ("NVIDIA A100-SXM4-80GB", "A100", 312, 2039),
    ("NVIDIA A10", "A10", 125, 600),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2, 1008),
    ("NVIDIA A10G", None, None, None),  # not in the table: unknown, not the A10's figures
])
def test_device_tables(name, label, bf16, gbs):
    cuda = torch.device("cuda")
    peak, source = hardware.peak_tflops(cuda, torch.bfloat16, name)
    bw, _ = hardware.peak_bandwidth(cuda, name)
    assert (peak, bw) == (bf16, gbs)
    assert source.startswith(label) if label else "unknown" in source


def test_cpu_peak_is_unknown_not_guessed():
    cpu = torch.device("cpu")
    assert hardware.peak_tflops(cpu, torch.float32, "x86_64")[0] is None
    assert hardware.peak_bandwidth(cpu, "x86_64")[0] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_exit_2():
    result = runner.invoke(app, ["bench", "--device", "cuda", "--steps", "1"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: device 'cuda' is not available on this machine (no CUDA GPU or a CPU-only "
        "torch build); use --device cpu or --device auto"]


def test_too_large_preset_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(hardware, "available_memory", lambda device: 2 * 1024 ** 3)
    monkeypatch.setattr(bench, "GPT", lambda config: pytest.fail("allocated the model"))
    result = runner.invoke(app, ["bench", "--device", "cpu", "--preset", "gpt2-xl",
                                 "--batch-size", "1"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: the gpt2-xl preset's training at batch size 1, context "
                           "1024, float32 needs about ")
    assert "GiB; cpu has 2.0 GiB available. Try a smaller --preset, --batch-size or " \
        "--context-length." in line


def test_oom_during_run_is_a_runtime_failure(monkeypatch):
    import gptcli.optim

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gptcli.optim, "train_step", oom)
    result = runner.invoke(app, FAST[:-1] + ["--batch-size", "4"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: out of memory during training at batch size 4 on ")
    assert line.endswith("try a smaller --batch-size (e.g. 2), --context-length or --preset")


def test_bad_values_exit_2():
    result = runner.invoke(app, ["bench", "--device", "cpu", "--only", "eval"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --only must be 'train' or 'generate', got 'eval'"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--preset", "tiny",
                                 "--prompt-length", "60", "--max-new-tokens", "10"])
    assert result.exit_code == 2 and "must fit in the context length (64)" in result.stderr


def test_cpu_peak_memory_is_the_process_own_not_its_parents():
    """A child's peak (a sweep's point, a benchmark's contender) must not inherit the peak its
    parent had before the exec, as Linux's ru_maxrss does."""
    import subprocess
    import sys

    ballast = bytearray(1536 * 2**20)  # 1.5 GiB, touched: the parent's peak is at least that
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = ("import torch; from gptcli.hardware import peak_memory; "
            "print(peak_memory(torch.device('cpu')))")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    del ballast
    assert 50 * 2**20 < child < 1024 * 2**20


# ----------------------------------------------------------------------------- with a draft

def saved(path, tokenizer, seed=3, **config):
    from gptcli.checkpoint import save_checkpoint
    from conftest import randomize_, tiny_config

    model = randomize_(GPT(tiny_config(vocab_size=tokenizer.vocab_size, **config)), seed=seed)
    return str(save_checkpoint(path, model, tokenizer))


DRAFTED = ["bench", "--device", "cpu", "--only", "generate", "--steps", "2", "--warmup", "1",
           "--prompt-length", "4", "--max-new-tokens", "12", "--json"]


def test_bench_times_decoding_with_a_draft_against_without(tmp_path):
    """--draft-model: plain and speculative runs alternate; the speculative figures, the
    acceptance and the speed-up come beside the plain ones, and in the table. A draft equal
    to the model accepts every token; another accepts fewer."""
    from conftest import char_tokenizer

    tok = char_tokenizer(60)
    target = saved(tmp_path / "big.safetensors", tok)
    small = saved(tmp_path / "small.safetensors", tok, seed=4, n_layer=1)
    for draft, accepted in ((target, lambda rate: rate == 1.0),
                            (small, lambda rate: rate < 1.0)):
        result = runner.invoke(app, DRAFTED + ["--model", target, "--draft-model", draft,
                                               "--draft-tokens", "3", "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["settings"]["draft_model"] == draft and out["draft_parameters"] > 0
        for g in out["generate"]:  # batch 1 and 2
            fast = g["speculative"]
            assert fast["draft_tokens"] > 0 and accepted(fast["acceptance_rate"])
            assert fast["acceptance_rate"] == fast["accepted_tokens"] / fast["draft_tokens"]
            assert fast["speedup"] == pytest.approx(fast["decode_tokens_per_s"]
                                                    / g["decode_tokens_per_s"])
            assert fast["time_to_first_token_s"]["median"] > 0
        assert "with the draft, batch 2" in result.stderr and "accepted" in result.stderr


def test_bench_refuses_a_draft_or_shape_it_cannot_time(tmp_path):
    from conftest import char_tokenizer
    from gptcli.tokenizer import GPT2Tokenizer

    target = saved(tmp_path / "big.safetensors", char_tokenizer(60))
    words = saved(tmp_path / "words.safetensors", GPT2Tokenizer())
    cases = [
        (["--draft-model", target], "error: --draft-model times speculative decoding of a "
         "trained model and its draft: give the model with --model"),
        (["--model", target, "--draft-tokens", "3"], "error: --draft-tokens goes with "
         "--draft-model"),
        (["--model", target, "--draft-model", str(tmp_path / "nowhere.safetensors")],
         "error: --draft-model: "),
        (["--model", target, "--draft-model", words], "error: the draft model words uses the "
         "gpt2 tokenizer and the model big the char one; a draft model must share the model's "
         "tokenizer"),
    ]
    from gptcli.checkpoint import load_checkpoint

    context = load_checkpoint(target)[0].config.context_length
    cases += [  # settings of a random-weights model, which --model's own shape replaces
        (["--model", target, "--preset", "small"], "error: --preset picks the shape of a model "
         "with random weights; --model times that model: give one of them"),
        (["--model", target, "--context-length", str(context + 1)], f"error: --context-length "
         f"{context + 1} is longer than the model's context ({context}); give at most {context}"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["bench", "--device", "cpu", "--steps", "1", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().startswith(message), result.stderr
        assert "Traceback" not in result.output
