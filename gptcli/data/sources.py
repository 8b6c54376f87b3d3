"""Training-data inputs: which files ``--data`` names (files, folders, globs, downloaded
datasets, or the bundled corpus) and reading them: ``.txt`` as decoded text in chunks cut where
the tokens cannot change (``cuts``), ``.jsonl``/``.json`` and ``.parquet`` as documents (rows)
from ``--text-column``, or as chat and instruction records (``file_format``, ``chat.py``)."""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from ..chat import RECORD_FIELDS, RecordError, detect_format, located, where
from ..errors import UserError, require
from ..store import DATA_FORMATS, stored_dataset
from .cuts import Cut, anywhere

CHUNK_BYTES = 4 << 20  # read 4 MiB at a time
DOC_CHUNK = 1 << 22  # characters of documents (jsonl/parquet rows) handed out at once
SUFFIXES = DATA_FORMATS  # suffix -> format


def bundled_corpus() -> Path:
    with resources.as_file(resources.files("gptcli") / "assets" / "tinyshakespeare.txt") as p:
        return Path(p)


def resolve_data(data: list[str] | None) -> list[Path]:
    """Files to train on: each entry a file, a folder (searched recursively for .txt, .jsonl,
    .json and .parquet files), a glob, or a downloaded dataset's name. None: the bundled
    Shakespeare corpus. Folder links are followed but never back into a folder already walked
    (``up -> ..`` ends instead of looping), and a file reached twice (two entries, a folder and
    a glob, a link) is kept once, where it first came."""
    if not data:
        return [bundled_corpus()]
    files: list[Path] = []
    for entry in data:
        path = Path(entry)
        if not path.exists() and stored_dataset(entry) is not None:
            path = stored_dataset(entry)
        if not path.exists() and glob.has_magic(entry):
            matched = [p for p in _glob(entry) if p.suffix in SUFFIXES]
            if not matched:
                raise UserError(f"no .txt, .jsonl or .parquet file matches {entry}")
            files.extend(sorted(matched))
            continue
        if not path.exists():
            hint = f"; if it is a dataset, fetch it first with: gpt download {entry}" \
                if not path.suffix and entry.count("/") <= 1 else ""
            raise UserError(f"data path {entry} does not exist{hint}")
        if path.is_dir():
            # hidden files count (as in a plain listing), but not huggingface_hub's .cache
            found = [p for p in _walk(path, ("**", "*"), hidden=True, skip=".cache")
                     if p.suffix in SUFFIXES]
            if not found:
                raise UserError(f"folder {entry} has no .txt, .jsonl or .parquet files")
            files.extend(sorted(found))
        else:
            if path.suffix not in SUFFIXES:
                raise UserError(f"data file {path} is not .txt, .jsonl, .json or .parquet")
            files.append(path)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty")
    return _once(files)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _once(files: list[Path]) -> list[Path]:
    """Each file once (the same device and inode: a link, a hard link, the same path twice)."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for f in files:
        if _identity(f) not in seen:
            seen.add(_identity(f))
            kept.append(f)
    return kept


def _glob(pattern: str) -> list[Path]:
    """Files matching a glob as ``glob.glob(pattern, recursive=True)`` matches them (``**``
    any number of folders, names starting with a dot only for a pattern that starts with one),
    without glob's walk through links that lead back: with ``sub/up -> ..`` glob went round
    the loop 40 times, and two links to ``.`` never ended."""
    parts = Path(pattern).parts
    literal = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return _walk(Path(*parts[:literal]) if literal else Path(), parts[literal:])


def _walk(root: Path, parts: tuple[str, ...], hidden: bool = False,
          skip: str | None = None) -> list[Path]:
    """Files under ``root`` matching the glob components ``parts``. Folder links are followed,
    but a folder is entered at most once for each component (by device and inode), so a walk
    ends whatever the links, and takes time in proportion to the folders it finds."""
    found: list[Path] = []
    entered: set[tuple[int, int, int]] = set()

    def shown(name: str, pattern: str) -> bool:
        return name != skip and (hidden or not name.startswith(".") or pattern.startswith("."))

    def walk(folder: Path, k: int) -> None:
        try:
            key = (*_identity(folder), k)
        except OSError:  # a broken link, a folder we may not read: glob skips them too
            return
        if key in entered:
            return
        entered.add(key)
        part, last = parts[k], k == len(parts) - 1
        if not glob.has_magic(part):
            path = folder / part
            if last and path.is_file():
                found.append(path)
            elif not last and path.is_dir():
                walk(path, k + 1)
            return
        if part == "**" and not last:
            walk(folder, k + 1)  # ** matches no folder at all, too
        for entry in _entries(folder):
            if not shown(entry.name, "" if part == "**" else part):
                continue
            path = folder / entry.name
            if part == "**":
                if last and _is(entry, "file"):
                    found.append(path)
                if _is(entry, "dir"):
                    walk(path, k)
            elif fnmatch.fnmatchcase(entry.name, part):
                if last and _is(entry, "file"):
                    found.append(path)
                elif not last and _is(entry, "dir"):
                    walk(path, k + 1)

    if parts:
        walk(root, 0)
    elif root.is_file():
        found.append(root)
    return found


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def _is(entry: os.DirEntry, kind: str) -> bool:
    """Whether a listed entry is a file or a folder, through links (a broken one is neither)."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir()
    except OSError:
        return False


