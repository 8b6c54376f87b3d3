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
import json
import os
from pathlib import Path
from typing import Any

from .hf import GPT2_VOCAB, from_hf
from .errors import GptcliError, RuntimeFailure, UserError
from .store import (DATA_FORMATS, KNOWN_DATASETS, KNOWN_MODELS, dataset_folder, is_repo_id,
                    model_file)


# ----------------------------------------------------------------------------- download

DATA_SUFFIXES = tuple(DATA_FORMATS)
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
NO_PICKLE = ("gptcli does not unpickle downloaded files, because unpickling can run arbitrary "
             "code; ask for (or convert to) a safetensors version")


def _offline(offline: bool) -> bool:
    """``--offline`` or ``HF_HUB_OFFLINE=1`` (read now, not when huggingface_hub was imported)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return offline or flag.strip().lower() in ("1", "true", "yes", "on")


def _is_network_error(e: BaseException) -> bool:
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in (
        "httpx", "httpx2", "httpcore", "requests", "urllib3")


def hub_fetch(repo: str, filename: str, *, revision: str | None = None, offline: bool = False,
              repo_type: str = "model", optional: bool = False,
              local_dir: str | os.PathLike | None = None) -> Path | None:
    """One file of a Hub repo, through huggingface_hub's cache (resumable, HF_TOKEN, HF_ENDPOINT,
    HF_HOME). Every huggingface_hub error becomes one UserError/RuntimeFailure line; with
    ``optional=True`` a file the repo does not have (or, offline, has not cached) is None."""
    offline = _offline(offline)
    if offline:  # so huggingface_hub, if imported only now, makes no background calls either
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

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
    if _offline(offline):
        raise UserError(f"offline, and {repo} is not in the gptcli store yet; run the same "
                        "command once with network access (without --offline / "
                        "HF_HUB_OFFLINE=1)")
    from huggingface_hub import HfApi

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
                              f"({_cause(e)}); check the connection or HF_ENDPOINT, or use "
                              "--offline for what is already cached")
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
        return UserError(f"{repo!r} is not a valid Hub repo id: {_cause(e)}")
    if isinstance(e, (HfHubHTTPError, OSError)) or _is_network_error(e):
        return RuntimeFailure(f"downloading {what} of {repo} from {where} failed "
                              f"({_cause(e)}); run the command again to resume")
    return e


def _cause(e: BaseException) -> str:
    """The first line of the innermost explained cause of ``e``."""
    while e.__cause__ is not None and str(e.__cause__):
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def resolve_repo(name: str) -> str:
    """``gpt2`` -> ``openai-community/gpt2``; ``org/name`` stays; anything else is refused."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if is_repo_id(name):
        return name
    raise UserError(f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, a Hub repo "
                    "id like org/name, or a local Hugging Face folder")


def download(name: str | None, *, dataset: str | None = None, files: list[str] | None = None,
             revision: str | None = None, out: str | os.PathLike | None = None,
             offline: bool = False, log=None) -> dict[str, Any]:
    """What `gpt download` does: a dataset (``--dataset`` or a known dataset name), a local
    Hugging Face folder (an existing directory), or a Hub model (known name or org/name)."""
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
        return {"kind": "model", **convert_folder(name, out=out, log=log)}
    return {"kind": "model", **download_model(name, revision=revision, out=out,
                                              offline=offline, log=log)}


def download_model(name: str, *, revision: str | None = None, out: str | os.PathLike | None = None,
                   offline: bool = False, log=None) -> dict[str, Any]:
    """Fetch a GPT-2 repo from the Hub (config.json + safetensors, single or sharded), convert it
    and store it as a gptcli checkpoint. Returns what :func:`convert_hf` returns."""
    repo = resolve_repo(name)
    config_path = hub_fetch(repo, "config.json", revision=revision, offline=offline)
    hf_config = _read_hf_config(config_path, repo)
    from_hf(hf_config)  # refuse non-GPT-2 repos before fetching any weights
    fetch = functools.partial(hub_fetch, repo, revision=revision, offline=offline)
    weights = fetch(HF_WEIGHTS, optional=True)
    if weights is not None:
        files = [weights]
    else:
        index = fetch(HF_WEIGHTS_INDEX, optional=True)
        if index is None:
            raise _no_safetensors(repo, revision, offline)
        files = [fetch(shard) for shard in _shards(index, repo)]
    return convert_hf(hf_config, files, out or model_file(name), log=log,
                      source=f"hf:{repo}", revision=commit_of(config_path, revision))


