"""`gpt bench`: training and generation speed of the real code paths, against the hardware limit.

Training is timed through ``optim.train_step`` with the optimizer, scaler, autocast and compiled
model from ``optim.step_parts`` (what ``fit()`` builds) on synthetic tokens already on the
device; generation through ``decode.decode_loop`` (the Engine ``generate`` runs), consuming each
token with ``.tolist()`` as ``generate`` does. Nothing here re-implements a forward, a step or a
decode loop.

Timing: the clock is read only after ``devices.synchronize``; warm-up steps (the first of which
holds torch.compile's compilation) are reported apart and left out of the median/min/max.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from . import hardware
from .config import PRESETS, BenchConfig, LoadConfig, ModelConfig, SampleConfig, TrainConfig
from .model import GPT
from .locate import find_model
from .models import check_format, display_name, load_weights, model_info
from .hardware import (check_memory, generate_memory_estimate, hardware_name,
                       measure_bandwidth, measure_tflops, peak_bandwidth, peak_memory,
                       peak_tflops, train_memory_estimate)
from .quantize import check_scheme, kernel_report, prepare
from .tuning import cache_path
from .devices import resolve_device, resolve_dtype, synchronize
from .errors import RuntimeFailure, UserError, is_oom
from .decode import compile_step
from .generate import find_draft, load_draft
from .speculative import Draft


# ----------------------------------------------------------------------------- formulas

def training_flops_per_token(config: ModelConfig) -> int:
    """Model FLOPs per trained token (forward + backward), the PaLM / nanoGPT count:
    6N + 12 L H Q T. N is the parameter count without the learned position table (a lookup,
    no matmul); the tied embedding counts once, as the lm_head matmul. 12LHQT is attention's
    QK^T and AV over the full (not causally halved) T x T scores."""
    n = config.num_params() - (config.context_length * config.n_embd
                               if config.position == "learned" else 0)
    L, H, Q, T = config.n_layer, config.n_head, config.head_size, config.context_length
    return 6 * n + 12 * L * H * Q * T


def decode_bytes(model: GPT) -> int:
    """Bytes of weights one decode step of ``model`` in its inference layout reads: every tensor
    once (shared ones once, even as different tensor objects), except an embedding table that
    is only looked up (one row a token: the token embedding while the output matrix is a
    separate copy, the learned positions always); plus
    layouts held outside tensors (``KernelLinear.packed_bytes``)."""
    def key(t: torch.Tensor):
        return id(t) if t.is_mkldnn or t.device.type == "meta" else (t.data_ptr(), t.numel())

    wpe = getattr(model, "wpe", None)  # (learned positions: looked up too, one row a step)
    lookups = {key(t) for m in (model.wte, wpe) if m is not None
               for t in [*m.parameters(), *m.buffers()]}
    head = {key(t) for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        k = key(t)
        if k in seen or (k in lookups and k not in head):
            continue
        seen.add(k)
        total += t.numel() * t.element_size()
    return total + sum(getattr(m, "packed_bytes", 0) for m in model.modules())


def bandwidth_utilisation(bytes_per_step: int, steps_per_s: float, gbs: float) -> float:
    """Share of the device's memory bandwidth that weight reads alone use while decoding."""
    return bytes_per_step * steps_per_s / (gbs * 1e9)


def mfu(flops_per_token: int, tokens_per_s: float, peak_tflops: float) -> float:
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- memory

def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- settings

