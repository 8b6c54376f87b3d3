"""`gpt serve`: an OpenAI-compatible HTTP API in front of the continuous-batching scheduler.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``. Request and response shapes follow the OpenAI API, errors too
(``{"error": {"message", "type", "param", "code"}}``); ``top_k`` and ``repetition_penalty`` are
accepted as extensions. Built on Starlette and served by uvicorn (the ``serve`` extra): Starlette
rather than FastAPI because the request models and the error format are ours to keep exactly
OpenAI's, and Starlette is all of FastAPI this needs (FastAPI's own validation errors would have
to be rewritten anyway).

Chat: base GPT-2 models have no chat format, so messages are laid out as plain text, one
``System:``, ``User:`` or ``Assistant:`` line per message, ending with ``Assistant:``; generation
stops before the model starts a new ``User:`` line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import SEED_LIMIT, SampleConfig
from .scheduler import Job, Scheduler

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


# ----------------------------------------------------------------------------- request shapes

class Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus top_k and repetition_penalty)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: dict | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, (f"{name} is not supported; use repetition_penalty (an extension: "
                              "above 1 discourages repeating earlier tokens)")
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def chat_prompt(messages: list[Message]) -> str:
    """The documented plain-text chat layout (see the module docstring)."""
    lines = [f"{ROLES[m.role]}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# ----------------------------------------------------------------------------- the app

class Server:
    """The served model and the rules of the API around the scheduler."""

    def __init__(self, model, tokenizer, *, model_id: str, max_batch: int = 8,
                 max_tokens: int = 1024, api_key: str | None = None,
                 max_body: int = 1 << 20) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.scheduler = Scheduler(model, tokenizer, max_batch)
        self.max_tokens, self.api_key, self.max_body = max_tokens, api_key, max_body
        self.context = model.config.context_length
        self.created = int(time.time())

    # -- request handling

    async def body(self, request, shape: type[BaseModel]) -> BaseModel:
        if self.api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                               code="invalid_api_key")
        size = int(request.headers.get("content-length") or 0)
        if size > self.max_body:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of "
                                f"{self.max_body}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            parsed = shape.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(400, f"{param}: {first.get('msg')}" if param else first.get("msg"),
                           param=param) from None
        if parsed.model not in (None, self.model_id):
            raise ApiError(404, f"the model {parsed.model!r} does not exist; this server has "
                                f"{self.model_id!r}", param="model", code="model_not_found")
        if bad := parsed.unsupported():
            raise ApiError(400, bad[1], param=bad[0])
        return parsed

    def encode(self, prompt: str | list[int], exact: bool) -> list[int]:
        """Token ids of a prompt: text or ids. Over the context, the last tokens are kept (the
        window slides as in `gpt generate`), unless ``exact`` (echo / prompt log-probs)."""
        from .sampling import prompt_ids

        if isinstance(prompt, list):
            if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise ApiError(400, "prompt token ids must be within the vocabulary",
                               param="prompt")
            ids = prompt or prompt_ids(self.tokenizer, "", self.context)[0]
        else:
            try:
                ids = self.tokenizer.encode(prompt) if prompt else \
                    prompt_ids(self.tokenizer, "", self.context)[0]
            except Exception as e:  # noqa: BLE001 - a char model meets an unknown character
                raise ApiError(400, str(e), param="prompt") from None
        if exact and len(ids) > self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; echo and logprobs over the "
                                f"prompt need it within the context of {self.context}",
                           param="prompt")
        return ids[-self.context:]

    def job(self, request: Sampling, prompts: list[list[int]], max_tokens: int, deliver, *,
            logprobs: int | None, echo: bool, extra_stop: list[str] = ()) -> Job:
        config = SampleConfig(max_new_tokens=max(1, max_tokens), temperature=request.temperature,
                              top_k=request.top_k, top_p=request.top_p,
                              repetition_penalty=request.repetition_penalty,
                              seed=request.seed, stop=[*request.stop, *extra_stop])
        if max_tokens == 0:
            config = config.model_copy(update={"max_new_tokens": 0})
        job = Job(prompts, request.n, config, deliver, logprobs=logprobs,
                  echo_logprobs=echo and logprobs is not None)
        try:
            self.scheduler.submit(job)
        except ValueError as e:
            raise ApiError(400, str(e), param="n") from None
        return job

    def cap(self, max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                f"{self.max_tokens} (--max-tokens)", param="max_tokens")
        return self.max_tokens if max_tokens is None else max_tokens


def events(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, Any]:
    """A queue on this event loop, and a callback the scheduler thread can call into it."""
    q: asyncio.Queue = asyncio.Queue()
    return q, lambda event: loop.call_soon_threadsafe(q.put_nowait, event)


async def collect(q: asyncio.Queue, job: Job, request) -> dict:
    """Wait for a job's final event; a client that disconnects meanwhile cancels it."""
    while True:
        try:
            event = await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise asyncio.CancelledError from None
            continue
        if event["type"] == "error":
            raise ApiError(500, event["message"], type="server_error")
        if event["type"] == "done":
            return event


