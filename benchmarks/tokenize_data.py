"""Tokenization at scale: throughput of `gpt train`'s token cache (``data.load_tokens``, the code
`gpt train` runs) at --workers 1 and N on a generated corpus, as .txt and as .parquet, next to a
plain tiktoken loop over the same text in the same process; peak memory (the whole process
tree) while tokenizing a large parquet file; peak memory and time for the same text with
different line endings (LF, CRLF, CR, or none: one line); and how long a second `gpt train` on
the same data takes to start training (no re-hashing).

    python benchmarks/tokenize_data.py                     # 100 MB corpus, workers 1 and 2
    python benchmarks/tokenize_data.py --mb 20 --parquet-gb 0 --no-restart   # quick look
    python benchmarks/tokenize_data.py --parquet-gb 1      # adds the 1 GB parquet memory figure
    python benchmarks/tokenize_data.py --mb 0 --endings lf,crlf,none --endings-mb 200
                                                           # line endings only (--mb 0: no corpus)

Needs the data extra (pyarrow). Every measurement uses its own empty cache folder.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_documents(target_bytes: int, seed: int = 0) -> list[str]:
    """Documents of 5-40 shuffled lines of the bundled Shakespeare, until ``target_bytes``."""
    from gptcli.data import bundled_corpus

    lines = [ln for ln in bundled_corpus().read_text().splitlines() if ln.strip()]
    rng = random.Random(seed)
    docs, size = [], 0
    while size < target_bytes:
        doc = "\n".join(rng.choices(lines, k=rng.randint(5, 40))) + "\n"
        docs.append(doc)
        size += len(doc.encode())
    return docs


def write_parquet(path: Path, docs, rows_per_group: int = 2000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for i in range(0, len(docs), rows_per_group):
            writer.write_table(pa.table({"text": docs[i:i + rows_per_group]}, schema=schema))


def timed_load(path: Path, workers: int, cache: Path) -> tuple[float, Path]:
    from gptcli.data import load_tokens

    os.environ["GPTCLI_DATA_CACHE"] = str(cache)
    t0 = time.perf_counter()
    data = load_tokens([path], "gpt2", workers=workers)
    return time.perf_counter() - t0, data.shards[0]


def tiktoken_reference(docs: list[str]) -> float:
    """A plain single-process loop: tiktoken's encode_ordinary per document (the shipped GPT-2
    vocabulary: tiktoken's own download needs the internet)."""
    from gptcli.tokenizer import _gpt2_encoding

    enc = _gpt2_encoding()
    t0 = time.perf_counter()
    for doc in docs:
        enc.encode_ordinary(doc)
    return time.perf_counter() - t0