def resolve_settings(load: LoadConfig, s: BenchConfig) -> tuple[BenchConfig, torch.device,
                                                                torch.dtype, ModelConfig]:
    """Fill in device-fitting defaults (the configs have checked every value already) and
    refuse what cannot fit, before allocating anything. ``load.model`` None means a preset with
    random weights."""
    device = resolve_device(load.device)
    dtype = resolve_dtype(load.dtype, device)
    check_scheme(load.quantize, device)
    if load.draft_model is not None and not load.model:
        raise UserError("--draft-model times speculative decoding of a trained model and its "
                        "draft: give the model with --model")
    if load.model or load.quantize:  # weights for inference only: nothing to train
        if s.only == "train":
            raise UserError("--model and --quantize time generation only; leave out --only train")
        s = s.model_copy(update={"only": "generate"})
    preset = s.preset or {"cuda": "gpt2", "mps": "small"}.get(device.type, "tiny")
    if load.model:
        if s.preset:
            raise UserError("--preset picks the shape of a model with random weights; --model "
                            "times that model: give one of them")
        config = ModelConfig.model_validate(model_info(find_model(load.model))[0]["config"])
        if (s.context_length or 0) > config.context_length:
            raise UserError(f"--context-length {s.context_length} is longer than the model's "
                            f"context ({config.context_length}); give at most "
                            f"{config.context_length}")
        config = config.model_copy(update={"context_length": min(
            config.context_length, s.context_length or config.context_length)})
        preset = load.model
    elif preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    else:  # every preset with the GPT-2 vocabulary (50257), so figures compare across presets
        config = ModelConfig.from_preset(preset, context_length=s.context_length)
    T = config.context_length
    prompt = s.prompt_length or max(1, min(128, T // 2))
    new = s.max_new_tokens or max(1, min(128, T - prompt))
    if prompt + new > T:
        raise UserError(f"--prompt-length ({prompt}) + --max-new-tokens ({new}) must fit in the "
                        f"context length ({T}), so the decode loop never slides its window")
    warmup = max(s.warmup, 1) if load.compile else s.warmup  # the first step compiles
    batch = s.batch_size or (1 if s.only == "generate" else None)
    if batch is None:  # the largest power of two up to 16 whose estimate fits comfortably
        available = hardware.available_memory(device)
        batch = 8 if device.type == "mps" else 16
        while (batch > 1 and available is not None
               and train_memory_estimate(config, batch, dtype) > 0.8 * available):
            batch //= 2
    shape = f"at batch size {batch}, context {T}, {str(dtype).removeprefix('torch.')}"
    hint = "Try a smaller --preset, --batch-size or --context-length."
    if s.only != "generate":
        check_memory(train_memory_estimate(config, batch, dtype), device,
                     f"the {preset} preset's training {shape}", hint)
    if s.only != "train":
        check_memory(generate_memory_estimate(config, batch, dtype), device,
                     f"the {preset} preset's generation {shape}", hint)
    resolved = s.model_copy(update={"preset": preset, "batch_size": batch, "context_length": T,
                                    "prompt_length": prompt, "max_new_tokens": new,
                                    "warmup": warmup})
    return resolved, device, dtype, config


# ----------------------------------------------------------------------------- measuring

def ceiling(flag: float | None, flag_name: str, datasheet: tuple[float | None, str],
            measure: Callable[[], float], *, needed: bool) -> tuple[float | None, str]:
    """The device's ceiling and where it comes from: the flag, the datasheet table, or (for
    CPUs and devices not in the table) a short measurement on this machine."""
    if flag:
        return flag, flag_name
    if datasheet[0] is not None:
        return datasheet
    if not needed:
        return None, "not measured: not needed for what was timed"
    return measure(), "measured"


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_train(model: GPT, load: LoadConfig, s: BenchConfig, device: torch.device,
                dtype: torch.dtype, tick: Callable[[], None]) -> dict:
    """Time ``optim.train_step``: the optimizer step ``fit()`` takes, on random tokens."""
    from . import optim

    cfg = TrainConfig(preset=s.preset, batch_size=s.batch_size, device=load.device,
                      dtype=load.dtype, compile=load.compile, seed=s.seed)
    model.train()
    parts = optim.step_parts(model, cfg, device, dtype)  # what fit() builds
    optimizer, scaler, amp, runner = parts.optimizer, parts.scaler, parts.amp, parts.runner
    T, V = model.config.context_length, model.config.vocab_size
    # Batches made on the device beforehand, so no data loading is timed.
    g = torch.Generator(device=device).manual_seed(s.seed)
    batches = [torch.randint(0, V, (s.batch_size, T + 1), device=device, generator=g)
               for _ in range(min(4, s.warmup + s.steps))]
    count = iter(range(1 << 62))

    def next_batch():
        b = batches[next(count) % len(batches)]
        return b[:, :-1], b[:, 1:]

    times, sampled = [], 0
    _reset_peak(device)
    for i in range(s.warmup + s.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = optim.train_step(runner, optimizer, next_batch, grad_accum=cfg.grad_accum,
                                grad_clip=cfg.grad_clip, amp=amp, scaler=scaler,
                                device=device).loss
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if device.type == "mps":
            sampled = max(sampled, torch.mps.current_allocated_memory())
        tick()
    if not torch.isfinite(loss):
        raise RuntimeFailure(f"the benchmark's training loss became {loss.item()}")
    steady = times[s.warmup:]
    tokens = s.batch_size * T
    step = _spread(steady)
    out = {"batch_size": s.batch_size, "context_length": T, "tokens_per_step": tokens,
           "step_time_s": step, "tokens_per_s": tokens / step["median"],
           "first_step_s": times[0], "flops_per_token": training_flops_per_token(model.config),
           "peak_memory_bytes": peak_memory(device, sampled)}
    if load.compile:  # the first step minus an ordinary one: the time spent compiling
        out["compile_s"] = max(times[0] - step["median"], 1e-9)
    return out


def bench_generate(model: GPT, s: BenchConfig, batch: int, device: torch.device,
                   step: Callable | None, tick: Callable[[], None], draft: Draft | None = None,
                   vocab: int | None = None) -> dict:
    """Time ``decode.decode_loop``: prefill + first token (TTFT), then one token at a time. With
    ``draft``, speculative decoding too (greedy, as the plain runs), its runs alternating with
    the plain ones: its figures, acceptance and speed-up under ``speculative``. ``vocab``: the
    tokenizer's size, which the prompt's ids and the tokens picked stay under."""
    from .decode import decode_loop

    g = torch.Generator(device=device).manual_seed(s.seed)
    prompt = torch.randint(0, vocab or model.config.vocab_size, (batch, s.prompt_length),
                           device=device, generator=g)
    cfg = SampleConfig(max_new_tokens=s.max_new_tokens, temperature=0)
    runs: dict[bool, list] = {False: [], True: []}
    counts = {"proposed": 0, "accepted": 0}
    sampled = 0
    _reset_peak(device)
    for i in range(min(s.warmup, 2) + s.steps):  # one warm-up run already compiles every shape
        for d in ((None, draft) if i % 2 == 0 else (draft, None)) if draft else (None,):
            seen: dict = {}
            synchronize(device)
            t0 = time.perf_counter()
            stamps = []
            for tok in decode_loop(model, prompt, cfg, step=step, draft=d, counts=seen,
                                   vocab_size=vocab):
                tok.tolist()  # the host needs each token, as in generate(): a sync per token
                stamps.append(time.perf_counter())
            synchronize(device)
            runs[d is not None].append((stamps[0] - t0, time.perf_counter() - stamps[0]))
            if d is not None and i >= min(s.warmup, 2):
                counts = {k: counts[k] + seen.get(k, 0) for k in counts}
        if device.type == "mps":
            sampled = max(sampled, torch.mps.current_allocated_memory())
        tick()
    out = {"batch_size": batch, "prompt_tokens": s.prompt_length,
           "new_tokens": s.max_new_tokens, **_timings(runs[False], s, batch, step)}
    if draft is not None:
        fast = _timings(runs[True], s, batch, step)
        fast.update(draft_tokens=counts["proposed"], accepted_tokens=counts["accepted"],
                    acceptance_rate=counts["accepted"] / counts["proposed"]
                    if counts["proposed"] else None)
        if "decode_tokens_per_s" in fast:
            fast["speedup"] = fast["decode_tokens_per_s"] / out["decode_tokens_per_s"]
        out["speculative"] = fast
    out["peak_memory_bytes"] = peak_memory(device, sampled)
    return out


def _timings(runs: list[tuple[float, float]], s: BenchConfig, batch: int,
             step: Callable | None) -> dict:
    """The figures of timed ``runs`` (time to the first token, then the rest), the first run's
    (warm-up) included only as such."""
    first_run = sum(runs[0])
    runs = runs[len(runs) - s.steps:]
    ttft = _spread([r[0] for r in runs])
    out = {"time_to_first_token_s": ttft,
           "prefill_tokens_per_s": batch * s.prompt_length / ttft["median"],
           "first_run_s": first_run}
    if s.max_new_tokens > 1:
        per_token = _spread([r[1] / (s.max_new_tokens - 1) for r in runs])  # seconds per step
        out.update({"decode_ms_per_token": {k: v * 1e3 for k, v in per_token.items()},
                    "decode_tokens_per_s": batch / per_token["median"],
                    "decode_steps_per_s": 1 / per_token["median"]})
    if step is not None:  # the first run minus an ordinary one: the time spent compiling
        out["compile_s"] = max(first_run - statistics.median(sum(r) for r in runs), 1e-9)
    return out


def run(load: LoadConfig, s: BenchConfig,
        progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict:
    """Measure as ``s`` says; returns the figures as one JSON-ready dict.

    ``progress(label, total)`` is called at the start of each phase and returns a function that
    is called once per step/run.
    """
    batch_given = s.batch_size is not None
    s, device, dtype, config = resolve_settings(load, s)
    progress = progress or (lambda label, total: (lambda: None))
    hw = hardware_name(device)
    peak, peak_src = ceiling(s.peak_tflops, "--peak-tflops", peak_tflops(device, dtype, hw),
                             lambda: measure_tflops(device, dtype), needed=s.only != "generate")
    bw, bw_src = ceiling(s.bandwidth_gbs, "--bandwidth-gbs", peak_bandwidth(device, hw),
                         lambda: measure_bandwidth(device), needed=s.only != "train")
    result: dict = {
        "device": str(device), "device_name": hw, "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "settings": load.model_dump() | s.model_dump() | {
            "vocab_size": config.vocab_size, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_embd": config.n_embd},
        "parameters": config.num_params(),
        "peak_tflops": peak, "peak_tflops_source": peak_src,
        "bandwidth_gbs": bw, "bandwidth_source": bw_src,
    }
    phase = "training" if s.only != "generate" else "generation"
    draft = tokenizer = None
    draft_path = None if load.draft_model is None else find_draft(load.draft_model)
    try:
        torch.manual_seed(s.seed)
        if load.model:
            path = find_model(load.model)
            check_format(path, load.quantize)
            model, tokenizer, _ = load_weights(path, finite=True)
            model = model.to(device)
        else:
            model = GPT(config).to(device)
        if s.only != "generate":
            t = bench_train(model, load, s, device, dtype,
                            progress("bench: training", s.warmup + s.steps))
            t["mfu"] = mfu(t["flops_per_token"], t["tokens_per_s"], peak) if peak else None
            result["train"] = t
        if s.only != "train":
            phase = "generation"
            model.eval().to(dtype)  # generation runs with weights in the dtype, as generate does
            # the inference layout `gpt generate` loads models with, its kernels chosen for
            # the batch sizes timed here
            prepare(model, load.quantize, kernel=load.kernel,
                    rows=(1, s.batch_size) if batch_given else (1,), steps=not load.compile)
            if device.type == "cpu":
                result.update(cpu=hardware.cpu_model(), isa_flags=hardware.isa_flags(),
                              kernels=kernel_report(model), kernel_cache=str(cache_path()),
                              blocks=getattr(model, "fused_choice", None))
            step = None
            if load.compile:  # as generate.load_generator
                torch._dynamo.reset()  # compile from scratch, as `gpt generate` would
                step = compile_step(model)
            if draft_path is not None:
                draft = load_draft(draft_path, tokenizer, path, device=str(device),
                                   dtype=str(dtype).removeprefix("torch."),
                                   quantize=load.quantize, kernel=load.kernel,
                                   rows=(1, s.batch_size) if batch_given else (1,),
                                   compile=load.compile, tokens=load.draft_tokens)
                result.update(draft=display_name(draft_path),
                              draft_parameters=draft.model.num_params())
            result["weight_bytes_per_step"] = decode_bytes(model)
            cache = hardware.cpu_cache_bytes() if device.type == "cpu" else None
            if cache and result["weight_bytes_per_step"] <= cache and not s.bandwidth_gbs:
                # perhaps read from there: the share is shown with that said (a VM's CPU may
                # report its host's cache, and read from memory all the same)
                result["weights_fit_in_cache_bytes"] = cache
            result["generate"] = []
            for batch in sorted({1, s.batch_size if batch_given else 1}):
                n = min(s.warmup, 2) + s.steps
                g = bench_generate(model, s, batch, device, step,
                                   progress(f"bench: generation, batch {batch}", n), draft,
                                   tokenizer.vocab_size if draft else None)
                if "decode_steps_per_s" in g:
                    g["bandwidth_utilisation"] = bandwidth_utilisation(
                        result["weight_bytes_per_step"], g["decode_steps_per_s"], bw) if bw else None
                result["generate"].append(g)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_oom(e):
            raise
        raise RuntimeFailure(
            f"out of memory during {phase} at batch size {s.batch_size} on {hw}; try a smaller "
            f"--batch-size (e.g. {max(1, s.batch_size // 2)}), --context-length or --preset"
        ) from None
    return result


# ----------------------------------------------------------------------------- showing
