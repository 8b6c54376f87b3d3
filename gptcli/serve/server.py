"""`gpt serve`: the HTTP server in front of the continuous-batching scheduler: the app and its
routes, the rules around each request (body size, limits, which model, the chat template), and
the lifecycle (start, Ctrl-C / SIGTERM, drain). Request and response shapes are
``protocol.py``; the API key and the errors that are not an endpoint's are ``guard.py``; the
checks made before a model is loaded (the address, the memory --max-batch needs) ``startup.py``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``. Built on Starlette and served by uvicorn (the ``serve`` extra): Starlette rather
than FastAPI because the request models and the error format are ours to keep exactly OpenAI's,
and Starlette is all of FastAPI this needs (FastAPI's own validation errors would have to be
rewritten anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from .. import chat
from ..config import SampleConfig
from ..errors import UserError, validation_message
from ..generate import prompt_ids
from .guard import guard, h11_protocol, http_error, require_key
from .protocol import (ApiError, ChatRequest, CompletionRequest, Sampling, chat_choice,
                       chat_chunks, chunks, completion_choice, completion_chunks, parse,
                       request_id, sse)
from .scheduler import Job, Scheduler
from .startup import check_address, check_batch

DRAIN_S = 10.0  # at Ctrl-C / SIGTERM, the requests in flight get this long to finish


class Server:
    """The served model and the rules of the API around the scheduler. ``chat_template`` is the
    model's chat layout (``chat.template_for`` its checkpoint metadata); ``log`` gets one line
    per failed request."""

    def __init__(self, model, tokenizer, *, model_id: str, max_batch: int = 8,
                 max_tokens: int = 1024, api_key: str | None = None,
                 max_body: int = 1 << 20, chat_template: str = chat.PLAIN,
                 log: Callable[[str], None] = lambda line: None, draft=None,
                 draft_id: str | None = None) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.scheduler = Scheduler(model, tokenizer, max_batch, draft)
        self.draft_id = draft_id
        self.max_tokens, self.api_key, self.max_body = max_tokens, api_key, max_body
        self.chat_template, self.log = chat_template, log
        self.context = model.config.context_length
        self.created = int(time.time())

    # -- request handling

    async def body(self, request, shape: type[BaseModel]) -> BaseModel:
        size = int(request.headers.get("content-length") or 0)
        if size > self.max_body:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of "
                                f"{self.max_body}")
        raw = await self.read(request)
        parsed = parse(raw, shape)
        if parsed.model not in (None, self.model_id):
            raise ApiError(404, f"the model {parsed.model!r} does not exist; this server has "
                                f"{self.model_id!r}", param="model", code="model_not_found")
        if bad := parsed.unsupported():
            raise ApiError(400, bad[1], param=bad[0])
        return parsed

    async def read(self, request) -> bytes:
        """The body, up to ``max_body`` bytes. It is read a message at a time, looking up every
        half second: once the server is shutting down, a body still arriving is refused (503)
        rather than waited for, as any request not yet decoding is."""
        raw = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), 0.5)
            except asyncio.TimeoutError:
                if self.scheduler.closing:
                    raise ApiError(503, "the server is shutting down") from None
                continue
            if message["type"] == "http.disconnect":
                raise ApiError(499, "the client went away before sending the whole body")
            raw += message.get("body", b"")
            if len(raw) > self.max_body:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes")
            if not message.get("more_body", False):
                return bytes(raw)

    def encode(self, prompt: str | list[int], exact: bool) -> list[int]:
        """Token ids of a prompt: text or ids. Over the context, the last tokens are kept (the
        window slides as in `gpt generate`), unless ``exact`` (echo / prompt log-probs)."""
        if isinstance(prompt, list):
            if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise ApiError(400, "prompt token ids must be within the vocabulary",
                               param="prompt")
            ids = prompt or [self.tokenizer.start_id]
        else:
            try:
                ids = prompt_ids(self.tokenizer, prompt, 1 << 62)[0]
            except (ValueError, UserError) as e:  # a char model meets an unknown character
                raise ApiError(400, str(e), param="prompt") from None
        if exact and len(ids) > self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; echo and logprobs over the "
                                f"prompt need it within the context of {self.context}",
                           param="prompt")
        return ids[-self.context:]

    def job(self, request: Sampling, prompts: list[list[int]], max_tokens: int, deliver, *,
            logprobs: int | None, echo: bool, extra_stop: list[str] = ()) -> Job:
        if self.scheduler.closing:
            raise ApiError(503, "the server is shutting down")
        try:
            config = SampleConfig(max_new_tokens=max(1, max_tokens),
                                  temperature=request.temperature, top_k=request.top_k,
                                  top_p=request.top_p, min_p=request.min_p,
                                  repetition_penalty=request.repetition_penalty,
                                  seed=request.seed, stop=[*request.stop, *extra_stop])
        except ValidationError as e:  # the request's own checks should have caught it
            raise ApiError(400, validation_message(e)) from None
        if max_tokens == 0:  # echo only: model_copy skips the validator (max_new_tokens >= 1),
            # which is right for `gpt generate` but not here (the scheduler finishes such a job
            # at once, after the prompt's log-probs)
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

    def chat_ids(self, request: ChatRequest) -> list[int]:
        """The conversation in the model's chat layout, as token ids."""
        try:
            ids = chat.prompt_tokens(request.messages, self.tokenizer, self.chat_template)
        except (ValueError, UserError) as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.encode(ids, exact=False)


