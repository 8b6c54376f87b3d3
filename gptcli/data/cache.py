"""The sharded token cache: each input file becomes one shard of token ids, keyed by the file's
content, its format and the tokenizer, written atomically and memory-mapped; tokenized in a
pool of worker processes; the shards seen as one sequence (``Tokens``).

Each shard is ``<cache>/shards/<key>.bin`` (uint16 when the vocabulary fits, else uint32) with a
JSON sidecar. Adding a file tokenizes only that file, and an interrupted run keeps the shards it
finished (a shard is written to a temporary file and renamed when complete). The content is
hashed while it is tokenized (one read per byte); a small index keyed by path, size and
modification time lets an unchanged file skip even that. Text is cut into pieces where its
tokens cannot change (``cuts``) and, with ``workers`` > 1, tokenized in a pool of processes, one
thread each (tiktoken's own threads hold the GIL most of the time: 1.2x on 2 cores, against ~2x
for processes), no more processes than cores and jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..chat import CHAT_FORMATS, TEMPLATE, render_row
from ..chat import where as row_at
from ..errors import UserError
from ..files import process_alive
from ..store import tokens_dir
from ..tokenizer import CharTokenizer, Tokenizer, get_tokenizer
from . import sources
from .cuts import Cut, for_tokenizer
from .dataset import TokenData, token_dtype
from .sources import SUFFIXES, document_rows, read_documents, read_text_chunks

PIECE_CHARS = 256 << 10  # one tokenizer call: its list of ids stays a few MB
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def _pieces(text: str, cut: Cut) -> Iterator[str]:
    """``text`` in pieces of about ``PIECE_CHARS``, cut where ``cut`` allows; a piece with no
    cut in reach runs on to the first one after it (searching on, never back over, the text)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        lo, hi, end = start + 1, start + PIECE_CHARS, -1
        while end < 0 and lo < len(text):
            end = cut(text, lo, hi)
            lo, hi = hi, min(len(text), hi + PIECE_CHARS)
        if end < 0:
            break
        yield text[start:end]
        start = end
    yield text[start:]


_WORKER: dict = {}


def _encode(job: tuple) -> bytes | tuple[bytes, bytes]:
    """Tokenize one piece of work (in a worker process, or in this one): ("text", text),
    ("docs", texts, lead) -> token ids as bytes in the cache's dtype; ("records", rows, how) ->
    the ids and their target mask (one byte per token) of chat/instruction records."""
    spec, dtype, kind, payload, lead = job
    if _WORKER.get("spec") != spec:
        _WORKER.update(spec=spec, tok=get_tokenizer(spec))
    tok = _WORKER["tok"]  # one thread per process: parallelism comes from the processes
    if kind == "records":
        return _encode_records(tok, dtype, payload, *lead)
    # each list of ids to bytes in C as soon as it is made (flattening millions of ids in
    # Python costs as much as encoding them, and holding every list of a chunk costs ~36
    # bytes per token)
    if kind == "text":
        return b"".join(np.asarray(tok.encode(piece), dtype=dtype).tobytes()
                        for piece in _pieces(payload, for_tokenizer(spec)))
    sep = tok.separator_id
    parts = []
    for n, doc in enumerate(payload):
        if (n or lead) and sep is not None:
            parts.append(np.asarray([sep], dtype=dtype).tobytes())
        parts.append(np.asarray(tok.encode(doc), dtype=dtype).tobytes())
    return b"".join(parts)


def _encode_records(tok: Tokenizer, dtype: str, rows: list[tuple[int, dict]], path: str,
                    fmt: str, mask_prompt: bool, column: str) -> tuple[bytes, bytes]:
    """Chat/instruction records rendered by the one chat template (``chat.render_row``): each
    ends with end-of-text, so records follow each other with no separator."""
    ids, targets = [], []
    for row, record in rows:
        _, row_ids, row_targets = render_row(record, tok, path=path, row=row, expected=fmt,
                                             mask_prompt=mask_prompt, text_column=column)
        ids.extend(row_ids)
        targets.extend(row_targets)
    return (np.asarray(ids, dtype=dtype).tobytes(),
            np.asarray(targets, dtype=np.uint8).tobytes())


