"""gptcli's own C products (native.py, native.c): built once per machine into the store, exact
where they claim to be, rebuilt when damaged, and skipped with the reason where no compiler
works, so that torch's kernels serve."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from gptcli import native, tuning
from gptcli.cli import app
from gptcli.kernels import KERNELS
from gptcli.quantize import _reference, _storage, kernel_report, prepare
from gptcli.store import gptcli_home

from test_kernels import model_in, packed

runner = CliRunner()
NATIVE = ["native", "bf16-native", "int8-native", "int4-native"]


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not loaded or failed to build the library yet."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", None)


def built() -> list:
    return sorted((gptcli_home() / "native").glob("gptcli-*.so"))


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("n_in", [40, 2100])
def test_every_row_count_and_width_is_within_the_kernels_bound(name, n_in):
    """1 to 9 rows (groups of 4 and the rest), a prompt's 20 (torch's product), widths that
    leave a remainder after the vector loops and (2100) span three int8 blocks (int4: 3 and 67
    groups of 32), with and without a bias."""
    kernel = KERNELS[name]
    if kernel.mode == "int4":  # whole groups of 32 inputs only: an odd number of them
        n_in = {40: 96, 2100: 2144}[n_in]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n_in, 37, generator=g) * 0.05
    for bias in (torch.randn(37, generator=g), None):
        storage = _storage(kernel.mode, weight, bias)
        exact_w = _reference(kernel.mode, storage).double()
        for rows in (*range(1, 10), 20):
            layer = packed(kernel, storage, rows)
            x = torch.randn(rows, n_in, generator=g) * 3
            with torch.no_grad():
                y = layer(x)
            exact = x.double() @ exact_w + (0 if bias is None else bias.double())
            assert y.shape == (rows, 37)
            assert tuning.relative_error(y, exact) <= kernel.tolerance, (name, rows, bias)


@pytest.mark.parametrize("n_in", [40, 2100])
def test_a_float32_row_comes_out_the_same_alone_or_with_others(n_in):
    """Bit for bit, among 1 to 9 rows (weight rows in fours and one at a time, rows of x in
    twos or fours and the rest; 37 outputs: a remainder; widths with a tail after the vector
    loops): the model's check of a draft's tokens (several positions) must give each position
    the logits a one-position step gives, or greedy tokens could differ with a draft."""
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(37, n_in, generator=g), torch.randn(37, generator=g)
    x = torch.randn(9, n_in, generator=g)
    for b in (bias, None):
        alone = torch.cat([native.float_product(x[m:m + 1], w, b) for m in range(9)])
        for rows in range(1, 10):
            assert torch.equal(native.float_product(x[:rows], w, b), alone[:rows]), rows
            assert torch.equal(native.float_product(x[9 - rows:], w, b), alone[9 - rows:]), rows


def test_int8_sums_at_their_largest_do_not_overflow():
    """Weights at 127 and -128 and activations at their row's maximum, over 3000 inputs, in the
    four-row and one-row code: each block's int32 sum is at its largest, and the result is still
    exact up to the activation rounding."""
    q = torch.full((3, 3000), 127, dtype=torch.int8)
    q[1] = -128
    scale = torch.full((3,), 1e-3)
    x = torch.full((5, 3000), 5.0)  # four rows together and one alone
    x[1] = -5.0
    y = native.int8_product(x, q, scale, None)
    exact = x.double() @ (q.double() * 1e-3).t()
    assert tuning.relative_error(y, exact) < 1e-6


def test_one_thread_and_two_or_three_give_the_same_products():
    """Bit for bit, int4 too (its rows go four at a time, in the same fours on any number of
    threads; 37 rows: a remainder after the fours)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (300, 768), dtype=torch.int8, generator=g)
    x, scale = torch.randn(5, 768, generator=g), torch.rand(300, generator=g)
    w = torch.randn(300, 768, generator=g).to(torch.bfloat16)
    p4, s4, low, _ = int4_case(g, 37, 832)
    x4 = torch.randn(5, 832, generator=g)
    results = []
    for n in (1, 2, 3):
        with threads_set(n):
            results.append((native.int8_product(x, q, scale, None),
                            native.float_product(x, w, None),
                            native.int4_product(x4, p4, s4, low, None),
                            native.int4_product(x4[:1], p4, s4, low, None)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_the_library_is_built_once_into_the_store_and_reused(fresh, monkeypatch):
    native.library()
    first = built()
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", None)  # a new process: finds it, builds nothing

    def no_build(*args):
        raise AssertionError("built again")
    monkeypatch.setattr(native, "_build", no_build)
    native.library()
    assert built() == first and first[0].stat().st_mtime_ns == stamp


def test_a_damaged_library_is_built_again(fresh):
    """In a new process (this one has the library loaded: its file is replaced, as a damaged
    one would be, never written over)."""
    native.library()
    (path,) = built()
    path.unlink()
    path.write_bytes(b"not a library")
    run = subprocess.run([sys.executable, "-c", "from gptcli import native; "
                          "print(native.library().gptcli_int8 is not None)"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    assert built() == [path] and path.stat().st_size > 1000
    assert not list(path.parent.glob(".build-*"))  # nothing half-written left behind


def test_without_a_compiler_torchs_kernels_serve_and_a_forced_native_one_is_refused(
        fresh, monkeypatch, char_checkpoint):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="gptcli's C kernels could not be built"):
        native.library()
    assert built() == []
    model = model_in("float")
    prepare(model, "int8")
    for row in kernel_report(model):
        assert row["kernel"] != "int8-native"
        assert "could not be built" in row["skipped"]["int8-native"]
    with pytest.raises(Exception, match="kernel int8-native does not run on this machine"):
        prepare(model_in("float"), "int8", kernel="int8-native")
    result = runner.invoke(app, ["generate", "--model", str(char_checkpoint), "--prompt", "a",
                                 "--max-new-tokens", "3", "--quantize", "int8",
                                 "--kernel", "int8-native"])
    assert result.exit_code == 2, result.output
    assert "kernel int8-native does not run on this machine" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("mode", [None, "half", "int8", "int4"])
def test_the_native_kernels_are_candidates_and_decode_as_the_stored_weights(mode):
    """Measured like any kernel (here: forced), the greedy tokens of a model running them equal
    those of the float model holding the weights the mode stores (half: rounded to bf16)."""
    from test_kernels import stored_weights_model
    from test_sampling import greedy
    from gptcli.decode import decode_loop
    from gptcli.model import Projection

    model = model_in(mode or "float")
    forced = copy.deepcopy(model)
    name = {None: "native", "half": "bf16-native", "int8": "int8-native",
            "int4": "int4-native"}[mode]
    prepare(forced, mode, kernel=name)
    assert {r["kernel"] for r in kernel_report(forced)
            if r["mode"] == (mode or "float")} == {name}  # (int4's output matrix: int8)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    want = stored_weights_model(model, mode if mode in ("int8", "int4") else "float")
    if mode == "half":
        with torch.no_grad():
            for m in want.modules():
                if isinstance(m, Projection):
                    m.weight.copy_(m.weight.bfloat16().float())
            want.lm_head.weight.copy_(want.lm_head.weight.bfloat16().float())
    got = torch.stack(list(decode_loop(forced, prompt, greedy(12))))
    assert torch.equal(got, torch.stack(list(decode_loop(want, prompt, greedy(12)))))


def test_a_compiler_without_openmp_builds_the_one_thread_library_and_is_asked_once(
        fresh, monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp (as Apple's clang does): the next flags build a library
    that runs on one thread, and a new process does not ask for -fopenmp again."""
    calls = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\necho "$@" >> %s\ncase "$*" in *-fopenmp*) '
                  'echo "error: unsupported option -fopenmp" >&2; exit 1;; esac\n'
                  'exec gcc "$@"\n' % calls)
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    lib = native.library()
    assert hasattr(lib, "gptcli_int8")
    asked = [line for line in calls.read_text().splitlines() if "-shared" in line]
    assert len(asked) == 2 and "-fopenmp" in asked[0] and "-fopenmp" not in asked[1]
    (note,) = (gptcli_home() / "native").glob("*.failed")
    assert "unsupported option -fopenmp" in note.read_text()
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (50, 64), dtype=torch.int8, generator=g)
    x, scale = torch.randn(3, 64, generator=g), torch.rand(50, generator=g)
    exact = x.double() @ (q.double() * scale.double()[:, None]).t()
    assert tuning.relative_error(native.int8_product(x, q, scale, None), exact) < 3e-4
    monkeypatch.setattr(native, "_loaded", None)  # a new process
    native.library()
    assert [line for line in calls.read_text().splitlines() if "-shared" in line] == asked


AVX2 = ["-mavx2", "-mfma", "-mf16c"]  # what -march=native gives on any AVX2 CPU


def test_int8_bytes_give_the_int16_codes_sums_exactly(fresh, monkeypatch):
    """With AVX-512 VNNI the int8 product multiplies bytes (weights + 128, activations as two
    bytes each) where other CPUs widen to int16: the integer sums are the same, so the products
    are equal bit for bit, at the weights' extremes (-128, 127) and activations' too, over
    tails, several int8 blocks, one row and four."""
    from gptcli import hardware
    isa = set(hardware.isa_flags())
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= isa:
        pytest.skip("this CPU lacks AVX-512 VNNI, whose byte products this compares")
    g = torch.Generator().manual_seed(5)
    cases = []
    for K in (7, 64, 130, 1100, 3072):
        q = torch.randint(-128, 128, (21, K), dtype=torch.int8, generator=g)
        q[0], q[1] = 127, -128
        x = torch.randn(6, K, generator=g) * 3
        x[0], x[1] = 5.0, -5.0
        cases.append((x, q, torch.rand(21, generator=g), torch.randn(21, generator=g)))
    results = []
    for flags in (["-O3", "-march=native", "-fopenmp"],
                  ["-O3", *AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]):
        monkeypatch.setattr(native, "FLAG_SETS", (flags,))
        monkeypatch.setattr(native, "_loaded", None)
        results.append([native.int8_product(x[:m], q, s, b) for x, q, s, b in cases
                        for m in (1, 4, 6)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("flags", [["-O3", *AVX2, "-fopenmp"], ["-O3", "-fopenmp"],
                                   ["-O3", *AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl",
                                    "-fopenmp"]],
                         ids=["avx2", "plain", "avx512-without-vnni"])
def test_the_avx2_and_plain_builds_compute_the_same_products(fresh, monkeypatch, flags):
    """This CPU builds with -march=native (AVX-512 VNNI here), so the AVX2 code, the plain
    loops and AVX-512 without VNNI (int4's 16-bit pairs) that other CPUs get are built here on
    purpose and held to the same bounds (and the greedy pick to torch's argmax)."""
    from gptcli import hardware
    needs = {"avx2", "fma", "f16c"} | ({"avx512f", "avx512bw", "avx512vl"}
                                       if "-mavx512bw" in flags else set())
    if flags != ["-O3", "-fopenmp"] and not needs <= set(hardware.isa_flags()):
        pytest.skip(f"this CPU lacks {', '.join(sorted(needs - set(hardware.isa_flags())))} "
                    "to run that build on")
    monkeypatch.setattr(native, "FLAG_SETS", (flags,))
    native.library()
    g = torch.Generator().manual_seed(4)
    for K in (7, 96, 1100, 2144):  # tails; more than one int8 block; int4: 3 and 67 groups
        for M in (1, 3, 4, 6):
            x = torch.randn(M, K, generator=g) * 2
            q = torch.randint(-128, 128, (19, K), dtype=torch.int8, generator=g)
            scale, bias = torch.rand(19, generator=g), torch.randn(19, generator=g)
            exact = x.double() @ (q.double() * scale.double()[:, None]).t() + bias.double()
            got = native.int8_product(x, q, scale, bias)
            assert tuning.relative_error(got, exact) < 3e-4, (K, M)
            w = torch.randn(19, K, generator=g)
            for weights in (w, w.bfloat16()):
                exact = x.double() @ weights.double().t() + bias.double()
                got = native.float_product(x, weights, bias)
                assert tuning.relative_error(got, exact) < 1e-5, (K, M, weights.dtype)
            if K % 32 == 0:  # fp16 scales and lows as given, subnormal and zero ones too
                p4, scale, low, weights = int4_case(g, 19, K)
                exact = x.double() @ weights.t() + bias.double()
                got = native.int4_product(x, p4, scale, low, bias)
                assert tuning.relative_error(got, exact) < 3e-4, (K, M)
                layer = packed(KERNELS["int4-native"], _storage("int4", w.t(), bias), M)
                exact = x.double() @ _reference("int4", _storage("int4", w.t(), bias)).double() \
                    + bias.double()
                with torch.no_grad():
                    assert tuning.relative_error(layer(x), exact) < 3e-4, (K, M)
    x, q = torch.randn(4, 40, generator=g), torch.randint(-127, 128, (8, 40), dtype=torch.int8,
                                                        generator=g)
    x[2, 5], x[1, 20] = float("nan"), float("inf")  # (the vector loops: 40 = 32 + a tail)
    y = native.int8_product(x, q, torch.rand(8, generator=g), None)
    assert y[2].isnan().all() and not y[1].isfinite().any() and y[[0, 3]].isfinite().all()
    scores = torch.randn(3, 50257, generator=g)  # the greedy pick: first of equal values
    scores[1, 9] = scores[1, 50000] = scores[2, 50250] = 50.0
    assert torch.equal(native.argmax(scores), scores.argmax(dim=-1))
    scores[0, 50256] = float("nan")  # (in the tail)
    assert native.argmax(scores) is None


@pytest.mark.parametrize("flags", [None, ["-O3", *AVX2, "-fopenmp"], ["-O3", "-fopenmp"]],
                         ids=["native", "avx2", "plain"])
def test_keys_and_values_round_to_fp16_as_torch_does_in_every_build(fresh, monkeypatch, flags):
    """A quantized model's keys and values are fp16, written into the cache by the C blocks
    (native.c's to_f16: the CPU's conversion, or by hand where the build has no F16C) and by
    torch (a copy into the cache, or model.py's rounding): the same fp16 values for normal,
    subnormal, overflowing and special inputs, and for ties (to even) and their neighbours."""
    from gptcli import hardware
    if flags and "-mavx2" in flags and not {"avx2", "fma", "f16c"} <= set(hardware.isa_flags()):
        pytest.skip("this CPU lacks AVX2 to run that build on")
    if flags:
        monkeypatch.setattr(native, "FLAG_SETS", (flags,))
    native.library()
    g = torch.Generator().manual_seed(6)
    bits = torch.randint(0, 0x7bff, (4000,), dtype=torch.int16, generator=g)  # finite fp16s
    low, high = bits.view(torch.float16).float(), (bits + 1).view(torch.float16).float()
    ties = (low + high) / 2  # half way between two fp16s (exact in float32)
    sign = torch.randint(0, 2, (4000,), generator=g).float() * 2 - 1
    wide = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,),
                                                                     generator=g).float())
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9,
                            float("inf"), -float("inf"), float("nan"), 2.0 ** -24,
                            2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -12),
                            1e-10, -6.1e-5])
    x = torch.cat([ties * sign, torch.nextafter(ties, torch.tensor(0.0)) * sign,
                   torch.nextafter(ties, ties * 2) * sign, wide, special])
    got, want = native.to_f16(x), x.half()
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 1
    keep = ~want.isnan()
    assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16))


