"""Inference formats on the one model class: int8, half and int4 weights, and the float
layouts (the kernels themselves: test_kernels.py)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.checkpoint import load_checkpoint, save_checkpoint
from gptcli.cli import app
from gptcli.model import GPT, Projection
from gptcli.kernel_layer import KernelLinear
from gptcli.kernels import chunked, chunked_matmul, int8_matmul
from gptcli.quantize import (dequantize_int4, is_quantized, prepare, quantization,
                             quantize_int4, quantize_int8)
from gptcli.decode import decode_loop

from conftest import char_tokenizer, randomize_, tiny_config
from test_sampling import full_recompute, greedy

runner = CliRunner()


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and q.abs().max() <= 127
    err = ((q.float() * scale[:, None]) - w).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 + 1e-7 * scale)
    torch.testing.assert_close(w.abs().amax(dim=1), 127 * scale)


def test_int8_matmul_keeps_the_activations_to_about_15_bits():
    """With float weights given exactly as int8 times scale, the only error left is the
    activations': two int8 parts keep it near float32 rounding of a product (1e-4 relative),
    where one part alone would leave ~1e-2."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scale = torch.rand(64) + 0.5
    w = (q.float() * scale[:, None])
    for rows in (1, 5):  # one product per part at batch 1, one stacked product for more rows
        x = torch.randn(rows, 96) * 3
        exact = x.double() @ w.double().T
        got = int8_matmul(x, q, scale).double()
        assert ((got - exact).norm() / exact.norm()).item() < 2e-4


