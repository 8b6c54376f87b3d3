"""The `gpt` command line. The only module that imports typer.

Each command parses and validates its flags, calls one library function and renders the result.
torch and the model code are imported inside the commands so `gpt --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .runtime import GptcliError, UserError, is_debug, is_oom

app = typer.Typer(
    name="gpt",
    help="Train, run, inspect and benchmark GPT-2-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int) -> None:
    """Print one line to stderr and exit with ``code``."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f"rank {rank}: " if rank is not None else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def command(name: str | None = None, **kwargs):
    """Register a command with the one error policy: a user error is one line on stderr and exit
    status 2 (bad input) or 1 (runtime failure); ``--debug`` shows the traceback instead."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except GptcliError as e:
                if is_debug():
                    traceback.print_exc()
                fail(str(e), e.exit_code)
            except KeyboardInterrupt:
                if is_debug():
                    traceback.print_exc()
                fail("interrupted", 130)
            except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
                if is_oom(e):
                    if is_debug():
                        traceback.print_exc()
                    fail("out of memory on the device; try a smaller --batch-size or model", 1)
                if is_debug():
                    raise
                fail(f"{type(e).__name__}: {e} (run with `gpt --debug ...` for the traceback)", 1)

        return app.command(name, **kwargs)(wrapper)

    return register


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Train, run, inspect and benchmark GPT-2-family language models."""
    if debug:
        os.environ["GPTCLI_DEBUG"] = "1"


def not_built(what: str) -> None:
    fail(f"`gpt {what}` is not implemented yet", 1)


# ----------------------------------------------------------------------------- info

