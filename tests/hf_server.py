"""A Hugging Face Hub look-alike HTTP server for tests: only what `huggingface_hub` downloads need.

It answers ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` (and ``/datasets/{repo}/...``) and
``GET /api/{models,datasets}/{repo}/tree/{revision}`` (the file list) with
the headers the real client checks (``X-Repo-Commit``, ``ETag``, ``Content-Length``, byte ranges)
and the Hub's error codes (``X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound``).
A repo marked ``drop=True`` sends half of each ``.safetensors`` file, then drops the connection,
and drops every later attempt to resume it, like a network that dies mid-download.
"""

from __future__ import annotations

import hashlib
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

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = digest.hexdigest()


class HubServer:
    """``with HubServer(repos) as hub: ... hub.url ...``; ``repos`` maps ``org/name`` (or
    ``datasets/org/name``) to a Repo. Requests are counted per path in ``hub.requests``."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
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
        if revision not in ("main", repo.commit):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", repo.commit)
        if filename not in repo.files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", repo.commit)
        data = repo.files[filename]
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
        import json

        path = unquote(h.path.split("?", 1)[0])[len("/api/"):]
        kind, _, rest = path.partition("/")
        repo_id, sep, revision = rest.partition("/tree/")
        key = f"datasets/{repo_id}" if kind == "datasets" else repo_id
        repo = self.repos.get(key)
        if not sep or repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        if revision.split("/")[0] not in ("main", repo.commit):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", repo.commit)
        listing = [{"type": "file", "path": name, "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(repo.files.items())]
        payload = json.dumps(listing).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str,
               commit: str | None = None) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        h.send_response(status)
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
