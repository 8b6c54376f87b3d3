from pathlib import Path

import numpy as np
import pytest
import torch

from gptcli.data import cache, cuts, sources
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


@pytest.mark.parametrize("content, problem", [
    ('[\n {"text": "a"},\n {"text": "b"}\n]\n',
     "is not valid JSON (Expecting value: the line ends before the JSON does)"),
    ('[{"text": "a"} {"text": "b"}]\n',
     "is not valid JSON (Expecting ',' delimiter at column 16)"),
    ('[{"text": "a"}, {"text": "b"}]\n', "is not a JSON object"),
    ('{\n  "train": {}\n}\n', "is not valid JSON (Expecting property name enclosed in double "
     "quotes: the line ends before the JSON does)"),
])
def test_a_json_array_file_says_json_lines_are_expected(tmp_path, content, problem):
    path = tmp_path / "arr.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_tokens([path], "gpt2")
    not_ = "an array" if content.startswith("[") else \
        "an object over several lines (a run folder's config.json, say)"
    assert str(err.value) == (f"{path} line 1 {problem}; a .json/.jsonl file holds one JSON "
                              f"object per line (JSON lines), not {not_}")


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
    check_enough(65, 65, 64, 0.1, val_data=True)  # each side holds a window
    for sizes, message in (((12, 6013), "--data has 12 tokens"),
                           ((6013, 12), "--val-data has 12 tokens")):
        with pytest.raises(UserError) as err:
            check_enough(*sizes, 64, 0.1, val_data=True)
        assert str(err.value) == (f"not enough data: {message}, but context length 64 needs at "
                                  "least 65; add text or lower --context-length")


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
    for workers, folder in ((1, "c1"), (2, "c2")):
        monkeypatch.setenv("GPTCLI_DATA_CACHE", str(tmp_path / folder))
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
    inodes = {Path(p): Path(p).stat().st_ino for p in first.shards}  # (a shard is renamed in)

    def spy(path, *args, **kwargs):
        shard = real(path, *args, **kwargs)
        if inodes.get(Path(shard)) != Path(shard).stat().st_ino:  # written by this call
            tokenized.append(path.name)
        return shard

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
    with pytest.raises(UserError, match=r"d.jsonl line 2: 'text' is int, not text"):
        load_tokens([path], "gpt2")
    path.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 1: the record has none of the known "
                                        r"fields \('messages'; .* or 'text' \(pick another text "
                                        r"field with --text-column\)\); its keys are 'body'"):
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


# ----------------------------------------------------------------------------- which files

def tree(tmp_path):
    """d/a.txt, d/sub/b.txt, d/sub/up -> .. (a link back up), other/c.txt linked as d/linked."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a\n")
    (d / "sub" / "b.txt").write_text("b\n")
    (d / "sub" / "up").symlink_to("..")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.txt").write_text("c\n")
    (d / "linked").symlink_to(tmp_path / "other")
    return d


def test_globs_and_folders_walk_links_once(tmp_path):
    d = tree(tmp_path)
    expected = [d / "a.txt", d / "linked" / "c.txt", d / "sub" / "b.txt"]
    assert resolve_data([f"{d}/**/*.txt"]) == expected  # glob went round sub/up 40 times
    assert sorted(sources._glob(f"{d}/**/*.txt")) == expected  # walked once, not deduplicated
    assert resolve_data([str(d)]) == expected  # the folder form did not follow d/linked
    assert resolve_data([f"{d}/*/*.txt"]) == [d / "linked" / "c.txt", d / "sub" / "b.txt"]


def test_a_glob_through_links_to_themselves_ends(tmp_path):
    """Two links to their own folder made glob's walk grow without end (a/b/a/b/...); in a
    process of its own, so the old walk fails the test by its timeout instead of hanging it."""
    import subprocess
    import sys

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "t.txt").write_text("t\n")
    for name in ("a", "b"):
        (tmp_path / "x" / name).symlink_to(".")
    code = "import sys; from gptcli.data import resolve_data; print(resolve_data(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, f"{tmp_path}/x/**/*.txt", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[PosixPath('{tmp_path}/x/t.txt')]"


def test_a_file_reached_twice_counts_once(tmp_path):
    import os

    d = tree(tmp_path)
    (tmp_path / "alias.txt").symlink_to(d / "a.txt")
    os.link(d / "sub" / "b.txt", tmp_path / "hard.txt")
    got = resolve_data([str(d / "a.txt"), str(d), f"{d}/*.txt", str(tmp_path / "alias.txt"),
                        str(tmp_path / "hard.txt"), str(tmp_path / "other" / "c.txt")])
    assert got == [d / "a.txt", d / "linked" / "c.txt", d / "sub" / "b.txt"]
    loaded = load_tokens(got, "char")
    assert loaded.tokenizer.decode(loaded.tokens.tolist()) == "a\n\nc\n\nb\n"


@pytest.mark.parametrize("pattern", ["d/*.txt", "d/**/*.txt", "**/*.txt", "d/**", "d/*/*.t?t",
                                     "d/[ab].txt", "d/.hid/*.txt", "d/.*/*.txt", "*/sub/**/*.jsonl",
                                     "d/sub/**/x.txt"])
def test_globs_match_what_glob_matches(tmp_path, pattern):
    import glob

    for name in ("d/a.txt", "d/b.txt", "d/c.jsonl", "d/.hidden.txt", "d/.hid/h.txt",
                 "d/sub/s.txt", "d/sub/deeper/x.txt", "d/sub/deeper/y.jsonl", "e/sub/z.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    expected = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                      if Path(p).is_file() and Path(p).suffix in sources.SUFFIXES)
    assert expected and resolve_data([pattern]) == expected


def test_a_dataset_in_the_default_store_under_dot_cache(tmp_path, monkeypatch):
    """The store's default home is ~/.cache/gptcli: every file of a downloaded dataset has
    .cache in its path, which only huggingface_hub's own .cache folder inside it should hide."""
    home = tmp_path / ".cache" / "gptcli"
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    folder = home / "datasets" / "tinystories"
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.txt").write_text("download metadata\n")
    (folder / "train.txt").write_text("Once upon a time\n")
    assert resolve_data(["tinystories"]) == [folder / "train.txt"]


