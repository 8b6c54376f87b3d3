"""Results as tables and lines on stdout (or a given console): `gpt bench`'s figures, `gpt
info`, `gpt eval`, `gpt eval --task`, `gpt download`, `gpt plot`'s comparison."""

from __future__ import annotations

from .display import Stdout

GiB = 1024 ** 3


def _fmt(x: float | None, unit: str = "", digits: int = 1) -> str:
    return "unknown" if x is None else f"{x:,.{digits}f}{unit}"


def _spread_ms(d: dict, scale: float = 1e3) -> str:
    return f"{d['median'] * scale:,.2f} ms (min {d['min'] * scale:,.2f}, max {d['max'] * scale:,.2f})"


def _kernel_row(k: dict) -> tuple[str, str]:
    """One weight shape's kernel: what runs, how it was chosen, and the candidates' times."""
    from .tuning import QUEUED_MAX  # (only bench shows kernels: torch is loaded)

    label = f"kernel {k['shape'][0]}x{k['shape'][1]}" + (
        ", prompts" if k.get("prompt") else f", {k['rows']} rows" if k["rows"] > 1 else "")
    how = {"forced": "forced", "cached": "cached",
           "inductor": "traced: a compiled step runs inductor's products",
           "fused": "run by the C blocks"}.get(k["source"], "measured")
    if k.get("load") is not None and k["source"] != "fused":
        how += f" at load {k['load']:.1f}"
    if (k.get("queued") or 0) >= QUEUED_MAX and k["source"] != "fused":
        how += f", disturbed by other programs (its threads waited {k['queued']:.2f} s a " \
            "second for a CPU): measured again next time"
    if k.get("prompt"):
        how += f" for {k['rows']} rows and more, timed at {k.get('timed_rows', k['rows'])} rows"
    times = ", ".join(f"{name} {us:,.0f}" for name, us in sorted(k["us"].items(),
                                                                  key=lambda kv: kv[1]))
    layers = f"{k['layers']} layer" + ("s" if k["layers"] > 1 else "")
    text = f"{k['kernel']} ({how}; {k['mode']}, {layers})" + (
        f"; µs per layer: {times}" if times else "")
    if k.get("skipped"):
        text += "; not run: " + ", ".join(k["skipped"])
    return label, text


def _blocks_row(b: dict) -> str:
    """How a decoded token's blocks run: one C call each, or the model's own (native_step.py)."""
    what = "each block one C call (native_step)" if b["fused"] else "the model's own blocks"
    if b.get("forced") or b.get("why"):
        return what + f" ({b.get('why') or 'forced'})"
    us = b.get("us", {})
    return what + (f" (measured; µs per block: C {us['fused']:,.0f}, the model's "
                   f"{us['layers']:,.0f})" if {"fused", "layers"} <= set(us) else "")


