"""Uploads to the Hugging Face Hub: `gpt export --push-to-hub ORG/NAME`.

Through ``huggingface_hub``: ``create_repo`` (kept if it exists) and ``create_branch`` for a
``--revision`` that is not there yet, before anything is written (``prepare_push``), then one
``create_commit`` with every file (``push``) (the client
asks the Hub's ``preupload`` endpoint how to send each file: inline, or LFS/Xet for large
ones). The token is huggingface_hub's: ``HF_TOKEN``, else the one ``hf auth login`` saved. It is
never printed; every failure is one sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RuntimeFailure, UserError
from .store import is_repo_id


def check_push(repo: str) -> str:
    """Refuse, before anything is written, a push that cannot work: a bad repo id, offline mode,
    no token. Returns the token."""
    from .hub import offline_mode

    if not is_repo_id(repo) or any(c.isspace() for c in repo):
        raise UserError(f"--push-to-hub takes a Hub repo id like your-name/model-name, not "
                        f"{repo!r}")
    if offline_mode():
        raise UserError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it "
                        "to upload")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("--push-to-hub needs a Hugging Face token with write access: set "
                        "HF_TOKEN, or run `hf auth login` once")
    return token


def prepare_push(repo: str, *, private: bool = False, revision: str | None = None) -> dict:
    """Everything a push needs before the files exist, so that a refusal (no token, a token the
    Hub refuses, an organisation that does not exist) comes before anything is written: the
    token, the Hub reachable, the repo created (``private`` when new) or found, and the branch
    ``revision`` created when missing. Returns what ``push`` takes."""
    from huggingface_hub import HfApi, constants

    from .hub import quiet_hub, unreachable

    token = check_push(repo)
    quiet_hub()
    why = unreachable(constants.ENDPOINT)
    if why is not None:
        raise RuntimeFailure(f"could not reach {constants.ENDPOINT} to upload to {repo} ({why}); "
                             "check the connection or HF_ENDPOINT")
    api = HfApi(token=token)
    step = "create"
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            step = "branch"
            api.create_branch(repo, branch=revision, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - every huggingface_hub / network failure: one line
        raise _push_error(e, repo, revision, step, constants.ENDPOINT) from None
    return {"api": api, "repo": repo, "url": str(url), "revision": revision, "private": private}


def push(files: list[Path], target: dict, *, message: str = "Upload with gpt export",
         log=None) -> dict[str, Any]:
    """Upload ``files`` (each under its own name) in one commit to the repo ``prepare_push``
    made ready. Returns the repo, its URL, the commit, the revision and the file names."""
    from huggingface_hub import CommitOperationAdd, constants

    repo, revision = target["repo"], target["revision"]
    if log:
        log(f"uploading {len(files)} file(s) to {repo}" + (f" ({revision})" if revision else ""))
    try:
        info = target["api"].create_commit(repo, operations=[
            CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files],
            commit_message=message, revision=revision)
    except Exception as e:  # noqa: BLE001 - every huggingface_hub / network failure: one line
        raise _push_error(e, repo, revision, "commit", constants.ENDPOINT) from None
    return {"repo": repo, "url": target["url"], "commit": info.oid,
            "revision": revision or "main", "files": sorted(f.name for f in files),
            "private": target["private"]}


def _push_error(e: BaseException, repo: str, revision: str | None, step: str,
                endpoint: str) -> BaseException:
    """A failed upload as one sentence: what the Hub said, and what to do about it."""
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    from .hub import first_cause, is_network_error

    owner = repo.split("/")[0]
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return UserError(f"{endpoint} refused the token (401 Unauthorized) when uploading to "
                         f"{repo}; set HF_TOKEN to a valid token with write access, or run "
                         "`hf auth login` again")
    if status == 403:
        return UserError(f"the token may not write to {owner!r} on {endpoint} (403 Forbidden); "
                         "use a token with write access to it, or push to your own namespace")
    if status == 404 and step == "create":
        return UserError(f"there is no user or organisation {owner!r} on {endpoint} (404), or "
                         f"the token cannot see it; check the name in --push-to-hub {repo}")
    if isinstance(e, RevisionNotFoundError) or (status == 404 and step == "branch"):
        return UserError(f"model repo {repo} has no revision {revision!r} and it could not be "
                         "created as a branch")
    if status == 404:
        return UserError(f"no model repo {repo!r} on {endpoint} to upload to (404)")
    if isinstance(e, (HfHubHTTPError, OSError)) or is_network_error(e):
        return RuntimeFailure(f"uploading to {repo} on {endpoint} failed ({first_cause(e)}); "
                              "run the same command again")
    if isinstance(e, ValueError):  # huggingface_hub's own checks (e.g. README metadata)
        return UserError(f"the Hub did not accept the upload to {repo}: {first_cause(e)}")
    return e