# ----------------------------------------------------------------------------- worker processes

def test_workers_are_capped_at_the_cores_and_the_work(tmp_path, monkeypatch):
    """A process per worker was started at once (74 seen for --workers 1000 on 2 cores): the
    pool is no larger than the cores and the jobs, and asking for more is said once."""
    import multiprocessing

    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)
    big = tmp_path / "big.txt"
    big.write_text("the rain in spain stays mainly in the plain\n" * 2000)  # 44 jobs
    cores = cache.usable_cores()
    assert 1 <= cores <= len(__import__("os").sched_getaffinity(0))
    alive, notes = [], []
    # asked for 3 more than there are cores: the old pool started all of them
    tokens = load_tokens([big], "gpt2", workers=cores + 3, log=notes.append,
                         progress=lambda done, total: alive.append(
                             len(multiprocessing.active_children()))).tokens
    assert tokens.tolist() == GPT2Tokenizer().encode(big.read_text())
    assert max(alive) == (cores if cores > 1 else 0)  # 1: tokenized here, no pool
    plural = "es" if cores > 1 else ""
    assert notes == [f"using {cores} tokenizer process{plural} (--workers {cores + 3}, but this "
                     f"machine has {cores} core{'s' if cores > 1 else ''})"]
    small, alive[:] = tmp_path / "small.txt", []
    small.write_text("one job\n")
    load_tokens([small], "gpt2", workers=cores, log=notes.append,
                progress=lambda done, total: alive.append(len(multiprocessing.active_children())))
    assert max(alive) == 0 and len(notes) == 1  # one job: no pool, nothing to say


# ----------------------------------------------------------------------------- exact cuts

def test_the_whitespace_of_the_cuts_is_tiktokens():
    """GPT-2's pattern means Unicode White_Space by \\s (tiktoken's regex engine), not
    str.isspace: seen through tiktoken, "\\n\\n" merges into one token only when the character
    after it is whitespace too (the run is then one piece)."""
    tok = GPT2Tokenizer()
    double_newline = tok.encode("\n\n")[0]
    seen = {chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000
            and tok.encode("\n\n" + chr(c) + "a")[0] == double_newline}
    assert seen == set(cuts.WHITESPACE)


MIXED = ["word", " ", "\r\n", "\r", "\n", "\t", "   ", "'s", "'ll", "'ve", " '", "'", "don't",
         "42", "3.14", "!!", "?\"", "中文没有空格", "，", "。", "日本語のテキスト", "ภาษาไทย", "e\u0301",
         "🙂", "٣", "Ⅷ", "½", "\u3000", "\xa0", "\x1c", "\u180e", "\u200b", "\u2028", "\x85", "ß",
         "\U00031350", "\U000e0041", "Ωμέγα", "naïve"]


def test_every_cut_found_is_exact():
    """At every position the GPT-2 cut search accepts, the two sides tokenize to the tokens
    of the whole: text of words, symbols, digits, apostrophes, every kind of line ending,
    runs of spaces, scripts without spaces, combining marks, characters new since Unicode 3.2."""
    import random

    enc, rng, checked = GPT2Tokenizer().encode, random.Random(0), 0
    for _ in range(250):
        text = "".join(rng.choice(MIXED) for _ in range(rng.randint(1, 30)))
        whole = enc(text)
        for c in range(1, len(text)):
            if cuts.gpt2_cut(text, c, c + 1) == c:
                assert enc(text[:c]) + enc(text[c:]) == whole, (text[:c], text[c:])
                checked += 1
    assert checked > 2000


