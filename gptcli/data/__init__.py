"""Training text -> token ids: input sources and formats (``sources``), where text may be cut
without changing its tokens (``cuts``), the sharded token cache and its workers (``cache``), and
training batches (``batches``).

Inputs are ``.txt`` files (one document each), ``.jsonl``/``.json`` lines and ``.parquet`` files
(one document per row, from ``--text-column``), folders and globs of them. Documents are joined
with a separator: GPT-2's end-of-text token, or a newline for character models (as nanoGPT and
build-nanogpt do). The dataset is the shards in input order with a separator between them, seen
as one sequence: training windows may cross shard boundaries as they cross document boundaries
inside a shard (the separator tells the model where one document ends), and validation is the
last ``val_fraction`` of that sequence.
"""

from .batches import BatchSampler, check_enough
from .cache import load_tokens
from .dataset import TokenData, Tokens
from .sources import bundled_corpus, resolve_data

__all__ = ["BatchSampler", "TokenData", "Tokens", "bundled_corpus", "check_enough", "load_tokens",
           "resolve_data"]
