"""A decoded token's blocks in C (native_step.py, native.c's gptcli_block): the same logits as
the model's own blocks and as recomputing the whole sequence, in every mode and for several
rows; prompts and rows at different positions left to the model; chosen by measurement and
cached, forced with --kernel fused, refused with one sentence where it cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptcli import native, native_step, tuning
from gptcli.cli import app
from gptcli.config import SampleConfig
from gptcli.decode import Engine, decode_loop
from gptcli.errors import UserError
from gptcli.kv_cache import KVCache
from gptcli.kernel_layer import KernelLinear
from gptcli.kernels import KERNELS
from gptcli.model import GPT
from gptcli.quantize import prepare
from gptcli.speculative import Draft

from conftest import randomize_, tiny_config
from test_kernels import fake_timings, model_in, stored_weights_model

runner = CliRunner()
# relative error of the blocks' output against the model's own blocks on the same cache (the C
# blocks' float32 maths, exp and GELU, differ from torch's in the last bits; int8 and int4 round
# activations to 15 bits, where a last-bit difference can move one step), and of a step's
# logits against the model recomputing the whole sequence (prompts run torch's products, the
# output matrix its kernel, which may round activations to 16 bits: the modes' kernel bounds)
OWN = {None: 2e-6, "half": 2e-6, "int8": 5e-5, "int4": 5e-5}
# the quantized modes' keys and values are rounded to fp16: where the two sides' float32 sums
# differ in their last bits a key or value may round a step apart, up to 2^-10 of itself
# (measured here over 5 models, 4 shapes each: up to 1.3e-6 half, 4.2e-5 int8, 5.3e-5 int4)
ROUNDED = {"half": 1e-5, "int8": 1e-4, "int4": 1e-4}
FULL = {None: 2e-5, "half": 5e-3, "int8": 5e-3, "int4": 5e-3}


def fused_model(mode, seed=1):
    model = model_in(mode or "float", seed)
    prepare(model, mode, kernel="fused", rows=(1, 3))
    assert isinstance(model.decode_step, native_step.BlockStep)
    return model


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode, kv", [(None, "float32"), ("half", "float32"), ("half", "rounded"),
                                      ("half", "fp16"), ("int8", "float32"), ("int8", "rounded"),
                                      ("int8", "fp16"), ("int4", "float32"), ("int4", "rounded"),
                                      ("int4", "fp16")])
@pytest.mark.parametrize("rows, positions", [(1, 1), (3, 1), (1, 5), (2, 4)])
def test_a_c_step_equals_the_models_blocks_on_the_same_cache(mode, kv, rows, positions,
                                                             monkeypatch):
    """One token after a prompt (or a few: a speculative round's check of a draft's tokens),
    from two copies of one cache: the blocks' output (the output matrix left out), with and
    without ``last_only``, and the keys and values written: within OWN with float32 keys and
    values (a float model's; the quantized ones' maths here held to it too), within ROUNDED
    where they are rounded to fp16 (a quantized model's, in a float32 cache or an fp16 one:
    fp16 values in either, within ROUNDED and the two roundings); the C blocks ran."""
    model = fused_model(mode)
    if kv == "float32":
        for block in model.h:
            block.attn.kv_dtype = None
    calls = []
    steps = native_step.BlockStep.steps
    monkeypatch.setattr(native_step.BlockStep, "steps",
                        lambda self, x, *a: (calls.append(x.shape), steps(self, x, *a)))
    g = torch.Generator().manual_seed(rows)
    prompt = torch.randint(0, model.config.vocab_size, (rows, 6), generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (rows, positions), generator=g)
    model.lm_head = torch.nn.Identity()
    cache = torch.float16 if kv == "fp16" else torch.float32
    caches = [KVCache.for_model(model.config, rows, dtype=cache) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(prompt, kv_cache=c)
        own = model(tokens, kv_cache=caches[0], start_pos=6)
        got = model.decode_step(tokens, kv_cache=caches[1], start_pos=6)
        last = model.decode_step(tokens, kv_cache=caches[1], start_pos=6, last_only=True)
    assert calls and set(calls) == {(rows * positions, model.config.n_embd)}
    assert got.shape == own.shape == (rows, positions, model.config.n_embd)
    assert relative(got, own) <= (OWN if kv == "float32" else ROUNDED)[mode]
    assert last.shape == (rows, 1, model.config.n_embd) and torch.equal(last, got[:, -1:])
    end = 6 + positions
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert b.dtype == cache
        if kv == "float32":
            assert relative(b[:, :, :end], a[:, :, :end]) <= OWN[mode]
        else:  # fp16 values (in a float32 cache too), each side's rounding within 2^-11
            assert torch.equal(b[:, :, :end], b[:, :, :end].half().to(cache))
            assert relative(b[:, :, :end].float(), a[:, :, :end].float()) <= \
                ROUNDED[mode] + 2 ** -10
        assert not b[:, :, end:].any()  # nothing written past the positions


@pytest.mark.parametrize("mode, flags", [
    ("half", None), ("int8", None), ("int4", None),
    ("int8", ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]), ("int8", ["-O3", "-fopenmp"])],
    ids=["half", "int8", "int4", "int8-avx2-build", "int8-plain-build"])
def test_a_quantized_models_keys_and_values_are_fp16_in_any_cache_or_none(mode, flags,
                                                                          monkeypatch):
    """Where the weights are rounded, so are the keys and values (to fp16, as llama.cpp keeps
    them): the model's logits are the same recomputed without a cache, through a float32
    cache and through an fp16 one; the C step's are the same on either cache, bit for bit,
    and within ROUNDED of the model's, in this CPU's build and in the AVX2 and plain ones that
    other CPUs get; the decode engine gives the C step an fp16 cache (half the bytes to read
    at each token) where its steps fit it, other steps and the model in float32 keep float32
    ones, and so does `gpt serve`'s engine (rows at different positions run torch's
    attention, which would widen an fp16 cache); a model in bf16 keeps its keys and values."""
    from gptcli import hardware
    if flags and "-mavx2" in flags and not {"avx2", "fma", "f16c"} <= set(hardware.isa_flags()):
        pytest.skip("this CPU lacks AVX2 to run that build on")
    if flags:  # (a process that builds the library with these flags)
        for name, value in (("_loaded", None), ("_failed", None), ("FLAG_SETS", (flags,))):
            monkeypatch.setattr(native, name, value)
    model = randomize_(GPT(tiny_config(n_embd=136, n_head=2)), seed=1).eval()  # heads of 68:
    prepare(model, mode, kernel="fused", rows=(1, 3))  # whole vectors and a tail, as GPT-2's 64
    assert {b.attn.kv_dtype for b in model.h} == {torch.float16}
    g = torch.Generator().manual_seed(3)
    prompt, token = torch.randint(0, 101, (2, 7), generator=g), torch.randint(0, 101, (2, 1),
                                                                          generator=g)
    caches = [KVCache.for_model(model.config, 2, dtype=d)
              for d in (torch.float32, torch.float16, torch.float32)]
    with torch.no_grad():
        whole = model(prompt)
        assert all(torch.equal(model(prompt, kv_cache=kv), whole) for kv in caches)
        steps = [model.decode_step(token, kv_cache=kv, start_pos=7) for kv in caches[:2]]
        own = model(token, kv_cache=caches[2], start_pos=7)
    assert torch.equal(steps[0], steps[1]) and relative(steps[0], own) <= ROUNDED[mode]
    assert all(torch.equal(a.half(), b) for a, b in zip(caches[0].k + caches[0].v,
                                                        caches[1].k + caches[1].v))
    if flags:
        return
    assert Engine(model, 2).cache.k[0].dtype == torch.float16
    # steps of more positions than the C step takes run torch's attention: a float32 cache
    assert Engine(model, native.ROWS_MAX + 1).cache.k[0].dtype == torch.float32
    assert Engine(model, 2, draft=Draft(model, 4)).cache.k[0].dtype == torch.float32  # 2 x 5
    assert Engine(model, 2, draft=Draft(model, 3)).draft_cache.k[0].dtype == torch.float16
    assert Engine(model, 2, step=model).cache.k[0].dtype == torch.float32
    assert Engine(fused_model(None), 2).cache.k[0].dtype == torch.float32
    bf16 = randomize_(GPT(tiny_config()), seed=1).eval().to(torch.bfloat16)
    prepare(bf16, mode)  # (keys and values already rounded to bf16: left so)
    assert {b.attn.kv_dtype for b in bf16.h} == {None}
    from gptcli.serve.scheduler import Scheduler
    from gptcli.tokenizer import get_tokenizer
    assert Scheduler(model, get_tokenizer(), 2).engine.cache.k[0].dtype == torch.float32


@pytest.mark.parametrize("mode", [None, "half", "int8", "int4"])
@pytest.mark.parametrize("rows, positions", [(1, 1), (2, 4)])
def test_the_output_matrix_runs_in_the_blocks_c_call_where_its_kernel_is_native(
        mode, rows, positions, monkeypatch):
    """Where the output matrix's kernel for the step's rows is its mode's native one, the final
    norm and the product run in the blocks' one C call: the logits, with and without
    ``last_only``, are those of the model's own norm and kernel on the C blocks' output within
    OWN; where its kernel is another (timings that favour it), the model runs it."""
    calls = []
    steps = native_step.BlockStep.steps
    monkeypatch.setattr(native_step.BlockStep, "steps", lambda self, x, cache, pos, n, *a: (
        calls.append(bool(a) and a[0] is not None), steps(self, x, cache, pos, n, *a)))
    g = torch.Generator().manual_seed(rows)
    prompt = torch.randint(0, 101, (rows, 6), generator=g)
    tokens = torch.randint(0, 101, (rows, positions), generator=g)
    for native_time in (9.0, 1.0):  # torch's kernel chosen for the output matrix, then C's
        measure, _ = fake_timings({name: native_time if name in native_step.NATIVE.values()
                                   else 5.0 for name in KERNELS})
        monkeypatch.setattr(tuning, "measure", measure)
        tuning.cache_path().unlink(missing_ok=True)  # (chosen again, by these timings)
        model = fused_model(mode)
        if native_time > 5.0:
            assert model.decode_step(tokens[:, :1], kv_cache=KVCache.for_model(
                model.config, rows), start_pos=0).shape == (rows, 1, 101)
            assert calls == [False]
    step, head = model.decode_step, model.lm_head
    assert {head.for_rows(m).name for m in (rows, rows * positions)} == \
        {native_step.NATIVE[head.mode]}
    caches = [KVCache.for_model(model.config, rows) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, kv_cache=cache)
        calls.clear()
        got = step(tokens, kv_cache=caches[0], start_pos=6)
        last = step(tokens, kv_cache=caches[0], start_pos=6, last_only=True)
        assert calls == [True, True]
        monkeypatch.setattr(step, "head_layer", None)  # the model's norm and output matrix
        own = step(tokens, kv_cache=caches[1], start_pos=6)
        assert calls[2:] == [False]
    assert got.shape == own.shape == (rows, positions, 101)
    assert relative(got, own) <= OWN[mode] and relative(last, own[:, -1:]) <= OWN[mode]


@pytest.mark.parametrize("mode", [None, "half", "int8", "int4"])
def test_fused_decoding_gives_the_models_tokens_and_recomputations_logits(mode, monkeypatch):
    """Three rows decoded greedily through two engines in lockstep, one with its one-token
    steps in C, one with the model's own blocks: the same tokens, and every C step's logits
    within FULL of the model on the whole sequence so far (its products the native kernels,
    as timings chose them: under load int4-bf16's 15e-3 could win, beyond FULL)."""
    measure, _ = fake_timings({name: 1.0 if name in native_step.NATIVE.values() else 9.0
                               for name in KERNELS})
    monkeypatch.setattr(tuning, "measure", measure)
    model = fused_model(mode)
    prompts = torch.randint(0, model.config.vocab_size, (3, 5),
                            generator=torch.Generator().manual_seed(0)).tolist()
    config = SampleConfig(max_new_tokens=12, temperature=0)
    fused, own = Engine(model, 3), Engine(model, 3, step=model)
    assert fused.step is model.decode_step
    for engine in (fused, own):
        engine.add(prompts, config)
    for i in range(12):
        assert fused.pick() == own.pick(), (mode, i)
        if i:  # (the first logits came from the prompt: the model's own forward in both)
            with torch.no_grad():
                full = model(torch.tensor([r.tokens[:-1] for r in fused.rows]))[:, -1]
            got = torch.stack([r.logits for r in fused.rows])
            assert relative(got, full) <= FULL[mode], (mode, i)
        fused.advance()
        own.advance()


@pytest.mark.parametrize("mode", [None, "int8"])
def test_a_speculative_rounds_check_of_a_drafts_tokens_runs_in_c(mode, monkeypatch):
    """Two rows, a draft of 3 tokens a round: the model's check of them (4 positions a row, or
    fewer near the sample's end) and the draft's own steps run in the C blocks, and greedy output is token for token that of
    decoding without a draft; a draft that is the model keeps every token."""
    model = fused_model(mode)
    calls = []
    steps = native_step.BlockStep.steps
    monkeypatch.setattr(native_step.BlockStep, "steps", lambda self, x, cache, pos, n, *a: (
        calls.append((self.model, n)), steps(self, x, cache, pos, n, *a)))
    prompt = torch.randint(0, model.config.vocab_size, (2, 5),
                           generator=torch.Generator().manual_seed(4))
    config = SampleConfig(max_new_tokens=20, temperature=0)
    plain = list(decode_loop(model, prompt, config))
    for draft, kept in ((fused_model(mode, seed=2), None), (model, 1.0)):
        calls.clear()
        counts: dict = {}
        out = list(decode_loop(model, prompt, config, draft=Draft(draft, 3), counts=counts))
        assert torch.equal(torch.stack(out), torch.stack(plain))
        assert (model, 4) in calls and any(m is draft for m, _ in calls)
        assert kept is None or counts["accepted"] == counts["proposed"] * kept
    # the last round, 3 tokens from the sample's end, checks 2 tokens (3 positions): in C too
    # (it fell to the model's own blocks, as a compiled step's other lengths do)
    assert (model, 3) in calls


@pytest.mark.parametrize("mode", [None, "int8"])
def test_prompts_and_rows_at_different_positions_go_to_the_model(mode, monkeypatch):
    """A request joining rows already decoding (gpt serve) puts them at different positions:
    that step is the model's (int8: on the C step's fp16 cache); the tokens are those of each
    row decoded alone."""
    model = fused_model(mode)
    calls = []
    steps = native_step.BlockStep.steps
    monkeypatch.setattr(native_step.BlockStep, "steps",
                        lambda self, x, *a: (calls.append(x.size(0)), steps(self, x, *a)))
    config = SampleConfig(max_new_tokens=6, temperature=0)
    engine = Engine(model, 2)
    engine.add([[1, 2, 3]], config)
    out = {0: [], 1: []}
    for step in range(6):
        if step == 2:
            engine.add([[7, 8, 9, 10]], config)  # at position 4, the first row at 5
        for row, token in enumerate(engine.pick()):
            out[row].append(token)
        engine.advance()
    assert calls and set(calls) == {1}  # only the steps with one row: the others mixed
    alone = []
    for prompt, n in (([1, 2, 3], 6), ([7, 8, 9, 10], 4)):
        engine = Engine(model, 1)
        engine.add([prompt], SampleConfig(max_new_tokens=n, temperature=0))
        tokens = []
        for _ in range(n):
            tokens += engine.pick()
            engine.advance()
        alone.append(tokens)
    assert out[0] == alone[0] and out[1] == alone[1]


@pytest.mark.parametrize("mode, cache", [(None, torch.float32), ("int8", torch.float16)])
def test_the_c_blocks_are_timed_on_the_cache_decoding_gives_them(mode, cache):
    model = model_in(mode or "float")
    prepare(model, mode, kernel="fused", rows=(1,))
    step, read = model.decode_step, []
    run = step.run
    step.run = lambda i, h, k, v, pos: (read.append((k.dtype, v.dtype)), run(i, h, k, v, pos))
    plain, fused = native_step._time_blocks(model, step, len(model.h), 1)
    assert plain > 0 and fused > 0
    assert read and set(read) == {(cache, cache)}


def test_a_block_the_c_library_does_not_know_is_refused_in_one_sentence():
    model = fused_model("int8")
    step = model.decode_step
    step.array[0].qkv.kind = 9  # (what the one C call reads)
    cache = KVCache.for_step(model, step, 1)
    with pytest.raises(RuntimeError, match="^gptcli's C block refused its inputs .status -2.: "
                                           "a weight layout or cache kind it does not know$"):
        step(torch.tensor([[1]]), kv_cache=cache, start_pos=0)


def fused_entries():
    return [e for e in json.loads(tuning.cache_path().read_text())["entries"]
            if e["key"].get("step") == "fused"]


def test_the_c_blocks_are_chosen_by_measurement_cached_and_forced(monkeypatch):
    times, timed = {"layers": 1.0, "fused": 2.0}, []

    def fake(model, step, count, rows):
        timed.append(rows)
        return times["layers"], times["fused"]
    monkeypatch.setattr(native_step, "_time_blocks", fake)
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 4))
    assert not hasattr(model, "decode_step") and timed == [1, 4]
    assert model.fused_choice == {"fused": False, "us": {"layers": 2.0, "fused": 4.0}}
    (entry,) = fused_entries()
    assert entry["fused"] is False and entry["key"]["rows"] == [1, 4]
    assert entry["key"]["kv"] == ["float16", "float16"]  # the cache each row count decodes on
    timed.clear()
    prepare(model_in("int8"), "int8", rows=(1, 4))  # cached: not measured again
    assert timed == []
    # an entry that is not what gptcli writes is measured again
    data = json.loads(tuning.cache_path().read_text())
    for e in data["entries"]:
        if e["key"].get("step") == "fused":
            e["fused"] = "yes"
    tuning.cache_path().write_text(json.dumps(data))
    times.update(layers=3.0, fused=1.0)
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 4))
    assert timed == [1, 4] and isinstance(model.decode_step, native_step.BlockStep)
    assert fused_entries()[0]["fused"] is True
    # forced: used even where measured slower; another forced kernel leaves the blocks alone
    times.update(layers=1.0, fused=9.0)
    tuning.cache_path().unlink()
    model = model_in("int8")
    prepare(model, "int8", kernel="fused")
    assert isinstance(model.decode_step, native_step.BlockStep) and model.fused_choice == {
        "fused": True, "forced": True}
    model = model_in("int8")
    prepare(model, "int8", kernel="int8-bf16")
    assert not hasattr(model, "decode_step") and model.fused_choice == {"fused": False,
                                                                        "forced": True}


