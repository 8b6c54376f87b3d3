"""The edges of `gpt serve`'s HTTP: whatever a client gets back that is not an endpoint's own
answer. Every error is OpenAI's JSON shape, and reaches the log as one line, never a traceback.

- ``require_key``: with ``--api-key``, every ``/v1/`` path needs it (OpenAI's API asks for the
  key before anything else, so a client without it learns nothing, not even which routes
  exist); ``/health`` stays open for probes and load balancers.
- ``http_error``: Starlette's own answers (404 for an unknown path, 405 with its ``Allow``
  header for a wrong method) in OpenAI's shape instead of plain text.
- ``guard``: the outermost layer. An exception no endpoint caught becomes a 500 and one log
  line; a request that uvicorn cancels at shutdown (one whose body never finished arriving when
  the graceful wait ran out) gets a 503 instead of a traceback.
- ``h11_protocol``: uvicorn's HTTP/1.1 protocol, answering malformed HTTP with a 400 in
  OpenAI's shape. When a response is already under way on that connection (a client that
  sends garbage after a request it did not finish), uvicorn's own 400 raises h11's
  LocalProtocolError, logged as a traceback; here the connection is simply closed. At shutdown,
  a connection still open once the drain is over (its client stopped reading: a response
  unfinished, its writes waiting for ever, or finished but still in the server's buffer) is
  closed, so uvicorn's graceful wait ends on time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from ..errors import require
from .protocol import ApiError

Log = Callable[[str], None]


def is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def bearer(scope: dict) -> bytes:
    """The key of an ``Authorization: Bearer KEY`` header (empty without one)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value[7:].strip() if value[:7].lower() == b"bearer " else b""
    return b""


def require_key(app, key: str | None):
    """``app`` behind the API key (see the module docstring); without a key, ``app`` itself."""
    if key is None:
        return app
    expected = key.encode()

    async def checked(scope, receive, send):
        if scope["type"] == "http" and is_api(scope["path"]) and \
                not hmac.compare_digest(bearer(scope), expected):
            error = ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await app(scope, receive, send)
    return checked


async def http_error(request, exc):
    """Starlette's HTTPException (404, 405, ...) as an OpenAI error, with its headers."""
    path = request.url.path
    if exc.status_code == 404:
        error = ApiError(404, f"no route {path}", code="not_found")
    elif exc.status_code == 405:
        # Starlette lists the methods from a set, in any order: sorted, they read the same
        allowed = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
        error = ApiError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                         code="method_not_allowed", headers={"Allow": allowed})
    else:
        error = ApiError(exc.status_code, str(exc.detail), headers=exc.headers)
    return error.response()


def guard(app, log: Log):
    """The outermost ASGI layer (see the module docstring)."""
    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        state = {"started": False, "complete": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await app(scope, receive, tracked)
            return
        except asyncio.CancelledError:
            error = ApiError(503, "the server is shutting down")
        except Exception as e:  # noqa: BLE001 - the server outlives any one request
            error = ApiError(500, f"{type(e).__name__}: {e}")
            log(f"{scope['method']} {scope['path']}: {error.status} {error.message}")
        try:
            if not state["started"]:
                await error.response()(scope, receive, send)
            elif not state["complete"]:  # end the body that was under way
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the connection is gone
            pass
    return guarded


def h11_protocol(drain_s: float):
    """uvicorn's h11 protocol class, with malformed HTTP answered and connections given up
    ``drain_s`` (and a little) after the shutdown started, as described above."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    h11 = require("h11", "serve", needed_for="gpt serve")  # uvicorn's HTTP/1.1 parser

    body = json.dumps(ApiError(400, "the request is not valid HTTP/1.1").body()).encode()

    class Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            try:
                headers = [(b"content-type", b"application/json"),
                           (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close")]
                response = h11.Response(status_code=400, headers=headers,
                                        reason=b"Bad Request")
                for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass  # a response is already under way: nothing more can be said here
            self.close()

        def shutdown(self) -> None:
            super().shutdown()
            self.loop.call_later(drain_s + 0.5, self.give_up)

        def give_up(self) -> None:
            # Still open after the drain: a response not complete, or one complete but held in
            # the buffer of a client that stopped reading (closing waits for it to be read, and
            # uvicorn's shutdown for that close). What waits to be written never will be.
            t = self.transport
            if not t.is_closing() or t.get_write_buffer_size():
                self.close(abort=True)

        def close(self, abort: bool = False) -> None:
            """Close the connection now; the app's answer, if it comes, goes nowhere (as it
            would once the close is noticed), quietly."""
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            if self.flow is not None:
                self.flow.resume_writing()  # a write waiting for the client returns

    return Protocol
