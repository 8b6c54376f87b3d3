"""`gpt eval --task`: the standard GPT-2 benchmarks, scored with the model's own forward pass.

- ``lambada`` (OpenAI's LAMBADA test set, 5,153 passages): the last word is predicted from the
  rest; accuracy = every token of it is the greedy choice, perplexity = exp(-mean log-likelihood
  of the last word) over passages (lm-evaluation-harness's ``lambada_openai``).
- ``hellaswag`` (validation, 10,042 items): the ending with the highest log-likelihood;
  ``acc`` by the sum of its log-probs, ``acc_norm`` by that sum divided by the ending's length in
  characters (lm-evaluation-harness's definition; its preprocessing of the text too).
- ``wikitext-2`` / ``wikitext-103`` (raw test split, document level): token perplexity, bits
  per byte and word-level perplexity of each document after undoing WikiText's tokenisation,
  scored in windows of the model's context, each token once, the first after an end-of-text
  token (lm-evaluation-harness's ``wikitext``: its rolling windows are exactly
  ``evaluate.eval_windows`` with the stride equal to the context).

Continuations are split from their context as lm-evaluation-harness does (the context's trailing
spaces move into the continuation; the continuation's tokens are those of context+continuation
after the context's), so per-item log-likelihoods match its ``loglikelihood``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError, require
from .store import tasks_dir


@dataclass(frozen=True)
class Task:
    name: str
    repo: str  # the Hugging Face dataset repo lm-evaluation-harness reads
    patterns: tuple[str, ...]  # the file to use in it, by preference (a layout change tolerated)
    items: int  # in the full split
    published: str  # GPT-2 124M's figures elsewhere, with their source
    columns: tuple[str, ...] = ()


# Published GPT-2 124M figures. GPT-2 paper: Radford et al. 2019, "Language Models are
# Unsupervised Multitask Learners", Table 3 (zero-shot; the paper's own detokenisation and, for
# LAMBADA, its own preprocessing, so not directly comparable). lm-evaluation-harness: its gpt2
# results as reported in EleutherAI's model comparisons (lambada_openai acc 0.3256, perplexity
# 40.06; hellaswag acc 0.2892, acc_norm 0.3114), the figures build-nanogpt's hellaswag.py also
# quotes for the harness.
TASKS = {
    "lambada": Task("lambada", "EleutherAI/lambada_openai",
                    ("lambada_test.jsonl", "*/lambada_test.jsonl", "*lambada_test_en.jsonl",
                     "default/*test*.parquet", "*test*.parquet"), 5153,
                    "GPT-2 124M: lm-evaluation-harness lambada_openai acc 32.56%, perplexity "
                    "40.06; GPT-2 paper (own preprocessing) acc 45.99%, perplexity 35.13",
                    ("text",)),
    "hellaswag": Task("hellaswag", "Rowan/hellaswag",
                      ("*val*.jsonl", "*validation*.jsonl", "*validation*.parquet"), 10042,
                      "GPT-2 124M: lm-evaluation-harness acc 28.92%, acc_norm 31.14%",
                      ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "wikitext-2": Task("wikitext-2", "EleutherAI/wikitext_document_level",
                       ("wikitext-2-raw-v1/*test*.parquet", "*wikitext-2-raw*test*"), 62,
                       "GPT-2 124M: GPT-2 paper word-level perplexity 29.41 (its own "
                       "detokenisation)", ("page",)),
    "wikitext-103": Task("wikitext-103", "EleutherAI/wikitext_document_level",
                         ("wikitext-103-raw-v1/*test*.parquet", "*wikitext-103-raw*test*"), 62,
                         "GPT-2 124M: GPT-2 paper word-level perplexity 37.50 (its own "
                         "detokenisation)", ("page",)),
}


# ----------------------------------------------------------------------------- data

def task_store(name: str) -> Path:
    return tasks_dir() / name


def load_items(task: Task, path: Path) -> list[dict]:
    """The items of a task file in its published format: JSON lines or parquet."""
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", "eval", needed_for=f"reading {path.name}")
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's own error classes
            raise UserError(f"{path} is not a readable parquet file: {e}") from None
    else:
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(json.loads(line))
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None
        except ValueError as e:
            raise UserError(f"{path} line {n} is not valid JSON: {e}") from None
        except OSError as e:
            from .errors import path_error

            raise path_error(e, f"read the {task.name} file", path) from None
    for n, row in enumerate(rows, 1):
        missing = [c for c in task.columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise UserError(f"{path} item {n} has no {', '.join(missing)}: it is not a "
                            f"{task.name} file (expected the fields {', '.join(task.columns)})")
    if not rows:
        raise UserError(f"{path} has no items")
    if task.name == "hellaswag":
        for n, row in enumerate(rows, 1):
            check_hellaswag(row, f"{path} item {n}")
    return rows


def check_hellaswag(item: dict, where: str) -> None:
    """An item that can be scored: texts, two or more endings with words left after cleaning
    (acc_norm divides by their length), and a label that is one of their indices."""
    endings, label = item["endings"], item["label"]
    if not all(isinstance(item[c], str) for c in ("activity_label", "ctx_a", "ctx_b")):
        raise UserError(f"{where}: activity_label, ctx_a and ctx_b must be texts")
    if not isinstance(endings, list) or len(endings) < 2 or \
            not all(isinstance(e, str) and hellaswag_text(e) for e in endings):
        raise UserError(f"{where}: endings must be a list of two or more texts that keep some "
                        "words once their [bracketed] tags are removed")
    if isinstance(label, bool) or not str(label).strip().isdecimal() or \
            int(label) >= len(endings):
        raise UserError(f"{where}: label {label!r} is not the index of one of its "
                        f"{len(endings)} endings")


def fetch(task: Task, offline: bool, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The task's file from the Hub (once; then from the gptcli store) and where it came from."""
    store = task_store(task.name)
    source_file = store / "source.json"
    if source_file.is_file():
        source = json.loads(source_file.read_text())
        if (store / source["file"]).is_file():
            return store / source["file"], source
    from .hub import commit_of, hub_fetch, list_files

    files = list_files(task.repo, offline=offline)
    chosen = next((f for pattern in task.patterns for f in sorted(files)
                   if fnmatch(f, pattern)), None)
    if chosen is None:
        raise UserError(f"dataset repo {task.repo} has no file for {task.name} (looked for "
                        f"{', '.join(task.patterns)}); pass one with --task-file "
                        f"{task.name}=FILE")
    log(f"downloading {task.name} ({task.repo}: {chosen})")
    path = hub_fetch(task.repo, chosen, offline=offline, repo_type="dataset",
                     local_dir=store)
    source = {"repo": task.repo, "file": chosen, "revision": commit_of(path, local_dir=store)}
    source_file.write_text(json.dumps(source))
    return store / chosen, source


