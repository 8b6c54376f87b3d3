"""gptcli's tokenizers in Hugging Face's formats: transformers, loading the files from a folder,
gives exactly gptcli's ids, and decodes them back to the text."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from gptcli.errors import UserError
from gptcli.tokenizer import CharTokenizer, get_tokenizer
from gptcli.vocab import bytes_to_unicode, gpt2_merges, gpt2_tokens, tokenizer_files

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

# Whitespace runs, tabs, CRLF, trailing spaces, accents (precomposed and combining), CJK, emoji
# (with a skin-tone modifier and a ZWJ sequence), Unicode spaces and the end-of-text text.
CORPUS = [
    "Hello world",
    "  leading, runs of   spaces,\ttabs\t\t, CRLF\r\nlines\r\n\r\n and trailing spaces   ",
    "\n\n\n   \n \t \n",
    "café naïve Ångström façade — «quotes» ‘curly’",
    "combining: e\u0301 a\u0308\u0301 n\u0303 \u0301 alone",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 🤖👍🏽 👩\u200d👩\u200d👧 🇫🇷!",
    "nbsp\u00a0ideographic\u3000space line\u2028sep nel\u0085 zwsp\u200b bom\ufeff",
    "don't I'll we've they're 'S 123 4567 ½ ² ٣",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|><|endoftext|>",
    "",
]


def _shakespeare(chars: int = 100_000) -> str:
    path = resources.files("gptcli") / "assets" / "tinyshakespeare.txt"
    return path.read_text(encoding="utf-8")[:chars]


def _folder(tmp_path_factory, spec, context_length):
    folder = tmp_path_factory.mktemp("tok")
    for name, text in tokenizer_files(spec, context_length=context_length).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return _folder(tmp_path_factory, {"type": "gpt2"}, 1024)


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_folder):
    return transformers.AutoTokenizer.from_pretrained(gpt2_folder)


def test_byte_level_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_gpt2_tables():
    tokens, merges = gpt2_tokens(), gpt2_merges()
    assert len(tokens) == 50257 and len(set(tokens)) == 50257
    assert tokens[50256] == "<|endoftext|>"
    assert len(merges) == 50000
    # GPT-2's merges.txt begins so
    assert merges[:5] == ["Ġ t", "Ġ a", "h e", "i n", "r e"]
    # merge i joins two earlier tokens into token 256 + i
    index = {t: i for i, t in enumerate(tokens)}
    for i, merge in enumerate(merges):
        a, b = merge.split(" ")
        assert index[a] < 256 + i and index[b] < 256 + i and index[a + b] == 256 + i


def test_gpt2_files(gpt2_folder):
    names = sorted(p.name for p in gpt2_folder.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((gpt2_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    lines = (gpt2_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and lines[1:] == gpt2_merges()
    config = json.loads((gpt2_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["model_max_length"] == 1024
    special = json.loads((gpt2_folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}
    spec = json.loads((gpt2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel" and spec["model"]["type"] == "BPE"
    assert spec["added_tokens"][0]["id"] == 50256 and spec["added_tokens"][0]["special"]


def test_gpt2_transformers_matches_gptcli(hf_gpt2):
    ours = get_tokenizer("gpt2")
    assert hf_gpt2.model_max_length == 1024
    assert hf_gpt2.bos_token_id == hf_gpt2.eos_token_id == hf_gpt2.unk_token_id == 50256
    for text in CORPUS:
        ids = hf_gpt2(text)["input_ids"]  # add_special_tokens on: nothing is added
        assert ids == ours.encode(text), repr(text)
        assert hf_gpt2.decode(ids) == text == ours.decode(ids)
    # the end-of-text token itself decodes the same in both
    assert hf_gpt2.decode([50256]) == ours.decode([50256]) == "<|endoftext|>"


def test_gpt2_end_of_text_text_is_ordinary_text(hf_gpt2, gpt2_folder):
    """gptcli never turns the text "<|endoftext|>" into the token; the exported config makes
    transformers agree. The one difference left: the bare tokenizers library (which does not read
    tokenizer_config.json) maps that text to the token, as GPT-2's own tokenizer.json does."""
    ids = get_tokenizer("gpt2").encode("<|endoftext|>")
    assert 50256 not in ids and len(ids) > 1
    assert hf_gpt2("<|endoftext|>")["input_ids"] == ids
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(gpt2_folder / "tokenizer.json"))
    assert raw.encode("<|endoftext|>").ids == [50256]
    assert raw.encode(CORPUS[1]).ids == get_tokenizer("gpt2").encode(CORPUS[1])


def test_gpt2_100kb(hf_gpt2):
    text = _shakespeare()
    ids = hf_gpt2(text, verbose=False)["input_ids"]
    assert ids == get_tokenizer("gpt2").encode(text)
    assert hf_gpt2.decode(ids) == text


def test_gpt2_vocab_and_merges_files_alone(gpt2_folder, tmp_path):
    """vocab.json + merges.txt (the files of tokenizers without tokenizer.json) say the same."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((gpt2_folder / name).read_bytes())
    hf = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    ours = get_tokenizer("gpt2")
    for text in CORPUS[:-3] + [_shakespeare(5_000)]:
        assert hf(text)["input_ids"] == ours.encode(text), repr(text)


def test_char_tokenizer(tmp_path_factory):
    text = "".join(CORPUS) + _shakespeare()
    ours = CharTokenizer.from_text(text)
    folder = _folder(tmp_path_factory, ours.spec(), 256)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.model_max_length == 256 and len(hf) == ours.vocab_size
    for piece in CORPUS + [text, "\r\n", " ", "\n"]:
        ids = hf(piece, verbose=False)["input_ids"]
        assert ids == ours.encode(piece), repr(piece[:40])
        assert hf.decode(ids) == piece
    # a character outside the vocabulary is an error in both, never a silent id
    spec = {"type": "char", "chars": "abc"}
    small = transformers.AutoTokenizer.from_pretrained(_folder(tmp_path_factory, spec, 8))
    with pytest.raises(UserError, match="outside this model's 3-character vocabulary"):
        get_tokenizer(spec).encode("abz")
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
        small("abz")


def test_char_ids_are_positions(tmp_path_factory):
    """Ids follow the order of ``chars`` as stored, not any sorting of them."""
    spec = {"type": "char", "chars": "z a\n\té"}
    hf = transformers.AutoTokenizer.from_pretrained(_folder(tmp_path_factory, spec, 8))
    assert hf("z a\n\té")["input_ids"] == [0, 1, 2, 3, 4, 5]
    assert hf("éz")["input_ids"] == get_tokenizer(spec).encode("éz") == [5, 0]


@pytest.mark.parametrize("spec, message", [
    ({"type": "bpe"}, "unknown tokenizer type 'bpe'"),
    ({"type": "char", "chars": "aa"}, "damaged char tokenizer spec"),
    ({"type": "char"}, "damaged char tokenizer spec"),
])
def test_bad_spec(spec, message):
    with pytest.raises(UserError, match=message):
        tokenizer_files(spec, context_length=8)
