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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import process_alive
from ..store import tokens_dir
from ..tokenizer import CharTokenizer, Tokenizer, get_tokenizer
from . import sources
from .cuts import Cut, for_tokenizer
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


def _encode(job: tuple) -> bytes:
    """Tokenize one piece of work (in a worker process, or in this one): ("text", text) or
    ("docs", texts, lead) -> token ids as bytes in the cache's dtype."""
    spec, dtype, kind, payload, lead = job
    if _WORKER.get("spec") != spec:
        _WORKER.update(spec=spec, tok=get_tokenizer(spec))
    tok = _WORKER["tok"]  # one thread per process: parallelism comes from the processes
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


def _dtype(tok: Tokenizer):
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _index(path: Path, spec: dict, column: str, encoding: str) -> Path:
    stat = path.stat()
    return tokens_dir() / "index" / (_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                                           spec, column, encoding) + ".json")


def cached_shard(path: Path, spec: dict, column: str, encoding: str) -> Path | None:
    """The shard of an unchanged file tokenized before (same path, size and time), or None."""
    index = _index(path, spec, column, encoding)
    if index.is_file():
        shard = tokens_dir() / "shards" / json.loads(index.read_text())["shard"]
        if shard.is_file() and shard.with_suffix(".json").is_file():
            return shard
    return None


def tokenize_file(path: Path, spec: dict, column: str, encoding: str, pool: Pool,
                  done: Callable[[int], None]) -> Path:
    """The shard of one input file: from the cache, else tokenized (and hashed) now."""
    kind = SUFFIXES[path.suffix]
    shard = cached_shard(path, spec, column, encoding)
    if shard is not None:
        done(path.stat().st_size)
        return shard
    index = _index(path, spec, column, encoding)
    tok = get_tokenizer(spec)
    dtype = np.dtype(_dtype(tok)).name
    digest = hashlib.sha256(json.dumps([kind, column, encoding, spec]).encode())
    shards = tokens_dir() / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    _remove_stale(shards)
    tmp = shards / f".{path.name}.{os.getpid()}.tmp"
    count = 0
    try:
        with open(tmp, "wb") as out:
            def write(blob: bytes) -> None:
                nonlocal count
                out.write(blob)
                count += len(blob) // np.dtype(dtype).itemsize

            if kind == "text":
                chunks = read_text_chunks(path, encoding, digest, cut=for_tokenizer(spec))
                jobs = ((spec, dtype, "text", chunk, False) for chunk in _counted(chunks, done))
            else:
                jobs = ((spec, dtype, "docs", docs, n > 0) for n, docs in
                        enumerate(_counted(read_documents(path, column, digest), done)))
            try:
                pool.run(jobs, write)
            except UserError as e:
                raise _unknown_characters(path, tok, column, encoding) or e from None
        shard = shards / f"{digest.hexdigest()[:24]}.bin"
        os.replace(tmp, shard)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    shard.with_suffix(".json").write_text(json.dumps(
        {"tokens": count, "dtype": dtype, "tokenizer": spec, "source": str(path),
         "format": kind, "column": column if kind != "text" else None}))
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"shard": shard.name}))
    return shard


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
                where = f"row {row}"
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
    for chunk in chunks:
        done(sum(len(c) for c in chunk) if isinstance(chunk, list) else len(chunk))
        yield chunk


# ----------------------------------------------------------------------------- the dataset

class Tokens:
    """Shards seen as one sequence, with the separator between consecutive shards. Supports
    ``len``, slicing (``[a:b]`` gives a numpy array, across shard boundaries) and ``view``."""

    def __init__(self, shards: list[np.ndarray], sep: int | None, start: int = 0,
                 stop: int | None = None) -> None:
        self.shards, self.sep = shards, sep
        gap = 0 if sep is None else 1
        self.offsets = np.cumsum([0] + [len(s) + gap for s in shards])
        total = int(self.offsets[-1]) - (gap if shards else 0)
        self.start, self.stop = start, total if stop is None else stop
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> Tokens:
        return Tokens(self.shards, self.sep, self.start + start, self.start + stop)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, _ = key.indices(len(self))
            return self._range(self.start + a, self.start + b)
        return self._range(self.start + key, self.start + key + 1)[0]

    def _range(self, a: int, b: int) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][a:b])
        parts = []
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        while a < b:
            base = int(self.offsets[i])
            shard = self.shards[i]
            if a < base + len(shard):
                end = min(b, base + len(shard))
                parts.append(np.asarray(shard[a - base:end - base]))
                a = end
            else:  # the separator after this shard
                parts.append(np.array([self.sep], dtype=self.dtype))
                a += 1
                i += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()


@dataclass
class TokenData:
    tokenizer: Tokenizer
    tokens: Tokens  # every token id, memory-mapped shards
    shards: list[Path]
    files: list[Path]

    def split(self, val_fraction: float) -> tuple[Tokens, Tokens]:
        """Train and validation tokens; validation is the last ``val_fraction``."""
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        return self.tokens.view(0, n - n_val), self.tokens.view(n - n_val, n)


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
                log: Callable[[str], None] | None = None) -> TokenData:
    """Token ids of ``files`` under ``tokenizer`` (a name or a spec), shard by shard from the
    cache, tokenizing what is missing. A char tokenizer given by name is built from the files'
    characters."""
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

    todo = [f for f in files if cached_shard(f, spec, column, encoding) is None]
    pool = Pool(pool_size(workers, todo, log))
    try:
        shards = [tokenize_file(f, spec, column, encoding, pool, done) for f in files]
    finally:
        pool.close()
    if progress:
        progress(total, total)
    dtype = _dtype(tok)
    arrays = [np.memmap(s, dtype=dtype, mode="r") if s.stat().st_size else
              np.empty(0, dtype=dtype) for s in shards]
    return TokenData(tok, Tokens(arrays, tok.separator_id), shards, files)