class Pool:
    """Ordered, bounded tokenization: in this process (1 worker) or a process pool."""

    def __init__(self, workers: int) -> None:
        self.executor = ProcessPoolExecutor(workers) if workers > 1 else None
        self.depth = 2 * workers

    def run(self, jobs: Iterator[tuple], write: Callable[[bytes], None]) -> None:
        if self.executor is None:
            for job in jobs:
                write(_encode(job))
            return
        pending: deque = deque()
        for job in jobs:
            pending.append(self.executor.submit(_encode, job))
            while len(pending) >= self.depth:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def usable_cores() -> int:
    """The CPU cores this process may use: its CPU affinity, lowered by a container's CPU quota
    (cgroup v2 ``cpu.max``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _work(path: Path) -> int:
    """How many jobs a file makes (about: parquet holds about 3 bytes of text per byte)."""
    size = path.stat().st_size
    per_job = {"text": sources.CHUNK_BYTES, "jsonl": sources.DOC_CHUNK,
               "parquet": sources.DOC_CHUNK // 3}[SUFFIXES[path.suffix]]
    return -(-size // per_job)


def pool_size(workers: int, todo: list[Path], log: Callable[[str], None] | None) -> int:
    """Tokenizer processes for ``todo``: ``workers``, but no more than the machine has cores
    (a process per worker was started at once: 74 on 2 cores for --workers 1000) nor than
    there are jobs. Asking for more than the cores is said once, through ``log``."""
    if not todo:
        return 1
    cores, work = usable_cores(), sum(_work(f) for f in todo)
    n = max(1, min(workers, cores, work))
    if workers > cores and log is not None:
        why = f"this machine has {cores} core{'s' * (cores > 1)}" + \
            (f" and there is work for {work}" if work < cores else "")
        log(f"using {n} tokenizer process{'es' * (n > 1)} (--workers {workers}, but {why})")
    return n


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _index(path: Path, spec: dict, column: str, encoding: str, *how) -> Path:
    stat = path.stat()
    return tokens_dir() / "index" / (_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                                           spec, column, encoding, *how) + ".json")


def cached_shard(path: Path, spec: dict, column: str, encoding: str, *how) -> Path | None:
    """The shard of an unchanged file tokenized before (same path, size and time, and for chat
    records the same masking), or None."""
    index = _index(path, spec, column, encoding, *how)
    if index.is_file():
        shard = tokens_dir() / "shards" / json.loads(index.read_text())["shard"]
        if shard.is_file() and shard.with_suffix(".json").is_file():
            return shard
    return None


def _how(fmt: str, mask_prompt: bool) -> list:
    """What else a shard depends on: for chat records, the masking and the template."""
    return [mask_prompt, TEMPLATE] if fmt in CHAT_FORMATS else []


def tokenize_file(path: Path, spec: dict, column: str, encoding: str, pool: Pool,
                  done: Callable[[int], None], fmt: str = "text",
                  mask_prompt: bool = True) -> Path:
    """The shard of one input file (``fmt``: ``sources.file_format``): from the cache, else
    tokenized (and hashed) now. A file of chat/instruction records also gets a mask shard
    (``<key>.mask``: 1 where a token is a target) beside it."""
    kind = SUFFIXES[path.suffix]
    how = _how(fmt, mask_prompt)
    shard = cached_shard(path, spec, column, encoding, *how)
    if shard is not None:
        done(path.stat().st_size)
        return shard
    index = _index(path, spec, column, encoding, *how)
    tok = get_tokenizer(spec)
    dtype = np.dtype(token_dtype(tok)).name
    digest = hashlib.sha256(json.dumps([kind, column, encoding, spec, *how]).encode())
    shards = tokens_dir() / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    _remove_stale(shards)
    tmp = shards / f".{path.name}.{os.getpid()}.tmp"
    tmp_mask = shards / f".{path.name}.mask.{os.getpid()}.tmp"  # (pid second to last: stale)
    count = 0
    try:
        with open(tmp, "wb") as out, open(tmp_mask, "wb") as masks:
            def write(blob: bytes | tuple[bytes, bytes]) -> None:
                nonlocal count
                if isinstance(blob, tuple):
                    blob, mask = blob
                    masks.write(mask)
                out.write(blob)
                count += len(blob) // np.dtype(dtype).itemsize

            try:
                pool.run(_jobs(path, kind, fmt, spec, dtype, column, encoding, mask_prompt,
                               digest, done), write)
            except UserError as e:
                raise _unknown_characters(path, tok, column, encoding) or e from None
        shard = shards / f"{digest.hexdigest()[:24]}.bin"
        if how:
            os.replace(tmp_mask, shard.with_suffix(".mask"))
        os.replace(tmp, shard)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        tmp_mask.unlink(missing_ok=True)
    shard.with_suffix(".json").write_text(json.dumps(
        {"tokens": count, "dtype": dtype, "tokenizer": spec, "source": str(path),
         "format": kind if fmt == "text" else fmt, "column": column if kind != "text" else None,
         "mask_prompt": mask_prompt if how else None}))
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"shard": shard.name}))
    return shard


def _jobs(path: Path, kind: str, fmt: str, spec: dict, dtype: str, column: str, encoding: str,
          mask_prompt: bool, digest, done: Callable[[int], None]) -> Iterator[tuple]:
    """The pieces of work a file is tokenized in (see ``_encode``)."""
    if fmt in CHAT_FORMATS:
        how = (str(path), fmt, mask_prompt, column)
        for rows in _counted(sources.read_records(path, column, digest), done):
            yield spec, dtype, "records", rows, how
    elif kind == "text":
        chunks = read_text_chunks(path, encoding, digest, cut=for_tokenizer(spec))
        for chunk in _counted(chunks, done):
            yield spec, dtype, "text", chunk, False
    else:
        for n, docs in enumerate(_counted(read_documents(path, column, digest), done)):
            yield spec, dtype, "docs", docs, n > 0


def _unknown_characters(path: Path, tok: Tokenizer, column: str,
                        encoding: str) -> UserError | None:
    """For a character model, the error naming where ``path`` first holds a character outside
    its vocabulary ("notes.txt line 3: ...", "docs.jsonl row 3: ...") and, in the tokenizer's
    words, every such character in the file; None if there is none (another error). A second
    read of the file, on the error path only: the workers that found the character know
    neither the file nor the line."""
    if not isinstance(tok, CharTokenizer):
        return None
    known, unknown, where = set(tok.chars), set(), None
    if SUFFIXES[path.suffix] == "text":
        line = 1
        for chunk in read_text_chunks(path, encoding):
            new = set(chunk) - known
            if new and where is None:
                first = min(chunk.find(c) for c in new)
                at = line + chunk.count("\n", 0, first)
                where = f"line {at}"
            unknown |= new
            line += chunk.count("\n")
    else:
        for row, doc in document_rows(path, column):
            new = set(doc) - known
            if new and where is None:
                where = row_at(path, row)
            unknown |= new
    if where is None:
        return None
    try:
        tok.encode("".join(sorted(unknown)))
    except UserError as e:
        return UserError(f"{path} {where}: {e}")
    return None


def _remove_stale(shards: Path) -> None:
    """Delete the temporary shards of tokenizations that were killed (their process is gone);
    a live process's temporary file is left alone."""
    for tmp in shards.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _counted(chunks: Iterator, done: Callable[[int], None]) -> Iterator:
    """``chunks`` (text, lists of documents, lists of (row, record)), reporting their size in
    characters to ``done`` (for the progress bar: about the bytes of the file read)."""
    for chunk in chunks:
        if isinstance(chunk, str):
            done(len(chunk))
        else:
            done(sum(len(c) if isinstance(c, str) else len(json.dumps(c[1])) for c in chunk))
        yield chunk


