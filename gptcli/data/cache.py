"""The sharded token cache: each input file becomes one shard of token ids, keyed by the file's
content, its format and the tokenizer, written atomically and memory-mapped; tokenized in a
pool of worker processes; the shards seen as one sequence (``Tokens``).

Each shard is ``<cache>/shards/<key>.bin`` (uint16 when the vocabulary fits, else uint32) with a
JSON sidecar. Adding a file tokenizes only that file, and an interrupted run keeps the shards it
finished (a shard is written to a temporary file and renamed when complete). The content is
hashed while it is tokenized (one read per byte); a small index keyed by path, size and
modification time lets an unchanged file skip even that. With ``workers`` > 1, text is cut into
pieces where GPT-2's tokenization cannot change and tokenized in a pool of processes, one thread
each (tiktoken's own threads hold the GIL most of the time: 1.2x on 2 cores, against ~2x for
processes).
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

from ..files import process_alive
from ..store import tokens_dir
from ..tokenizer import CharTokenizer, Tokenizer, get_tokenizer
from .sources import SUFFIXES, _boundary, read_documents, read_text_chunks

PIECE_CHARS = 256 << 10  # one tokenizer call
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def _split_pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            cut = _boundary(text, start, end + 1)
            end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces



_WORKER: dict = {}


def _encode(job: tuple) -> bytes:
    """Tokenize one piece of work (in a worker process, or in this one): ("text", text) or
    ("docs", texts, lead) -> token ids as bytes in the cache's dtype."""
    spec, dtype, kind, payload, lead = job
    if _WORKER.get("spec") != spec:
        _WORKER.update(spec=spec, tok=get_tokenizer(spec))
    tok = _WORKER["tok"]  # one thread per process: parallelism comes from the processes
    if kind == "text":
        parts = [tok.encode(piece) for piece in _split_pieces(payload)]
    else:
        sep = tok.separator_id
        parts = []
        for n, doc in enumerate(payload):
            if (n or lead) and sep is not None:
                parts.append([sep])
            parts.append(tok.encode(doc))
    # each list to bytes in C: flattening millions of ids in Python costs as much as encoding
    return b"".join(np.asarray(ids, dtype=dtype).tobytes() for ids in parts)


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


def _dtype(tok: Tokenizer):
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_file(path: Path, spec: dict, column: str, encoding: str, pool: Pool,
                  done: Callable[[int], None]) -> Path:
    """The shard of one input file: from the cache, else tokenized (and hashed) now."""
    kind = SUFFIXES[path.suffix]
    stat = path.stat()
    index = tokens_dir() / "index" / (_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                                           spec, column, encoding) + ".json")
    if index.is_file():
        shard = tokens_dir() / "shards" / json.loads(index.read_text())["shard"]
        if shard.is_file() and shard.with_suffix(".json").is_file():
            done(stat.st_size)
            return shard
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
                jobs = ((spec, dtype, "text", chunk, False)
                        for chunk in _counted(read_text_chunks(path, encoding, digest), done))
            else:
                jobs = ((spec, dtype, "docs", docs, n > 0) for n, docs in
                        enumerate(_counted(read_documents(path, column, digest), done)))
            pool.run(jobs, write)
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

    pool = Pool(max(1, workers))
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