def _no_safetensors(repo: str, revision: str | None, offline: bool) -> GptcliError:
    if _offline(offline):
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


def _read_hf_config(path: Path, where: str) -> dict[str, Any]:
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"config.json of {where} is not readable JSON: {e}") from None
    if not isinstance(hf, dict):
        raise UserError(f"config.json of {where} is not a JSON object")
    return hf


def _shards(index_path: Path, where: str) -> list[str]:
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{HF_WEIGHTS_INDEX} of {where} is damaged: {e}") from None
    bad = [s for s in shards if not s.endswith(".safetensors") or "/" in s or ".." in s]
    if bad:
        raise UserError(f"{HF_WEIGHTS_INDEX} of {where} names files that are not safetensors "
                        f"shards: {bad[:3]}")
    return shards


def convert_folder(folder: str | os.PathLike, *, out: str | os.PathLike | None = None,
                   log=None) -> dict[str, Any]:
    """Convert a local Hugging Face GPT-2 folder (config.json + safetensors), no network."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    hf_config = _read_hf_config(config_path, str(folder))
    from_hf(hf_config)
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_WEIGHTS_INDEX).is_file():
        files = [folder / s for s in _shards(folder / HF_WEIGHTS_INDEX, str(folder))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"shards listed in {HF_WEIGHTS_INDEX} are missing: {missing[:3]}")
    else:
        pickles = [p for p in HF_PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise UserError(f"{folder} has only pickle weights ({pickles[0]}); " + NO_PICKLE)
        raise UserError(f"{folder} has no {HF_WEIGHTS} (nor {HF_WEIGHTS_INDEX})")
    name = folder.resolve().name
    return convert_hf(hf_config, files, out or model_file(name), log=log,
                      source=f"local:{folder.resolve()}")


def convert_hf(hf_config: dict[str, Any], files: list[Path], out: str | os.PathLike, *,
               log=None, **provenance: Any) -> dict[str, Any]:
    """Hugging Face GPT-2 config + safetensors files -> one gptcli checkpoint at ``out``, then
    load it back once to verify. Returns name, path, parameters, size and source."""
    import torch

    from .checkpoint import check_tensors, load_checkpoint, read_safetensors, save_checkpoint
    from .model import GPT
    from .tokenizer import GPT2Tokenizer

    config, _ = from_hf(hf_config)
    if config.vocab_size < GPT2_VOCAB:
        raise UserError(f"this model has vocab_size {config.vocab_size}, fewer than the GPT-2 "
                        f"tokenizer's {GPT2_VOCAB} tokens; gptcli pairs Hub models with the "
                        "GPT-2 tokenizer")
    hf_state = {}
    for path in files:
        hf_state.update(read_safetensors(path)[0])
    if log:
        log(f"converting {len(files)} file(s), {len(hf_state)} tensors")
    config, state = from_hf(hf_config, hf_state)
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, config, "config.json")
    with torch.device("meta"):  # shapes only: the file's tensors become the weights
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    out = Path(out)
    save_checkpoint(out, model, GPT2Tokenizer(), **{k: v for k, v in provenance.items() if v})
    del model, state, hf_state
    verified, _, _ = load_checkpoint(out, finite=True)  # read back what was written
    return {"name": out.stem.replace("--", "/"), "path": str(out.resolve()),
            "parameters": verified.num_params(), "size": out.stat().st_size,
            "source": provenance.get("source"), "revision": provenance.get("revision")}


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
    if _offline(offline) and folder.is_dir():
        have = [p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
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
