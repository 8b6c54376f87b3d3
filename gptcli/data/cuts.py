"""Where text may be cut without changing its tokens, so that a file of any shape (one 1 GB line,
Windows or old-Mac line endings, no spaces at all) is tokenized a bounded piece at a time with
exactly the tokens of the whole text.

A cut function ``cut(text, lo, hi)`` answers the last position ``c`` with ``lo <= c < hi`` (and
``0 < c < len(text)``) where ``encode(text[:c]) + encode(text[c:]) == encode(text)``, or -1.

GPT-2 (tiktoken) splits text into pieces with ``tokenizer.GPT2_PATTERN`` and runs BPE inside each
piece, so a cut is exact when the pieces of the two sides are the pieces of the whole. The
pattern has no look-behind and no anchors, so the pieces after a position depend only on the
text after it; a cut at ``c`` is therefore exact when (a) a piece of the whole text ends at
``c`` and (b) every match before ``c`` comes out the same when ``text[c]`` is replaced by the
end of the text. Two kinds of position have both:

1. Before a whitespace character that follows a non-whitespace one ("word| word",
   "line|\\r\\nline", "end|\\n"). (a) No alternative of the pattern puts whitespace after a
   non-whitespace character inside one piece (its optional space is a prefix). (b) The
   alternatives that start before ``c`` and can reach it are the letter, digit and
   other-symbol runs and the contractions; each stops at a whitespace character exactly as at
   the end of the text. A whitespace run (the only alternative with a look-ahead) cannot reach
   ``c``: the character before ``c`` is not whitespace.
2. Between two non-whitespace characters of different classes among letters (``\\p{L}``),
   digits (``\\p{N}``) and the rest, unless the first is the apostrophe that opens "'s", "'ll",
   ...: (a) every non-whitespace alternative is a run of one class (a contraction is an
   apostrophe and letters), and (b) the next character, of another class, stops that run
   exactly as the end of the text does. Only tried where a window holds no cut of kind 1
   (text without spaces: Chinese, Japanese, Thai, base64), and only for characters whose
   class is the same in Unicode 3.2 and in Python's tables: a newer or older Unicode table in
   tiktoken's regex engine then classes them the same way.

Whitespace is Unicode's White_Space property, which is what ``\\s`` means in tiktoken's regex
engine (Rust's regex crate); ``str.isspace`` differs (it also counts \\x1c-\\x1f).

Only a single piece longer than the text searched (a megabyte of one letter, digit, symbol or
space) has no exact cut: it has to be tokenized whole.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache

Cut = Callable[[str, int, int], int]

WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")  # Unicode White_Space: 25 characters
FIRST_WINDOW = 1024  # characters searched first, from the end; doubled while nothing is found


def _class(chars) -> str:
    """A regular-expression character class holding ``chars`` (as ranges of code points)."""
    codes = sorted(set(map(ord, chars)))
    ranges, start = [], None
    for i, c in enumerate(codes):
        start = c if start is None else start
        if i + 1 == len(codes) or codes[i + 1] != c + 1:
            ranges.append(f"\\U{start:08x}" + (f"-\\U{c:08x}" if c > start else ""))
            start = None
    return "[" + "".join(ranges) + "]"


# a match ends at the cut: one non-whitespace character, then (looked at, not consumed, so
# overlapping candidates are all seen) a whitespace character
_BEFORE_SPACE = re.compile(f"[^{_class(WHITESPACE)[1:-1]}](?={_class(WHITESPACE)})")


@lru_cache(maxsize=1)
def _class_change() -> re.Pattern:
    """Kind-2 cuts: letter|digit, letter|symbol, digit|letter, digit|symbol, symbol|letter,
    symbol|digit, for characters classed alike by Unicode 3.2 and by Python's tables (built on
    first use, ~0.2 s: most text never needs it)."""
    def kind(category: str) -> str:
        return category[0] if category[0] in "LNZ" else "S"

    old, space = unicodedata.ucd_3_2_0, set(WHITESPACE)
    classes: dict[str, list[str]] = {"L": [], "N": [], "S": []}
    # past plane 2, Unicode 3.2 had only tags and private use: left out (no cut next to them)
    for code in range(0x30000):
        ch = chr(code)
        then = old.category(ch)
        if then == "Cn" or then == "Cs" or ch in space:
            continue
        if kind(then) == kind(unicodedata.category(ch)) and kind(then) in classes:
            classes[kind(then)].append(ch)
    letter, digit, symbol = classes["L"], classes["N"], classes["S"]
    opener = [c for c in symbol if c != "'"]
    return re.compile(f"{_class(letter)}(?={_class(digit + symbol)})"
                      f"|{_class(digit)}(?={_class(letter + symbol)})"
                      f"|{_class(opener)}(?={_class(letter + digit)})")


def _last_end(pattern: re.Pattern, text: str, start: int, end: int) -> int:
    """The end of the last match of ``pattern`` that ends in [start, end), or -1."""
    found = -1
    for m in pattern.finditer(text, start - 1, end):
        found = m.end()
    return found


def gpt2_cut(text: str, lo: int, hi: int) -> int:
    """The last exact cut for GPT-2 in [lo, hi) (see the module's note), or -1. Searches back
    from ``hi`` in windows that double, so a cut near the end is found at once and a stretch
    without one is read once (by each kind of cut)."""
    lo, hi = max(lo, 1), min(hi, len(text))
    end, size = hi, FIRST_WINDOW
    while end > lo:
        start = max(lo, end - size)
        cut = _last_end(_BEFORE_SPACE, text, start, end)
        if cut < 0:
            cut = _last_end(_class_change(), text, start, end)
        if cut >= 0:
            return cut
        end, size = start, 2 * size
    return -1


def anywhere(text: str, lo: int, hi: int) -> int:
    """Any cut is exact (one token per character): the last position in [lo, hi)."""
    lo, hi = max(lo, 1), min(hi, len(text))
    return hi - 1 if hi - 1 >= lo else -1


def nowhere(text: str, lo: int, hi: int) -> int:
    """No known exact cut (a tokenizer this module does not know): the text stays whole."""
    return -1


def for_tokenizer(spec: dict) -> Cut:
    """The cut function for a tokenizer spec."""
    return {"gpt2": gpt2_cut, "char": anywhere}.get(spec.get("type"), nowhere)
