"""The local store: where downloaded models, datasets, benchmark-task data and the token cache
live, the short names gptcli knows, and name -> file.

``$GPTCLI_HOME`` (default ``~/.cache/gptcli``) holds ``models/`` (one gptcli checkpoint per
model, ``org/name`` stored as ``org--name.safetensors``), ``datasets/`` (one folder per dataset;
``datasets/tasks/`` for benchmark tasks) and ``tokens/`` (the token cache; ``$GPTCLI_DATA_CACHE``
moves it). ``hub.py`` downloads into the store and ``models.py`` loads from it; neither knows the
other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Short names -> Hub repos. Anything else with one slash is taken as a repo id.
KNOWN_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# Short names -> (dataset repo, its files: exact names or globs). OpenWebText has no parquet or
# safetensors copy gptcli knows of (its repo is a loading script), so it has no shortcut.
KNOWN_DATASETS = {
    "tinystories": ("roneneldan/TinyStories", ("TinyStories-train.txt", "TinyStories-valid.txt")),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", ("sample/10BT/*.parquet",)),  # 10B tokens
}
# The training-data files gptcli reads, by suffix -> format.
DATA_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def gptcli_home() -> Path:
    """``$GPTCLI_HOME`` or ``~/.cache/gptcli``."""
    return Path(os.environ.get("GPTCLI_HOME") or Path.home() / ".cache" / "gptcli")


def models_dir() -> Path:
    return gptcli_home() / "models"


def datasets_dir() -> Path:
    return gptcli_home() / "datasets"


def tasks_dir() -> Path:
    """Benchmark-task data (`gpt eval --task`), one folder per task."""
    return datasets_dir() / "tasks"


def tokens_dir() -> Path:
    """The token cache (``$GPTCLI_DATA_CACHE`` moves it, e.g. to a larger disk)."""
    return Path(os.environ.get("GPTCLI_DATA_CACHE") or gptcli_home() / "tokens")


def store_name(name: str) -> str:
    """File-system name for a model or dataset name: ``org/name`` -> ``org--name``."""
    return name.strip("/").replace("/", "--")


def model_file(name: str) -> Path:
    """Where the model called ``name`` is (or would be) stored."""
    return models_dir() / f"{store_name(name)}.safetensors"


def stored_model(name: str) -> Path | None:
    """The stored checkpoint of model ``name``, or None."""
    path = model_file(name)
    return path if path.is_file() else None


def dataset_folder(name: str) -> Path:
    return datasets_dir() / store_name(name)


def stored_dataset(name: str) -> Path | None:
    """The folder of a downloaded dataset called ``name``, or None."""
    folder = dataset_folder(name)
    return folder if folder.is_dir() else None


def is_repo_id(name: str) -> bool:
    """``org/name``: one slash; each side letters, digits, ``-``, ``_`` and ``.``, neither
    starting nor ending with ``-`` or ``.`` (the Hub's rule: ``./x``, ``../x`` and ``~/x`` are
    paths, never repos)."""
    part = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
    return re.fullmatch(f"{part}/{part}", name) is not None


def is_stored_name(path: Path) -> bool:
    """Whether ``path`` is a checkpoint in the model store."""
    try:
        return path.resolve().parent == models_dir().resolve()
    except OSError:
        return False


def local_models() -> list[str]:
    """Names of the models in the local store."""
    return sorted(p.stem.replace("--", "/") for p in models_dir().glob("*.safetensors"))


def local_datasets() -> list[str]:
    """Names of the downloaded datasets (folders holding training-data files)."""
    return sorted(p.name.replace("--", "/") for p in datasets_dir().glob("*")
                  if p.is_dir() and p != tasks_dir()
                  and any(f.suffix in DATA_FORMATS for f in p.rglob("*")))


def listing() -> dict[str, Any]:
    """The known names and what is already in the store (``gpt download --list``)."""
    stored, datasets = local_models(), local_datasets()
    return {"models": {n: {"repo": r, "stored": n in stored} for n, r in KNOWN_MODELS.items()},
            "datasets": {n: {"repo": r, "stored": n in datasets}
                         for n, (r, _) in KNOWN_DATASETS.items()},
            "stored_models": stored, "stored_datasets": datasets,
            "models_dir": str(models_dir()), "datasets_dir": str(datasets_dir())}