# ----------------------------------------------------------------------------- reading

def read_text_chunks(path: Path, encoding: str = "utf-8", digest=None,
                     cut: Cut = anywhere) -> Iterator[str]:
    """Decoded text of ``path`` in chunks of about ``CHUNK_BYTES`` that end where ``cut``
    (``cuts.for_tokenizer``) allows, so that tokenizing chunk by chunk gives the tokens of the
    whole text; the raw bytes go to ``digest`` as they are read; a clear error names the byte
    offset of undecodable input. Only the text read since the last cut is searched for the next
    one (a stretch without a cut is searched once, not again with every read), and the text
    after a cut is kept as a list of reads until it is handed out (joined once)."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r}") from None
    offset, pending = 0, []  # pending: text read but not handed out, with no cut inside it
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
            if not raw:
                rest = "".join(pending) + text
                if rest:
                    yield rest
                return
            if not text:
                continue
            # a cut looks at the character before it: search that one and the new text
            before = pending[-1][-1] if pending else ""
            at = cut(before + text, 1, len(before) + len(text)) - len(before)
            if at < 0:
                pending.append(text)
                continue
            pending.append(text[:at])
            yield "".join(pending)
            pending = [text[at:]]


def _row_text(value, path: Path, row: int, column: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{path} {where(path, row)}: {column!r} is "
                        f"{'missing' if value is None else type(value).__name__}, not text")
    return value


def read_documents(path: Path, column: str, digest=None) -> Iterator[list[str]]:
    """The documents (rows) of a .jsonl or .parquet file in groups of about ``DOC_CHUNK``
    characters; parquet is read one record batch at a time (memory bounded)."""
    batch: list[str] = []
    size = 0
    for _, text in document_rows(path, column, digest):
        batch.append(text)
        size += len(text)
        if size >= DOC_CHUNK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def document_rows(path: Path, column: str, digest=None) -> Iterator[tuple[int, str]]:
    """Each document with its row: the line of a .jsonl file (blank lines count, as in an
    editor), the row of a .parquet file."""
    for row, value in _rows(path, column, digest):
        yield row, _row_text(value, path, row, column)


def _rows(path: Path, column: str, digest) -> Iterator[tuple[int, object]]:
    """Each row's ``column`` value, with its row number (see ``document_rows``)."""
    if SUFFIXES[path.suffix] == "parquet":
        for row, record in _parquet_rows(path, [column], required=column):
            value = record[column]
            if digest is not None and isinstance(value, str):
                digest.update(value.encode("utf-8") + b"\0")
            yield row, value
        return
    for row, record in _json_rows(path, digest):
        if column not in record:
            raise UserError(f"{path} {where(path, row)} has no {column!r} field; pick the text "
                            "field with --text-column")
        yield row, record[column]