def events(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, Any]:
    """A queue on this event loop, and a callback the scheduler thread can call into it (an
    error once the loop has closed: the scheduler then counts the client as gone)."""
    q: asyncio.Queue = asyncio.Queue()
    return q, lambda event: loop.call_soon_threadsafe(q.put_nowait, event)


async def collect(q: asyncio.Queue, job: Job, request) -> dict | None:
    """Wait for a job's final event; None when the client disconnected meanwhile. The job is
    cancelled then, at once (it leaves the batch at the next step), and when this wait is (at
    shutdown). The connection is watched beside the queue, not between its events: a job
    delivers an event every step, so a wait for a quiet queue would never come."""
    watcher = asyncio.ensure_future(gone(request, q))
    try:
        while True:
            event = await q.get()
            if event["type"] == "gone":
                job.cancel()
                return None
            if event["type"] == "error":
                raise ApiError(event.get("status", 500), event["message"])
            if event["type"] == "done":
                return event
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        watcher.cancel()


async def gone(request, q: asyncio.Queue) -> None:
    """Put ``{"type": "gone"}`` in ``q`` once the client disconnects. The body has been read:
    what ``receive`` says next is the disconnect (it waits for it), as Starlette's streaming
    responses listen for it."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    q.put_nowait({"type": "gone"})


# ----------------------------------------------------------------------------- endpoints

async def respond(server: Server, request, q: asyncio.Queue, job: Job, req: Sampling, shape,
                  whole):
    """A job's answer: streamed as server-sent events in ``shape`` (``req.stream``), or once it
    is done as ``whole(done_event)``; a client that left meanwhile gets nothing (499)."""
    from starlette.responses import JSONResponse, Response, StreamingResponse

    if req.stream:
        def on_error(e: ApiError) -> None:
            server.log(f"{request.method} {request.url.path}: {e.status} {e.message} "
                       "(in the stream)")

        return StreamingResponse(sse(chunks(q, shape, req.include_usage), job.cancel, on_error),
                                 media_type="text/event-stream")
    done = await collect(q, job, request)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(whole(done))


async def completions_endpoint(server: Server, request):
    req: CompletionRequest = await server.body(request, CompletionRequest)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.stream and req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs needs stream: false", param="stream")
    max_tokens = server.cap(req.max_tokens)
    ids = [server.encode(p, exact=req.echo) for p in req.prompts()]
    q, deliver = events(asyncio.get_running_loop())
    job = server.job(req, ids, max_tokens, deliver, logprobs=req.logprobs, echo=req.echo)
    head = {"id": request_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": server.model_id}
    echoed = [server.tokenizer.decode(p) for p in ids for _ in range(req.n)] if req.echo else []
    return await respond(server, request, q, job, req,
                         completion_chunks(server.tokenizer, head, echoed),
                         lambda done: {**head, "usage": done["usage"], "choices": [
                             completion_choice(server.tokenizer, c, req.echo, req.logprobs)
                             for c in done["choices"]]})


async def chat_endpoint(server: Server, request):
    req: ChatRequest = await server.body(request, ChatRequest)
    if req.top_logprobs is not None and not req.logprobs:  # as OpenAI refuses it
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = server.cap(req.max_completion_tokens or req.max_tokens)
    ids = [server.chat_ids(req)]
    q, deliver = events(asyncio.get_running_loop())
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    template = server.chat_template
    job = server.job(req, ids, max_tokens, deliver, logprobs=logprobs, echo=False,
                     extra_stop=chat.stop_strings(template))
    head = {"id": request_id("chatcmpl"), "object": "chat.completion",
            "created": int(time.time()), "model": server.model_id}
    shape = chat_chunks(server.tokenizer, {**head, "object": "chat.completion.chunk"}, req.n,
                        template)
    return await respond(server, request, q, job, req, shape,
                         lambda done: {**head, "usage": done["usage"], "choices": [
                             chat_choice(server.tokenizer, c, req.logprobs, template)
                             for c in done["choices"]]})


# ----------------------------------------------------------------------------- the app

def create_app(server: Server):
    """The ASGI application: Starlette's routes behind ``guard.py``'s layers. The scheduler's
    loop runs apart from it: ``run_server`` runs it on the main thread (tests start it on a
    thread with ``server.scheduler.start()``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(server, request)
            except ApiError as e:
                server.log(f"{request.method} {request.url.path}: {e.status} {e.message}")
                return e.response()
        return endpoint

    async def models(server, request):
        return JSONResponse({"object": "list", "data": [{
            "id": server.model_id, "object": "model", "created": server.created,
            "owned_by": "gptcli", "context_length": server.context,
            "meta": {"parameters": server.model.num_params(),
                     "context_length": server.context,
                     "vocab_size": server.model.config.vocab_size}}]})

    async def health(server, request):
        body = {"status": "ok", "model": server.model_id, "requests": server.scheduler.busy()}
        engine = server.scheduler.engine
        if engine.draft is not None:  # speculative decoding's tally since the start
            proposed, accepted = engine.proposed, engine.accepted
            body["draft"] = {"model": server.draft_id, "tokens_a_round": engine.draft.tokens,
                             "proposed": proposed, "accepted": accepted,
                             "acceptance_rate": accepted / proposed if proposed else None}
        return JSONResponse(body)

    async def internal(request, exc):  # Starlette's last resort, in OpenAI's shape
        return ApiError(500, f"{type(exc).__name__}: {exc}").response()

    app = Starlette(routes=[
        Route("/v1/completions", guarded(completions_endpoint), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_endpoint), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: internal})
    return guard(require_key(app, server.api_key), server.log)


def http_server(server: Server, host: str, port: int):
    """The uvicorn server for ``server``'s app (not yet running): h11 with ``guard``'s 400s, and a
    graceful shutdown that waits ten seconds longer than the scheduler's drain. Connections
    still writing are given up half a second after the drain (``guard.h11_protocol``), which
    ends the wait, so a normal shutdown takes no longer for the margin; with only half a
    second more, a test run on a busy machine saw uvicorn's wait run out first (an ERROR line
    saying it cancelled nothing), and three seconds leave little for a starved event loop."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port,
                                         log_level="warning", http=h11_protocol(DRAIN_S),
                                         timeout_graceful_shutdown=int(DRAIN_S) + 10))


def run_server(load, cfg, log) -> int:
    """`gpt serve`: load the model, print how to reach it, and serve until Ctrl-C / SIGTERM.

    The scheduler (all the torch work) runs on the main thread and uvicorn on a second one:
    decoding from a second thread measured ~20% slower here. A signal asks uvicorn to shut down
    gracefully (it stops accepting connections and closes idle ones) and the scheduler to
    drain: requests not decoding yet get a 503 (one whose body is still arriving too), those
    decoding go on for up to ``DRAIN_S`` and then end with a 503, so every response is complete
    before uvicorn stops waiting for them; a connection whose client stopped reading is closed
    then (``guard.h11_protocol``). A second signal stops at once. Returns the exit status: 130
    after Ctrl-C, 143 after SIGTERM, as `gpt train` does.
    """
    import signal
    import threading

    from ..checkpoint import read_safetensors
    from ..errors import RuntimeFailure, require
    from ..generate import find_draft, load_draft
    from ..locate import find_model, load_model
    from ..models import display_name

    require("starlette", "serve", needed_for="gpt serve")
    require("uvicorn", "serve", needed_for="gpt serve")
    address = check_address(cfg.host, cfg.port)
    path = find_model(load.model)
    draft_path = None if load.draft_model is None else find_draft(load.draft_model)
    check_batch(path, cfg.max_batch, load.device, load.dtype, load.quantize, draft_path)
    model, tokenizer, path = load_model(path, device=load.device, dtype=load.dtype,
                                        quantize=load.quantize, kernel=load.kernel,
                                        rows=(1, cfg.max_batch))
    draft = None if draft_path is None else load_draft(
        draft_path, tokenizer, path, device=load.device, dtype=load.dtype, quantize=load.quantize,
        kernel=load.kernel, rows=(1, cfg.max_batch), compile=False, tokens=load.draft_tokens)
    template = chat.template_for(read_safetensors(path, tensors=False)[1])
    server = Server(model, tokenizer, model_id=display_name(path), max_batch=cfg.max_batch,
                    max_tokens=cfg.max_tokens, api_key=cfg.api_key, max_body=cfg.max_body,
                    chat_template=template, log=log, draft=draft,
                    draft_id=None if draft_path is None else display_name(draft_path))
    http = http_server(server, cfg.host, cfg.port)
    received: list[int] = []

    def on_signal(signum, frame):
        if received:  # a second Ctrl-C: do not wait
            raise KeyboardInterrupt
        received.append(signum)
        server.scheduler.drain(DRAIN_S)
        http.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http.run, name="gptcli-http", daemon=True)
    url = f"http://{address}"
    auth = ' -H "Authorization: Bearer $KEY"' if cfg.api_key else ""  # (not the key: logs)
    try:
        thread.start()
        while thread.is_alive() and not http.started:
            time.sleep(0.01)
        if not http.started:
            raise RuntimeFailure(f"the HTTP server could not start on {address}")
        log(f"serving {server.model_id} ({path}, {model.num_params():,} parameters, up to "
            f"{cfg.max_batch} sequences at once) at {url}/v1")
        if draft is not None:
            log(f"speculative decoding with the draft model {server.draft_id} "
                f"({draft.model.num_params():,} parameters, {draft.tokens} tokens a round; "
                f"its acceptance: {url}/health)")
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
