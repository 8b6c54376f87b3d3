import numpy as np
import pytest
import torch

from gptcli import data
from gptcli.data import BatchSampler, check_enough, load_tokens, resolve_data
from gptcli.runtime import UserError
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
    monkeypatch.setattr(data.Pool, "run", lambda *a, **k: pytest.fail("tokenized twice"))
    second = load_tokens([corpus], "gpt2")
    assert second.path == first.path and np.array_equal(second.tokens, first.tokens)


def test_streaming_in_small_chunks_equals_whole_text(corpus, monkeypatch):
    text = corpus.read_text()
    whole = GPT2Tokenizer().encode(text)
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(data, "PIECE_CHARS", 300)
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
    monkeypatch.setattr(data, "read_text_chunks", lambda *a, **k: pytest.fail("read again"))
    second = load_tokens([corpus], "char")
    assert second.path == first.path and second.tokenizer.spec() == first.tokenizer.spec()


def test_an_edited_file_is_tokenized_again(tmp_path):
    import os

    path = tmp_path / "t.txt"
    path.write_text("abc\n")
    assert load_tokens([path], "char").tokens.tolist() == [1, 2, 3, 0]
    path.write_text("abd\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = load_tokens([path], "char")
    assert again.tokenizer.decode(again.tokens.tolist()) == "abd\n"