@contextlib.contextmanager
def threads_set(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def int4_case(g: torch.Generator, N: int, K: int) -> tuple:
    """Random 4-bit weights (N, K) as native.c takes them, fp16 scales and lows with subnormal
    and zero ones among them (a row of them where N > 1: alone its small results would be all
    rounding), and the same weights in float64."""
    p4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    scale = (torch.rand(N, K // 32, generator=g) * 1e-4).half()  # most < 6.1e-5: subnormal
    if N > 1:
        scale[N // 2] = 0
    low = (torch.randn(N, K // 32, generator=g) * 1e-3).half()
    nibbles = p4.view(N, -1, 16)  # byte j of a group: element j, element j + 16
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(N, K).double()
    weights = q * scale.double().repeat_interleave(32, 1) + low.double().repeat_interleave(32, 1)
    return p4, scale, low, weights


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x's rows as native.c rounds them (15 bits, each row's step max |x| / 16383, to nearest
    even), in float64: against these the integer products are exact but for float32 sums."""
    step = x.abs().amax(dim=1, keepdim=True) / 16383
    return torch.round(x * (1 / step)).double() * step.double()


def test_int4_takes_four_weight_rows_and_four_activation_rows_at_a_time():
    """Where a row has an even number of groups, four weight rows at a time with four rows of
    activations (or one: the rest), the scales eight groups at a time: 2, 4, 6, 8 and 26 groups
    (the last load of scales short or whole), 1 to 9 rows of activations (fours and the rest),
    output rows that leave a remainder after the fours (the last thread's), with and without a
    bias, on one thread and two: exact to the rounded activations but for float32 sums."""
    g = torch.Generator().manual_seed(7)
    for K in (64, 128, 192, 256, 832):
        for N in (1, 4, 9, 37):
            p4, scale, low, weights = int4_case(g, N, K)
            bias = torch.randn(N, generator=g)
            for M in (1, 2, 3, 4, 5, 9):
                x = torch.randn(M, K, generator=g) * 2
                for b in (bias, None):
                    exact = rounded(x) @ weights.t() + (0 if b is None else b.double())
                    for threads in (1, 2):
                        with threads_set(threads):
                            got = native.int4_product(x, p4, scale, low, b)
                        assert tuning.relative_error(got, exact) < 1e-5, (K, N, M, threads)


def test_int4_weights_made_float32_for_a_prompt_are_the_stored_weights():
    """int4-dnn's weights (a prompt's product through oneDNN): each q * scale + low, within
    float32's rounding of it (subnormal and zero scales among them), on one thread and two."""
    g = torch.Generator().manual_seed(8)
    for K, N in ((32, 1), (64, 9), (832, 37)):
        p4, scale, low, weights = int4_case(g, N, K)
        for threads in (1, 2):
            with threads_set(threads):
                got = native.int4_unpacked(p4, scale, low)
            assert got.dtype == torch.float32 and got.shape == (N, K)
            err = (got.double() - weights).abs()
            assert (err <= weights.abs() * 2 ** -23 + 1e-45).all(), (K, N, threads)
    with pytest.raises(ValueError, match="whole groups of 32"):
        native.int4_unpacked(p4[:, :8], scale, low)  # 16 inputs a row


def test_a_row_holding_a_nan_gives_nan_and_torchs_default_dtype_does_not_matter():
    """As torch's product would: a NaN in a row of x makes that row's results NaN, not a
    quiet number, and an infinity makes them not finite; the result is float32 even where
    torch's default dtype is another."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (8, 64), dtype=torch.int8, generator=g)
    x, scale = torch.randn(4, 64, generator=g), torch.rand(8, generator=g)
    x[2, 5], x[1, 40] = float("nan"), float("inf")
    y = native.int8_product(x, q, scale, None)
    assert y[2].isnan().all() and not y[1].isfinite().any() and y[[0, 3]].isfinite().all()
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        y = native.int8_product(x[[0, 3]], q, scale, None)
    finally:
        torch.set_default_dtype(default)
    exact = x[[0, 3]].double() @ (q.double() * scale.double()[:, None]).t()
    assert y.dtype == torch.float32 and tuning.relative_error(y, exact) < 3e-4


def test_wrong_buffers_are_refused_before_the_c_code_reads_them():
    x, q, scale = torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    for bad in (q.t().contiguous().t(), q[:, :32].contiguous(), q.float()):
        with pytest.raises(ValueError, match="gptcli's C product needs a contiguous"):
            native.int8_product(x, bad, scale, None)
    assert native.int8_product(x, q, scale.double(), None).shape == (1, 8)  # converted


def test_a_cached_native_choice_where_the_library_no_longer_builds_is_measured_again(
        fresh, monkeypatch):
    """A kernel cache written where the C library built (a shared $GPTCLI_HOME, a compiler
    since removed): the next load measures torch's kernels instead of failing."""
    prepare(model_in("float"), "int8")
    cache = json.loads(tuning.cache_path().read_text())
    for entry in cache["entries"]:  # as if int8-native had won everywhere
        entry["kernel"] = "int8-native"
    tuning.cache_path().write_text(json.dumps(cache))
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = model_in("float")
    prepare(model, "int8")
    for row in kernel_report(model):
        assert row["kernel"] != "int8-native" and row["source"] == "measured"
        assert "no C compiler '/nonexistent/cc' found" in row["skipped"]["int8-native"]