def render_bench(result: dict, console) -> None:
    """The figures as a rich table."""
    from rich.table import Table

    s = result["settings"]
    table = Table(title=f"gpt bench: {result['device_name']} ({result['device']}), torch "
                        f"{result['torch']}, {result['dtype']}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{s['preset']}: {result['parameters'] / 1e6:,.1f}M parameters, "
                  f"{s['n_layer']} layers, {s['n_head']} heads, width {s['n_embd']}, vocabulary "
                  f"{s['vocab_size']}, context {s['context_length']}")
    table.add_row("settings", f"batch {s['batch_size']}, {s['steps']} timed steps after "
                  f"{s['warmup']} warm-up, compile {'on' if s['compile'] else 'off'}, "
                  f"{result['threads']} CPU threads")
    table.add_row("peak compute", f"{_fmt(result['peak_tflops'])} TFLOPs "
                  f"({result['peak_tflops_source']})")
    table.add_row("memory bandwidth", f"{_fmt(result['bandwidth_gbs'])} GB/s "
                  f"({result['bandwidth_source']})")
    if "cpu" in result:
        table.add_row("CPU", f"{result['cpu']}; {' '.join(result['isa_flags']) or 'no flags'}")
    if result.get("kernels"):
        table.add_section()
        for k in result["kernels"]:
            table.add_row(*_kernel_row(k))
    if b := result.get("blocks"):
        table.add_row("decode steps", _blocks_row(b))
    if t := result.get("train"):
        table.add_section()
        table.add_row("train step", _spread_ms(t["step_time_s"]))
        table.add_row("train tokens/s", f"{t['tokens_per_s']:,.0f} ({t['tokens_per_step']:,} "
                      f"tokens per step, {t['flops_per_token'] / 1e6:,.1f} MFLOPs per token)")
        table.add_row("MFU", "unknown (peak unknown)" if t["mfu"] is None else
                      f"{t['mfu'] * 100:.1f}%")
        first = f"{t['first_step_s']:.2f} s" + (f" (compile about {t['compile_s']:.1f} s)"
                                                 if "compile_s" in t else "")
        table.add_row("first step", first)
        table.add_row("train peak memory", f"{t['peak_memory_bytes'] / GiB:,.2f} GiB")
    for g in result.get("generate", []):
        table.add_section()
        b = f"batch {g['batch_size']}"
        table.add_row(f"time to first token, {b}", f"{_spread_ms(g['time_to_first_token_s'])} "
                      f"for {g['prompt_tokens']} prompt tokens")
        table.add_row(f"prefill, {b}", f"{g['prefill_tokens_per_s']:,.0f} tokens/s")
        if "decode_tokens_per_s" in g:
            table.add_row(f"decode, {b}", f"{g['decode_tokens_per_s']:,.1f} tokens/s, "
                          f"{_spread_ms(g['decode_ms_per_token'], 1)} per token "
                          f"({g['new_tokens']} new tokens)")
            util, cached = g["bandwidth_utilisation"], result.get("weights_fit_in_cache_bytes")
            shown = "unknown" if util is None else f"{util:.1%}" + (
                f" of memory's; the weights fit in the {cached / 2**20:,.0f} MiB cache the CPU "
                "reports, and over 100% means some came from there" if cached else
                " (above the measured ceiling: the probe ran while the machine was busy; "
                "pass --bandwidth-gbs)" if util > 1 else "")
            table.add_row(f"bandwidth use, {b}", f"{shown} (weights "
                          f"{result['weight_bytes_per_step'] / 1e6:,.0f} MB per step)")
        if "compile_s" in g:
            table.add_row(f"first run, {b}", f"{g['first_run_s']:.2f} s (compile about "
                          f"{g['compile_s']:.1f} s)")
        if "speculative" in g:
            table.add_row(f"with the draft, {b}", _speculative_row(g["speculative"], result))
        both = " (its runs and the draft's)" if "speculative" in g else ""
        table.add_row(f"generate peak memory, {b}",
                      f"{g['peak_memory_bytes'] / GiB:,.2f} GiB{both}")
    console.print(table)
    notes = []
    if result["device"] == "cpu":
        notes.append("peak memory on the CPU is the process's max RSS since it started")
    if result["peak_tflops"] is None and "train" in result:
        notes.append("MFU needs the device's peak: pass --peak-tflops")
    if result["bandwidth_gbs"] is None and "generate" in result:
        notes.append("bandwidth use needs the device's bandwidth: pass --bandwidth-gbs")
    for note in notes:
        console.print(f"note: {note}", style="dim")


def _speculative_row(d: dict, result: dict) -> str:
    """Speculative decoding's figures against the plain runs they alternated with."""
    accepted = "no draft tokens proposed" if d["acceptance_rate"] is None else \
        f"{d['acceptance_rate']:.0%} of {d['draft_tokens']:,} draft tokens accepted"
    speed = f"{d['decode_tokens_per_s']:,.1f} tokens/s ({d['speedup']:.2f}x), " \
        if "speedup" in d else ""
    return f"{speed}{accepted} (draft {result['draft']}, " \
        f"{result['settings']['draft_tokens']} a round)"


# ----------------------------------------------------------------------------- results on stdout