@pytest.mark.parametrize("mode,chosen,prompts,kept", [
    (None, "linear", "mkldnn-plain", "mkldnn-plain"),
    (None, "addmm", "mkldnn-plain", "mkldnn-plain"),  # (timed as the native layout's)
    ("int8", "int8-bf16", "int8-bf16", "int8-f32")])
def test_a_prompts_kernel_stays_once_fused_where_it_reads_the_native_layout_as_precisely(
        monkeypatch, mode, chosen, prompts, kept):
    """The C blocks take decoding's rows only: a prompt's products keep the kernel chosen for
    them (float: oneDNN on W (out, in), native's layout) unless it is less precise than the
    native kernel (int8-bf16's bf16 activations): then the fastest of those timed for prompts
    that is as precise (all as fast here: the most precise, int8-f32). Either way a prompt's
    logits are the plain model's."""
    def measure(kernels, storages, reference, rows, dtype, threads, flush):
        fast = prompts if rows == tuning.PROMPT_TIMED else chosen
        return {k.name: 1.0 if k.name == fast else 2.0 for k in kernels}, {}
    monkeypatch.setattr(tuning, "measure", measure)
    monkeypatch.setattr(native_step, "_time_blocks", lambda *a: (2.0, 1.0))
    model = model_in(mode or "float")
    want = stored_weights_model(model, mode or "float")
    prepare(model, mode)
    assert isinstance(model.decode_step, native_step.BlockStep)
    layer = model.h[0].mlp.c_fc
    native_name = "int8-native" if mode else "native"
    assert {m: k.name for m, k in layer.kernels.items()} == {1: native_name,
                                                             tuning.PROMPT_ROWS: kept}
    assert layer.for_rows(20).name == kept
    # the output matrix (not a block's) keeps its own layout for prompts: no second copy
    head = model.lm_head
    assert head.for_rows(20).layout == head.kernels[1].layout and (
        mode or chosen != "addmm" or not hasattr(head, "w_oi"))
    assert {m: c.kernel.name for m, c in layer.choices.items()} == {  # (as gpt bench shows)
        1: native_name, tuning.PROMPT_ROWS: kept}
    idx = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, exact = model(idx), want(idx)
    assert relative(got, exact) < (1e-5 if mode is None else 3e-3)


