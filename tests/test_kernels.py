"""Kernels chosen by measurement: every candidate computes the product its mode stands for, a
forced one gives the same logits, the cache of choices survives only what it should."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from gptcli import native_step, tuning
from gptcli.cli import app
from gptcli.config import KERNEL_ENV, SampleConfig
from gptcli.errors import UserError
from gptcli.kernel_layer import KernelLinear
from gptcli.kernels import KERNELS, candidates
from gptcli.model import GPT, Projection
from gptcli.quantize import _reference, _storage, kernel_report, prepare, quantization
from gptcli.decode import decode_loop

from conftest import randomize_, tiny_config
from test_sampling import full_recompute, greedy

runner = CliRunner()


@pytest.fixture(autouse=True)
def models_own_blocks(monkeypatch):
    """The kernels' choices as the tuner made them: the C blocks, which run the native kernel
    in every block where they measure faster, measure slower here (test_native_step.py tests
    them, and what they do to these choices)."""
    monkeypatch.setattr(native_step, "_time_blocks", lambda *args: (1.0, 2.0))


def packed(kernel, storage, rows=1):
    """``kernel``'s layer for ``storage``, or a skip when it does not run on this CPU."""
    layer = KernelLinear.from_storage(kernel.mode, storage)
    try:
        layer.use({rows: kernel}, 2, storage)
        with torch.no_grad():
            kernel.run(torch.zeros(rows, layer.n_in), layer)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"{kernel.name} does not run on this CPU: {str(e).splitlines()[0]}")
    return layer


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_computes_its_modes_product_within_its_bound(name):
    """Against the float64 product with the weights the mode stores (int8: dequantized; half:
    the float weights, since rounding them is the kernel's), at 1 row and 5, with a bias."""
    kernel = KERNELS[name]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 40, generator=g) * 0.05  # (in, out); 40 outputs: int4 pads them
    storage = _storage(kernel.mode, weight, torch.randn(40, generator=g))
    exact_w = _reference(kernel.mode, storage).double()
    for rows in (1, 5):
        layer = packed(kernel, storage, rows)
        x = torch.randn(rows, 64, generator=g) * 3
        with torch.no_grad():
            y = layer(x)
        exact = x.double() @ exact_w + storage["bias"].double()
        assert y.shape == (rows, 40) and y.dtype == torch.float32
        assert tuning.relative_error(y, exact) <= kernel.tolerance, (name, rows)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_row_keeps_its_bound_whatever_the_other_rows_hold(name):
    """Rows of one batch a million times apart in scale: each row's result is within the
    kernel's bound of its own exact product (a kernel that quantized the batch with one range,
    as fbgemm's operator does by itself, would leave the small rows as noise)."""
    kernel = KERNELS[name]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 40, generator=g) * 0.05
    storage = _storage(kernel.mode, weight, torch.randn(40, generator=g) * 1e-3)
    exact_w = _reference(kernel.mode, storage).double()
    layer = packed(kernel, storage, 4)
    x = torch.randn(4, 64, generator=g) * torch.tensor([[1e3], [1.0], [1e-3], [1.0]])
    x[3] = x[3].abs()  # a row of one sign: its own range is not symmetric
    with torch.no_grad():
        y = layer(x)
    exact = x.double() @ exact_w + storage["bias"].double()
    for row in range(4):
        assert tuning.relative_error(y[row], exact[row]) <= kernel.tolerance, (name, row)


def model_in(mode, seed=1):
    config = tiny_config(n_embd=64, n_head=4) if mode == "int4" else tiny_config()
    return randomize_(GPT(config), seed=seed).eval()