def tree_memory(pid: int) -> int:
    """Memory of a process and all its descendants, in bytes: the sum of their proportional set
    sizes (PSS), which counts a page that forked workers share with their parent once, where
    summing RSS would count it in every process."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def peak_memory(path: Path, workers: int, cache: Path) -> tuple[float, int]:
    """Tokenize ``path`` in a fresh process; the peak memory of its process tree, sampled."""
    code = ("import sys; from pathlib import Path; from gptcli.data import load_tokens; "
            "load_tokens([Path(sys.argv[1])], 'gpt2', workers=int(sys.argv[2]))")
    env = {**os.environ, "GPTCLI_DATA_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(workers)], env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_memory(proc.pid))
        time.sleep(0.05)
    assert proc.returncode == 0
    return time.perf_counter() - t0, peak


ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r", "none": " "}  # none: lines joined by a space


def endings(kinds: list[str], mb: float, workers: list[int], work: Path) -> None:
    """Peak memory and time of tokenizing the same text with each kind of line ending (a file
    with none is one line): the reader must find places to cut in all of them."""
    docs = make_documents(int(mb * 1e6), seed=1)
    for kind in kinds:
        path = work / f"endings-{kind}.txt"
        with open(path, "w", newline="") as f:  # newline="": write the endings as they are
            for doc in docs:
                f.write(doc.replace("\n", ENDINGS[kind]))
        size = path.stat().st_size
        for n in workers:
            seconds, peak = peak_memory(path, n, work / "cache-endings")
            shutil.rmtree(work / "cache-endings")
            print(f"{kind:5s} {size / 1e6:6.1f} MB, --workers {n}: peak {peak / 1e6:6.0f} MB "
                  f"(process tree), {seconds:5.1f} s, {size / 1e6 / seconds:5.1f} MB/s")
        path.unlink()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def train_start(data: Path, cache: Path, out: Path) -> float:
    """Seconds from starting `gpt train` until it prints its first line about training."""
    env = {**os.environ, "GPTCLI_DATA_CACHE": str(cache), "COLUMNS": "120"}
    argv = [sys.executable, "-m", "gptcli", "train", "--data", str(data), "--tokenizer", "gpt2",
            "--max-steps", "1", "--eval-interval", "1", "--sample-interval", "0",
            "--device", "cpu", "--out", str(out), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    started = None
    for line in proc.stdout:
        if started is None and line.startswith("training "):
            started = time.perf_counter() - t0
    proc.wait()
    assert proc.returncode == 0 and started is not None
    return started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100, help="corpus size in MB (default 100)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--parquet-gb", type=float, default=0,
                    help="also measure peak memory on a parquet file of this size (GB)")
    ap.add_argument("--no-restart", action="store_true", help="skip the second-start timing")
    ap.add_argument("--endings", default="",
                    help="also compare line endings, e.g. lf,crlf,none (one of lf, crlf, cr, none)")
    ap.add_argument("--endings-mb", type=float, default=200,
                    help="text size for --endings in MB (default 200)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptcli-tok-"))
    print(f"{cpu_model()}, {os.cpu_count()} cores")
    if args.endings:
        endings(args.endings.split(","), args.endings_mb, sorted({1, args.workers}), work)
    if not args.mb:
        return
    docs = make_documents(int(args.mb * 1e6))
    txt, pq_path = work / "corpus.txt", work / "corpus.parquet"
    txt.write_text("".join(docs))
    write_parquet(pq_path, docs)
    mb = txt.stat().st_size / 1e6
    print(f"corpus: {len(docs):,} documents, {mb:,.1f} MB of text "
          f"({pq_path.stat().st_size / 1e6:,.1f} MB as parquet)")

    ref = tiktoken_reference(docs)
    print(f"reference: tiktoken encode_ordinary per document, one process: {mb / ref:5.1f} MB/s")
    shards = {}
    for path, kind in ((txt, "txt"), (pq_path, "parquet")):
        base = None
        for workers in sorted({1, args.workers}):
            seconds, shard = timed_load(path, workers, work / f"cache-{kind}-{workers}")
            shards[kind, workers] = shard.read_bytes()
            base = base or seconds
            print(f"{kind:8s} --workers {workers}: {mb / seconds:5.1f} MB/s "
                  f"({seconds:5.1f} s; {base / seconds:.2f}x workers 1, "
                  f"{ref / seconds:.2f}x the reference)")
    same_workers = len({v for (k, _), v in shards.items() if k == "txt"}) == 1 and \
        len({v for (k, _), v in shards.items() if k == "parquet"}) == 1
    print(f"shards byte-identical across worker counts: {same_workers}")
    txt_ids = np.frombuffer(shards["txt", 1], dtype=np.uint16)
    pq_ids = np.frombuffer(shards["parquet", 1], dtype=np.uint16)
    print(f"txt and parquet token counts: {len(txt_ids):,} and {len(pq_ids):,} (the parquet "
          "file's documents are joined with end-of-text; the text file is one document)")

    if args.parquet_gb:
        big = work / "big.parquet"
        # the corpus repeated until the parquet file (compressed) has the size asked for
        write_parquet(big, docs * round(args.parquet_gb * 1e9 / pq_path.stat().st_size))
        size = big.stat().st_size
        seconds, peak = peak_memory(big, args.workers, work / "cache-big")
        print(f"peak memory tokenizing a {size / 1e9:.2f} GB parquet file with --workers "
              f"{args.workers}: {peak / 1e9:.2f} GB (process and workers; {seconds:.0f} s)")
        big.unlink()

    if not args.no_restart:
        cache = work / "cache-train"
        first = train_start(txt, cache, work / "run")
        second = train_start(txt, cache, work / "run")
        print(f"gpt train on the {mb:,.0f} MB text, time to the start of training: first "
              f"{first:.1f} s (tokenizing), second {second:.1f} s (from the cache)")


if __name__ == "__main__":
    main()