def _char_spec(files: list[Path], column: str, encoding: str) -> dict:
    """A character vocabulary from every file's text (a pass of its own: the vocabulary must be
    known before any file is tokenized), cached by the files' paths, sizes and times."""
    key = tokens_dir() / "index" / ("chars-" + _hash(
        [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        column, encoding) + ".json")
    if key.is_file():
        return json.loads(key.read_text())
    def texts() -> Iterator[str]:
        for f in files:
            yield from read_text_chunks(f, encoding) if SUFFIXES[f.suffix] == "text" else \
                (d for docs in read_documents(f, column) for d in docs)
        if len(files) > 1 or SUFFIXES[files[0].suffix] != "text":
            yield "\n"  # the document separator

    spec = CharTokenizer.from_text(texts()).spec()
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(spec))
    return spec


def load_tokens(files: list[Path], tokenizer: str | dict, *, encoding: str = "utf-8",
                column: str = "text", workers: int = 1, progress: Progress | None = None,
                log: Callable[[str], None] | None = None,
                mask_prompt: bool = True) -> TokenData:
    """Token ids of ``files`` under ``tokenizer`` (a name or a spec), shard by shard from the
    cache, tokenizing what is missing; chat and instruction records also give their target
    masks (``mask_prompt``: only what the assistant says is a target). A char tokenizer given
    by name is built from the files' characters."""
    formats = [sources.file_format(f, column) for f in files]
    chat = [(f, fmt) for f, fmt in zip(files, formats) if fmt in CHAT_FORMATS]
    if chat and (tokenizer == "char" or (isinstance(tokenizer, dict)
                                         and tokenizer.get("type") == "char")):
        raise UserError(f"{chat[0][0]} holds {chat[0][1]} records, which the chat template ends "
                        "with an end-of-text token the char tokenizer does not have; train "
                        "them with a GPT-2 tokenizer (--tokenizer gpt2)")
    spec = tokenizer if isinstance(tokenizer, dict) else None
    if spec is None:
        spec = _char_spec(files, column, encoding) if tokenizer == "char" else {"type": tokenizer}
    tok = get_tokenizer(spec)
    total = sum(f.stat().st_size for f in files)
    if log is not None and total > 1 << 30:
        log(f"tokenizing up to {total / 1e9:,.1f} GB of text; the token cache in {tokens_dir()} "
            f"will take about {total * 0.55 / 1e9:,.1f} GB more (about 2 bytes per token)")
    seen = 0

    def done(n: int) -> None:
        nonlocal seen
        seen += n
        if progress:
            progress(min(seen, total), total)

    todo = [f for f, fmt in zip(files, formats)
            if cached_shard(f, spec, column, encoding, *_how(fmt, mask_prompt)) is None]
    pool = Pool(pool_size(workers, todo, log))
    try:
        shards = [tokenize_file(f, spec, column, encoding, pool, done, fmt, mask_prompt)
                  for f, fmt in zip(files, formats)]
    finally:
        pool.close()
    if progress:
        progress(total, total)
    return TokenData.from_shards(tok, shards, files, formats)