def stored_weights_model(model, mode):
    """A plain float model whose projections hold exactly what ``mode`` stores (int8, int4:
    dequantized; the output matrix int8 in int4 mode): the logits every kernel of the mode
    must reproduce, up to its activation rounding."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, Projection):
                m.weight.copy_(_reference(mode, _storage(mode, m.weight, m.bias)))
        head_mode = "int8" if mode == "int4" else mode
        ref.lm_head.weight.copy_(_reference(head_mode, _storage(
            head_mode, ref.lm_head.weight.t(), None)).t())
    return ref


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_forced_kernel_gives_the_same_logits(name):
    """Forcing any candidate gives the logits of the weights its mode stores, within the
    kernel's own precision (its bound, a few times over for 2 layers and the output matrix),
    and the same top-1 tokens nearly everywhere."""
    kernel = KERNELS[name]
    model = model_in(kernel.mode)
    quantize = None if kernel.mode == "float" else kernel.mode
    forced = copy.deepcopy(model)
    try:
        prepare(forced, quantize, kernel=name)
    except UserError as e:
        assert "does not run on this machine" in str(e)
        pytest.skip(str(e))
    chosen = {m.kernel.name for m in forced.modules() if isinstance(m, KernelLinear)
              and m.mode == kernel.mode}
    assert chosen == {name}
    idx = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = stored_weights_model(model, kernel.mode)(idx), forced(idx)
    rms = ((got - want).pow(2).mean().sqrt() / want.std()).item()
    assert rms <= 4 * kernel.tolerance, rms
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (
        1.0 if kernel.tolerance <= 1e-4 else 0.9)


@pytest.mark.parametrize("quantize", [None, "half", "int8", "int4"])
def test_kv_cache_decode_equals_full_recomputation_in_each_mode(quantize):
    model = model_in(quantize or "float", seed=2)
    prepare(model, quantize)
    assert quantization(model) == quantize
    # one row: decoding multiplies single rows (the kernels' batch-1 paths), the full
    # recomputation whole windows
    prompt = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(1))
    n = 60  # context 32: the window slides
    cached = torch.stack(list(decode_loop(model, prompt, greedy(n))), dim=1)
    assert torch.equal(cached, full_recompute(model, prompt, n))


def test_int8_with_bf16_activations_is_left_out_where_torchs_kernel_would_crash():
    """torch 2.13's _weight_int8pack_mm with bf16 activations ends the process (a segfault, on
    an AVX-512 CPU) where the inputs are not a multiple of 16, e.g. 136 in, 101 out, 3 rows:
    the tuner leaves that kernel out there, saying why, and the model decodes as the
    recomputation does; a layer of 544 inputs still has it timed."""
    model = randomize_(GPT(tiny_config(n_embd=136, n_head=2)), seed=4).eval()
    prepare(model, "int8", rows=(1, 3))
    attn, out = model.h[0].attn.c_attn, model.h[0].mlp.c_proj  # 136 inputs; 544
    assert {"int8-bf16"} <= set(attn.choices[3].skipped)
    assert "multiple of 16 inputs" in attn.choices[3].skipped["int8-bf16"]
    assert "int8-bf16" not in out.choices[3].skipped
    prompt = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(2))
    cached = torch.stack(list(decode_loop(model, prompt, greedy(8))), dim=1)
    assert torch.equal(cached, full_recompute(model, prompt, 8))


# ----------------------------------------------------------------------------- choosing

def fake_timings(times):
    """A stand-in for tuning.measure that reports ``times`` (kernel -> µs) and counts calls."""
    calls = []

    def measure(kernels, storages, reference, rows, dtype, threads, flush):
        calls.append((rows, [k.name for k in kernels]))
        at = times.get(rows, times)  # times may be given per row count
        return {k.name: at[k.name] for k in kernels if k.name in at}, {}
    return measure, calls


def test_the_fastest_measured_kernel_is_chosen_and_cached(monkeypatch):
    measure, calls = fake_timings({"int8-intmm2": 9.0, "int8-intmm": 3.0, "int8-bf16": 5.0,
                                   "int8-fp16": 1.0, "int8-f32": 7.0})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 4))
    head = model.lm_head
    assert head.kernels[1].name == "int8-fp16" and head.kernels[4].name == "int8-fp16"
    # five shapes, two row counts each and prompts: these among the kernels as precise as
    # decoding's (int8-fp16's activations), of its layout
    assert [rows for rows, _ in calls] == [1, 4, tuning.PROMPT_TIMED] * 5
    precise = [n for n in calls[0][1] if KERNELS[n].tolerance <= KERNELS["int8-fp16"].tolerance]
    assert "int8-intmm" not in precise and "int8-bf16" not in precise
    assert all(names == precise for rows, names in calls if rows == tuning.PROMPT_TIMED)
    assert head.kernels[tuning.PROMPT_ROWS].name == "int8-fp16"
    report = kernel_report(model)
    assert {r["source"] for r in report} == {"measured"}
    # the next load reads the choices from the cache: nothing is measured again
    calls.clear()
    again = model_in("int8")
    prepare(again, "int8", rows=(1, 4))
    assert calls == [] and {r["source"] for r in kernel_report(again)} == {"cached"}
    assert again.lm_head.kernels[1].name == "int8-fp16"


def test_a_more_precise_kernel_within_a_few_percent_of_the_fastest_is_preferred():
    assert tuning.pick({"int8-bf16": 100.0, "int8-intmm2": 102.0, "int8-f32": 500.0}) \
        == "int8-intmm2"  # 15-bit activations for 2% more time
    assert tuning.pick({"int8-bf16": 100.0, "int8-intmm2": 110.0}) == "int8-bf16"
    assert tuning.pick({"addmm": 100.0, "linear": 101.0}) == "addmm"  # equally precise


def test_one_layout_serves_every_row_count_and_is_the_fastest_over_them(monkeypatch):
    """Every kernel is measured at each row count; the layout is the one fastest summed over
    them, each row count then runs its fastest kernel of that layout."""
    float_names = [k.name for k in candidates("float") if not k.prompt]  # (prompts': below)
    one = {"addmm": 5.0, "linear": 1.0, "chunked": 2.0, "chunked-rows": 4.0, "mkldnn": 3.0}
    measure, calls = fake_timings({1: one, 4: {**one, "linear": 9.0, "chunked": 9.0}})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float")
    prepare(model, None, rows=(1, 4))
    assert calls[:2] == [(1, float_names), (4, float_names)]
    # (out, in) costs 1 + 9; chunked 2 + 9; mkldnn's own layout 3 + 3: the fastest together
    assert {m: k.name for m, k in model.lm_head.kernels.items()} == {1: "mkldnn", 4: "mkldnn"}
    # within a few percent, the 1-row choice keeps its layout; alone, it always does
    assert tuning.layout_for([one, {**one, "linear": 3.1}]) == "out_in"
    assert tuning.layout_for([one]) == "out_in"


def test_a_row_count_where_the_kept_layout_did_not_run_takes_its_own_fastest(monkeypatch):
    """If no kernel of the 1-row layout ran at 4 rows, the 4-row choice is its own fastest,
    packed as a second layout: the model still runs, with the same logits."""
    measure, _ = fake_timings({1: {"linear": 1.0}, 4: {"chunked": 2.0}})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float")
    want = copy.deepcopy(model)
    prepare(model, None, rows=(1, 4))
    assert model.lm_head.kernels == {1: KERNELS["linear"], 4: KERNELS["chunked"]}
    idx = torch.randint(0, 101, (4, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), want(idx), rtol=1e-4, atol=1e-4)


def test_a_row_count_not_chosen_for_runs_the_kernel_of_the_most_rows_below_it(monkeypatch):
    """Kernels of one layout: each row count chosen for takes its own fastest; a batch of more
    rows runs the batch's kernel up to the prompts' row count, the prompts' from there, and a
    batch smaller than any chosen for, the first."""
    one = {"int8-intmm2": 9.0, "int8-intmm": 3.0, "int8-bf16": 5.0, "int8-fp16": 8.0,
           "int8-f32": 7.0, "int8-fbgemm": 1.0}
    measure, _ = fake_timings({1: one, 4: {**one, "int8-fbgemm": 6.0},
                               tuning.PROMPT_TIMED: {**one, "int8-f32": 0.5}})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 4))
    head, prompts = model.lm_head, tuning.PROMPT_ROWS
    assert head.kernels == {1: KERNELS["int8-fbgemm"], 4: KERNELS["int8-intmm"],
                            prompts: KERNELS["int8-f32"]}
    assert [head.for_rows(m).name for m in (1, 2, 3, 4, 5, prompts - 1, prompts, 64)] == \
        ["int8-fbgemm"] * 3 + ["int8-intmm"] * 3 + ["int8-f32"] * 2
    assert [r["prompt"] for r in kernel_report(model) if r.get("prompt")] != []


def test_prompts_get_their_own_kernel_timed_at_a_prompts_rows(monkeypatch):
    """From PROMPT_ROWS rows on, the fastest of the layout's kernels timed at PROMPT_TIMED rows,
    those for prompts only among them (never timed for decoding); none where the batch itself
    is that large."""
    layout = [k.name for k in candidates("float") if k.layout == "out_in"]
    one = {"linear": 1.0, "native": 2.0, "addmm": 3.0}
    measure, calls = fake_timings({1: one, tuning.PROMPT_ROWS: one,
                                   tuning.PROMPT_TIMED: {n: 1.0 if n == "mkldnn-plain" else 3.0
                                                         for n in layout}})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float")
    want = copy.deepcopy(model)
    prepare(model, None)
    assert "mkldnn-plain" in layout and KERNELS["mkldnn-plain"].prompt
    assert all(not KERNELS[n].prompt for rows, names in calls if rows == 1 for n in names)
    assert {tuple(names) for rows, names in calls if rows != 1} == {tuple(layout)}
    head, prompts = model.lm_head, tuning.PROMPT_ROWS
    assert head.kernels == {1: KERNELS["linear"], prompts: KERNELS["mkldnn-plain"]}
    assert [head.for_rows(m).name for m in (1, prompts - 1, prompts, 500)] == \
        ["linear"] * 2 + ["mkldnn-plain"] * 2
    (entry,) = [r for r in kernel_report(model) if r.get("prompt") and r["shape"][1] == 101]
    assert entry["rows"] == prompts and entry["timed_rows"] == tuning.PROMPT_TIMED
    idx = torch.randint(0, 101, (2, prompts + 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), want(idx), rtol=1e-4, atol=1e-4)
    calls.clear()
    big = model_in("float")
    prepare(big, None, rows=(1, prompts))  # a batch of 16: its own choice serves prompts
    # (1 row: cached above) never timed at PROMPT_TIMED
    assert set(big.lm_head.kernels) == {1, prompts} and {r for r, _ in calls} == {prompts}
    assert not any(r.get("prompt") for r in kernel_report(big))


def test_a_prompt_is_never_computed_less_precisely_than_the_largest_batchs_kernel(monkeypatch):
    """Prompts ran the largest batch's kernel before they had their own: theirs is at least as
    precise (here int8-intmm2's 15-bit activations, not int8-fbgemm's 8 bits)."""
    fast = {"int8-fbgemm": 0.5, "int8-intmm": 0.6, "int8-bf16": 0.7, "int8-fp16": 0.8,
            "int8-f32": 2.0, "int8-intmm2": 3.0, "int8-native": 3.0}
    measure, calls = fake_timings({1: fast, 4: {**fast, "int8-intmm2": 0.1},
                                   tuning.PROMPT_TIMED: fast})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 4))
    head = model.lm_head
    assert head.kernels[1].name == "int8-fbgemm" and head.kernels[4].name == "int8-intmm2"
    timed = {n for rows, names in calls if rows == tuning.PROMPT_TIMED for n in names}
    assert timed and all(KERNELS[n].tolerance <= KERNELS["int8-intmm2"].tolerance
                         for n in timed)
    assert head.kernels[tuning.PROMPT_ROWS].name == "int8-f32"


def test_generate_chooses_kernels_for_its_batch(char_checkpoint, monkeypatch):
    """`gpt generate --num-samples N` decodes N rows at once: its kernels are chosen for N rows
    too (as `gpt serve`'s for --max-batch)."""
    from gptcli.generate import load_generator

    measure, calls = fake_timings({"addmm": 5.0, "linear": 3.0, "chunked": 2.0,
                                   "chunked-rows": 4.0, "mkldnn": 9.0})
    monkeypatch.setattr(tuning, "measure", measure)
    loaded = load_generator(str(char_checkpoint), device="cpu", batch=3)
    prompts = {tuning.PROMPT_ROWS}  # (and prompts: timed at PROMPT_TIMED)
    assert set(loaded.model.lm_head.kernels) - prompts == {1, 3}
    assert {rows for rows, _ in calls} - {tuning.PROMPT_TIMED} == {1, 3}
    result = runner.invoke(app, ["generate", "--model", str(char_checkpoint), "--prompt", "ab",
                                 "--max-new-tokens", "2", "--num-samples", "5"])
    assert result.exit_code == 0, result.output
    assert {rows for rows, _ in calls} - {tuning.PROMPT_TIMED} == {1, 3, 5}


def cache_entries():
    """The kernels' entries (the file also holds native_step's choices: test_native_step.py)."""
    return [e for e in json.loads(tuning.cache_path().read_text())["entries"] if "kernel" in e]


def test_a_corrupt_or_foreign_cache_entry_is_ignored_and_remeasured(monkeypatch):
    prepare(model_in("float"), None)
    entries = cache_entries()
    assert len([e for e in entries if e["key"]["rows"] == 1]) == 5 and \
        all(e["key"]["threads"] == torch.get_num_threads() for e in entries)
    # our entries rewritten to name another mode's kernel, plus another machine's entry
    foreign = dict(entries[0], key=dict(entries[0]["key"], cpu="Some Other CPU"),
                   kernel="chunked")
    broken = [dict(e, kernel="int8-intmm") for e in entries]
    tuning.cache_path().write_text(json.dumps({"format": tuning.CACHE_FORMAT,
                                               "entries": broken + [foreign]}))
    measure, calls = fake_timings({"addmm": 2.0, "linear": 1.0, "chunked": 3.0, "mkldnn": 4.0})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float")
    prepare(model, None)
    # (five shapes at 1 row and for prompts: (out, in)'s kernels are measured for those too)
    assert len(calls) == 10 and {r["source"] for r in kernel_report(model)} == {"measured"}
    kept = cache_entries()
    # (a broken entry for prompts whose candidates differ from this run's is left as it was)
    assert foreign in kept and {e["kernel"] for e in kept
                                if e != foreign and e not in broken} == {"linear"}
    # a file that is not JSON at all, or not ours: measured again, then rewritten whole
    for text in ("{not json", json.dumps({"format": "something-else/9", "entries": []})):
        tuning.cache_path().write_text(text)
        calls.clear()
        prepare(model_in("float"), None)
        assert len(calls) == 10 and len(cache_entries()) == 10
    # a valid entry is used as it is (the cache is really read)
    entries = cache_entries()
    for e in entries:
        e.update(kernel="addmm", us={"addmm": 1.0})
    tuning.cache_path().write_text(json.dumps({"format": tuning.CACHE_FORMAT,
                                               "entries": entries}))
    calls.clear()
    model = model_in("float")
    prepare(model, None)
    # (prompts: addmm's layout is not the native one, whose kernels are timed for them too)
    assert [r for r, _ in calls if r != tuning.PROMPT_TIMED] == []
    assert model.lm_head.kernel.name == "addmm"


def test_the_first_measurement_says_so_once_on_a_terminal(monkeypatch, capsys):
    """Measuring takes seconds the first time a model is used on a machine: on a terminal, one
    line on stderr says why it pauses (once per process); a run that reads the cache is quiet,
    and so is stderr that is not a terminal (a pipe, a log, an error that must stand alone)."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(tuning, "_announced", False)
    prepare(model_in("int8"), "int8")  # (not a terminal)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    prepare(model_in("float"), None)
    prepare(model_in("int4"), "int4")
    assert sys.stderr.getvalue() == (f"measuring which kernels are fastest on this CPU "
                                     f"(once; kept in {tuning.cache_path()})\n")
    monkeypatch.setattr(tuning, "_announced", False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    prepare(model_in("float"), None)
    assert sys.stderr.getvalue() == ""


def test_choices_made_without_an_isa_limit_are_not_taken_with_one(monkeypatch):
    """ATEN_CPU_CAPABILITY (and oneDNN's limit, and $CC for gptcli's C) change which kernels
    are fastest: a choice cached without them is measured again with them, and each is then
    read back under its own setting."""
    for name in tuning.LIMITS:
        monkeypatch.delenv(name, raising=False)
    measure, calls = fake_timings({"addmm": 2.0, "linear": 1.0, "chunked": 3.0, "mkldnn": 4.0})
    monkeypatch.setattr(tuning, "measure", measure)
    prepare(model_in("float"), None)
    assert len(calls) == 10
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    calls.clear()
    prepare(model_in("float"), None)
    assert len(calls) == 10 and all(e["key"].get("limits") in (None, {"ATEN_CPU_CAPABILITY":
                                                                      "avx2"})
                                    for e in cache_entries())
    for setting in ("avx2", None):
        if setting is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY")
        calls.clear()
        prepare(model_in("float"), None)
        assert calls == []


def test_each_timing_follows_a_read_of_what_decoding_reads_in_between(monkeypatch):
    """Decoding reads the rest of the model between two reads of a layer's weights, so each
    timing follows a read of the model's size: no more than twice the cache the CPU reports
    (which a VM may not really have to itself), nor FLUSH_MAX."""
    size = lambda model_bytes: tuning.flush_buffer(model_bytes).numel() * 4  # noqa: E731
    monkeypatch.setattr(tuning.hardware, "cpu_cache_bytes", lambda: 4 << 20)
    assert size(3 << 20) == 3 << 20  # the model fits the cache reported, and is read all the same
    assert size(100 << 20) == 8 << 20 and size(1000) == 1000
    monkeypatch.setattr(tuning.hardware, "cpu_cache_bytes", lambda: None)
    monkeypatch.setattr(tuning, "FLUSH_MAX", 2 << 20)
    assert size(1 << 20) == 1 << 20 and size(8 << 20) == 2 << 20
    assert tuning.flush_buffer(0) is None
    # choices timed the earlier way (format 1: no read where the model fitted) are timed again
    prepare(model_in("float"), None)
    data = json.loads(tuning.cache_path().read_text())
    tuning.cache_path().write_text(json.dumps(dict(data, format="gptcli-kernels/1")))
    measure, calls = fake_timings({"addmm": 2.0, "linear": 1.0, "chunked": 3.0, "mkldnn": 4.0})
    monkeypatch.setattr(tuning, "measure", measure)
    prepare(model_in("float"), None)
    assert len(calls) == 10 and json.loads(tuning.cache_path().read_text())["format"] == \
        tuning.CACHE_FORMAT != "gptcli-kernels/1"


def test_a_choice_measured_on_a_saturated_machine_is_measured_again_when_quieter(monkeypatch):
    import os

    cores = os.cpu_count()
    monkeypatch.setattr(tuning, "current_load", lambda: cores + 3.0)
    prepare(model_in("float"), None)
    assert {e["load"] for e in cache_entries()} == {cores + 3.0}
    measure, calls = fake_timings({"addmm": 2.0, "linear": 1.0, "chunked": 3.0, "mkldnn": 4.0})
    monkeypatch.setattr(tuning, "measure", measure)
    monkeypatch.setattr(tuning, "current_load", lambda: cores + 2.5)  # hardly quieter: kept
    prepare(model_in("float"), None)
    assert calls == []
    monkeypatch.setattr(tuning, "current_load", lambda: 0.5)
    prepare(model_in("float"), None)
    assert len(calls) == 10 and {e["load"] for e in cache_entries() if e["key"]["rows"] == 1} \
        == {0.5}
    calls.clear()
    prepare(model_in("float"), None)  # measured on a quiet machine: kept from then on
    assert calls == []


def test_a_measurement_other_programs_disturbed_is_taken_again_and_not_kept(monkeypatch):
    """Where this process's threads waited for a CPU while kernels were timed, the timing runs
    once more; still disturbed, it is used, shown as such, and measured again next time."""
    from gptcli.tables import _kernel_row

    waited, busy = [0], [True]

    def queued_ns():  # each reading after the last: 1000 s more waiting while busy
        waited[0] += 10 ** 12 if busy[0] else 0
        return waited[0]
    monkeypatch.setattr(tuning.hardware, "queued_ns", queued_ns)
    measure, calls = fake_timings({"addmm": 2.0, "linear": 1.0, "chunked": 3.0, "mkldnn": 4.0})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float")
    prepare(model, None)
    assert len(calls) == 20  # every shape and row count twice
    assert all(e["queued"] >= tuning.QUEUED_MAX for e in cache_entries())
    choice = next(iter(model.h[0].mlp.c_fc.choices.values())).as_dict()
    row = _kernel_row({**choice, "shape": [8, 32], "rows": 1, "mode": "float", "layers": 2})[1]
    assert "disturbed by other programs" in row and "measured again next time" in row
    busy[0] = False
    calls.clear()
    prepare(model_in("float"), None)  # quiet now: measured again, once each, and kept
    assert len(calls) == 10 and {e["queued"] for e in cache_entries()} == {0.0}
    calls.clear()
    prepare(model_in("float"), None)
    assert calls == []
    # disturbed the first time only: the second timing is the one kept
    tuning.cache_path().unlink()
    readings = iter([0, 10 ** 12, 10 ** 12, 10 ** 12])
    monkeypatch.setattr(tuning.hardware, "queued_ns", lambda: next(readings, 10 ** 12))
    assert tuning.undisturbed(lambda: calls.append(1) or "out") == ("out", 0.0) and \
        len(calls) == 1 + 1


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"),
                    reason="the wait for a CPU is read from Linux's /proc/self/task/*/schedstat")
def test_the_wait_for_a_cpu_is_seen_when_another_process_shares_it():
    """A real second process on the same CPU: a busy thread of ours then waits about half the
    time; alone, hardly."""
    script = textwrap.dedent("""
        import os, subprocess, sys, time
        from gptcli import hardware
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        def spin(seconds):
            q0, t0 = hardware.queued_ns(), time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                pass
            return (hardware.queued_ns() - q0) / 1e9 / (time.perf_counter() - t0)
        quiet = spin(0.3)
        hog = subprocess.Popen([sys.executable, "-c",
                                f"import os; os.sched_setaffinity(0, {{{cpu}}})\\nwhile True: pass"])
        try:
            time.sleep(0.3)
            busy = spin(0.6)
        finally:
            hog.kill()
            hog.wait()
        print(quiet, busy)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    quiet, busy = map(float, out.stdout.split())
    assert busy > 0.25 and quiet < busy / 2, (quiet, busy)


def test_the_cache_key_holds_the_machine_threads_torch_code_and_shape(tmp_path, monkeypatch):
    prepare(model_in("float"), None)
    key = cache_entries()[0]["key"]
    assert set(key) == {"cpu", "flags", "threads", "torch", "code", "mode", "dtype", "shape",
                        "rows", "candidates"}
    assert key["torch"] == torch.__version__ and key["mode"] == "float"
    # the kernels' code: the same for the same files, another for an edited one
    assert key["code"] == tuning.code() and len(key["code"]) == 12
    for name in tuning.CODE:
        (tmp_path / name).write_bytes((tuning.HERE / name).read_bytes())
    monkeypatch.setattr(tuning, "HERE", tmp_path)
    try:
        tuning.code.cache_clear()
        assert tuning.code() == key["code"]
        with open(tmp_path / "native.c", "a") as f:
            f.write("/* edited */\n")
        tuning.code.cache_clear()
        assert tuning.code() != key["code"]
    finally:
        tuning.code.cache_clear()
    # new kernels: measured again (those for prompts only have entries of their own)
    assert key["candidates"] == [k.name for k in candidates("float") if not k.prompt]


def test_a_kernel_that_misses_its_bound_is_not_chosen(monkeypatch):
    """A kernel that computes something else (as a broken kernel on some CPU would) is
    measured, found wrong, and skipped with the reason."""
    wrong = KERNELS["linear"].__class__(**{**KERNELS["linear"].__dict__,
                                           "run": lambda x, m: 1.01 * (x @ m.w_oi.t())})
    monkeypatch.setitem(KERNELS, "linear", wrong)
    model = model_in("float")
    prepare(model, None)
    for r in kernel_report(model):
        assert r["kernel"] != "linear" and "linear" in r["skipped"]
        assert "over its bound" in r["skipped"]["linear"]


# ----------------------------------------------------------------------------- forcing

def test_forcing_by_environment_variable_and_refusals(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "chunked")
    model = model_in("float")
    prepare(model, None)
    assert {r["kernel"] for r in kernel_report(model)} == {"chunked"}
    assert {r["source"] for r in kernel_report(model)} == {"forced"}
    monkeypatch.delenv(KERNEL_ENV)
    with pytest.raises(UserError) as err:
        prepare(model_in("float"), None, kernel="fastest")
    assert str(err.value).startswith("unknown kernel 'fastest'; for this model choose one of: "
                                     "addmm, linear, chunked, chunked-rows, mkldnn")
    with pytest.raises(UserError) as err:
        prepare(model_in("float"), None, kernel="int8-intmm")
    assert str(err.value).startswith("kernel int8-intmm is for --quantize int8; for this model "
                                     "choose one of: addmm")
    assert str(err.value).endswith(" (or auto, fused, or inductor with --compile)")  # as above
    assert [k.name for k in candidates("int4")] == ["int4-bf16", "int4-f32", "int4-native",
                                                    "int4-dnn"]


def test_bench_shows_the_choice_and_refuses_an_unknown_kernel():
    args = ["bench", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "0",
            "--context-length", "32", "--prompt-length", "8", "--max-new-tokens", "4",
            "--only", "generate", "--quantize", "int8"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["cpu"] and isinstance(out["isa_flags"], list)
    shapes = {tuple(k["shape"]) for k in out["kernels"]}
    assert (128, 50257) in shapes and all(k["kernel"] in k["us"] for k in out["kernels"])
    # each the fastest measured, but for the blocks' products where their steps run in C
    # (native_step.py): those run its kernel; prompts the fastest of their layout among those
    # at least as precise (others are timed for them too: tuning.choose)
    fused = out["blocks"]["fused"]
    assert set(out["blocks"]["us"]) == {"fused", "layers"}
    assert fused == (out["blocks"]["us"]["fused"] < out["blocks"]["us"]["layers"])
    for k in out["kernels"]:
        chosen = KERNELS[k["kernel"]]
        rivals = [t for n, t in k["us"].items() if not k.get("prompt") or (
            KERNELS[n].layout == chosen.layout and KERNELS[n].tolerance <= chosen.tolerance)]
        if k["source"] == "fused":
            assert fused and k["kernel"] == "int8-native" and k["shape"][1] != 50257
        else:
            assert k["us"][k["kernel"]] <= (1 + tuning.SLACK) * min(rivals), k
    table = runner.invoke(app, args + ["--kernel", "int8-intmm2"])
    assert table.exit_code == 0, table.output
    assert "int8-intmm2 (forced; int8, 4 layers)" in " ".join(table.stdout.split())
    assert "the model's own blocks (forced)" in " ".join(table.stdout.split())
    table = runner.invoke(app, args + ["--kernel", "fused"])
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "each block one C call (native_step) (forced)" in text
    out = json.loads(runner.invoke(app, args + ["--kernel", "fused", "--json"]).stdout
                     .strip().splitlines()[-1])
    assert out["blocks"] == {"fused": True, "forced": True}
    blocks = [k for k in out["kernels"] if k["shape"][1] != 50257]
    assert {(k["kernel"], k["source"]) for k in blocks if not k.get("prompt")} == {
        ("int8-native", "fused")}
    # prompts (which the C blocks do not take): the native layout, at least as precise
    assert all(KERNELS[k["kernel"]].layout == "int8" and KERNELS[k["kernel"]].tolerance
               <= KERNELS["int8-native"].tolerance for k in blocks if k.get("prompt"))
    bad = runner.invoke(app, args + ["--kernel", "linear"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().startswith("error: kernel linear is for no --quantize; for this "
                                         "model choose one of: int8-intmm2")


def test_generate_and_eval_take_the_kernel_flag(char_checkpoint, tmp_path):
    """--kernel is a flag of every command that loads a model: it reaches the model."""
    from gptcli.generate import load_generator

    path = char_checkpoint
    loaded = load_generator(str(path), device="cpu", kernel="linear")
    assert {r["kernel"] for r in kernel_report(loaded.model)} == {"linear"}
    for command in (["generate", "--prompt", "ab", "--max-new-tokens", "2"],
                    ["eval", "--data", str(tmp_path / "t.txt")]):
        (tmp_path / "t.txt").write_text("abcdefgh " * 40)
        bad = runner.invoke(app, [*command, "--model", str(path), "--kernel", "int8-intmm"])
        assert bad.exit_code == 2, bad.output
        assert "kernel int8-intmm is for --quantize int8" in bad.stderr


@pytest.mark.parametrize("mode, kernel", [("int8", "int8-fbgemm"), ("half", "fp16-fbgemm"),
                                          (None, "chunked-rows"), (None, "mkldnn-batch"),
                                          ("int8", "int8-native")])
def test_a_compiled_cpu_step_is_one_graph_with_any_kernel_and_decodes_as_eager(mode, kernel):
    """fbgemm's packed weights are objects dynamo cannot trace, and inductor's own lowering of
    oneDNN's product asserts on a weight it did not pack: a compiled CPU step calls each
    layer's kernel as one operator (kernels.product), so any kernel compiles, the step stays
    one graph (before: a break at every fbgemm product) over the dynamic cache, and it decodes
    the eager step's tokens."""
    from gptcli.decode import compile_step
    from gptcli.kv_cache import KVCache

    model = model_in("float")
    try:
        prepare(model, mode, kernel=kernel)
    except UserError as e:  # (fbgemm or oneDNN missing from this torch build)
        pytest.skip(str(e))
    assert {r["kernel"] for r in kernel_report(model)} == {kernel}
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])  # 2 rows: some kernels return views there
    cache = KVCache.for_model(model.config, 2)
    # the Engine's shapes: one token at one position, rows at different positions (the cache
    # view's length set for them), a speculative verification of several tokens
    for idx, start, length in ((torch.tensor([[4], [7]]), 3, 0),
                               (torch.tensor([[4], [7]]), torch.tensor([3, 2]), 4),
                               (torch.tensor([[4, 5, 6], [7, 8, 9]]), 3, 0)):
        torch._dynamo.reset()
        with torch.no_grad():
            model(prompt, kv_cache=cache)
            cache.length = length
            explained = torch._dynamo.explain(model)(idx, kv_cache=cache, start_pos=start,
                                                     last_only=True)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
            explained.break_reasons
    torch._dynamo.reset()
    got = torch.stack(list(decode_loop(model, prompt, greedy(8), step=compile_step(model))))
    assert torch.equal(got, torch.stack(list(decode_loop(model, prompt, greedy(8)))))


@pytest.mark.parametrize("mode", ["int8", None])
def test_kernel_inductor_traces_its_products_into_a_frozen_compiled_step(mode):
    """--kernel inductor: every layer runs its mode's kernel of plain operators
    (quantize.TRACED), which the compiled step traces instead of calling gptcli::product, so
    inductor (freezing the weights) puts its own products in; one step's logits are the eager
    step's within that kernel's tolerance. Without --compile the flag is refused."""
    from gptcli.decode import compile_step
    from gptcli.kv_cache import KVCache
    from gptcli.quantize import TRACED

    model = model_in("float")
    prepare(model, mode, kernel="inductor")
    kernel = TRACED[mode or "float"]
    assert {r["kernel"] for r in kernel_report(model)} == {kernel}
    prompt, idx = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[4], [7]])
    torch._dynamo.reset()
    with torch.no_grad():
        caches = [KVCache.for_model(model.config, 2) for _ in range(3)]
        for cache in caches:
            model(prompt, kv_cache=cache)
        explained = torch._dynamo.explain(model)(idx, kv_cache=caches[0], start_pos=3)
        code = "\n".join(g.code for g in explained.graphs)
        assert "gptcli.product" not in code and explained.graph_break_count == 0
        torch._dynamo.reset()
        step = compile_step(model)
        got = step(idx, kv_cache=caches[1], start_pos=3)
        exact = model(idx, kv_cache=caches[2], start_pos=3)
        assert float((got - exact).norm() / exact.norm()) < KERNELS[kernel].tolerance
        # float32 frozen: the compiled step holds its own (packed) copy of the weights;
        # unfrozen it would read the layer's, as eager does (and as inductor's int8 product does)
        changed = not torch.equal(step(idx, kv_cache=caches[1], start_pos=3), got)
        model.h[0].mlp.c_fc.get_buffer("qweight" if mode else "w_oi").zero_()
        assert not torch.allclose(model(idx, kv_cache=caches[2], start_pos=3), exact)
        changed |= not torch.equal(step(idx, kv_cache=caches[1], start_pos=3), got)
        if mode is None:
            assert not changed
    for args, env in ((["--kernel", "inductor"], {}), ([], {"GPTCLI_KERNEL": "inductor"})):
        bad = runner.invoke(app, ["generate", "--model", "x", *args], env=env)
        assert bad.exit_code == 2 and "--kernel inductor needs --compile" in bad.stderr, \
            bad.output


