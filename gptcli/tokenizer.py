"""Tokenizers: GPT-2 byte-pair encoding (offline, on the shipped vocabulary) and characters.

Every tokenizer has a JSON ``spec`` that is stored in checkpoints, so a checkpoint knows how to
turn text into its token ids without anything else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from typing import Protocol, runtime_checkable

from .errors import UserError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
TOKENIZER_CHOICES = ("gpt2", "char")


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token, or None when the vocabulary has none."""
        ...

    @property
    def separator_id(self) -> int | None:
        """The token between documents: end-of-text, or a newline for character vocabularies
        that have one (as nanoGPT joins its character data); None when there is neither."""
        ...

    @property
    def start_id(self) -> int:
        """The token an empty prompt starts from: the separator, else id 0."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def spec(self) -> dict: ...


@lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = resources.files("gptcli") / "assets" / "gpt2.tiktoken"
    with resources.as_file(path) as file:
        ranks = load_tiktoken_bpe(str(file))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: 50256})


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE through tiktoken, built from the vocabulary shipped in the package."""

    name = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab  # 50257

    @property
    def eot_id(self) -> int:
        return self._enc.eot_token

    @property
    def separator_id(self) -> int:
        return self.eot_id

    @property
    def start_id(self) -> int:
        return self.eot_id

    def encode(self, text: str) -> list[int]:
        # The end-of-text marker in ordinary text is encoded as plain characters, never as the
        # special token, so user text cannot inject it.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def spec(self) -> dict:
        return {"type": "gpt2"}


class CharTokenizer:
    """One token per character, vocabulary from the training text (sorted, stored in the spec)."""

    name = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a char vocabulary is a list of distinct single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The vocabulary of every character in ``text`` (a string or pieces of one), sorted."""
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        if not chars:
            raise UserError("cannot build a character vocabulary from empty text")
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> None:
        return None

    @property
    def separator_id(self) -> int | None:
        return self._index.get("\n")

    @property
    def start_id(self) -> int:
        return self.separator_id if self.separator_id is not None else 0

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self._index})
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise UserError(
                f"the text has {len(unknown)} character(s) outside this model's "
                f"{len(self.chars)}-character vocabulary: {shown}{more}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}


def get_tokenizer(spec: str | dict = "gpt2", text: str | Iterable[str] | None = None) -> Tokenizer:
    """A tokenizer from a name (``gpt2`` or ``char``, the latter built from ``text``) or a spec."""
    if isinstance(spec, str):
        if spec.lstrip().startswith("{"):
            spec = json.loads(spec)
        elif spec == "gpt2":
            return GPT2Tokenizer()
        elif spec == "char":
            if text is None:
                raise UserError("the char tokenizer is built from training text; none was given")
            return CharTokenizer.from_text(text)
        else:
            raise UserError(f"unknown tokenizer {spec!r}; choose one of: {', '.join(TOKENIZER_CHOICES)}")
    kind = spec.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if not isinstance(spec.get("chars"), str):
            raise UserError("damaged char tokenizer spec: its chars entry is not a string")
        try:
            return CharTokenizer(list(spec["chars"]))
        except ValueError as e:
            raise UserError(f"damaged char tokenizer spec: {e}") from None
    raise UserError(f"unknown tokenizer type {kind!r}; this gptcli knows "
                    f"{' and '.join(TOKENIZER_CHOICES)}")
