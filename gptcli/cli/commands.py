"""The commands. Each parses, validates, calls one library function and renders the result;
settings come from the config models (see ``app.command``), rendering from ``display.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import (BenchConfig, EvalConfig, LoadConfig, SampleConfig, ServeConfig,
                      TrainConfig)
from ..errors import UserError
from ..files import check_new
from .app import Json, command, settings, with_default

Opt = typer.Option
Arg = typer.Argument


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# LoadConfig's speculative decoding settings: generate, bench and serve decode with a draft
DRAFT = ("draft_model", "draft_tokens")


def check_draft(load: LoadConfig, given: dict) -> None:
    if "draft_tokens" in given and load.draft_model is None:
        raise UserError("--draft-tokens goes with --draft-model")


# ----------------------------------------------------------------------------- train

@command("train", TrainConfig, panels=("Data", "Model", "LoRA", "Optimisation", "Run", "Device"),
         oom_hint="try a smaller --batch-size (raise --grad-accum to keep "
         "the effective batch), --context-length or model")
def train_cmd(
    given: dict,
    config: Annotated[Optional[Path], Opt(metavar="FILE", rich_help_panel="Run", help=(
        "Load settings from a JSON file; flags override it."))] = None,
    resume: Annotated[bool, Opt("--resume", metavar="", rich_help_panel="Run", help=(
        "Continue the run in --out exactly where it stopped; `--resume auto` resumes when "
        "there is a saved state, else starts fresh."))] = False,
    resume_auto: Annotated[bool, Opt("--resume-auto", hidden=True)] = False,
    force: Annotated[bool, Opt("--force", metavar="", rich_help_panel="Run", help=(
        "Overwrite the files of an existing run folder."))] = False,
) -> None:
    """Train a model on text files (default: the tiny preset on the bundled Shakespeare)."""
    from ..display import TrainDisplay
    from ..train import launch

    display = TrainDisplay()
    result = launch(given, config_file=config, force=force,
                    resume="auto" if resume_auto else "yes" if resume else None, display=display)
    if result.is_main:
        display.report(result)
    raise typer.Exit(result.exit_code)


# ----------------------------------------------------------------------------- generate

@command("generate", LoadConfig, SampleConfig,
         panels=("Model", "Prompt", "Sampling", "Device", "Output"),
         oom_hint="try a smaller --num-samples or --max-new-tokens, or a smaller model")
def generate_cmd(
    given: dict,
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", metavar="TEXT", rich_help_panel="Prompt",
                                         help="Text to continue; '-' reads standard input (also "
                                              "read when piped).")] = None,
    prompt_file: Annotated[Optional[Path], Opt(metavar="FILE", rich_help_panel="Prompt", help=(
        "Read the prompt from this UTF-8 file."))] = None,
    interactive: Annotated[bool, Opt("--interactive", "-i", metavar="", rich_help_panel="Prompt",
                                     help="A prompt loop: each line a new prompt; Ctrl-D or "
                                          "/quit leaves.")] = False,
    as_json: Json = False,
) -> None:
    """Generate text from a model, streamed to stdout (statistics on stderr)."""
    from ..generate import load_generator

    load, sample = settings(LoadConfig, given), settings(SampleConfig, given)
    check_draft(load, given)
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt with either --prompt TEXT or --prompt-file FILE")
    if interactive and (prompt is not None or prompt_file is not None):
        raise UserError("--interactive reads each prompt as a line of input; leave out "
                        f"{'--prompt' if prompt is not None else '--prompt-file'}")
    loaded = load_generator(load.model, device=load.device, dtype=load.dtype,
                            compile=load.compile, quantize=load.quantize, kernel=load.kernel,
                            draft_model=load.draft_model, draft_tokens=load.draft_tokens,
                            batch=sample.num_samples)
    if load.model is None:
        note(f"using {loaded.path} (the latest run)")
    if load.compile and loaded.model.device.type == "cpu" and load.kernel != "inductor":
        note("note: on CPUs the compiled step decodes about as fast as eager (gpt2: 0.97-1.07x) "
             "after ~30 s of compiling; --kernel inductor lets inductor choose the products "
             "(faster on some CPUs: gpt bench --compile --kernel inductor)")
    prompts = iter(read_prompt_line, None) if interactive else [read_prompt(prompt, prompt_file)]
    engine = loaded.engine(sample.num_samples) if interactive else None  # (one for every line)
    for text in prompts:
        generate_once(loaded, text, sample, as_json, engine)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    from ..files import read_text_arg

    if prompt_file is not None:
        return read_text_arg(prompt_file, "prompt file")
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    return prompt or ""


def read_prompt_line() -> str | None:
    """The next prompt of --interactive (None: the end, or /quit), read as `gpt chat` reads a
    message: a "> " prompt in a terminal (on stderr where stdout is redirected), none when the
    lines are piped in, so stdout keeps only the text."""
    from ..conversation import read_line

    line = read_line(sys.stdin.isatty())
    return None if line is None or line.strip() == "/quit" else line


def generate_once(loaded, text: str, cfg: SampleConfig, as_json: bool, engine=None) -> None:
    from ..generate import generate, prompt_ids

    from ..display import SampleWriter

    ids, warning = prompt_ids(loaded.tokenizer, text, loaded.model.config.context_length)
    if warning:
        note(f"warning: {warning}")
    writer = None if as_json else SampleWriter(cfg.num_samples, text)
    samples, stats = generate(loaded.model, loaded.tokenizer, ids, cfg, step=loaded.step,
                              draft=loaded.draft, on_text=writer and writer.text,
                              on_done=writer and writer.done, engine=engine)
    if as_json:
        print(json.dumps({"prompt_token_ids": ids, "stats": stats.as_dict(), "samples": [
            {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
            for s in samples]}))
        return
    print(flush=True)
    kept = f" ({stats.cached_prompt_tokens} kept)" if stats.cached_prompt_tokens else ""
    # --compile: the first call's steps compile (gpt bench --compile times the steps after)
    compiling = " with compiling" if loaded.step is not None and not loaded.warm else ""
    loaded.warm = True
    speed = f", {stats.decode_tokens_per_s:.1f} tokens/s{compiling}" if stats.new_tokens > 1 \
        else ""  # (after the first token: none to time)
    note(f"[{_count(stats.prompt_tokens, 'prompt')}{kept}, {_count(stats.new_tokens, 'new')}, "
         f"first token {stats.time_to_first_token_s * 1000:.0f} ms{speed}{_acceptance(stats)}]")


def _count(n: int, what: str) -> str:
    return f"{n} {what} token{'s' * (n != 1)}"


def _acceptance(stats) -> str:
    if stats.draft_tokens is None:
        return ""
    rate = "-" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.0%}"
    return f", draft tokens accepted {rate} ({stats.accepted_tokens}/{stats.draft_tokens})"


# ----------------------------------------------------------------------------- chat

@command("chat", LoadConfig, SampleConfig, exclude=("num_samples",),
         panels=("Model", "Conversation", "Sampling", "Device", "Output"),
         oom_hint="try a smaller --max-new-tokens, or a smaller model",
         helps={"max_new_tokens": "The longest reply in tokens, kept free in the model's "
                "context (default: 200, or half the context when that is less)."})
def chat_cmd(
    given: dict,
    system: Annotated[Optional[str], Opt("--system", metavar="TEXT",
                                         rich_help_panel="Conversation", help=(
        "The system message the conversation starts with (/system TEXT changes it)."))] = None,
    as_json: Json = False,
) -> None:
    """Chat with a model: a conversation that keeps its history, each reply streamed as it is
    made (--max-new-tokens is the longest reply). Commands: /reset, /system TEXT, /save FILE,
    /quit; Ctrl-C stops a reply. From a pipe, each line is a message and each reply a line."""
    from ..conversation import run_chat
    from ..generate import load_generator

    load, sample = settings(LoadConfig, given), settings(SampleConfig, given)
    check_draft(load, given)
    loaded = load_generator(load.model, device=load.device, dtype=load.dtype,
                            compile=load.compile, quantize=load.quantize, kernel=load.kernel,
                            draft_model=load.draft_model, draft_tokens=load.draft_tokens)
    if load.model is None:
        note(f"using {loaded.path} (the latest run)")
    raise typer.Exit(run_chat(loaded, sample, system=system, as_json=as_json, log=note,
                              reply_given="max_new_tokens" in given))


# ----------------------------------------------------------------------------- eval

@command("eval", LoadConfig, EvalConfig, exclude=("compile", *DRAFT),
         panels=("Model", "Data", "Tasks", "Scoring", "Device", "Output"),
         oom_hint="try a smaller --batch-size or --context-length")
def eval_cmd(given: dict, as_json: Json = False) -> None:
    """Loss, perplexity and bits per byte of a model on text (sliding window); without --data,
    on the validation split of the run the model comes from. With --task: the standard GPT-2
    benchmarks (LAMBADA, HellaSwag, WikiText) next to their published figures."""
    load, cfg = settings(LoadConfig, given), settings(EvalConfig, given)
    if cfg.harness:
        return eval_harness(load, cfg, as_json)
    if cfg.task:
        return eval_tasks(load, cfg, as_json)
    if cfg.task_file or cfg.limit or cfg.offline or cfg.log_to:
        raise UserError("--task-file, --limit, --offline and --log-to go with --task")
    from ..tables import render_eval
    from ..evaluate import evaluate_file

    result = evaluate_file(load, cfg)
    if as_json:
        print(json.dumps(result))
    else:
        render_eval(result)


def eval_harness(load, cfg, as_json: bool) -> None:
    from ..errors import require

    if cfg.task or cfg.data:
        raise UserError("--harness runs lm-evaluation-harness tasks; leave out --task and --data")
    harness = require("gptcli.harness", "eval", needed_for="--harness")
    tasks = [t for entry in cfg.harness for t in entry.split(",") if t]
    results = harness.evaluate_harness(tasks, load, cfg.batch_size, cfg.limit,
                                       cfg.harness_include)
    if as_json:
        print(json.dumps({"results": results["results"], "versions": results.get("versions")},
                         default=str))
    else:
        from lm_eval.utils import make_table

        print(make_table(results))


def eval_tasks(load, cfg, as_json: bool) -> None:
    from rich.console import Console

    from ..display import ProgressBars
    from ..tables import render_tasks
    from ..tasks import run_tasks

    if cfg.data:
        raise UserError("--data and --task are two kinds of evaluation; give one")
    with ProgressBars(Console(stderr=True)) as progress:
        model, results = run_tasks(load, cfg, progress, log=note)
    if cfg.log_to:
        from ..trackers import log_results, scalars

        run = log_results(model, {f"{r.task}/{k}": v for r in results
                                  for k, v in scalars(r.metrics).items()}, cfg.log_to)
        note(f"results added to {run}/metrics.jsonl and {' and '.join(cfg.log_to)}")
    if as_json:
        print(json.dumps({"model": model, "tasks": {r.task: {
            "metrics": r.metrics, "items": r.items, "source": r.source,
            "published": r.published, "seconds": r.seconds} for r in results}}))
    else:
        render_tasks(model, results)


# ----------------------------------------------------------------------------- inspect-attention

@command("inspect-attention", LoadConfig, exclude=("compile", *DRAFT),
         panels=("Model", "Text", "Selection", "Device", "Output"))
def inspect_attention_cmd(
    given: dict,
    text: Annotated[Optional[str], Opt("--text", metavar="TEXT", rich_help_panel="Text", help=(
        "The text to look at."))] = None,
    text_file: Annotated[Optional[Path], Opt("--text-file", metavar="FILE", rich_help_panel="Text",
                                             help="Read the text from this UTF-8 file instead.")] = None,
    layer: Annotated[str, Opt("--layer", metavar="N", rich_help_panel="Selection",
                              show_default=False, help=with_default(
                                  "Layer(s) to show, 0-based: N, N,M or 'all'.", "0"))] = "0",
    head: Annotated[str, Opt("--head", metavar="N", rich_help_panel="Selection",
                             show_default=False, help=with_default(
                                 "Head(s) to show, 0-based: N, N,M or 'all' (terminal: their "
                                 "mean).", "all"))] = "all",
    out: Annotated[Optional[Path], Opt("--out", metavar="FILE", rich_help_panel="Output", help=(
        "Write a PNG grid of heatmaps (needs matplotlib: the plot extra)."))] = None,
    html: Annotated[Optional[Path], Opt("--html", metavar="FILE", rich_help_panel="Output", help=(
        "Write a self-contained interactive HTML page."))] = None,
    force: Annotated[bool, Opt("--force", metavar="", rich_help_panel="Output", help=(
        "Overwrite --out and --html even if gptcli did not write them."))] = False,
    as_json: Json = False,
) -> None:
    """Show what every attention head attends to: heatmap, top tokens, head summary. The maps
    are computed in the weights' dtype and shown as float32."""
    from .. import attention
    from ..display import Stdout

    load = settings(LoadConfig, given)
    check_new(out, "--out", force, mark=b"matplotlib")  # (its writer's name, in every file)
    check_new(html, "--html", force, mark=b"gptcli inspect-attention")
    if out is not None:
        attention.require_matplotlib()  # fail before the slow part
    insp = attention.inspect(load.model, text=text, text_file=text_file, layer=layer, head=head,
                             device=load.device, dtype=load.dtype, quantize=load.quantize)
    if out is not None:
        note(f"wrote {attention.write_png(insp, out)}")
    if html is not None:
        note(f"wrote {attention.write_html(insp, html)}")
    if as_json:
        print(json.dumps(attention.to_json(insp)))
    else:
        attention.render_terminal(Stdout(), insp)


