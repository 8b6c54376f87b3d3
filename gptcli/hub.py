"""Hugging Face Hub transfers into the local store: `gpt download` (Hub repos, local HF folders,
text datasets). The GPT-2 <-> gptcli map itself is ``hf.py``; the store is ``store.py``.

Downloads go through ``huggingface_hub`` (its cache under ``HF_HOME``, resumable transfers,
``HF_TOKEN``, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``); it is imported only when needed.
Pickle weights (``pytorch_model.bin``) are never downloaded or opened.

Files are fetched one by one with ``hf_hub_download`` rather than ``snapshot_download``: the
order matters (config.json first, so a repo that is not GPT-2 is refused before any weights are
fetched; then the single file, else the shards its index names, never both), offline mode must
say which file is missing, and a pickle-only repo must be named as such without downloading
it. ``snapshot_download`` fetches every file matching its patterns at once (after a repo-info
and a tree request), so it would still need config.json and the index read first; what it adds,
parallel shards, does not help the GPT-2 repos, which are single files.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from .convert import (HF_PICKLE_WEIGHTS, HF_WEIGHTS, HF_WEIGHTS_INDEX, NO_PICKLE, convert_folder,
                      convert_hf, read_hf_config, shards)
from .hf import from_hf
from .errors import GptcliError, RuntimeFailure, UserError
from .store import (DATA_FORMATS, KNOWN_DATASETS, KNOWN_MODELS, dataset_folder, is_repo_id,
                    model_file)


# ----------------------------------------------------------------------------- download

DATA_SUFFIXES = tuple(DATA_FORMATS)


def offline_mode(offline: bool = False) -> bool:
    """``--offline`` or ``HF_HUB_OFFLINE=1`` (read now, not when huggingface_hub was imported)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return offline or flag.strip().lower() in ("1", "true", "yes", "on")


def is_network_error(e: BaseException) -> bool:
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in (
        "httpx", "httpx2", "httpcore", "requests", "urllib3")


@functools.lru_cache(maxsize=None)
def unreachable(endpoint: str) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached (its name does not resolve, or nothing
    answers within a few seconds), or None when it can. Checked once per process, before the
    first transfer: huggingface_hub retries a failed connection five times with back-off (24 s
    of warnings) before giving up, where a machine without a network should hear so at once."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=5):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def quiet_hub() -> None:
    """Keep huggingface_hub's own retry and warning lines out of the terminal: its failures
    reach the user as one sentence (``_translated``)."""
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def check_reachable(what: str, repo: str, *, instead: str | None = None) -> None:
    """Fail at once, in one sentence, when the Hub cannot be reached (see ``unreachable``);
    ``instead`` replaces the usual advice."""
    from huggingface_hub import constants

    quiet_hub()
    why = unreachable(constants.ENDPOINT)
    if why is not None:
        advice = instead or ("check the connection or HF_ENDPOINT, or use --offline for what "
                             "is already cached")
        raise RuntimeFailure(f"could not reach {constants.ENDPOINT} to download {what} of {repo} "
                             f"({why}); {advice}")


def hub_fetch(repo: str, filename: str, *, revision: str | None = None, offline: bool = False,
              repo_type: str = "model", optional: bool = False,
              local_dir: str | os.PathLike | None = None) -> Path | None:
    """One file of a Hub repo, through huggingface_hub's cache (resumable, HF_TOKEN, HF_ENDPOINT,
    HF_HOME). Every huggingface_hub error becomes one UserError/RuntimeFailure line; with
    ``optional=True`` a file the repo does not have (or, offline, has not cached) is None."""
    offline = offline_mode(offline)
    if offline:  # so huggingface_hub, if imported only now, makes no background calls either
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    quiet_hub()
    if not offline:
        check_reachable(filename, repo)

    try:
        return Path(hf_hub_download(repo, filename, repo_type=repo_type, revision=revision,
                                    local_files_only=offline, local_dir=local_dir))
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        if optional and (offline or not isinstance(e, LocalEntryNotFoundError)):
            return None
        raise _translated(e, repo, filename, repo_type, revision, offline) from None
    except Exception as e:  # noqa: BLE001 - every huggingface_hub / network failure: one line
        raise _translated(e, repo, filename, repo_type, revision, offline) from None


