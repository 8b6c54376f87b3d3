"""gptcli's tokenizers in Hugging Face's file formats (and the GPT-2 tables GGUF needs).

GPT-2: the shipped ``gpt2.tiktoken`` holds each token's bytes and rank (rank = token id). Hugging
Face's formats spell a token as text in the "byte-level" alphabet (each byte one printable
character, :func:`bytes_to_unicode`) and list merges instead of ranks. Every token of rank >= 256
is the merge of two lower-ranked tokens; :func:`gpt2_merges` finds that pair by running byte-pair
merging over the token's own bytes with only the lower ranks, which ends in exactly two parts
(checked). Merges are listed in rank order, so merge ``i`` makes token ``256 + i``.

The character tokenizer has no merges: a WordLevel model over one-character pieces (a Split
pre-tokenizer that isolates every code point, newlines included) gives one id per character, the
character's position in ``chars``, as gptcli's CharTokenizer does. A character outside the
vocabulary is an error in both (Hugging Face: "Missing [UNK] token"), never a silent drop.

One deliberate setting: gptcli encodes the text ``<|endoftext|>`` as ordinary characters, so user
text cannot inject the end-of-text token. The exported tokenizer_config.json sets
``split_special_tokens: true`` so that transformers does the same; the id 50256 is still the
tokenizer's bos/eos/unk and decodes to ``<|endoftext|>``. (The raw ``tokenizers`` library, which
does not read tokenizer_config.json, maps that text to 50256.)

No torch and no new dependency: tiktoken (a core dependency) reads the vocabulary, the rest is
JSON text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from .errors import UserError
from .tokenizer import GPT2_EOT, get_tokenizer

GPT2_EOT_ID = 50256


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> the one printable character that stands for it in byte-level BPE files.

    Bytes that are printable and not whitespace in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand
    for themselves; the other 68 (controls, space, NBSP, soft hyphen) take U+0100 onwards in
    byte order, so the space byte is 'Ġ' and the newline 'Ċ'.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _gpt2_ranked() -> tuple[bytes, ...]:
    """Token bytes in rank (= id) order, from the vocabulary shipped in the package."""
    from tiktoken.load import load_tiktoken_bpe

    path = resources.files("gptcli") / "assets" / "gpt2.tiktoken"
    with resources.as_file(path) as file:
        ranks = load_tiktoken_bpe(str(file))
    ordered = sorted(ranks, key=ranks.__getitem__)
    if [ranks[t] for t in ordered] != list(range(len(ordered))) or len(ordered) != GPT2_EOT_ID:
        raise UserError("the shipped gpt2.tiktoken is damaged: its ranks are not 0..50255; "
                        "reinstall gptcli")
    return tuple(ordered)


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made ``token``: byte-pair merge its bytes (lowest rank first,
    as tiktoken encodes) using only tokens ranked below ``rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise UserError(f"the shipped gpt2.tiktoken is damaged: token {rank} is not a merge of "
                        "two earlier tokens; reinstall gptcli")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def _gpt2_tables() -> tuple[tuple[str, ...], tuple[str, ...]]:
    ordered = _gpt2_ranked()
    ranks = {t: i for i, t in enumerate(ordered)}
    tokens = tuple(_byte_level(t) for t in ordered) + (GPT2_EOT,)
    merges = []
    for rank in range(256, len(ordered)):
        a, b = _last_merge(ordered[rank], rank, ranks)
        merges.append(f"{_byte_level(a)} {_byte_level(b)}")  # no byte-level char is a space
    return tokens, tuple(merges)


def gpt2_tokens() -> list[str]:
    """GPT-2's 50,257 token strings in id order: byte-level spellings, then ``<|endoftext|>``."""
    return list(_gpt2_tables()[0])


def gpt2_merges() -> list[str]:
    """GPT-2's 50,000 merges as ``"a b"`` strings (byte-level spellings), in rank order."""
    return list(_gpt2_tables()[1])


def _dumps(payload) -> str:
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


def _gpt2_files(context_length: int) -> dict[str, str]:
    tokens, merges = _gpt2_tables()
    vocab = {t: i for i, t in enumerate(tokens)}
    eot = {"id": GPT2_EOT_ID, "content": GPT2_EOT, "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}
    # use_regex: GPT-2's split pattern (the one in gptcli.tokenizer); add_prefix_space false
    # because gptcli encodes text as given, without a leading space.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "vocab": vocab, "merges": list(merges)},
    }
    special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, **special,
        "add_bos_token": False, "add_prefix_space": False, "errors": "replace",
        # decode(encode(text)) == text: no removal of spaces before punctuation
        "clean_up_tokenization_spaces": False,
        # the text "<|endoftext|>" is ordinary text, as in gptcli (see the module docstring)
        "split_special_tokens": True,
        "added_tokens_decoder": {str(GPT2_EOT_ID): {k: v for k, v in eot.items() if k != "id"}},
    }
    return {"tokenizer.json": _dumps(tokenizer_json), "vocab.json": _dumps(vocab),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer_config.json": _dumps(config),
            "special_tokens_map.json": _dumps(special)}