def texts() -> dict[str, str]:
    from gptcli.data import bundled_corpus

    lines = bundled_corpus().read_text()[:20_000]
    import random

    rng = random.Random(1)
    return {
        "crlf": lines.replace("\n", "\r\n"),
        "cr": lines.replace("\n", "\r"),
        "one line": lines.replace("\n", " "),
        "space runs": "".join(rng.choice(["word", " " * rng.randint(1, 300), "\t\t", "\r\n ",
                                          "  \n", "x"]) for _ in range(400)),
        "mixed": "".join(rng.choice(MIXED) for _ in range(3000)),
        "no spaces": "中文的文本没有空格，这是一个测试。日本語のテキストです！" * 100 + "base64+/Zm9v==" * 50,
        "single pieces": "a" * 3000 + " " * 3000 + "7" * 3000 + "!" * 3000,
    }


@pytest.mark.parametrize("name", list(texts()))
def test_tokens_read_in_tiny_chunks_equal_the_whole_text(tmp_path, monkeypatch, name):
    text = texts()[name]
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)  # a cut every few dozen characters
    monkeypatch.setattr(cache, "PIECE_CHARS", 50)
    assert load_tokens([path], "gpt2").tokens.tolist() == GPT2Tokenizer().encode(text)
    chars = load_tokens([path], "char")
    assert chars.tokenizer.decode(chars.tokens.tolist()) == text
    chunks = list(sources.read_text_chunks(path, cut=cuts.gpt2_cut))
    assert "".join(chunks) == text  # cut, and often (a run of one kind is one piece: whole)
    assert len(chunks) >= (3 if name == "single pieces" else len(text) // 1000)


def test_searching_for_cuts_reads_the_text_once(tmp_path, monkeypatch):
    """Without a cut in reach, the search goes on through the new text only: searching the
    whole of a growing carry again with every read made the reader quadratic."""
    searched = []

    def counting(text, lo, hi):
        searched.append(hi - lo)
        return cuts.gpt2_cut(text, lo, hi)

    text = "a" * 200_000  # one piece: no cut anywhere
    (tmp_path / "t.txt").write_text(text)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)
    assert list(sources.read_text_chunks(tmp_path / "t.txt", cut=counting)) == [text]
    assert sum(searched) <= len(text) + 2 * len(searched)
    searched.clear()
    monkeypatch.setattr(cache, "PIECE_CHARS", 1000)
    assert list(cache._pieces(text, counting)) == [text]
    assert sum(searched) <= len(text)


def test_memory_stays_bounded_without_line_breaks(tmp_path):
    """A file of one line (or with CRLF endings) has no lone newline to cut at: it piled up
    whole in memory (750 MB for 40 MB of CRLF text against 387 MB with LF). Peak memory while
    tokenizing 6 MB each way must stay well under the file's size."""
    import subprocess
    import sys

    from gptcli.data import bundled_corpus

    corpus = bundled_corpus().read_text()
    (tmp_path / "warm.txt").write_text(corpus[:100_000])
    for name, ending in (("one-line.txt", " "), ("crlf.txt", "\r\n")):
        with open(tmp_path / name, "w", newline="") as f:
            f.write((corpus.replace("\n", ending) * 6)[:6_000_000])
    code = ("import resource, sys; from pathlib import Path\n"
            "from gptcli.data import load_tokens, sources\n"
            "sources.CHUNK_BYTES = 1 << 16\n"
            "load_tokens([Path('warm.txt')], 'gpt2')  # imports, the vocabulary, one shard\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for name in sys.argv[1:]: load_tokens([Path(name)], 'gpt2')\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, "one-line.txt", "crlf.txt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 1_500_000, int(out.stdout)  # a quarter of one file


# ----------------------------------------------------------------------------- a char model's text

def test_unknown_characters_name_the_file_and_line(tmp_path, char_checkpoint):
    """gpt eval (or a fine-tune) of a character model on new text: the error says which file
    and the first line holding a character outside the model's vocabulary, and lists every
    such character in the file."""
    import subprocess
    import sys

    (tmp_path / "notes.txt").write_text("abc def\nghi.\nab0c2 d\nxyz\n4 more\n")
    out = subprocess.run([sys.executable, "-m", "gptcli", "eval", "--model", str(char_checkpoint),
                          "--data", "notes.txt"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("error: notes.txt line 3: the text has 3 character(s) outside "
                                  "this model's 29-character vocabulary: '0', '2', '4'")


def test_unknown_characters_found_by_a_worker_name_the_line_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)  # the line is in the 30th job, in a worker
    spec = {"type": "char", "chars": "\nabc "}
    path = tmp_path / "t.txt"
    path.write_text("abc abc\n" * 400 + "ab\nabcX\n" + "Y\n")
    with pytest.raises(UserError) as err:
        load_tokens([path], spec, workers=2)
    assert str(err.value) == (f"{path} line 402: the text has 2 character(s) outside this "
                              "model's 5-character vocabulary: 'X', 'Y'")
    rows = tmp_path / "d.jsonl"
    rows.write_text('{"text": "abc"}\n\n{"text": "a\\tb"}\n')  # a blank line counts as a row
    with pytest.raises(UserError) as err:
        load_tokens([rows], spec)
    assert str(err.value) == (f"{rows} line 3: the text has 1 character(s) outside this model's "
                              "5-character vocabulary: '\\t'")