def list_files(repo: str, *, repo_type: str = "dataset", revision: str | None = None,
               offline: bool = False) -> list[str]:
    """The files of a Hub repo (needs the network)."""
    if offline_mode(offline):
        raise UserError(f"offline, and {repo} is not in the gptcli store yet; run the same "
                        "command once with network access (without --offline / "
                        "HF_HUB_OFFLINE=1)")
    from huggingface_hub import HfApi

    check_reachable("the file list", repo)
    try:
        return HfApi().list_repo_files(repo, repo_type=repo_type, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise _translated(e, repo, "the file list", repo_type, revision, offline) from None


def _translated(e: BaseException, repo: str, what: str, repo_type: str, revision: str | None,
                offline: bool) -> BaseException:
    """A huggingface_hub (or network) failure as one user-facing error; anything else as is."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    kind = "dataset" if repo_type == "dataset" else "model"
    at = f" at revision {revision!r}" if revision else ""
    where = constants.ENDPOINT
    if isinstance(e, LocalEntryNotFoundError):
        if offline:
            return UserError(f"offline, and {what} of {kind} repo {repo}{at} is not in the "
                             f"local cache ({constants.HF_HUB_CACHE}); run the same command "
                             "once with network access (without --offline / HF_HUB_OFFLINE=1)")
        return RuntimeFailure(f"could not reach {where} to download {what} of {repo} "
                              f"({first_cause(e)}); check the connection or HF_ENDPOINT, or "
                              "use --offline for what is already cached")
    if isinstance(e, GatedRepoError):
        return UserError(f"{kind} repo {repo} is gated: accept its terms on the Hub and set "
                         "HF_TOKEN to a token with access")
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f"no {kind} repo {repo!r} on {where} (or it is private: set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return UserError(f"{kind} repo {repo} has no revision {revision!r}")
    if isinstance(e, EntryNotFoundError):
        return UserError(f"{kind} repo {repo}{at} has no file {what}")
    if isinstance(e, HFValidationError):
        return UserError(f"{repo!r} is not a valid Hub repo id: {first_cause(e)}")
    if isinstance(e, (HfHubHTTPError, OSError)) or is_network_error(e):
        return RuntimeFailure(f"downloading {what} of {repo} from {where} failed "
                              f"({first_cause(e)}); run the command again to resume")
    return e


def first_cause(e: BaseException) -> str:
    """The first line of the innermost explained cause of ``e``."""
    while e.__cause__ is not None and str(e.__cause__):
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def resolve_repo(name: str) -> str:
    """``gpt2`` -> ``openai-community/gpt2``; ``org/name`` stays; anything else is refused."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if is_repo_id(name) and not Path(name).exists():  # (a file there is what was meant)
        return name
    if Path(name).is_file():
        raise UserError(f"{name} is a file; gpt download converts a Hugging Face folder (its "
                        "config.json and weights), a Hub repo or a known name"
                        + (f" (a gptcli checkpoint needs none: gpt generate --model {name})"
                           if name.endswith(".safetensors") else ""))
    if "/" in name or name.startswith((".", "~")):
        raise UserError(f"{name} does not exist (a folder to convert?), and it is not a Hub "
                        "repo id (org/name)")
    raise UserError(f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, a Hub repo "
                    "id like org/name, or a local Hugging Face folder")


def download(name: str | None, *, dataset: str | None = None, files: list[str] | None = None,
             revision: str | None = None, out: str | os.PathLike | None = None,
             offline: bool = False, force: bool = False, log=None) -> dict[str, Any]:
    """What `gpt download` does: a dataset (``--dataset`` or a known dataset name), a local
    Hugging Face folder (an existing directory), or a Hub model (known name or org/name).
    A model replaces no file the user has unless ``force`` (``check_destination``)."""
    if dataset or (name in KNOWN_DATASETS and not Path(name).is_dir()):
        if out:
            raise UserError("--out is for models; datasets go to the local store")
        return {"kind": "dataset", **download_dataset(dataset or name, files, revision=revision,
                                                      offline=offline, log=log)}
    if files:
        raise UserError("--include picks files of a dataset; use it with --dataset org/name")
    if not name:
        raise UserError(f"say what to download: one of {', '.join(KNOWN_MODELS)}, a Hub repo id "
                        "(org/name), a local Hugging Face folder, or --list to see the choices")
    if Path(name).is_dir():
        if revision:
            raise UserError("--revision is for Hub repos, not local folders")
        folder = Path(name).resolve()
        dest = check_destination(out, folder.name, f"local:{folder}", force=force)
        return {"kind": "model", **convert_folder(name, out=dest, log=log)}
    dest = check_destination(out, name, f"hf:{resolve_repo(name)}", force=force)
    return {"kind": "model", **download_model(name, revision=revision, out=dest,
                                              offline=offline, log=log)}


def check_destination(out: str | os.PathLike | None, name: str, source: str, *,
                      force: bool) -> Path:
    """Where a model from ``source`` goes (``out``, else the store's file for ``name``), once
    it is sure to replace nothing the user would miss: an existing ``--out`` file, or a stored
    model of that name from another source (two local folders called ``hf-dir``, say), is
    refused unless ``force``. A stored model from the same source is updated: downloading
    gpt2 again fetches what changed."""
    from .checkpoint import read_safetensors

    dest = Path(out) if out is not None else model_file(name)
    if force or not (dest.exists() or dest.is_symlink()):
        return dest
    if out is not None:
        raise UserError(f"{dest} already exists; pass --force to overwrite it, or another --out")
    try:
        had = read_safetensors(dest, tensors=False)[1].get("source")
    except GptcliError:
        had = None
    if had == source:
        return dest
    where = "an unknown source" if not had else \
        "the Hub's " + had[3:] if had.startswith("hf:") else had.removeprefix("local:")
    raise UserError(f"the store already has a model called {dest.stem} (from {where}); pass "
                    "--force to replace it, or --out FILE to write this one elsewhere")


def download_model(name: str, *, revision: str | None = None, out: str | os.PathLike | None = None,
                   offline: bool = False, log=None) -> dict[str, Any]:
    """Fetch a GPT-2 repo from the Hub (config.json + safetensors, single or sharded), convert it
    and store it as a gptcli checkpoint. Returns what :func:`convert_hf` returns."""
    repo = resolve_repo(name)
    config_path = hub_fetch(repo, "config.json", revision=revision, offline=offline)
    hf_config = read_hf_config(config_path, repo)
    from_hf(hf_config)  # refuse non-GPT-2 repos before fetching any weights
    fetch = functools.partial(hub_fetch, repo, revision=revision, offline=offline)
    weights = fetch(HF_WEIGHTS, optional=True)
    if weights is not None:
        files = [weights]
    else:
        index = fetch(HF_WEIGHTS_INDEX, optional=True)
        if index is None:
            raise _no_safetensors(repo, revision, offline)
        files = [fetch(shard) for shard in shards(index, repo)]
    return convert_hf(hf_config, files, out or model_file(name), log=log,
                      source=f"hf:{repo}", revision=commit_of(config_path, revision))


def _no_safetensors(repo: str, revision: str | None, offline: bool) -> GptcliError:
    if offline_mode(offline):
        return UserError(f"offline, and neither {HF_WEIGHTS} nor {HF_WEIGHTS_INDEX} of {repo} is "
                         "in the local cache; run the same command once with network access")
    from huggingface_hub import HfApi

    for pickle_name in HF_PICKLE_WEIGHTS:
        try:
            found = HfApi().file_exists(repo, pickle_name, revision=revision)
        except Exception:  # noqa: BLE001 - only used to word the message
            found = False
        if found:
            return UserError(f"{repo} has only pickle weights ({pickle_name}), no safetensors; "
                             + NO_PICKLE)
    return UserError(f"{repo} has no {HF_WEIGHTS} (nor {HF_WEIGHTS_INDEX}); gptcli converts "
                     "safetensors weights only")


def commit_of(path: Path, revision: str | None = None, *,
              local_dir: Path | None = None) -> str | None:
    """The commit a downloaded file came from: the snapshot folder of huggingface_hub's cache
    (``.../snapshots/<sha>/file``), or, for a file fetched into ``local_dir``, what
    huggingface_hub recorded beside it (``.cache/huggingface/download/<file>.metadata``, the
    commit on its first line); else ``revision``."""
    parent = Path(path).parent.name
    if len(parent) == 40:
        return parent
    if local_dir is not None:
        try:
            meta = Path(local_dir) / ".cache" / "huggingface" / "download" / \
                f"{Path(path).relative_to(local_dir)}.metadata"
            first = meta.read_text().splitlines()[:1]
        except (OSError, ValueError):
            first = []
        if first and len(first[0]) == 40:
            return first[0]
    return revision


def download_dataset(name: str, files: list[str] | None = None, *, revision: str | None = None,
                     offline: bool = False, log=None) -> dict[str, Any]:
    """Data files of a Hub dataset repo into ``datasets_dir()/<store name>/``, where ``gpt train
    --data NAME`` finds them. ``name`` is a known name or ``org/name``; ``files`` are exact
    names or globs (``--include``) of .txt, .jsonl or .parquet files. Downloads resume; offline,
    what is already in the store is used."""
    from fnmatch import fnmatch

    repo, default = KNOWN_DATASETS[name] if name in KNOWN_DATASETS else \
        (resolve_dataset_repo(name), ())
    wanted = list(files or default)
    if not wanted:
        raise UserError(f"say which files of dataset {repo} to fetch with --include GLOB (e.g. "
                        "--include '*.parquet')")
    bad = [f for f in wanted if not f.endswith(DATA_SUFFIXES) and not f.endswith("*")]
    if bad:
        raise UserError(f"gptcli trains on .txt, .jsonl and .parquet files, not {bad[0]}")
    folder = dataset_folder(name)
    if offline_mode(offline) and folder.is_dir():
        # (huggingface_hub's .cache inside the folder, not the store's own ~/.cache path)
        have = [p for p in folder.rglob("*") if p.is_file()
                and ".cache" not in p.relative_to(folder).parts
                and any(fnmatch(str(p.relative_to(folder)), w) for w in wanted)]
        if have:
            return _dataset_result(name, folder, have, repo)
    exact = [w for w in wanted if not any(c in w for c in "*?[")]
    names = exact
    if len(exact) < len(wanted):  # globs: match them against the repo's files
        listing = list_files(repo, revision=revision, offline=offline)
        names = sorted({f for f in listing for w in wanted if fnmatch(f, w)
                        and f.endswith(DATA_SUFFIXES)} | set(exact))
        if not names:
            raise UserError(f"no file of dataset {repo} matches {', '.join(wanted)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, filename in enumerate(names, 1):
        if log and len(names) > 1:
            log(f"[{n}/{len(names)}] {filename}")
        paths.append(hub_fetch(repo, filename, revision=revision, offline=offline,
                               repo_type="dataset", local_dir=folder))
    return _dataset_result(name, folder, paths, repo)


def _dataset_result(name: str, folder: Path, paths: list[Path], repo: str) -> dict[str, Any]:
    return {"name": name, "path": str(folder.resolve()), "files": [str(p) for p in paths],
            "size": sum(p.stat().st_size for p in paths), "source": f"hf:datasets/{repo}"}


def resolve_dataset_repo(name: str) -> str:
    if is_repo_id(name):
        return name
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(KNOWN_DATASETS)} or a "
                    "Hub dataset repo id like org/name")
