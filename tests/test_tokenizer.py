import socket

import pytest

from gptcli.errors import UserError
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer, _gpt2_encoding, get_tokenizer


def test_gpt2_ids_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _gpt2_encoding.cache_clear()
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_gpt2_user_text_cannot_inject_end_of_text():
    tok = GPT2Tokenizer()
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_gpt2_spec_round_trip():
    tok = get_tokenizer(GPT2Tokenizer().spec())
    assert isinstance(tok, GPT2Tokenizer)


def test_char_round_trip_and_spec():
    text = "To be, or not to be: that is the question.\nÆsop?"
    tok = get_tokenizer("char", text=text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))
    again = get_tokenizer(tok.spec())
    assert isinstance(again, CharTokenizer) and again.encode(text) == tok.encode(text)
    assert tok.eot_id is None


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"2 character\(s\) outside this model's 3-character "
                                        r"vocabulary: 'x', 'z'"):
        tok.encode("abxz")


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'; choose one of: gpt2, char"):
        get_tokenizer("bpe")


@pytest.mark.parametrize("spec,message", [
    ({"type": "char", "chars": "aab"}, "damaged char tokenizer spec: a char vocabulary is a list "
                                       "of distinct single characters"),
    ({"type": "char", "chars": ["a", "b"]}, "damaged char tokenizer spec: its chars entry is not "
                                            "a string"),
    ({"type": "char"}, "damaged char tokenizer spec: its chars entry is not a string"),
    ({"type": "sentencepiece"}, "unknown tokenizer type 'sentencepiece'; this gptcli knows gpt2 "
                                "and char"),
])
def test_damaged_or_unknown_specs_are_one_sentence(spec, message):
    with pytest.raises(UserError) as err:
        get_tokenizer(spec)
    assert str(err.value) == message