def test_the_blocks_layers_keep_only_the_native_layout_once_fused(monkeypatch):
    """Chosen per layer first (here: addmm, the (in, out) layout), then switched to the native
    kernel's (out, in) one: the earlier layout is dropped, not kept beside it."""
    measure, _ = fake_timings({"addmm": 1.0, "linear": 5.0, "chunked": 5.0,
                               "chunked-rows": 5.0, "mkldnn": 5.0, "mkldnn-batch": 5.0,
                               "native": 5.0})
    monkeypatch.setattr(tuning, "measure", measure)
    monkeypatch.setattr(native_step, "_time_blocks", lambda *a: (2.0, 1.0))
    model = model_in("float")
    prepare(model, None)
    layer = model.h[0].mlp.c_fc
    assert isinstance(layer, KernelLinear) and layer.kernel.name == "native"
    assert hasattr(layer, "w_oi") and not hasattr(layer, "w_io")
    assert model.lm_head.kernel.name == "addmm"  # (the output matrix is not a block's)
    # two kernels of one layout (linear, native: both W (out, in)) switched to one of them
    measure, _ = fake_timings({1: {"linear": 1.0, "native": 5.0}, 4: {"linear": 5.0,
                                                                       "native": 1.0}})
    monkeypatch.setattr(tuning, "measure", measure)
    model = model_in("float", seed=2)
    prepare(model, None, rows=(1, 4))
    layer = model.h[0].mlp.c_fc
    assert {m: k.name for m, k in layer.kernels.items()} == {1: "native", 4: "native"}
    assert layer.w_oi.shape == (layer.n_out, layer.n_in)