def _char_files(chars: str, context_length: int) -> dict[str, str]:
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None,
        # every code point its own piece: [\s\S] matches any character, newlines included
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},  # join the pieces back without separators
        # "<unk>" is not in the vocabulary (it is not one character), so an unknown character
        # is an error, as in gptcli, rather than a silent id
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)},
                  "unk_token": "<unk>"},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": _dumps(tokenizer_json), "tokenizer_config.json": _dumps(config)}


def tokenizer_files(spec: dict, *, context_length: int) -> dict[str, str]:
    """The Hugging Face tokenizer files (file name -> text) for a gptcli tokenizer ``spec``
    (``{"type": "gpt2"}`` or ``{"type": "char", "chars": ...}``); ``context_length`` becomes
    ``model_max_length``. A folder holding them loads with ``AutoTokenizer.from_pretrained`` and
    encodes every text to the ids gptcli's tokenizer gives.

    GPT-2: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json. Char: tokenizer.json and tokenizer_config.json. A damaged or
    unknown spec is a UserError (the same checks as ``get_tokenizer``)."""
    tokenizer = get_tokenizer(spec)  # validates the spec
    if tokenizer.name == "gpt2":
        return _gpt2_files(context_length)
    return _char_files(tokenizer.spec()["chars"], context_length)


# ----------------------------------------------------------------------------- files -> spec

def _bpe_pairs(merges) -> list[str]:
    """Merges as ``"a b"`` strings: tokenizer.json spells them so, or (newer files) as pairs."""
    return [" ".join(m) if isinstance(m, (list, tuple)) else m for m in merges]


def _read_json(path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path.name} of {where} is not readable JSON: {e}") from None


def tokenizer_spec_from_files(folder, where: str | None = None) -> dict | None:
    """The gptcli tokenizer spec that a Hugging Face folder's tokenizer files describe (the
    inverse of :func:`tokenizer_files`): ``{"type": "gpt2"}`` for GPT-2's exact vocabulary and
    merges, a char spec for a one-character WordLevel vocabulary as gptcli exports it, None
    when the folder has no tokenizer files. Any other tokenizer is a UserError: gptcli has no
    tokenizer to encode text as it does."""
    from pathlib import Path

    folder = Path(folder)
    where = where or str(folder)
    if (folder / "tokenizer.json").is_file():
        data = _read_json(folder / "tokenizer.json", where)
        model = data.get("model") if isinstance(data, dict) else None
        kind = model.get("type") if isinstance(model, dict) else None
        if kind == "BPE":
            vocab, merges = model.get("vocab"), _bpe_pairs(model.get("merges") or [])
        elif kind == "WordLevel":
            return _char_spec(model.get("vocab"), data.get("pre_tokenizer"), where)
        else:
            raise UserError(f"the tokenizer of {where} is a {kind or 'unknown'} tokenizer; gptcli "
                            "runs GPT-2's byte-level BPE and its own character vocabularies only")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json", where)
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
    else:
        return None
    tokens, gpt2 = _gpt2_tables()
    if vocab != {t: i for i, t in enumerate(tokens)} or merges != list(gpt2):
        size = len(vocab) if isinstance(vocab, dict) else "?"
        raise UserError(f"the tokenizer of {where} is not GPT-2's ({size} tokens, "
                        f"{len(merges)} merges, not GPT-2's exact 50257 tokens and 50000 merges); "
                        "gptcli pairs GPT-2 models with the GPT-2 tokenizer only")
    return {"type": "gpt2"}


def _char_spec(vocab, pre_tokenizer, where: str) -> dict:
    """A WordLevel vocabulary of single characters, ids 0..n-1, split one character a piece."""
    pieces = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else []
    one_each = (isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Split"
                and pre_tokenizer.get("pattern") == {"Regex": r"[\s\S]"})
    if not pieces or not one_each or [i for _, i in pieces] != list(range(len(pieces))) \
            or any(len(c) != 1 for c, _ in pieces):
        raise UserError(f"the tokenizer of {where} is a WordLevel tokenizer but not a gptcli "
                        "character vocabulary (one character a token, ids 0..n-1)")
    spec = {"type": "char", "chars": "".join(c for c, _ in pieces)}
    get_tokenizer(spec)  # the same checks as a checkpoint's spec
    return spec
