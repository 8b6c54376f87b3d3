"""dtype `auto`: bf16 autocast for training on CPUs that compute bf16 natively, from a width
where it pays; float32 for small widths, for inference and on other CPUs."""

import pytest
import torch
from typer.testing import CliRunner

import gptcli.devices
from gptcli.cli import app
from gptcli.devices import CPU_BF16_MIN_WIDTH, cpu_bf16_isa, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("isa", ["avx512_bf16", "amx_bf16", None])
def test_auto_trains_in_bf16_on_cpus_that_compute_it_natively(monkeypatch, isa):
    monkeypatch.setattr(gptcli.devices, "cpu_bf16_isa", lambda: isa)
    native = torch.bfloat16 if isa else torch.float32
    assert resolve_dtype("auto", CPU, train_width=384) == native
    assert resolve_dtype("auto", CPU, train_width=CPU_BF16_MIN_WIDTH) == native
    assert resolve_dtype("auto", CPU, train_width=128) == torch.float32  # too small to pay
    assert resolve_dtype("auto", CPU) == torch.float32  # inference
    assert resolve_dtype("float32", CPU, train_width=384) == torch.float32  # asked for


def test_this_cpus_bf16_isa_is_read_from_its_flags():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    expected = "amx_bf16" if " amx_bf16" in flags else "avx512_bf16" if " avx512_bf16" in flags \
        else None
    assert cpu_bf16_isa() == expected


def test_train_says_when_auto_chose_bf16(monkeypatch, corpus, tmp_path):
    """One note line at the start, and the run's dtype is bf16; --dtype float32 keeps float32
    without a note."""
    from gptcli import train

    monkeypatch.setattr(gptcli.devices, "cpu_bf16_isa", lambda: "avx512_bf16")
    monkeypatch.setattr(train, "cpu_bf16_isa", lambda: "avx512_bf16")
    runner = CliRunner()
    args = ["train", "--data", str(corpus), "--device", "cpu", "--n-layer", "1", "--n-head", "2",
            "--n-embd", str(CPU_BF16_MIN_WIDTH), "--context-length", "16", "--max-steps", "1",
            "--sample-interval", "0", "--warmup-steps", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert ("note: bfloat16 autocast (weights stay float32): this CPU computes bf16 natively "
            "(avx512_bf16); --dtype float32 trains in float32") in result.stderr
    assert "(bfloat16)" in result.stderr
    result = runner.invoke(app, [*args, "--dtype", "float32", "--out", str(tmp_path / "f32")])
    assert result.exit_code == 0, result.output
    assert "bfloat16" not in result.stderr and "(float32)" in result.stderr