def test_kernel_fused_is_refused_in_one_sentence_where_it_cannot_run(monkeypatch,
                                                                      char_checkpoint):
    rope = randomize_(GPT(tiny_config(position="rope", n_head=4))).eval()
    with pytest.raises(UserError, match="kernel fused does not run here .*rotary"):
        prepare(rope, "int8", kernel="fused")
    rope = randomize_(GPT(tiny_config(position="rope", n_head=4))).eval()
    prepare(rope, "int8")  # not forced: the model's own blocks, quietly (bench says why)
    assert not hasattr(rope, "decode_step") and "rotary" in rope.fused_choice["why"]
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = model_in("float")
    prepare(model, None)
    assert not hasattr(model, "decode_step")
    result = runner.invoke(app, ["generate", "--model", str(char_checkpoint), "--prompt", "a",
                                 "--max-new-tokens", "3", "--kernel", "fused"])
    assert result.exit_code == 2, result.output
    assert "kernel fused does not run here (gptcli's C kernels could not be built" in \
        result.stderr
    assert "Traceback" not in result.output


def test_a_copy_of_a_fused_model_decodes_alike_from_its_own_weights():
    import copy

    model = fused_model("int8")
    twin = copy.deepcopy(model)
    assert twin.decode_step.model is twin
    tokens = []
    for m in (model, twin):
        engine = Engine(m, 1)
        engine.add([[1, 2, 3]], SampleConfig(max_new_tokens=5, temperature=0))
        out = []
        for _ in range(5):
            out += engine.pick()
            engine.advance()
        tokens.append(out)
    assert tokens[0] == tokens[1]
    twin_block = twin.decode_step.blocks[0]
    assert twin_block.qkv.w == twin.h[0].attn.c_attn.qweight.data_ptr() != \
        model.decode_step.blocks[0].qkv.w


