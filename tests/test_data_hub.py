"""Datasets from the Hub look-alike: `gpt download --dataset ... --include`, offline reuse, and
training on what was downloaded (parquet through the data extra)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow as pa  # the data extra; the test extras install it
import pyarrow.parquet as pq
import pytest

from hf_server import HubServer, Repo

DOCS = [f"Document number {i}: the quick brown fox jumps over the lazy dog. " * 3
        for i in range(40)]


def parquet_bytes(rows: list[str], column: str = "text") -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({column: rows}), sink, row_group_size=8)
    return sink.getvalue()


def gpt(tmp_path, *args, endpoint, offline=False):
    env = {**os.environ, "GPTCLI_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.fixture
def hub():
    repo = Repo({"README.md": b"docs", "data/train-0.parquet": parquet_bytes(DOCS[:20]),
                 "data/train-1.parquet": parquet_bytes(DOCS[20:]),
                 "data/notes.jsonl": b"".join(json.dumps({"text": d}).encode() + b"\n"
                                              for d in DOCS[:5]),
                 "other/skip.parquet": parquet_bytes(["no"])}, repo_type="dataset")
    broken = Repo({"data/bad.parquet": b"PAR1 not really parquet PAR1",
                   "data/cols.parquet": parquet_bytes(DOCS[:3], column="content")},
                  repo_type="dataset")
    with HubServer({"datasets/t/docs": repo, "datasets/t/broken": broken}) as server:
        yield server


def test_include_globs_then_offline_then_training(tmp_path, hub):
    result = gpt(tmp_path, "download", "--dataset", "t/docs", "--include", "data/*.parquet",
                 "--json", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert sorted(os.path.relpath(f, got["path"]) for f in got["files"]) == [
        "data/train-0.parquet", "data/train-1.parquet"]  # not other/, not the jsonl
    again = gpt(tmp_path, "download", "--dataset", "t/docs", "--include", "data/*.parquet",
                "--offline", "--json", endpoint="http://127.0.0.1:9", offline=True)
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads(again.stdout)["files"]) == sorted(got["files"])
    train = gpt(tmp_path, "train", "--data", "t/docs", "--tokenizer", "gpt2", "--n-layer", "1",
                "--n-embd", "32", "--context-length", "16", "--batch-size", "2",
                "--max-steps", "2", "--eval-interval", "2", "--sample-interval", "0",
                "--device", "cpu", "--out", "run", endpoint="http://127.0.0.1:9", offline=True)
    assert train.returncode == 0, train.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [os.path.basename(f) for f in config["data"]] == ["train-0.parquet",
                                                             "train-1.parquet"]
    assert len(config["shards"]) == 2


@pytest.mark.parametrize("include,message", [
    ("data/bad.parquet", "bad.parquet is not a readable parquet file"),
    ("data/cols.parquet", "cols.parquet has no column 'text' (its columns: content); pick one "
                          "with --text-column"),
])
def test_damaged_or_unexpected_parquet_is_one_sentence(tmp_path, hub, include, message):
    assert gpt(tmp_path, "download", "--dataset", "t/broken", "--include", include,
               endpoint=hub.url).returncode == 0
    result = gpt(tmp_path, "train", "--data", "t/broken", "--tokenizer", "gpt2",
                 "--device", "cpu", endpoint=hub.url)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_download_errors(tmp_path, hub):
    missing = gpt(tmp_path, "download", "--dataset", "t/nothing", "--include", "*.parquet",
                  endpoint=hub.url)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: no dataset repo 't/nothing' on {hub.url} (or it " \
        "is private: set HF_TOKEN)"
    none = gpt(tmp_path, "download", "--dataset", "t/docs", "--include", "*.csv",
               endpoint=hub.url)
    assert none.returncode == 2 and "not *.csv" in none.stderr
    nomatch = gpt(tmp_path, "download", "--dataset", "t/docs", "--include", "zzz/*.parquet",
                  endpoint=hub.url)
    assert nomatch.returncode == 2
    assert "no file of dataset t/docs matches zzz/*.parquet" in nomatch.stderr
