"""Training-data inputs: which files ``--data`` names (files, folders, globs, downloaded
datasets, or the bundled corpus) and reading them: ``.txt`` as decoded text in chunks cut where
GPT-2's tokenization cannot change, ``.jsonl``/``.json`` and ``.parquet`` as documents (rows)
from ``--text-column``."""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from ..errors import UserError, require
from ..store import DATA_FORMATS, stored_dataset

CHUNK_BYTES = 4 << 20  # read 4 MiB at a time
DOC_CHUNK = 1 << 22  # characters of documents (jsonl/parquet rows) handed out at once
SUFFIXES = DATA_FORMATS  # suffix -> format


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
        if not path.exists() and stored_dataset(entry) is not None:
            path = stored_dataset(entry)
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
