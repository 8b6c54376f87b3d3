"""Training text -> token ids: input formats, a sharded token cache, batch sampling.

Inputs are ``.txt`` files (one document each), ``.jsonl``/``.json`` lines and ``.parquet`` files
(one document per row, from ``--text-column``), folders and globs of them. Documents are joined
with a separator: GPT-2's end-of-text token, or a newline for character models (as nanoGPT and
build-nanogpt do).

Each input file becomes one cached shard, ``<cache>/shards/<key>.bin`` (uint16 when the vocabulary
fits, else uint32) with a JSON sidecar, keyed by the file's content, its format and the tokenizer:
adding a file tokenizes only that file, and an interrupted run keeps the shards it finished (a
shard is written to a temporary file and renamed when complete). The content is hashed while it
is tokenized (one read per byte); a small index keyed by path, size and modification time lets an
unchanged file skip even that. With ``workers`` > 1, text is cut into pieces where GPT-2's
tokenization cannot change and tokenized in a pool of processes, one thread each (tiktoken's own
threads hold the GIL most of the time: 1.2x on 2 cores, against ~2x for processes).

The dataset is the shards in input order with a separator between them, seen as one sequence
(``Tokens``): training windows may cross shard boundaries as they cross document boundaries
inside a shard (the separator tells the model where one document ends), and validation is the
last ``val_fraction`` of that sequence.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .runtime import UserError, datasets_dir, gptcli_home, process_alive, require, store_name
from .tokenizer import Tokenizer, get_tokenizer

CHUNK_BYTES = 4 << 20  # read 4 MiB at a time
PIECE_CHARS = 256 << 10  # one tokenizer call
DOC_CHUNK = 1 << 22  # characters of documents (jsonl/parquet rows) handed out at once
SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def bundled_corpus() -> Path:
    with resources.as_file(resources.files("gptcli") / "assets" / "tinyshakespeare.txt") as p:
        return Path(p)


def resolve_data(data: list[str] | None) -> list[Path]:
    """Files to train on: each entry a file, a folder (searched recursively for .txt, .jsonl,
    .json and .parquet files), a glob, or a downloaded dataset's name. None: the bundled
    Shakespeare corpus."""
    if not data:
        return [bundled_corpus()]
    files: list[Path] = []
    for entry in data:
        path = Path(entry)
        if not path.exists() and (datasets_dir() / store_name(entry)).is_dir():
            path = datasets_dir() / store_name(entry)
        if not path.exists() and glob.has_magic(entry):
            matched = sorted(Path(p) for p in glob.glob(entry, recursive=True)
                             if Path(p).suffix in SUFFIXES and Path(p).is_file())
            if not matched:
                raise UserError(f"no .txt, .jsonl or .parquet file matches {entry}")
            files.extend(matched)
            continue
        if not path.exists():
            hint = f"; if it is a dataset, fetch it first with: gpt download {entry}" \
                if not path.suffix and entry.count("/") <= 1 else ""
            raise UserError(f"data path {entry} does not exist{hint}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                           and ".cache" not in p.parts)
            if not found:
                raise UserError(f"folder {entry} has no .txt, .jsonl or .parquet files")
            files.extend(found)
        else:
            if path.suffix not in SUFFIXES:
                raise UserError(f"data file {path} is not .txt, .jsonl, .json or .parquet")
            files.append(path)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty")
    return files


# ----------------------------------------------------------------------------- reading

def _boundary(text: str, lo: int, hi: int) -> int:
    """The last cut in (lo, hi) just after a lone line break between two non-space characters:
    GPT-2's pre-tokenizer always ends a piece there, so cutting changes no token; -1 if none."""
    i = text.rfind("\n", lo, hi - 1)
    while i >= lo:
        if not text[i + 1].isspace() and (i == 0 or not text[i - 1].isspace()):
            return i + 1
        i = text.rfind("\n", lo, i)
    return -1


