import numpy as np
import pytest
import torch

from gptcli.data import cache, sources
from gptcli.data import BatchSampler, check_enough, load_tokens, resolve_data
from gptcli.errors import UserError
from gptcli.tokenizer import GPT2Tokenizer


def test_default_is_bundled_shakespeare():
    (path,) = resolve_data(None)
    assert path.name == "tinyshakespeare.txt" and path.stat().st_size == 1_115_394


def test_folder_and_several_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bbb\n")
    (tmp_path / "d" / "a.txt").write_text("aaa\n")
    (tmp_path / "d" / "skip.md").write_text("no\n")
    (tmp_path / "c.txt").write_text("ccc\n")
    files = resolve_data([str(tmp_path / "d"), str(tmp_path / "c.txt")])
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]
    loaded = load_tokens(files, "char")
    assert loaded.tokenizer.decode(loaded.tokens.tolist()) == "aaa\n\nbbb\n\nccc\n"  # newline between


def test_downloaded_dataset_name_resolves(isolated_home):
    folder = isolated_home / "datasets" / "tinystories"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("Once upon a time\n")
    assert resolve_data(["tinystories"]) == [folder / "train.txt"]
    for name in ("fineweb-edu", "org/name"):  # not downloaded yet
        with pytest.raises(UserError) as err:
            resolve_data([name])
        assert str(err.value) == (f"data path {name} does not exist; if it is a dataset, fetch "
                                  f"it first with: gpt download {name}")


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "data path {p}/missing.txt does not exist"),
    (lambda p: (p / "empty.txt").write_text(""), "data file {p}/empty.txt is empty"),
    (lambda p: (p / "nodocs").mkdir(), "folder {p}/nodocs has no .txt, .jsonl or .parquet files"),
])
def test_bad_paths(tmp_path, setup, message):
    setup(tmp_path)
    name = {"data path": "missing.txt", "data file": "empty.txt", "folder": "nodocs"}
    target = next(v for k, v in name.items() if message.startswith(k))
    with pytest.raises(UserError) as err:
        resolve_data([str(tmp_path / target)])
    assert str(err.value) == message.format(p=tmp_path)


def test_not_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf".encode() + b"\xe9 au lait\n")
    with pytest.raises(UserError, match=r"latin.txt is not valid utf-8 text \(byte offset 3\); "
                                        r"pass --encoding"):
        load_tokens([path], "char")
    tokens = load_tokens([path], "char", encoding="latin-1")
    assert tokens.tokenizer.decode(tokens.tokens.tolist()) == "café au lait\n"


def test_cache_is_reused(corpus, monkeypatch):
    first = load_tokens([corpus], "gpt2")
    assert first.tokens.dtype == np.uint16
    monkeypatch.setattr(cache.Pool, "run", lambda *a, **k: pytest.fail("tokenized twice"))
    second = load_tokens([corpus], "gpt2")
    assert second.shards == first.shards and np.array_equal(second.tokens, first.tokens)


def test_streaming_in_small_chunks_equals_whole_text(corpus, monkeypatch):
    text = corpus.read_text()
    whole = GPT2Tokenizer().encode(text)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(cache, "PIECE_CHARS", 300)
    streamed = load_tokens([corpus], "gpt2").tokens
    assert streamed.tolist() == whole
    chars = load_tokens([corpus], "char")
    assert chars.tokenizer.decode(chars.tokens.tolist()) == text


def test_too_little_data_says_how_much():
    with pytest.raises(UserError, match=r"not enough data: 50 tokens, but context length 64 with "
                                        r"--val-fraction 0.1 needs at least 651"):
        check_enough(45, 5, 64, 0.1)