def test_a_copied_layer_is_found_by_the_compiled_steps_operator():
    """kernels.product finds a layer by id: a deepcopy (made without __init__) registers too,
    and runs its own weights."""
    from gptcli.kernel_layer import product

    model = model_in("float")
    prepare(model, "int8", kernel="int8-f32")  # (a kernel that reads qweight itself)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.lm_head.qweight.zero_()
        x = torch.randn(1, model.config.n_embd)
        for layer in (model.lm_head, copied.lm_head):
            assert torch.equal(product(x, id(layer), layer.n_out), layer(x))
        assert not product(x, id(copied.lm_head), copied.lm_head.n_out).any()


@pytest.mark.parametrize("mode, names", [("float", ("linear", "chunked")),
                                         ("half", ("fp16-linear", "bf16-linear"))])
def test_a_layer_holding_two_layouts_runs_each_on_its_own_buffers(mode, names):
    """The tuner's fallback may give a layer a second layout for one row count (where no kernel
    of the kept layout ran): each layout keeps its buffers under names of its own, so both row
    counts multiply by the right weights (a shared name let the second layout overwrite the
    first's)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 40, generator=g) * 0.05
    storage = _storage(mode, weight, torch.randn(40, generator=g))
    layer = KernelLinear.from_storage(mode, storage)
    layer.use({1: KERNELS[names[0]], 4: KERNELS[names[1]]}, 2, storage)
    exact_w = _reference(mode, storage).double()
    for rows, name in ((1, names[0]), (4, names[1])):
        x = torch.randn(rows, 64, generator=g)
        with torch.no_grad():
            y = layer(x)
        exact = x.double() @ exact_w + storage["bias"].double()
        assert tuning.relative_error(y, exact) <= KERNELS[name].tolerance, name


def test_large_buffers_move_into_huge_page_areas_once_with_the_same_values(monkeypatch):
    """hardware.in_huge_pages: a copy with the same values, in an area advised for huge pages
    (tensors under CHUNK one after another from a 2 MB boundary, on 4 KB boundaries; a larger
    one in its own, from a 2 MB boundary); a small, non-contiguous or non-CPU tensor stays
    itself. A prepared int8 model's layers hold their buffers there, each moved once, and the
    tied embedding reads the output matrix's own rows; it decodes the same tokens as without."""
    import gc

    from gptcli import hardware
    monkeypatch.setattr(hardware, "_area", [None, 0])
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1000, generator=g)
    b = torch.randint(-128, 127, (700, 1001), dtype=torch.int8, generator=g)
    big = torch.randn(2200, 4000, generator=g)  # 35 MB: over CHUNK
    moved = [hardware.in_huge_pages(t) for t in (a, b, big)]
    for t, m in zip((a, b, big), moved):
        assert m.data_ptr() != t.data_ptr() and m.dtype == t.dtype and torch.equal(m, t)
    assert moved[0].data_ptr() % hardware.HUGE_PAGE == 0 == moved[2].data_ptr() % \
        hardware.HUGE_PAGE
    assert moved[1].data_ptr() == moved[0].data_ptr() + 1_200_128  # (1,200,000 to 4 KB)
    small = torch.randn(100, 100)
    for t in (small, a.t(), torch.empty(600, 600, device="meta")):
        assert hardware.in_huge_pages(t) is t
    del moved[0], a
    gc.collect()
    assert torch.equal(moved[0], b)  # its area lives on with it

    monkeypatch.setattr(hardware, "SMALL", 0)  # (the tiny model's buffers move too)
    model = model_in("int8")
    prepare(model, "int8", rows=(1,))
    layers = [m for m in model.modules() if isinstance(m, KernelLinear)]
    assert all(set(m._huge) == {n for n, t in m._buffers.items() if t is not None}
               for m in layers)
    assert all(m._huge[n] == t.data_ptr() for m in layers for n, t in m._buffers.items()
               if t is not None)  # (still where they were moved: nothing moved twice)
    assert model.wte.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    prompt = torch.tensor([[1, 2, 3]])
    config = SampleConfig(max_new_tokens=8, temperature=0)
    got = torch.stack(list(decode_loop(model, prompt, config)))
    monkeypatch.setattr(hardware, "SMALL", 1 << 62)
    plain = model_in("int8")
    prepare(plain, "int8", rows=(1,))
    assert not any(m._huge[n] != m._buffers[n].data_ptr() for m in plain.modules()
                   if isinstance(m, KernelLinear) for n in m._huge)
    assert torch.equal(got, torch.stack(list(decode_loop(plain, prompt, config))))