def read_text_chunks(path: Path, encoding: str = "utf-8",
                     digest=None) -> Iterator[str]:
    """Decoded text of ``path`` in chunks cut where tokenization is unaffected (see
    ``_boundary``), feeding the raw bytes to ``digest`` as they are read; a clear error names
    the byte offset of undecodable input."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r}") from None
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            if digest is not None:
                digest.update(raw)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not valid {encoding} text (byte offset {offset + e.start}); "
                    "pass --encoding (e.g. --encoding latin-1) if it uses another encoding"
                ) from None
            offset += len(raw)
            text = carry + text
            if not raw:
                if text:
                    yield text
                return
            cut = _boundary(text, 0, len(text))
            if cut < 0:
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]


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


def _row_text(value, path: Path, row: int, column: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{path} row {row}: {column!r} is "
                        f"{'missing' if value is None else type(value).__name__}, not text")
    return value


def read_documents(path: Path, column: str, digest=None) -> Iterator[list[str]]:
    """The documents (rows) of a .jsonl or .parquet file in groups of about ``DOC_CHUNK``
    characters; parquet is read one record batch at a time (memory bounded)."""
    batch: list[str] = []
    size = 0
    for row, text in enumerate(_rows(path, column, digest), 1):
        batch.append(_row_text(text, path, row, column))
        size += len(batch[-1])
        if size >= DOC_CHUNK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _rows(path: Path, column: str, digest) -> Iterator:
    if SUFFIXES[path.suffix] == "parquet":
        pq = require("pyarrow.parquet", "data", needed_for=f"reading {path.name}")
        try:
            # pre_buffer=False: with it on, pyarrow keeps the column chunks it has read
            # (memory grew in step with the part of the file read)
            reader = pq.ParquetFile(path, pre_buffer=False)
            if column not in reader.schema_arrow.names:
                raise UserError(f"{path} has no column {column!r} (its columns: "
                                f"{', '.join(reader.schema_arrow.names)}); pick one with "
                                "--text-column")
            for batch in reader.iter_batches(batch_size=4096, columns=[column]):
                for value in batch.column(0).to_pylist():
                    if digest is not None and isinstance(value, str):
                        digest.update(value.encode("utf-8") + b"\0")
                    yield value
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow's own errors for a damaged file
            raise UserError(f"{path} is not a readable parquet file: {e}") from None
        return
    with open(path, "rb") as f:
        for row, line in enumerate(f, 1):
            if digest is not None:
                digest.update(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} row {row} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or column not in record:
                raise UserError(f"{path} row {row} has no {column!r} field; pick the text "
                                "field with --text-column")
            yield record[column]


# ----------------------------------------------------------------------------- tokenizing

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
        sep = separator(tok)
        parts = []
        for n, doc in enumerate(payload):
            if (n or lead) and sep is not None:
                parts.append([sep])
            parts.append(tok.encode(doc))
    # each list to bytes in C: flattening millions of ids in Python costs as much as encoding
    return b"".join(np.asarray(ids, dtype=dtype).tobytes() for ids in parts)


def separator(tok: Tokenizer) -> int | None:
    """The token between documents: end-of-text, or a newline for character models."""
    if tok.eot_id is not None:
        return tok.eot_id
    return tok.encode("\n")[0] if "\n" in getattr(tok, "chars", []) else None


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


def cache_dir() -> Path:
    return Path(os.environ.get("GPTCLI_DATA_CACHE") or gptcli_home() / "tokens")


def _dtype(tok: Tokenizer):
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_file(path: Path, spec: dict, column: str, encoding: str, pool: Pool,
                  done: Callable[[int], None]) -> Path:
    """The shard of one input file: from the cache, else tokenized (and hashed) now."""
    kind = SUFFIXES[path.suffix]
    stat = path.stat()
    index = cache_dir() / "index" / (_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                                           spec, column, encoding) + ".json")
    if index.is_file():
        shard = cache_dir() / "shards" / json.loads(index.read_text())["shard"]
        if shard.is_file() and shard.with_suffix(".json").is_file():
            done(stat.st_size)
            return shard
    tok = get_tokenizer(spec)
    dtype = np.dtype(_dtype(tok)).name
    digest = hashlib.sha256(json.dumps([kind, column, encoding, spec]).encode())
    shards = cache_dir() / "shards"
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

    @property
    def path(self) -> Path:
        return self.shards[0]

    def split(self, val_fraction: float) -> tuple[Tokens, Tokens]:
        """Train and validation tokens; validation is the last ``val_fraction``."""
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        return self.tokens.view(0, n - n_val), self.tokens.view(n - n_val, n)


def _char_spec(files: list[Path], column: str, encoding: str) -> dict:
    """A character vocabulary from every file's text (a pass of its own: the vocabulary must be
    known before any file is tokenized), cached by the files' paths, sizes and times."""
    key = cache_dir() / "index" / ("chars-" + _hash(
        [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        column, encoding) + ".json")
    if key.is_file():
        return json.loads(key.read_text())
    chars: set[str] = set()
    for f in files:
        texts = read_text_chunks(f, encoding) if SUFFIXES[f.suffix] == "text" else \
            (d for docs in read_documents(f, column) for d in docs)
        for text in texts:
            chars.update(text)
    if len(files) > 1 or SUFFIXES[files[0].suffix] != "text":
        chars.add("\n")  # the document separator
    spec = {"type": "char", "chars": "".join(sorted(chars))}
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
        log(f"tokenizing up to {total / 1e9:,.1f} GB of text; the token cache in {cache_dir()} "
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
    return TokenData(tok, Tokens(arrays, separator(tok)), shards, files)


def check_enough(n_train: int, n_val: int, context_length: int, val_fraction: float) -> None:
    """At least one training window (and one validation window when asked for)."""
    need = context_length + 1
    if n_train < need or (val_fraction > 0 and n_val < need):
        total = n_train + n_val
        needed = need if val_fraction == 0 else max(int(need / val_fraction) + 1, 2 * need)
        raise UserError(
            f"not enough data: {total} tokens, but context length {context_length} with "
            f"--val-fraction {val_fraction} needs at least {needed}; add text or lower "
            "--context-length"
        )


class BatchSampler:
    """Random windows of ``context_length + 1`` tokens.

    Every rank of a distributed job draws the same ``batch_size * world`` window starts from the
    same generator and keeps its own slice, so ranks see different windows, the generator state
    (part of the training state) is the same everywhere, and 2 ranks with batch b see exactly
    the windows of 1 process with batch 2b.
    """

    def __init__(self, tokens, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (batch_size, context_length) int64 on the CPU."""
        T, B = self.context_length, self.batch_size
        starts = torch.randint(len(self.tokens) - T, (B * self.world,), generator=self.generator)
        mine = starts[self.rank * B:(self.rank + 1) * B].tolist()
        windows = np.stack([self.tokens[s: s + T + 1] for s in mine]).astype(np.int64)
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