def render_info(info: dict, title: str, console=None) -> None:
    """`gpt info`: the config fields that mean something for this model, rounded figures."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if "lora" in info:  # a LoRA checkpoint: its adapters, and the base they adapt
        lora, base = info["lora"], info["base"]
        table.add_row("LoRA adapters", f"{info['parameters']:,} parameters "
                      f"({info['parameters'] / info['base_parameters']:.2%} of the base), rank "
                      f"{lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}")
        table.add_row("base model", f"{base['model']} ({base['path']}, "
                      f"{info['base_parameters']:,} parameters)")
    else:
        table.add_row("parameters", f"{info['parameters']:,}")
    size = info["file_size"]
    table.add_row("file size", f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size / 1e3:,.1f} kB")
    table.add_row("tokenizer", info["tokenizer"])
    config = dict(info["config"])
    if config.get("position") != "rope":
        config.pop("rope_theta", None)
    for key, value in {**config, **info["provenance"]}.items():
        table.add_row(key, _rounded(value))
    if memory := info.get("memory"):  # a run's checkpoint: what a training step of it holds
        table.add_row("training memory", memory_text(memory))
        table.add_row("measured peak", "unknown" if memory["peak"] is None else
                      f"{size_text(memory['peak'])} (CUDA: max allocated; CPU: the process's "
                      "max RSS, Python and PyTorch included)")
    (console or Stdout()).print(table)


def size_text(n: float) -> str:
    return next(f"{n / scale:,.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"),
                                                               (1e3, "kB"), (1, "B"))
                if n >= scale or scale == 1)


def memory_text(memory: dict) -> str:
    """A training step's memory estimate, by what holds it (``models.run_memory``)."""
    parts = ", ".join(f"{name} {size_text(memory[name])}" for name in
                      ("weights", "gradients", "optimizer", "activations"))
    return (f"{size_text(memory['estimate'])} estimated = {parts} (batch "
            f"{memory['batch_size']} x {memory['context_length']} tokens, {memory['dtype']})")


def _rounded(value) -> str:
    """Floats stored as text (e.g. a val loss in checkpoint metadata) shown to 4 decimals."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, bool) or float(number).is_integer() or "e" in str(value).lower():
        return str(value)
    return f"{number:.4f}"


def render_eval(result: dict) -> None:
    quantized = f" (--quantize {result['quantize']})" if result.get("quantize") else ""
    print(f"{result['model']}{quantized}: loss {result['loss']:.4f} nats/token, perplexity "
          f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte")
    plural = "s" * (result["tokens"] != 1)
    print(f"scored {result['tokens']:,} token{plural} of {result['data']} (window "
          f"{result['context_length']}, stride {result['stride']})")
    if estimate := result.get("training_estimate"):
        print(f"(its val_loss in the checkpoint, {estimate['val_loss']:.4f} at step "
              f"{estimate['step']}, is training's estimate on {estimate['windows']:,} of the split's "
              f"{estimate['of']:,} windows; this scores every token)")


def render_listing(info: dict) -> None:
    """`gpt download --list`."""
    for kind in ("models", "datasets"):
        for key, entry in info[kind].items():
            print(f"{key:<12} {entry['repo']:<30} {'stored' if entry['stored'] else ''}".rstrip())
    print(f"in {info['models_dir']}: {', '.join(info['stored_models']) or '(nothing)'}")
    print(f"in {info['datasets_dir']}: {', '.join(info['stored_datasets']) or '(nothing)'}")


def render_download(result: dict) -> None:
    if result["kind"] == "dataset":
        print(f"stored dataset {result['name']} ({result['size'] / 1e6:,.1f} MB) in "
              f"{result['path']}; train on it with `gpt train --data {result['name']}`")
    else:
        print(f"stored {result['name']}: {result['parameters']:,} parameters, "
              f"{result['size'] / 1e6:,.1f} MB, {result['path']}")


def render_comparison(differ: list[str], rows: list[dict]) -> None:
    """`gpt plot`: one row per run, with its best val loss and the settings that differ."""
    from rich.table import Table

    table = Table("run", "best val", *differ)
    for row in rows:
        best = f"{row['best_val']:.4f}" if row["best_val"] is not None else "-"
        table.add_row(row["run"], best, *(setting_text(k, row[k]) for k in differ))
    Stdout().print(table)


def setting_text(name: str, value) -> str:
    """A setting as a person writes it: no None, no Python lists."""
    if value is None or value == []:
        return "bundled corpus" if name == "data" else "default"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_tasks(model: str, results: list) -> None:
    """`gpt eval --task`: one row per task, then the published figures to compare with."""
    from rich.table import Table

    table = Table("task", "items", "figures", "items/s", title=model, title_justify="left")
    for r in results:
        figures = ", ".join(f"{k} {v:.2%}" if k.startswith("acc") else f"{k} {v:,.4g}"
                            for k, v in r.metrics.items() if k not in ("tokens", "words",
                                                                       "bytes"))
        table.add_row(r.task, f"{r.items:,}", figures, f"{r.items / max(r.seconds, 1e-9):,.1f}")
    out = Stdout()
    out.print(table)
    for r in results:
        where = r.source.get("repo", r.source.get("file"))
        out.print(f"{r.task}: data {where}" + (f" @ {r.source['revision'][:12]}" if
                                                r.source.get("revision") else "") +
                  f"; published {r.published}", highlight=False, soft_wrap=True)