async def sse(chunks: AsyncIterator[dict], job: Job) -> AsyncIterator[bytes]:
    """Server-sent events ending with ``[DONE]``; when the client goes away, Starlette cancels
    this generator and the job leaves the batch."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()


def create_app(server: Server, *, scheduler_thread: bool = True):
    """The Starlette application. With ``scheduler_thread`` the scheduler runs on a thread of
    its own while the app runs; otherwise the caller runs its loop (``run_server`` does, on
    the main thread)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from .serve_api import chat_endpoint, completions_endpoint

    @asynccontextmanager
    async def lifespan(app):
        if scheduler_thread:
            server.scheduler.start()
        yield
        if scheduler_thread:
            server.scheduler.stop()

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(server, request, StreamingResponse)
            except ApiError as e:
                return e.response()
            except Exception as e:  # noqa: BLE001 - a request never takes the server down
                return ApiError(500, f"{type(e).__name__}: {e}", type="server_error").response()
        return endpoint

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": server.model_id, "object": "model", "created": server.created,
            "owned_by": "gptcli", "context_length": server.context,
            "meta": {"parameters": server.model.num_params(),
                     "context_length": server.context,
                     "vocab_size": server.model.config.vocab_size}}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": server.model_id,
                             "requests": server.scheduler.busy()})

    async def not_found(request, exc):
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    return Starlette(routes=[
        Route("/v1/completions", guarded(completions_endpoint), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_endpoint), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={404: not_found})


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_port(host: str, port: int) -> None:
    """Fail with one sentence now, not in uvicorn's log, when the address cannot be used."""
    import socket

    from .runtime import UserError, os_error_reason

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {os_error_reason(e)}; pick another "
                        "--port (or stop what uses it)") from None


def run_server(load, cfg, log) -> int:
    """`gpt serve`: load the model, print how to reach it, and serve until Ctrl-C / SIGTERM.

    The scheduler (all the torch work) runs on the main thread and uvicorn on a second one:
    decoding from a second thread measured ~20% slower here. A signal asks uvicorn to shut down
    gracefully: it stops accepting connections while the scheduler finishes the requests in
    flight (up to 10 s); a second signal stops at once. Returns the exit status: 130 after
    Ctrl-C, 143 after SIGTERM, as `gpt train` does.
    """
    import signal
    import threading

    from .models import display_name, load_model
    from .runtime import RuntimeFailure, require

    require("starlette", "serve", needed_for="gpt serve")
    uvicorn = require("uvicorn", "serve", needed_for="gpt serve")
    check_port(cfg.host, cfg.port)
    model, tokenizer, path = load_model(load.model, device=load.device, dtype=load.dtype,
                                        quantize=load.quantize)
    server = Server(model, tokenizer, model_id=display_name(path), max_batch=cfg.max_batch,
                    max_tokens=cfg.max_tokens, api_key=cfg.api_key, max_body=cfg.max_body)
    http = uvicorn.Server(uvicorn.Config(create_app(server, scheduler_thread=False),
                                         host=cfg.host, port=cfg.port, log_level="warning",
                                         timeout_graceful_shutdown=10))
    received: list[int] = []

    def on_signal(signum, frame):
        if received:  # a second Ctrl-C: do not wait
            raise KeyboardInterrupt
        received.append(signum)
        http.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http.run, name="gptcli-http", daemon=True)
    url = f"http://{cfg.host}:{cfg.port}"
    auth = f' -H "Authorization: Bearer {cfg.api_key}"' if cfg.api_key else ""
    try:
        thread.start()
        while thread.is_alive() and not http.started:
            time.sleep(0.01)
        if not http.started:
            raise RuntimeFailure(f"the HTTP server could not start on {cfg.host}:{cfg.port}")
        log(f"serving {server.model_id} ({path}, {model.num_params():,} parameters, up to "
            f"{cfg.max_batch} sequences at once) at {url}/v1")
        log(f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d "
            f"'{{\"prompt\": \"Hello\", \"max_tokens\": 20}}'")
        log("Ctrl-C stops it")
        while thread.is_alive():
            server.scheduler.run_once()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.scheduler.stop()
    log("stopped: in-flight requests finished or timed out")
    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(received[0], 0) if received else 0
