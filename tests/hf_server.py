"""A Hugging Face Hub look-alike HTTP server for tests: only what `huggingface_hub` downloads and
uploads need.

It answers ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` (and ``/datasets/{repo}/...``) and
``GET /api/{models,datasets}/{repo}/tree/{revision}`` (the file list) with
the headers the real client checks (``X-Repo-Commit``, ``ETag``, ``Content-Length``, byte ranges)
and the Hub's error codes (``X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound``).
A repo marked ``drop=True`` sends half of each ``.safetensors`` file, then drops the connection,
and drops every later attempt to resume it, like a network that dies mid-download.

Uploads (huggingface_hub 2.4's ``create_repo``, ``create_branch`` and ``create_commit``):
``POST /api/repos/create``, ``/api/validate-yaml`` (README.md front matter, parsed with PyYAML),
``/api/models/{repo}/preupload/{rev}`` (every file "regular": sent inline, base64, in the commit,
so no LFS or Xet server is needed), ``/api/models/{repo}/branch/{name}`` and
``/api/models/{repo}/commit/{rev}`` (NDJSON). Writes need ``Authorization: Bearer <token>`` with
a token in ``writers`` (token -> the namespaces it may write to): none or another is a 401, a
namespace that does not exist a 404, one the token may not write to a 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass
class Repo:
    files: dict[str, bytes]
    repo_type: str = "model"
    drop: bool = False
    commit: str = field(default="")
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # besides main: files

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = self.digest(self.files)

    @staticmethod
    def digest(files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        return digest.hexdigest()

    def at(self, revision: str) -> dict[str, bytes] | None:
        """The files at ``revision`` (main, its commit, or a branch), or None."""
        return self.files if revision in ("main", self.commit) else self.branches.get(revision)


class HubServer:
    """``with HubServer(repos) as hub: ... hub.url ...``; ``repos`` maps ``org/name`` (or
    ``datasets/org/name``) to a Repo. Requests are counted per path in ``hub.requests``."""

    def __init__(self, repos: dict[str, Repo],
                 writers: dict[str, set[str]] | None = None) -> None:
        self.repos = repos
        self.writers = writers or {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                server._answer(self, body=False)

            def do_GET(self) -> None:
                server._answer(self, body=True)

            def do_POST(self) -> None:
                server._post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ request handling

    def _find(self, path: str) -> tuple[str | None, Repo | None, str, str]:
        """(repo key, repo, revision, filename) of a ``.../resolve/REV/FILE`` path."""
        path = unquote(path.split("?", 1)[0]).lstrip("/")
        head, sep, tail = path.partition("/resolve/")
        if not sep or "/" not in tail:
            return None, None, "", ""
        revision, _, filename = tail.partition("/")
        return head, self.repos.get(head), revision, filename

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        if h.path.startswith("/api/"):
            return self._tree(h, body)
        key, repo, revision, filename = self._find(h.path)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        files = repo.at(revision)
        if files is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", repo.commit)
        if filename not in files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", repo.commit)
        data = files[filename]
        dropping = repo.drop and body and filename.endswith(".safetensors")
        start = 0
        ranged = h.headers.get("Range", "")
        if ranged.startswith("bytes="):
            if dropping:  # the network stays down: every resume attempt is cut off at once
                return self._hang_up(h)
            start = int(ranged[len("bytes="):].split("-", 1)[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if dropping:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return self._hang_up(h)
        h.wfile.write(data[start:])

    def _tree(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        """``GET /api/{models,datasets}/{repo}/tree/{revision}``: the repo's files (one page)."""
        path = unquote(h.path.split("?", 1)[0])[len("/api/"):]
        kind, _, rest = path.partition("/")
        repo_id, sep, revision = rest.partition("/tree/")
        key = f"datasets/{repo_id}" if kind == "datasets" else repo_id
        repo = self.repos.get(key)
        if not sep or repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        files = repo.at(revision.split("/")[0])
        if files is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", repo.commit)
        listing = [{"type": "file", "path": name, "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())]
        payload = json.dumps(listing).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    # ------------------------------------------------------------------ uploads

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append((h.command, h.path))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = unquote(h.path.split("?", 1)[0])
        if path == "/api/validate-yaml":
            return self._validate_yaml(h, json.loads(body)["content"])
        allowed = self.writers.get(h.headers.get("Authorization", "").removeprefix("Bearer "))
        if allowed is None:
            return self._error(h, 401, "", "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            request = json.loads(body)
            owner = request["organization"]
            if owner not in allowed and not any(k.startswith(f"{owner}/") for k in self.repos):
                return self._error(h, 404, "", f"Organization {owner} not found")
            if owner not in allowed:
                return self._error(h, 403, "", "You don't have the rights to create a repo here")
            key = f"{owner}/{request['name']}"
            if key in self.repos:
                return self._json(h, 409, {"error": "You already created this model repo",
                                           "url": f"{self.url}/{key}"})
            self.repos[key] = Repo({}, private=request.get("visibility") == "private")
            return self._json(h, 200, {"url": f"{self.url}/{key}"})
        head, _, rest = path.removeprefix("/api/models/").partition("/")
        name, _, rest = rest.partition("/")
        action, _, revision = rest.partition("/")
        key, repo = f"{head}/{name}", self.repos.get(f"{head}/{name}")
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        if head not in allowed:
            return self._error(h, 403, "", "You don't have the rights to write to this repo")
        if action == "branch":
            if repo.at(revision) is not None:
                return self._json(h, 409, {"error": "Reference already exists"})
            repo.branches[revision] = dict(repo.files)
            return self._json(h, 200, {})
        files = repo.at(revision)
        if files is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id")
        if action == "preupload":
            return self._json(h, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]]})
        if action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            commit = Repo.digest(files)
            if files is repo.files:
                repo.commit = commit
            return self._json(h, 200, {"commitUrl": f"{self.url}/{key}/commit/{commit}",
                                       "commitOid": commit, "pullRequestUrl": None})
        return self._error(h, 404, "", "Not found")

    def _validate_yaml(self, h: BaseHTTPRequestHandler, content: str) -> None:
        """README.md's front matter must parse as a YAML mapping, as the Hub requires."""
        import yaml

        errors = []
        if content.startswith("---\n"):
            try:
                if not isinstance(yaml.safe_load(content[4:content.index("\n---", 3)]), dict):
                    errors.append({"message": "metadata is not a mapping"})
            except (ValueError, yaml.YAMLError) as e:
                errors.append({"message": str(e)})
        self._json(h, 400 if errors else 200, {"errors": errors, "warnings": []})

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str,
               commit: str | None = None) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    @staticmethod
    def _hang_up(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