def test_where_the_c_blocks_are_not_used_the_choice_says_why(monkeypatch):
    """A compiled step (its own), batches over 8 rows, a failure while measuring: the model's
    own blocks, and bench's line says why; --kernel fused with --compile is refused."""
    model = model_in("int8")
    prepare(model, "int8", rows=(1, 16))
    assert not hasattr(model, "decode_step")
    assert "batches over 8 rows" in model.fused_choice["why"]
    model = model_in("int8")
    prepare(model, "int8", steps=False)
    assert not hasattr(model, "decode_step") and "a compiled step" in model.fused_choice["why"]
    with pytest.raises(UserError, match=r"--kernel fused runs decode steps in C, which a "
                                        r"compiled step \(--compile\)"):
        prepare(model_in("int8"), "int8", kernel="fused", steps=False)

    def broken(*args):
        raise ValueError("something in the C blocks")
    monkeypatch.setattr(native_step, "_time_blocks", broken)
    model = model_in("int8")
    prepare(model, "int8")
    assert model.fused_choice == {"fused": False,
                                  "why": "the C blocks failed: something in the C blocks"}
    assert not hasattr(model, "decode_step")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_a_compiled_step_and_whole_text_scoring_get_no_c_blocks(char_checkpoint, tmp_path):
    from gptcli.generate import load_generator
    from gptcli.locate import load_model

    loaded = load_generator(str(char_checkpoint), device="cpu", compile=True)
    assert not hasattr(loaded.model, "decode_step")
    model = load_model(str(char_checkpoint), device="cpu", steps=False)[0]
    assert not hasattr(model, "decode_step")
    (tmp_path / "t.txt").write_text("abcdefgh " * 40)
    with pytest.MonkeyPatch.context() as env:  # the variable where nothing decodes: ignored
        env.setenv("GPTCLI_KERNEL", "fused")
        model = load_model(str(char_checkpoint), device="cpu", steps=False)[0]
        assert not hasattr(model, "decode_step") and "whole texts" in model.fused_choice["why"]
        result = runner.invoke(app, ["eval", "--data", str(tmp_path / "t.txt"), "--model",
                                     str(char_checkpoint)])
        assert result.exit_code == 0, result.output
    for command in (["generate", "--prompt", "a", "--max-new-tokens", "3", "--compile"],
                    ["eval", "--data", str(tmp_path / "t.txt")]):
        result = runner.invoke(app, [*command, "--model", str(char_checkpoint), "--kernel",
                                     "fused"])
        assert result.exit_code == 2, result.output
        assert "--kernel fused runs decode steps in C, which a compiled step (--compile) and " \
            "whole-text scoring do not take; leave it out" in " ".join(result.stderr.split())


def test_a_layout_that_fails_to_pack_leaves_the_layer_as_it_was():
    from dataclasses import replace

    from gptcli.kernels import KERNELS
    from test_kernels import packed

    weight = torch.randn(16, 8)
    storage = {"weight": weight, "bias": None}
    layer = packed(KERNELS["linear"], storage)

    def refuse(storage, threads):
        raise RuntimeError("cannot pack")
    with pytest.raises(RuntimeError):
        layer.use({1: replace(KERNELS["native"], pack=refuse)}, 1, storage)
    assert layer.kernel.name == "linear"
    with torch.no_grad():
        assert torch.allclose(layer(torch.ones(1, 16)), torch.ones(1, 16) @ weight, atol=1e-5)