def test_chunked_layout_is_the_same_product():
    w, x = torch.randn(24, 37), torch.randn(5, 24)
    for chunks in (1, 2, 3, 8):
        packed = chunked(w, chunks)
        assert packed.shape == (chunks, 24, -(-37 // chunks))
        torch.testing.assert_close(chunked_matmul(x, packed, 37), x @ w)


def test_int4_error_is_at_most_half_a_step_per_group():
    w = torch.randn(37, 96) * torch.logspace(-3, 1, 37)[:, None]
    q4, sz = quantize_int4(w)
    assert q4.shape == (48, 96) and sz.shape == (3, 48, 2)  # rows padded to a multiple of 16
    assert q4.min() >= 0 and q4.max() <= 15 and torch.all(q4[37:] == q4[37:, :1])
    err = (dequantize_int4(q4, sz, 37) - w).abs().view(37, 3, 32).amax(dim=-1)  # per group
    step = sz[..., 0].t()[:37]
    assert torch.all(err <= step / 2 + 1e-6 * step)


def test_float_inference_layout_matches_the_training_layout():
    model = randomize_(GPT(tiny_config())).eval()
    prepared = copy.deepcopy(model)
    prepare(prepared, None)
    assert all(isinstance(m, KernelLinear) and m.kernel for m in prepared.modules()
               if isinstance(m, KernelLinear)) and prepared.lm_head.kernel
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(prepared(idx), model(idx), rtol=1e-5, atol=1e-5)
    prompt = torch.randint(0, 101, (2, 5))
    cfg = greedy(40)
    assert torch.equal(torch.stack(list(decode_loop(prepared, prompt, cfg)), 1),
                       torch.stack(list(decode_loop(model, prompt, cfg)), 1))


def logit_errors(quantize, config=None, seed=1):
    """(RMS error / logits' std, max error / std, top-1 agreement) of a ``quantize`` model's
    logits against float32's, on 4 x 32 random tokens."""
    model = randomize_(GPT(config or tiny_config()), seed=seed).eval()
    quantized = copy.deepcopy(model)
    prepare(quantized, quantize)
    idx = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(idx), quantized(idx)
    return ((a - b).pow(2).mean().sqrt() / a.std()).item(), ((a - b).abs().max() / a.std()
                                                              ).item(), \
        (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def test_int8_logits_are_close_to_float32():
    """Tolerance: per-channel int8 weights carry ~0.4% relative error each (half a step of
    absmax/127, on values spread like a Gaussian), and it does not add up coherently over a
    dot product, so logits move by about that fraction of their spread: 3% of the logits'
    standard deviation, and the same top-1 token at nearly every position (whichever int8
    kernel was chosen: their activations keep 8 to 15 bits)."""
    rms, worst, same = logit_errors("int8")
    assert worst < 0.3 and rms < 0.03 and same > 0.95


def test_half_logits_are_close_to_float32():
    """Bound: bf16 keeps 8 significant bits (a relative rounding of at most 2^-9 = 0.2% per
    weight and per activation), fp16 11; with random rounding errors that do not add up
    coherently, logits move by well under 2% of their spread (measured: ~0.4% with bf16)."""
    rms, worst, same = logit_errors("half")
    assert worst < 0.15 and rms < 0.02 and same > 0.97


def test_int4_logits_are_close_to_float32():
    """Bound: 4-bit groups of 32 leave each weight within half a step of range/15 (about 7% of
    a Gaussian group's spread, RMS 2/3 of that); errors add incoherently, so logits move by
    about 8% of their spread (measured here: ~8%): bounded at 15%, and 85% of top-1 tokens."""
    rms, worst, same = logit_errors("int4", tiny_config(n_embd=64, n_head=4))
    assert rms < 0.15 and worst < 1.0 and same > 0.85


def test_int4_keeps_the_output_matrix_and_odd_widths_in_int8():
    model = randomize_(GPT(tiny_config(n_embd=48)), seed=3).eval()  # 48: no whole 32-groups
    prepare(model, "int4")
    modes = {name: m.mode for name, m in model.named_modules() if isinstance(m, KernelLinear)}
    assert modes["lm_head"] == "int8" and modes["h.0.mlp.c_proj"] == "int4"  # 192 inputs
    assert modes["h.0.attn.c_attn"] == "int8" and quantization(model) == "int4"


@pytest.mark.parametrize("options", [dict(), dict(tie_embeddings=False, position="rope")])
def test_int8_greedy_decode_equals_full_recomputation(options):
    model = randomize_(GPT(tiny_config(**options)), seed=2).eval()
    prepare(model, "int8")
    assert is_quantized(model)
    assert not any(isinstance(m, Projection) for m in model.modules())
    prompt = torch.randint(0, 101, (2, 9))
    n = 60  # context 32: the window slides
    cached = torch.stack(list(decode_loop(model, prompt, greedy(n))), dim=1)
    assert torch.equal(cached, full_recompute(model, prompt, n))


def test_a_prepared_model_is_not_prepared_again_in_another_format():
    from gptcli.errors import UserError

    model = randomize_(GPT(tiny_config())).eval()
    prepare(model, None)
    with pytest.raises(UserError) as err:
        prepare(model, "int8")
    assert str(err.value) == ("the model is already prepared as float; load it again to use "
                              "--quantize int8")
    prepare(model, None)  # the same format again: nothing to do


def test_unknown_scheme_or_device_is_refused_with_exit_2(char_checkpoint):
    result = runner.invoke(app, ["generate", "--model", str(char_checkpoint), "--quantize",
                                 "int5", "--prompt", "a"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --quantize must be 'half', 'int8' or 'int4', got "
                                     "'int5'")
    from gptcli.quantize import check_scheme
    from gptcli.errors import UserError

    with pytest.raises(UserError) as err:
        check_scheme("half", torch.device("cuda"))
    assert str(err.value) == ("--quantize half runs on the CPU only for now, not on cuda; use "
                              "--device cpu, or leave out --quantize")


def test_every_int8_kernel_runs_a_loaded_checkpoint_on_a_prompt(tmp_path):
    """Weights read from a file reach the kernels as they are: torch's bf16 int8 product
    crashed the process (a segmentation fault) on those safetensors left at the file's own
    offsets, for more than one row. In a process of its own, so that a crash fails this test."""
    model = randomize_(GPT(tiny_config()), seed=4).eval()
    src = save_checkpoint(tmp_path / "m.safetensors", model, char_tokenizer(101))
    assert runner.invoke(app, ["quantize", str(src)]).exit_code == 0
    script = """
import sys, torch
from gptcli.checkpoint import load_checkpoint
from gptcli.kernels import candidates
from gptcli.quantize import prepare
from gptcli.errors import UserError
idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
outs = {}
for kernel in candidates("int8"):
    model, _, _ = load_checkpoint(sys.argv[1])
    try:
        prepare(model, None, kernel=kernel.name)
    except UserError:  # does not run on this CPU
        continue
    with torch.no_grad():
        outs[kernel.name] = model(idx)
ref = outs.pop("int8-intmm2")
for name, out in outs.items():
    assert (out - ref).abs().max() < 0.05 * ref.abs().max(), name
print(" ".join(sorted(outs)))
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m-int8.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8-bf16" in done.stdout.split()


def test_gpt_quantize_round_trip(tmp_path, monkeypatch):
    model = randomize_(GPT(tiny_config()), seed=4).eval()
    src = save_checkpoint(tmp_path / "m.safetensors", model, char_tokenizer(101), step=7)
    result = runner.invoke(app, ["quantize", str(src)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m-int8.safetensors"
    assert result.stdout.startswith(f"wrote {out} (int8, ")
    # loads as the same int8 model that quantizing in memory gives
    loaded, _, meta = load_checkpoint(out)
    assert meta["quantization"] == "int8" and meta["step"] == "7"
    assert meta["quantized_from"] == str(src)
    prepare(loaded, None)  # its kernels, chosen as `gpt quantize` chose them (cached)
    expected = copy.deepcopy(model)
    prepare(expected, "int8")
    assert loaded.lm_head.kernel == expected.lm_head.kernel
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), expected(idx))
    assert loaded.lm_head.qweight is loaded.wte.qweight  # tied: stored once, shared again
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["quantization"] == "int8" and info["parameters"] == model.num_params()
    assert "quantization" in runner.invoke(app, ["info", str(out)]).stdout
    gen = runner.invoke(app, ["generate", "--model", str(out), "--prompt", chr(0x100),
                              "--max-new-tokens", "5", "--json", "--temperature", "0"])
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout)["samples"][0]["token_ids"]) == 5
    again = runner.invoke(app, ["quantize", str(src)])
    assert again.exit_code == 2
    assert again.stderr.strip() == (f"error: {out} already exists; pass --force to overwrite it, "
                                    "or --out to write another file")
    twice = runner.invoke(app, ["quantize", str(out), "--out", str(tmp_path / "x.safetensors")])
    assert twice.exit_code == 2
    assert twice.stderr.strip() == f"error: {out} is already an int8 checkpoint"
    import gptcli.checkpoint

    def no_weights(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(gptcli.checkpoint, "read_tensors", no_weights)
    for scheme, command in (("half", ["generate", "--prompt", chr(0x100)]),
                            ("int4", ["generate", "--prompt", chr(0x100)]),
                            ("half", ["bench", "--only", "generate"])):
        # another format needs the float model it came from (the header says so)
        other = runner.invoke(app, [*command, "--model", str(out), "--quantize", scheme])
        assert other.exit_code == 2, other.output
        assert other.stderr.strip() == (f"error: {out} is an int8 checkpoint; --quantize "
                                        f"{scheme} needs a float model, such as the one it was "
                                        f"made from: {src}")


@pytest.mark.parametrize("command", ["quantize", "merge", "download"])
def test_an_out_that_ends_like_a_folder_is_refused(tmp_path, command):
    """(before: `gpt merge runs/chat --out newdir/` wrote a file called newdir)"""
    src = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), char_tokenizer(101))
    out = f"{tmp_path / 'newdir'}/"
    args = {"quantize": ["quantize", str(src), "--out", out],
            "merge": ["merge", str(src), "--out", out],
            "download": ["download", str(tmp_path), "--out", out]}[command]
    result = runner.invoke(app, args)
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: --out {out} names a folder; give the file's name, such as "
           f"{tmp_path / 'newdir' / 'model.safetensors'}")
    assert not (tmp_path / "newdir").exists()
    (tmp_path / "newdir").mkdir()  # an existing folder, without the slash: the same, and
    args[args.index(out)] = out = out.rstrip("/")  # before any talk of --force
    for force in ([], ["--force"]):
        result = runner.invoke(app, args + force)
        assert (result.exit_code, result.stderr.strip()) == (
            2, f"error: --out {out} names a folder; give the file's name, such as "
               f"{tmp_path / 'newdir' / 'model.safetensors'}")
    # a name the loader would refuse as a pickle file is refused before anything is written
    args[args.index(out)] = out = str(tmp_path / "model.bin")
    result = runner.invoke(app, args)
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: --out {out} is named like a pickle file, which gptcli never loads; name it "
           f"{tmp_path / 'model.safetensors'}")
    assert not Path(out).exists()


def test_an_out_whose_folder_cannot_be_made_names_the_folder(tmp_path):
    """(before: "cannot write checkpoint to /proc/.../m.safetensors: it does not exist")"""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux), a file system where no folder can be made")
    src = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), char_tokenizer(101))
    out = Path("/proc/gptcli-none/a/m.safetensors")  # the first folder that cannot be made
    result = runner.invoke(app, ["quantize", str(src), "--out", str(out)])
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: cannot write checkpoint to {out}: its folder /proc/gptcli-none cannot be "
           "created (the file system refused)")
    result = runner.invoke(app, ["train", "--out", "/proc/gptcli-none"])  # the folder itself
    assert (result.exit_code, result.stderr.strip()) == (
        2, "error: cannot create run folder /proc/gptcli-none: the file system refused")


def test_training_from_an_int8_checkpoint_is_refused(tmp_path, corpus):
    tok = char_tokenizer(101)
    src = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), tok)
    assert runner.invoke(app, ["quantize", str(src)]).exit_code == 0
    result = runner.invoke(app, ["train", "--data", str(corpus), "--init-from",
                                 str(tmp_path / "m-int8.safetensors"), "--out",
                                 str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'm-int8.safetensors'} is an int8 checkpoint, for inference only; "
        f"train from the float checkpoint it was made from ({src})")


def test_quantizing_a_stored_model_suggests_it_by_name():
    """A model in the local store quantizes beside itself, and the suggested command names
    the copy as the store's models go, by name (the full path worked too, but reads badly)."""
    from gptcli.store import models_dir

    models_dir().mkdir(parents=True, exist_ok=True)
    save_checkpoint(models_dir() / "tiny-x.safetensors", GPT(tiny_config()), char_tokenizer(101))
    result = runner.invoke(app, ["quantize", "tiny-x"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().endswith("use it with: gpt generate --model tiny-x-int8")
    again = runner.invoke(app, ["generate", "--model", "tiny-x-int8", "--prompt", chr(0x101),
                                "--max-new-tokens", "2"])
    assert again.exit_code == 0, again.output
