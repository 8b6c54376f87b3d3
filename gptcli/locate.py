"""A model a command names, fetched first when it must be: the one step above ``models.py``
(finding and loading what is on disk) and ``hub.py`` (Hub transfers), which do not import each
other.

``find_model`` resolves a name as ``models.resolve_model`` does, and hands it a fetcher for a
Hub id (``org/name``, ``gpt2``) that is not in the store yet: the model is downloaded into the
store once (as `gpt download` would) and used from there on. Offline (``HF_HUB_OFFLINE=1``,
or ``offline=True``) no fetcher is given, so the message says to run ``gpt download NAME``;
an unreachable Hub says the same, at once.

Why a module above both rather than a fetcher argument threaded through every command: the
commands already load through ``models.load_model`` and ``resolve_model``; a fetcher passed
into ``resolve_model`` keeps the order of the look-up (file, run, Hugging Face folder, store,
Hub) in one place, and this module is the only one that knows both the look-up and the Hub.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from .models import load_model as _load_model
from .models import resolve_model
from .store import models_dir


def find_model(name: str | os.PathLike | None, *, offline: bool = False, log=None) -> Path:
    """The checkpoint ``name`` means (see ``models.resolve_model``), downloading a Hub model
    that is not in the store yet when the Hub may be used."""
    from .hub import offline_mode

    fetch = None if offline_mode(offline) else partial(_download, log=log)
    return resolve_model(name, fetch=fetch, log=log)


def load_model(name: str | os.PathLike | None, **options):
    """``models.load_model`` on what ``find_model`` finds (the same options and result)."""
    return _load_model(find_model(name), **options)


def _download(name: str, *, log=None) -> Path:
    from huggingface_hub import constants

    from .hub import check_reachable, download_model

    check_reachable("the weights", name, instead=f"{name} is not downloaded yet: run "
                    f"`gpt download {name}` once with network access")
    if log:
        log(f"{name} is not in {models_dir()} yet: downloading it once from {constants.ENDPOINT}")
    return Path(download_model(name, log=log)["path"])