def test_sampler_state_resumes_the_same_batches():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, 4, seed=3)
    a.next_batch()
    state = a.state()
    expected = [a.next_batch() for _ in range(3)]
    b = BatchSampler(tokens, 16, 4, seed=99)
    b.load_state(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = expected[0]
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_unchanged_files_skip_even_the_hashing_pass(corpus, monkeypatch):
    first = load_tokens([corpus], "char")
    monkeypatch.setattr(cache, "read_text_chunks", lambda *a, **k: pytest.fail("read again"))
    second = load_tokens([corpus], "char")
    assert second.shards == first.shards and second.tokenizer.spec() == first.tokenizer.spec()


def test_an_edited_file_is_tokenized_again(tmp_path):
    import os

    path = tmp_path / "t.txt"
    path.write_text("abc\n")
    assert load_tokens([path], "char").tokens.tolist() == [1, 2, 3, 0]
    path.write_text("abd\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = load_tokens([path], "char")
    assert again.tokenizer.decode(again.tokens.tolist()) == "abd\n"


# ----------------------------------------------------------------------------- formats and shards

DOCS = ["First document.\nIt has two lines.", "Second: naïve café, 🙂 emoji!",
        "Third document ends here."]


def same_documents(tmp_path):
    """The same three documents as .txt files, one .jsonl and one .parquet."""
    import json

    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"{i}.txt").write_text(d)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    out = {"txt": txt, "jsonl": jsonl}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet", row_group_size=1)
        out["parquet"] = tmp_path / "docs.parquet"
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_txt_jsonl_and_parquet_give_one_token_stream(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    sources = same_documents(tmp_path)
    streams = {}
    for kind, path in sources.items():
        loaded = load_tokens(resolve_data([str(path)]), tokenizer if tokenizer == "gpt2" else
                             {"type": "char", "chars": "".join(sorted(set("".join(DOCS) + "\n")))})
        streams[kind] = loaded.tokens.tolist()
    assert streams["txt"] == streams["jsonl"] == streams["parquet"]
    tok = loaded.tokenizer
    sep = "<|endoftext|>" if tokenizer == "gpt2" else "\n"
    assert tok.decode(streams["txt"]) == sep.join(DOCS)  # documents joined by the separator


def test_parquet_is_read_with_bounded_memory(tmp_path):
    """Arrow's allocations stay near one record batch however much of the file has been read
    (with pyarrow's default pre-buffering they grew with every row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i} " + "x" * 400 for i in range(40_000)]  # 16 MB in 80 row groups
    pq.write_table(pa.table({"text": rows}), tmp_path / "big.parquet", row_group_size=500,
                   compression="none")
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for docs in sources.read_documents(tmp_path / "big.parquet", "text"):
        count += len(docs)
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == len(rows)
    assert peak < 6 << 20, peak  # a third of the file: a few batches of 4,096 rows


def test_workers_make_byte_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)  # many pieces, so both workers get some
    text = (tmp_path / "t.txt")
    text.write_text(("All the world's a stage, and all the men and women merely players.\n"
                     "They have their exits and their entrances.\n") * 400)
    shards = []
    for workers, cache in ((1, "c1"), (2, "c2")):
        monkeypatch.setenv("GPTCLI_DATA_CACHE", str(tmp_path / cache))
        shards.append(load_tokens([text], "gpt2", workers=workers).shards[0].read_bytes())
    assert shards[0] == shards[1]
    assert np.frombuffer(shards[0], np.uint16).tolist() == GPT2Tokenizer().encode(text.read_text())


def test_adding_a_file_tokenizes_only_that_file(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first file\n" * 50)
    first = load_tokens(resolve_data([str(tmp_path / "d")]), "gpt2")
    (tmp_path / "d" / "b.txt").write_text("second file\n" * 50)
    tokenized = []
    real = cache.tokenize_file

    def spy(path, *args, **kwargs):
        shard = real(path, *args, **kwargs)
        tokenized.append(path.name) if shard.stat().st_mtime_ns > start else None
        return shard

    import time

    start = time.time_ns()
    monkeypatch.setattr(cache, "tokenize_file", spy)
    second = load_tokens(resolve_data([str(tmp_path / "d")]), "gpt2")
    assert tokenized == ["b.txt"] and second.shards[0] == first.shards[0]
    b_tokens = first.tokenizer.encode("second file\n" * 50)
    assert second.tokens[len(first.tokens):].tolist() == [50256] + b_tokens  # separator, then b


def test_windows_cross_shard_boundaries_through_the_separator(tmp_path):
    (tmp_path / "a.txt").write_text("aaaa")
    (tmp_path / "b.txt").write_text("bbbb")
    loaded = load_tokens([tmp_path / "a.txt", tmp_path / "b.txt"],
                         {"type": "char", "chars": "\nab"})
    assert loaded.tokens[2:7].tolist() == [1, 1, 0, 2, 2]  # a a \n b b
    train, val = loaded.split(0.4)
    assert train.tolist() + val.tolist() == loaded.tokens.tolist() and len(val) == 3


def test_bad_rows_name_the_file_and_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(UserError, match=r"d.jsonl row 2: 'text' is int, not text"):
        load_tokens([path], "gpt2")
    path.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"d.jsonl row 1 has no 'text' field; pick the text field "
                                        r"with --text-column"):
        load_tokens([path], "gpt2")
    assert load_tokens([path], "gpt2", column="body").tokens.tolist() == \
        GPT2Tokenizer().encode("x")


def test_an_interrupted_tokenization_resumes_and_ends_byte_identical(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    for i in range(3):  # three shards of a few seconds' work each
        (tmp_path / f"{i}.txt").write_text(f"file {i}: " + "the rain in spain stays mainly "
                                           "in the plain\n" * 300_000)
    code = ("import sys; from pathlib import Path; from gptcli.data import load_tokens\n"
            "files = sorted(Path(sys.argv[1]).glob('*.txt'))\n"
            "print(load_tokens(files, 'gpt2', workers=1).shards)")
    env = {**os.environ, "GPTCLI_DATA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    shards = tmp_path / "cache" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.bin"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second file
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.bin")}
    assert len(done) == 1
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.bin")}
    assert len(after) == 3 and all(after[n] == t for n, t in done.items())  # kept, not redone
    assert not list(shards.glob("*.tmp"))
    clean = {**env, "GPTCLI_DATA_CACHE": str(tmp_path / "clean")}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=clean, check=True)
    for name in after:
        assert (shards / name).read_bytes() == (tmp_path / "clean" / "shards" / name).read_bytes()