# ----------------------------------------------------------------------------- bench

@command("bench", LoadConfig, BenchConfig,
         panels=("Model", "Generation", "Run", "Hardware", "Device", "Output"),
         oom_hint="try a smaller --batch-size, --context-length or --preset",
         helps={"model": "Time this checkpoint, run folder or downloaded model (generation "
                         "only) instead of a preset with random weights."})
def bench_cmd(given: dict, as_json: Json = False) -> None:
    """Measure training and generation speed on this machine: tokens/s, MFU, bandwidth use."""
    from rich.console import Console

    from ..bench import run
    from ..display import ProgressBars, Stdout
    from ..tables import render_bench

    err = Console(stderr=True)
    load = settings(LoadConfig, given)
    check_draft(load, given)
    with ProgressBars(err) as progress:
        result = run(load, settings(BenchConfig, given), progress)
    render_bench(result, err if as_json else Stdout())  # with --json, the table goes to stderr
    if as_json:
        print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- serve

@command("serve", LoadConfig, ServeConfig, exclude=("compile",),
         panels=("Model", "Server", "Device"),
         oom_hint="try a smaller --max-batch or --max-tokens, or a smaller model")
def serve_cmd(given: dict) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming),
    decoding concurrent requests together. Needs the serve extra (starlette and uvicorn)."""
    from ..serve import run_server

    load = settings(LoadConfig, given)
    check_draft(load, given)
    raise typer.Exit(run_server(load, settings(ServeConfig, given), note))


# ----------------------------------------------------------------------------- models on disk

@command("plot")
def plot_cmd(
    runs: Annotated[list[Path], Arg(metavar="RUN...", help="Run folders to compare (a sweep "
                                     "folder: all its points).", show_default=False)],
    out: Annotated[Path, Opt(metavar="FILE", show_default=False, help=with_default(
        "Where to write the picture.", "loss.png"))] = Path("loss.png"),
    x: Annotated[str, Opt("--x", metavar="step|tokens|flops", show_default=False,
                          help=with_default("The x axis: optimizer steps, tokens trained or "
                                            "training FLOPs.", "step"))] = "step",
    force: Annotated[bool, Opt("--force", metavar="", help=(
        "Overwrite --out even if gptcli did not write it."))] = False,
) -> None:
    """Overlay the loss curves of several runs and list the settings that differ; a sweep
    folder alone also gets its final loss against the setting it varies."""
    from ..tables import render_comparison
    from ..plot import compare_runs, plot_runs, pyplot

    check_new(out, "--out", force, mark=b"matplotlib")
    pyplot()  # (a missing extra before the table, which would go to stdout for nothing)
    render_comparison(*compare_runs(runs))
    note(f"wrote {plot_runs(runs, out, x=x)}")
