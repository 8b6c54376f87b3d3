"""Text -> token ids, cached as a memory-mapped file; train/val split; batch sampling.

Token ids are written once to ``<cache>/<key>.bin`` (uint16 when the vocabulary fits, else
uint32) with a JSON sidecar, keyed by the content hash of the input files and the tokenizer type.
Input is streamed in chunks, so a file larger than memory can be tokenized.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .runtime import UserError, datasets_dir, gptcli_home, store_name
from .tokenizer import Tokenizer, get_tokenizer

CHUNK_BYTES = 4 << 20  # read 4 MiB at a time
PIECE_CHARS = 256 << 10  # tiktoken encodes pieces of this size in parallel threads
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def bundled_corpus() -> Path:
    with resources.as_file(resources.files("gptcli") / "assets" / "tinyshakespeare.txt") as p:
        return Path(p)


def resolve_data(data: list[str] | None) -> list[Path]:
    """Files to train on: each entry a file, a folder of .txt files, or a downloaded dataset name.

    No entry means the bundled Shakespeare corpus.
    """
    if not data:
        return [bundled_corpus()]
    files: list[Path] = []
    for entry in data:
        path = Path(entry)
        if not path.exists() and (datasets_dir() / store_name(entry)).is_dir():
            path = datasets_dir() / store_name(entry)
        if not path.exists():
            raise UserError(f"data path {entry} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"folder {entry} has no .txt files")
            files.extend(found)
        else:
            files.append(path)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty")
    return files


def _boundary(text: str, lo: int, hi: int) -> int:
    """The last cut in (lo, hi) just after a lone line break between two non-space characters:
    GPT-2's pre-tokenizer always ends a piece there, so cutting changes no token; -1 if none."""
    i = text.rfind("\n", lo, hi - 1)
    while i >= lo:
        if not text[i + 1].isspace() and (i == 0 or not text[i - 1].isspace()):
            return i + 1
        i = text.rfind("\n", lo, i)
    return -1


def read_text_chunks(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Decoded text of ``path`` in chunks cut where tokenization is unaffected (see
    ``_boundary``), with a clear error naming the byte offset of undecodable input."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r}") from None
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
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


@dataclass
class TokenData:
    tokenizer: Tokenizer
    tokens: np.ndarray  # every token id, memory-mapped
    path: Path  # the cache file
    files: list[Path]

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation tokens; validation is taken from the end."""
        n_val = int(len(self.tokens) * val_fraction)
        return self.tokens[: len(self.tokens) - n_val], self.tokens[len(self.tokens) - n_val:]


def cache_dir() -> Path:
    return Path(os.environ.get("GPTCLI_DATA_CACHE") or gptcli_home() / "tokens")


def load_tokens(files: list[Path], tokenizer: str | dict, *, encoding: str = "utf-8",
                progress: Progress | None = None) -> TokenData:
    """Token ids of ``files`` under ``tokenizer`` (a name or spec), from the cache when present.

    A char tokenizer given by name is built from the files' characters.
    """
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer["type"]
    total = sum(f.stat().st_size for f in files)
    # Files unchanged since the last run (same paths, sizes, modification times) skip even the
    # hashing pass, so a second run on multi-GB data starts at once.
    seen = cache_dir() / "seen" / (hashlib.sha256(json.dumps(
        [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        + [tokenizer, encoding], sort_keys=True).encode()).hexdigest()[:24] + ".json")
    if seen.is_file():
        known = json.loads(seen.read_text())
        bin_path = cache_dir() / f"{known['key']}.bin"
        if bin_path.is_file() and bin_path.with_suffix(".json").is_file():
            return _open_tokens(get_tokenizer(known["spec"]), bin_path, files)
    digest = hashlib.sha256()
    chars: set[str] = set()
    done = 0
    for f in files:  # one streaming pass: content hash (and the character set for char)
        digest.update(f"{f.stat().st_size}:".encode())
        for chunk in read_text_chunks(f, encoding):
            digest.update(chunk.encode("utf-8"))
            if kind == "char":
                chars.update(chunk)
            done += len(chunk)
            if progress:
                progress(min(done, total), 2 * total)
    spec = tokenizer if isinstance(tokenizer, dict) else None
    if spec is None:
        spec = {"type": "char", "chars": "".join(sorted(chars))} if kind == "char" else {"type": kind}
    tok = get_tokenizer(spec)
    key = hashlib.sha256(digest.hexdigest().encode() + json.dumps(spec, sort_keys=True).encode()
                         ).hexdigest()[:24]
    bin_path = cache_dir() / f"{key}.bin"
    meta_path = bin_path.with_suffix(".json")
    if not (bin_path.is_file() and meta_path.is_file()):
        _write_tokens(files, tok, bin_path, meta_path, _token_dtype(tok), encoding, total, progress)
    if progress:
        progress(2 * total, 2 * total)
    seen.parent.mkdir(parents=True, exist_ok=True)
    seen.write_text(json.dumps({"key": key, "spec": spec}))
    return _open_tokens(tok, bin_path, files)


def _token_dtype(tok: Tokenizer):
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _open_tokens(tok: Tokenizer, bin_path: Path, files: list[Path]) -> TokenData:
    return TokenData(tok, np.memmap(bin_path, dtype=_token_dtype(tok), mode="r"), bin_path, files)


def _write_tokens(files, tok: Tokenizer, bin_path: Path, meta_path: Path, dtype, encoding: str,
                  total: int, progress: Progress | None) -> None:
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_suffix(f".{os.getpid()}.tmp")
    count, done = 0, 0
    try:
        with open(tmp, "wb") as out:
            for n, f in enumerate(files):
                if n and tok.eot_id is not None:  # documents are separated by end-of-text
                    out.write(np.array([tok.eot_id], dtype=dtype).tobytes())
                    count += 1
                for chunk in read_text_chunks(f, encoding):
                    for ids in tok.encode_batch(_split_pieces(chunk)):
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                        count += len(ids)
                    done += len(chunk)
                    if progress:
                        progress(total + min(done, total), 2 * total)
        os.replace(tmp, bin_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {"tokenizer": tok.spec(), "tokens": count, "dtype": np.dtype(dtype).name,
            "files": [str(f) for f in files]}
    meta_path.write_text(json.dumps(meta))


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

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int,
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