def _json_rows(path: Path, digest) -> Iterator[tuple[int, dict]]:
    """The JSON objects of a JSON-lines file, each with its line number (blank lines count,
    and are skipped); the raw bytes go to ``digest``."""
    with open(path, "rb") as f:
        for row, line in enumerate(f, 1):
            if digest is not None:
                digest.update(line)
            if not line.strip():
                continue
            first = line.lstrip()[:1] if row == 1 else b""
            hint = "; a .json/.jsonl file holds one JSON object per line (JSON lines), not " + (
                "an array" if first == b"[" else "an object over several lines (a run folder's "
                "config.json, say)") if first in (b"[", b"{") else ""
            try:
                record = json.loads(line)
            except ValueError as e:
                at = getattr(e, "msg", str(e)) + (
                    f" at column {e.colno}" if getattr(e, "lineno", 1) == 1 else
                    ": the line ends before the JSON does")
                raise UserError(f"{path} line {row} is not valid JSON ({at}){hint}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {row} is not a JSON object{hint}")
            yield row, record


def _parquet_rows(path: Path, columns: list[str], required: str | None = None,
                  batch_size: int = 4096, *, one_of: tuple[str, ...] = (),
                  ) -> Iterator[tuple[int, dict]]:
    """The rows of a .parquet file as ``{column: value}`` for the ``columns`` it has, read one
    record batch at a time (memory bounded). The ``required`` column must be there, or, when
    ``one_of`` is given, one of those (the message names ``required``)."""
    pq = require("pyarrow.parquet", "data", needed_for=f"reading {path.name}")
    try:
        # pre_buffer=False: with it on, pyarrow keeps the column chunks it has read
        # (memory grew in step with the part of the file read)
        reader = pq.ParquetFile(path, pre_buffer=False)
        names = reader.schema_arrow.names
        if required is not None and not ({required, *one_of} & set(names) if one_of
                                         else required in names):
            raise UserError(f"{path} has no column {required!r} (its columns: "
                            f"{', '.join(names)}); pick one with --text-column")
        wanted = [c for c in names if c in columns]
        row = 0
        for batch in reader.iter_batches(batch_size=batch_size, columns=wanted):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors for a damaged file
        raise UserError(f"{path} is not a readable parquet file: {e}") from None


# ----------------------------------------------------------------------------- chat records

def records(path: Path, column: str, digest=None, batch_size: int = 4096,
            ) -> Iterator[tuple[int, dict]]:
    """Every row of a .jsonl or .parquet file as a record (the fields a chat or instruction
    record may have, and ``column``), with its row number."""
    if SUFFIXES[path.suffix] == "parquet":
        for row, record in _parquet_rows(path, [*RECORD_FIELDS, column], column, batch_size,
                                         one_of=RECORD_FIELDS):
            if digest is not None:
                digest.update(json.dumps(record, sort_keys=True).encode("utf-8") + b"\0")
            yield row, record
    else:
        yield from _json_rows(path, digest)


def read_records(path: Path, column: str, digest=None) -> Iterator[list[tuple[int, dict]]]:
    """``records`` in groups of about ``DOC_CHUNK`` characters of JSON."""
    batch: list[tuple[int, dict]] = []
    size = 0
    for row, record in records(path, column, digest):
        batch.append((row, record))
        size += len(json.dumps(record))
        if size >= DOC_CHUNK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def file_format(path: Path, column: str) -> str:
    """What a data file holds: ``text`` (a .txt file, or rows with the text column) or a chat
    format (``messages``, ``prompt_completion``, ``alpaca``), from its first row; a row of
    another format later in the file is refused when it is read (``chat.render_row``)."""
    if SUFFIXES[path.suffix] == "text":
        return "text"
    for row, record in records(path, column, batch_size=1):  # the first row is enough
        try:
            return detect_format(record, column)
        except RecordError as e:
            raise located(path, row, e) from None
    return "text"