# ----------------------------------------------------------------------------- scoring

def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's encoding of a (context, continuation) pair: trailing spaces of
    the context move into the continuation; the continuation's tokens are those of the whole
    text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    if not ctx:  # an empty context starts from end-of-text, as the harness does
        return [tokenizer.start_id], whole
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
          tick: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation) token pair: the continuation's log-likelihood given the
    context, and whether every continuation token is the greedy choice. Inputs longer than the
    context window keep their last tokens; batches pad on the right (causal attention makes
    padding after a row's tokens invisible to them); the longest inputs go first."""
    T = model.config.context_length
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("an empty continuation")
        whole = (ctx + cont)[-(T + 1):]
        inputs.append((whole[:-1], len(cont)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        width = len(inputs[chunk[0]][0])
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            idx[row, :len(inputs[i][0])] = torch.tensor(inputs[i][0])
        logits = model(idx.to(model.device))
        for row, i in enumerate(chunk):
            n_in, n_cont = len(inputs[i][0]), inputs[i][1]
            target = torch.tensor(pairs[i][1], device=logits.device)
            # predictions of the continuation's tokens only (a softmax over the vocabulary at
            # every position would cost as much as the model here)
            rows = F.log_softmax(logits[row, n_in - n_cont:n_in].float(), dim=-1)
            ll = rows.gather(1, target[:, None]).sum().item()
            results[i] = (ll, bool((rows.argmax(-1) == target).all()))
        if tick:
            tick(len(chunk))
    return results


def rolling(model, tokens: list[int], prefix: int) -> float:
    """The log-likelihood of a whole document: ``prefix`` (end-of-text) then its tokens, in
    windows of the model's context, each token scored once (lm-evaluation-harness's
    ``loglikelihood_rolling``)."""
    from .evaluate import evaluate

    seq = np.asarray([prefix, *tokens], dtype=np.int64)
    T = model.config.context_length
    result = evaluate(model, seq, min(T, len(seq) - 1), stride=min(T, len(seq) - 1),
                      batch_size=8, device=model.device)
    return -result.loss * result.tokens


# ----------------------------------------------------------------------------- the tasks

def lambada(model, tokenizer, items: list[dict], batch_size: int, tick) -> dict:
    pairs = []
    for item in items:
        context, _, word = item["text"].rpartition(" ")
        pairs.append(split_pair(tokenizer, context, " " + word))
    scored = score(model, pairs, batch_size, tick)
    lls = [ll for ll, _ in scored]
    return {"acc": float(np.mean([greedy for _, greedy in scored])),
            "perplexity": math.exp(-float(np.mean(lls)))}


def hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's cleaning of HellaSwag text (WikiHow's bracketed artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(model, tokenizer, items: list[dict], batch_size: int, tick) -> dict:
    pairs, choices, gold = [], [], []
    for item in items:
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
        query = hellaswag_text(item["activity_label"] + ": " + ctx)
        endings = [hellaswag_text(e) for e in item["endings"]]
        pairs.extend(split_pair(tokenizer, query, " " + e) for e in endings)
        choices.append(endings)
        gold.append(int(item["label"]))
    scored = iter(score(model, pairs, batch_size, lambda n: tick(n / 4) if tick else None))
    acc, acc_norm = [], []
    for endings, label in zip(choices, gold):
        lls = np.array([next(scored)[0] for _ in endings])
        lengths = np.array([len(e) for e in endings], dtype=float)
        acc.append(int(np.argmax(lls)) == label)
        acc_norm.append(int(np.argmax(lls / lengths)) == label)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


# WikiText's tokenisation, undone, in the order lm-evaluation-harness's wikitext task applies it:
# ("text", old, new) replaces text, ("re", pattern, new) a regular expression.
_DETOKENIZE = [
    ("text", "s '", "s'"), ("re", r"/' [0-9]/", r"/'[0-9]/"),  # contractions
    ("text", " @-@ ", "-"), ("text", " @,@ ", ","), ("text", " @.@ ", "."),  # number separators
    *(("text", f" {p} ", f"{p} ") for p in ":;.!?,"),  # punctuation
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"), ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),  # spaces inside brackets and quotes
    ("text", "= = = =", "===="), ("text", "= = =", "==="), ("text", "= =", "=="),
    ("text", " \u00b0 ", "\u00b0"), ("text", " \n", "\n"), ("text", "\n ", "\n"),
    ("text", " N ", " 1 "), ("text", " 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    for kind, old, new in _DETOKENIZE:
        text = text.replace(old, new) if kind == "text" else re.sub(old, new, text)
    return text


def wikitext(model, tokenizer, items: list[dict], batch_size: int, tick) -> dict:
    prefix = tokenizer.start_id
    total_ll, tokens, words, n_bytes = 0.0, 0, 0, 0
    for item in items:
        doc = wikitext_detokenize(item["page"])
        ids = tokenizer.encode(doc)
        if ids:
            total_ll += rolling(model, ids, prefix)
        tokens += len(ids)
        words += len(re.split(r"\s+", doc))
        n_bytes += len(doc.encode("utf-8"))
        if tick:
            tick(1)
    return {"token_perplexity": math.exp(-total_ll / max(1, tokens)),
            "word_perplexity": math.exp(-total_ll / max(1, words)),
            "bits_per_byte": -total_ll / max(1, n_bytes) / math.log(2),
            "tokens": tokens, "words": words, "bytes": n_bytes}


SCORERS = {"lambada": lambada, "hellaswag": hellaswag, "wikitext-2": wikitext,
           "wikitext-103": wikitext}


@dataclass
class TaskResult:
    task: str
    items: int
    metrics: dict
    source: dict
    published: str
    seconds: float = 0.0


def parse_task_files(entries: Sequence[str] | None) -> dict[str, Path]:
    """``--task-file NAME=PATH`` entries."""
    files = {}
    for entry in entries or []:
        name, sep, path = entry.partition("=")
        if not sep or name not in TASKS:
            raise UserError(f"--task-file {entry!r}: write it as NAME=PATH with NAME one of "
                            f"{', '.join(TASKS)}")
        if not Path(path).is_file():
            raise UserError(f"--task-file {name}: {path} is not a file")
        files[name] = Path(path)
    return files


def run_tasks(load, cfg, progress: Callable[[str, int], Callable[..., None]] | None = None,
              log: Callable[[str], None] = lambda m: None) -> tuple[str, list[TaskResult]]:
    """`gpt eval --task ...`: fetch (or read) each task's data, score it, return the figures."""
    import time

    from .locate import load_model

    files = parse_task_files(cfg.task_file)
    unused = sorted(set(files) - set(cfg.task))
    if unused:
        raise UserError(f"--task-file names {', '.join(unused)}, which no --task asks for")
    data = {}
    for name in cfg.task:  # all data first: a missing file is found before any scoring
        task = TASKS[name]
        if name in files:
            path, source = files[name], {"file": str(files[name])}
        else:
            path, source = fetch(task, cfg.offline, log)
        items = load_items(task, path)
        data[name] = (items[:cfg.limit] if cfg.limit else items, source)
    model, tokenizer, model_path = load_model(load.model, device=load.device, dtype=load.dtype,
                                              quantize=load.quantize, kernel=load.kernel,
                                              steps=False)  # scored whole: no decode steps
    progress = progress or (lambda label, total: (lambda n=1: None))
    results = []
    for name, (items, source) in data.items():
        tick = progress(name, len(items))
        t0 = time.perf_counter()
        metrics = SCORERS[name](model, tokenizer, items, cfg.batch_size, tick)
        results.append(TaskResult(name, len(items), metrics, source, TASKS[name].published,
                                  time.perf_counter() - t0))
    return str(model_path), results
