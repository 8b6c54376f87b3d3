"""The dataset the trainer sees: the token cache's shards as one sequence (``Tokens``), and,
for chat and instruction data, the matching sequence of target masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer


class Tokens:
    """Shards seen as one sequence, with the separator between consecutive shards. Supports
    ``len``, slicing (``[a:b]`` gives a numpy array, across shard boundaries) and ``view``."""

    def __init__(self, shards: list[np.ndarray], sep: int | None, start: int = 0,
                 stop: int | None = None) -> None:
        self.shards, self.sep = shards, sep
        gap = 0 if sep is None else 1
        self.offsets = np.cumsum([0] + [len(s) + gap for s in shards])
        total = int(self.offsets[-1]) - (gap if shards else 0)
        self.start, self.stop = start, total if stop is None else stop
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> Tokens:
        return Tokens(self.shards, self.sep, self.start + start, self.start + stop)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, _ = key.indices(len(self))
            return self._range(self.start + a, self.start + b)
        return self._range(self.start + key, self.start + key + 1)[0]

    def _range(self, a: int, b: int) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][a:b])
        parts = []
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        while a < b:
            base = int(self.offsets[i])
            shard = self.shards[i]
            if a < base + len(shard):
                end = min(b, base + len(shard))
                parts.append(np.asarray(shard[a - base:end - base]))
                a = end
            else:  # the separator after this shard
                parts.append(np.array([self.sep], dtype=self.dtype))
                a += 1
                i += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()


def token_dtype(tokenizer: Tokenizer):
    """How token ids are stored: uint16 when the vocabulary fits, else uint32."""
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def _memmap(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else \
        np.empty(0, dtype=dtype)


@dataclass
class TokenData:
    """Every token id (memory-mapped shards) and, when some file held chat or instruction
    records, the target masks of the same positions (1: a token the model learns to produce;
    text files are all targets, and the separator between files is not)."""

    tokenizer: Tokenizer
    tokens: Tokens
    shards: list[Path]
    files: list[Path]
    masks: Tokens | None = None
    formats: list[str] = field(default_factory=list)  # each file's: text, or a chat format

    @classmethod
    def from_shards(cls, tokenizer: Tokenizer, shards: list[Path], files: list[Path],
                    formats: list[str] | None = None) -> TokenData:
        arrays = [_memmap(s, token_dtype(tokenizer)) for s in shards]
        masks = None
        if any(s.with_suffix(".mask").is_file() for s in shards):
            masks = Tokens([_memmap(s.with_suffix(".mask"), np.uint8)
                            if s.with_suffix(".mask").is_file() else
                            np.broadcast_to(np.uint8(1), (len(a),))  # a text file: all targets
                            for s, a in zip(shards, arrays)], 0)
        return cls(tokenizer, Tokens(arrays, tokenizer.separator_id), shards, files, masks,
                   list(formats or ["text"] * len(files)))

    def split(self, val_fraction: float) -> tuple[Tokens, Tokens]:
        """Train and validation tokens; validation is the last ``val_fraction``."""
        return _split(self.tokens, val_fraction)

    def split_masks(self, val_fraction: float) -> tuple[Tokens | None, Tokens | None]:
        """The masks of ``split``'s two parts (None without masks)."""
        return _split(self.masks, val_fraction) if self.masks is not None else (None, None)

    @property
    def targets(self) -> int:
        """How many tokens are targets (all of them without masks)."""
        if self.masks is None:
            return len(self.tokens)
        return int(sum(int(np.count_nonzero(s)) for s in self.masks.shards))


def _split(tokens: Tokens, val_fraction: float) -> tuple[Tokens, Tokens]:
    n = len(tokens)
    n_val = int(n * val_fraction)
    return tokens.view(0, n - n_val), tokens.view(n - n_val, n)
