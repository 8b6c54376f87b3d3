"""gptcli: train, run, inspect and benchmark GPT-2-family language models.

The public API is imported lazily, so ``import gptcli`` (and the CLI's ``--help``) does not pay
for importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "GPT": "gptcli.model",
    "KVCache": "gptcli.kv_cache",
    "ModelConfig": "gptcli.config",
    "load_checkpoint": "gptcli.checkpoint",
    "save_checkpoint": "gptcli.checkpoint",
    "get_tokenizer": "gptcli.tokenizer",
    "resolve_device": "gptcli.devices",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gptcli' has no attribute {name!r}")