@command("info")
def info_cmd(
    model: Annotated[str, typer.Argument(
        help="A checkpoint file, a run folder, or the name of a downloaded model.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a checkpoint's config, parameter count, tokenizer, provenance and size."""
    from .checkpoint import checkpoint_info, resolve_model

    info = checkpoint_info(resolve_model(model))
    if as_json:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(model), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("file size", f"{info['file_size'] / 1e6:,.1f} MB")
    table.add_row("tokenizer", info["tokenizer"])
    for key, value in info["config"].items():
        table.add_row(key, str(value))
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    Console().print(table)


# ----------------------------------------------------------------------------- commands built later

def _default(field: str, model=None) -> str:
    """' (default: X)' from the config model, so defaults live in one place."""
    from .config import TrainConfig

    value = (model or TrainConfig).model_fields[field].default
    return "" if value is None else f" (default: {value})"


def _given(**flags) -> dict:
    """The flags the user actually set (None means: not given)."""
    return {k: v for k, v in flags.items() if v is not None}


Opt = typer.Option
DeviceOpt = Annotated[Optional[str], Opt(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[Optional[str], Opt(help="auto (bf16 on GPUs that support it, else float32), "
                                             "float32, bfloat16 or float16.")]


@command("train")
def train_cmd(
    data: Annotated[Optional[list[str]], Opt(help="Text file, folder of .txt files or downloaded "
                    "dataset name; repeat for several (default: bundled Shakespeare).")] = None,
    tokenizer: Annotated[Optional[str], Opt(help="gpt2, char, or auto (char for the tiny/small "
                         "presets, else gpt2).")] = None,
    val_fraction: Annotated[Optional[float], Opt(help="Share of tokens held out for validation, "
                            "from the end" + _default("val_fraction"))] = None,
    encoding: Annotated[Optional[str], Opt(help="Text encoding of the data" + _default("encoding"))] = None,
    preset: Annotated[Optional[str], Opt(help="Model shape: tiny, small, gpt2, gpt2-medium, "
                      "gpt2-large, gpt2-xl" + _default("preset"))] = None,
    n_layer: Annotated[Optional[int], Opt(help="Override the preset's number of layers.")] = None,
    n_head: Annotated[Optional[int], Opt(help="Override the preset's attention heads.")] = None,
    n_embd: Annotated[Optional[int], Opt(help="Override the preset's embedding width.")] = None,
    context_length: Annotated[Optional[int], Opt(help="Override the preset's context length.")] = None,
    dropout: Annotated[Optional[float], Opt(help="Dropout rate" + _default("dropout"))] = None,
    init_from: Annotated[Optional[str], Opt(help="Start from this checkpoint, run folder or "
                         "downloaded model (fine-tuning).")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Sequences per micro-batch" + _default("batch_size"))] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Micro-batches per optimizer step" + _default("grad_accum"))] = None,
    lr: Annotated[Optional[float], Opt(help="Peak learning rate" + _default("lr"))] = None,
    min_lr: Annotated[Optional[float], Opt(help="Learning rate at the end of the cosine decay" + _default("min_lr"))] = None,
    warmup_steps: Annotated[Optional[int], Opt(help="Linear warm-up steps" + _default("warmup_steps"))] = None,
    max_steps: Annotated[Optional[int], Opt(help="Optimizer steps" + _default("max_steps"))] = None,
    epochs: Annotated[Optional[float], Opt(help="Train for this many passes over the data "
                      "instead of --max-steps.")] = None,
    max_time: Annotated[Optional[float], Opt(help="Stop (and save) after this many seconds.")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="AdamW weight decay" + _default("weight_decay"))] = None,
    beta1: Annotated[Optional[float], Opt(help="AdamW beta1" + _default("beta1"))] = None,
    beta2: Annotated[Optional[float], Opt(help="AdamW beta2" + _default("beta2"))] = None,
    grad_clip: Annotated[Optional[float], Opt(help="Clip the gradient norm; 0 disables" + _default("grad_clip"))] = None,
    eval_interval: Annotated[Optional[int], Opt(help="Steps between evaluations and saves" + _default("eval_interval"))] = None,
    eval_steps: Annotated[Optional[int], Opt(help="Validation batches per evaluation" + _default("eval_steps"))] = None,
    log_interval: Annotated[Optional[int], Opt(help="Steps between log lines" + _default("log_interval"))] = None,
    save_interval: Annotated[Optional[int], Opt(help="Also keep step-N.safetensors every N steps.")] = None,
    sample_interval: Annotated[Optional[int], Opt(help="Steps between generated samples; 0 "
                               "disables" + _default("sample_interval"))] = None,
    sample_tokens: Annotated[Optional[int], Opt(help="Length of each sample" + _default("sample_tokens"))] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile", help="torch.compile the model.")] = None,
    seed: Annotated[Optional[int], Opt(help="Random seed" + _default("seed"))] = None,
    out: Annotated[Optional[str], Opt(help="Run folder (default: runs/<data name>).")] = None,
    config: Annotated[Optional[Path], Opt(help="Load settings from a JSON file; flags override it.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out exactly where it "
                      "stopped; `--resume auto` starts fresh when there is nothing to resume.")] = False,
    resume_auto: Annotated[bool, Opt("--resume-auto", hidden=True)] = False,
    force: Annotated[bool, Opt("--force", help="Overwrite the files of an existing run folder.")] = False,
) -> None:
    """Train a model on text files (default: the tiny preset on the bundled Shakespeare)."""
    explicit = _given(**{k: v for k, v in locals().items()
                         if k not in ("config", "resume", "resume_auto", "force")})
    from .display import TrainDisplay
    from .runtime import setup_distributed, teardown_distributed
    from .train import default_out, fit, merge_config, prepare_run_folder

    cfg = _validated(lambda: merge_config(explicit, config, None))
    folder = Path(cfg.out) if cfg.out else default_out(cfg)
    dist = setup_distributed(cfg.device)  # under torchrun: join the job; else one process
    try:
        resuming = dist.main_first(lambda: prepare_run_folder(
            folder, resume="auto" if resume_auto else "yes" if resume else None, force=force))
        if resuming:
            cfg = _validated(lambda: merge_config(explicit, config, folder))
        result = fit(cfg, out=folder, resume=resuming, display=TrainDisplay())
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed()
    if not dist.is_main:  # rank 0 reports; the others only pass on a signal's exit status
        raise typer.Exit({"SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by or "", 0))
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}; saved {folder / 'last.safetensors'}."
              f" Resume with: gpt train --out {folder} --resume", file=sys.stderr)
        if result.stopped_by.startswith("SIG"):
            raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)
        return
    best = f"best val loss {result.best_val:.4f}, " if result.best_val is not None else ""
    print(f"done: {result.step} steps, {best}checkpoint {result.checkpoint}\n"
          f"try it: gpt generate --model {folder} --prompt \"{'ROMEO:' if not cfg.data else 'The'}\"",
          file=sys.stderr)


def _validated(build):
    """Run a config constructor, turning validation errors into one-line user errors."""
    from pydantic import ValidationError

    from .config import validation_message

    try:
        return build()
    except ValidationError as e:
        raise UserError(validation_message(e)) from None


@command("generate")
def generate_cmd(
    model: Annotated[Optional[str], Opt("--model", "-m", help="Checkpoint file, run folder or "
                     "downloaded model name (default: the latest run under ./runs).")] = None,
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", help="Text to continue; '-' reads "
                      "standard input (also read when piped).")] = None,
    prompt_file: Annotated[Optional[Path], Opt(help="Read the prompt from this file.")] = None,
    max_new_tokens: Annotated[int, Opt(help="Tokens to generate per sample.")] = 200,
    temperature: Annotated[float, Opt(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, Opt(help="Sample among the k most likely tokens; 0 is off.")] = 0,
    top_p: Annotated[float, Opt(help="Nucleus sampling: smallest set with this probability.")] = 1.0,
    repetition_penalty: Annotated[float, Opt(help="> 1 discourages repeating earlier tokens.")] = 1.0,
    seed: Annotated[Optional[int], Opt(help="Same seed, same text (on the same device).")] = None,
    num_samples: Annotated[int, Opt(help="Samples generated together as one batch.")] = 1,
    stop: Annotated[Optional[list[str]], Opt(help="End a sample before this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, Opt("--ignore-eos", help="Go on past the end-of-text token.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    compile: Annotated[bool, Opt("--compile", help="torch.compile the one-token step.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object instead of text.")] = False,
    interactive: Annotated[bool, Opt("--interactive", "-i", help="A prompt loop: each line a new "
                           "prompt; Ctrl-D or /quit leaves.")] = False,
) -> None:
    """Generate text from a model, streamed to stdout (statistics on stderr)."""
    from .config import SampleConfig
    from .sampling import load_generator

    cfg = _validated(lambda: SampleConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, num_samples=num_samples,
        stop=stop or [], ignore_eos=ignore_eos))
    loaded = load_generator(model, device=device or "auto", dtype=dtype or "auto", compile=compile)
    if model is None:
        print(f"using {loaded[2]} (the latest run)", file=sys.stderr)
    if compile and loaded[0].device.type == "cpu":
        print("note: on CPUs the compiled step decodes slower than eager (measured 0.3x for gpt2); "
              "--compile pays off on CUDA", file=sys.stderr)
    if interactive:
        while (line := _read_prompt_line()) is not None:
            _generate_once(loaded, line, cfg, as_json)
        return
    _generate_once(loaded, _read_prompt(prompt, prompt_file), cfg, as_json)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UserError(f"prompt file {prompt_file} does not exist")
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {prompt_file} is not UTF-8 text (byte offset "
                            f"{e.start})") from None
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    return prompt or ""


def _read_prompt_line() -> str | None:
    try:
        line = input("> ")
    except EOFError:
        return None
    return None if line.strip() == "/quit" else line


def _generate_once(loaded, text: str, cfg, as_json: bool) -> None:
    from .sampling import generate, prompt_ids

    model, tokenizer, _, step = loaded
    ids, warning = prompt_ids(tokenizer, text, model.config.context_length)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    stream = not as_json and cfg.num_samples == 1

    def on_text(i: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        sys.stdout.write(text)
    samples, stats = generate(model, tokenizer, ids, cfg, on_text=on_text if stream else None,
                              step=step)
    if as_json:
        print(json.dumps({"prompt_token_ids": ids, "stats": stats.as_dict(), "samples": [
            {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
            for s in samples]}))
        return
    for i, s in enumerate(samples if not stream else []):
        print(f"{'' if i == 0 else chr(10)}----- sample {i + 1}/{len(samples)} -----")
        sys.stdout.write(text + s.text)
    print(flush=True)
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens, first token "
          f"{stats.time_to_first_token_s * 1000:.0f} ms, {stats.decode_tokens_per_s:.1f} "
          f"tokens/s]", file=sys.stderr)


@command("download")
def download_cmd(
    name: Annotated[Optional[str], typer.Argument(
        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, a Hub repo id (org/name), a "
             "local Hugging Face GPT-2 folder, or the dataset tinystories.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Fetch text files of this Hub dataset repo (org/name) instead of a model.")] = None,
    file: Annotated[Optional[list[str]], typer.Option(
        "--file", help="A .txt file of the --dataset repo to fetch (repeatable).")] = None,
    revision: Annotated[Optional[str], typer.Option(
        help="Branch, tag or commit of the Hub repo (default: main).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write the checkpoint here instead of the local model store.")] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Use only the Hugging Face cache (like HF_HUB_OFFLINE=1).")] = False,
    list_: Annotated[bool, typer.Option(
        "--list", help="Show the known names and what is in the local store.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Download GPT-2 weights (or a text dataset) from the Hugging Face Hub."""
    if list_:
        from .hub import list_available

        info = list_available()
        if as_json:
            print(json.dumps(info))
            return
        for kind in ("models", "datasets"):
            for key, entry in info[kind].items():
                print(f"{key:<12} {entry['repo']:<30} {'stored' if entry['stored'] else ''}")
        print(f"in {info['models_dir']}: {', '.join(info['stored_models']) or '(nothing)'}")
        print(f"in {info['datasets_dir']}: {', '.join(info['stored_datasets']) or '(nothing)'}")
        return
    from .hub import download

    result = download(name, dataset=dataset, files=file, revision=revision, out=out,
                      offline=offline, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps(result))
    elif result["kind"] == "dataset":
        print(f"stored dataset {result['name']} ({result['size'] / 1e6:,.1f} MB) in "
              f"{result['path']}; train on it with `gpt train --data {result['name']}`")
    else:
        print(f"stored {result['name']}: {result['parameters']:,} parameters, "
              f"{result['size'] / 1e6:,.1f} MB, {result['path']}")


@command("inspect-attention")
def inspect_attention_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=(
        "Checkpoint file, run folder or downloaded model name (default: the latest run)."))] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="The text to look at.")] = None,
    text_file: Annotated[Optional[Path], typer.Option(
        "--text-file", help="Read the text from this UTF-8 file instead.")] = None,
    layer: Annotated[str, typer.Option(
        "--layer", help="Layer(s) to show, 0-based: N, N,M or 'all'.")] = "0",
    head: Annotated[str, typer.Option(
        "--head", help="Head(s) to show, 0-based: N, N,M or 'all' (terminal: their mean).")] = "all",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write a PNG grid of heatmaps (needs matplotlib: the plot extra).")] = None,
    html: Annotated[Optional[Path], typer.Option(
        "--html", help="Write a self-contained interactive HTML page.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print tokens, selected weights and head summary as JSON.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Show what every attention head attends to: heatmap, top tokens, head summary."""
    from rich.console import Console

    from . import attention

    if out is not None:
        attention.require_matplotlib()  # fail before the slow part
    insp = attention.inspect(model, text=text, text_file=text_file, layer=layer, head=head,
                             device=device)
    err = Console(stderr=True)
    if out is not None:
        err.print(f"wrote {attention.write_png(insp, out)}")
    if html is not None:
        err.print(f"wrote {attention.write_html(insp, html)}")
    if as_json:
        print(json.dumps(attention.to_json(insp)))
    else:
        attention.render_terminal(Console(), insp)


@command("bench")
def bench_cmd(
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    preset: Annotated[Optional[str], Opt(help="Model shape (GPT-2 vocabulary): tiny, small, gpt2, "
                      "... (default: gpt2 on CUDA, small on MPS, tiny on CPU).")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Training batch; generation is timed at "
                          "batch 1 and also at this one when given (default: fits the device).")] = None,
    context_length: Annotated[Optional[int], Opt(help="Override the preset's context length.")] = None,
    prompt_length: Annotated[Optional[int], Opt(help="Prompt tokens to prefill (default: "
                             "min(128, context/2)).")] = None,
    new_tokens: Annotated[Optional[int], Opt(help="Tokens to decode per run (default: "
                          "min(128, what fits in the context)).")] = None,
    steps: Annotated[int, Opt(help="Timed training steps, and timed generation runs.")] = 10,
    warmup: Annotated[int, Opt(help="Untimed warm-up steps (generation: up to 2 runs).")] = 3,
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the model.")] = False,
    only: Annotated[Optional[str], Opt(help="Measure only: train or generate.")] = None,
    peak_tflops: Annotated[Optional[float], Opt(help="The device's dense peak TFLOPs for the "
                           "dtype (for MFU; default: a table of known GPUs).")] = None,
    bandwidth_gbs: Annotated[Optional[float], Opt(help="The device's memory bandwidth in GB/s "
                             "(default: a table of known GPUs).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object as the last line of "
                       "stdout (the table goes to stderr).")] = False,
) -> None:
    """Measure training and generation speed on this machine: tokens/s, MFU, bandwidth use."""
    given = _given(**{k: v for k, v in locals().items() if k != "as_json"})
    from rich.console import Console

    from .bench import BenchSettings, run
    from .display import ProgressBars, render

    settings = BenchSettings(**given)
    err = Console(stderr=True)
    with ProgressBars(err) as progress:
        result = run(settings, progress)
    render(result, err if as_json else Console())
    if as_json:
        print(json.dumps(result), flush=True)


@command("eval")
def eval_cmd(
    model: Annotated[Optional[str], Opt(help="Checkpoint file, run folder or downloaded model "
                     "(default: the latest run).")] = None,
    data: Annotated[Optional[list[str]], Opt(help="Text file(s) or folder to score (default: "
                    "the bundled Shakespeare).")] = None,
    context_length: Annotated[Optional[int], Opt(help="Window length (default: the model's).")] = None,
    stride: Annotated[Optional[int], Opt(help="Tokens scored per window; smaller gives each "
                      "token more context (default: the window length).")] = None,
    batch_size: Annotated[int, Opt(help="Windows per forward pass.")] = 8,
    encoding: Annotated[str, Opt(help="Text encoding of the data.")] = "utf-8",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
) -> None:
    """Mean loss, perplexity and bits per byte of a model on a text file (sliding window)."""
    from .evaluate import evaluate_file

    result = evaluate_file(model, data, context_length=context_length, stride=stride,
                           batch_size=batch_size, encoding=encoding, device=device or "auto",
                           dtype=dtype or "auto")
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['model']}: loss {result['loss']:.4f} nats/token, perplexity "
          f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte "
          f"({result['tokens']:,} tokens scored)")


@command("export")
def export_cmd(
    model: Annotated[str, typer.Option(
        help="A checkpoint file, a run folder, or the name of a downloaded model.")],
    to: Annotated[Path, typer.Option(
        help="Folder to write config.json, model.safetensors, generation_config.json into.")],
) -> None:
    """Write a model as a Hugging Face GPT-2 folder (loadable by transformers)."""
    from .checkpoint import resolve_model
    from .hub import export_model

    result = export_model(resolve_model(model), to)
    print(f"wrote {', '.join(result['files'])} ({result['parameters']:,} parameters) to "
          f"{result['path']}")
    if result["tokenizer"] != "gpt2":
        print(f"note: this model uses the {result['tokenizer']} tokenizer, which transformers "
              "does not know; encode text with gptcli's tokenizer", file=sys.stderr)


@command("plot")
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to compare.")],
    out: Annotated[Path, Opt(help="Where to write the picture.")] = Path("loss.png"),
) -> None:
    """Overlay the loss curves of several runs and list the settings that differ."""
    from rich.console import Console
    from rich.table import Table

    from .plot import compare_runs, plot_runs

    differ, rows = compare_runs(runs)
    table = Table("run", "best val", *differ)
    for row in rows:
        best = f"{row['best_val']:.4f}" if row["best_val"] is not None else "-"
        table.add_row(row["run"], best, *(str(row[k]) for k in differ))
    Console().print(table)
    plot_runs(runs, out)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    # `--resume auto` is spelled as an option value; typer has no optional-value options.
    for i in range(len(args) - 1):
        if args[i] == "--resume" and args[i + 1] == "auto":
            args[i:i + 2] = ["--resume-auto"]
            break
    app(args=args, prog_name="gpt")


if __name__ == "__main__":
    main()
