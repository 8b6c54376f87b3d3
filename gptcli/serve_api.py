"""The two generating endpoints of `gpt serve`: requests in, OpenAI-shaped responses out (whole
or as server-sent events). The rules around them (auth, limits, errors) are in ``serve.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from .scheduler import Choice
from .serve import (CHAT_STOP, ApiError, ChatRequest, CompletionRequest, chat_prompt, collect,
                    events, request_id, sse)


def _prompts(prompt) -> list:
    """A request's prompt(s): text, a list of texts, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt) or [""]


# ----------------------------------------------------------------------------- completions

def legacy_logprobs(entries: list[dict], start: int = 0) -> dict:
    """/v1/completions' log-prob object for a run of token entries."""
    offsets, offset = [], start
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) if e["logprob"] is not None else None
                             for e in entries],
            "text_offset": offsets}


def completion_choice(server, choice: Choice, echo: bool, logprobs: int | None) -> dict:
    prompt_text = server.tokenizer.decode(choice.prompt) if echo else ""
    entries = (choice.prompt_logprobs if echo else []) + choice.logprobs
    return {"index": choice.index, "text": prompt_text + choice.stream.text,
            "logprobs": legacy_logprobs(entries) if logprobs is not None else None,
            "finish_reason": choice.finish_reason}


async def completions_endpoint(server, request, streaming):
    from starlette.responses import JSONResponse, Response

    req: CompletionRequest = await server.body(request, CompletionRequest)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    max_tokens = server.cap(req.max_tokens)
    ids = [server.encode(p, exact=req.echo) for p in _prompts(req.prompt)]
    q, deliver = events(asyncio.get_running_loop())
    job = server.job(req, ids, max_tokens, deliver, logprobs=req.logprobs, echo=req.echo)
    head = {"id": request_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": server.model_id}
    if req.stream:
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs needs stream: false", param="stream")
        echoed = [server.tokenizer.decode(p) for p in ids for _ in range(req.n)] \
            if req.echo else []
        return streaming(sse(completion_chunks(req, q, head, echoed), job),
                         media_type="text/event-stream")
    try:
        done = await collect(q, job, request)
    except asyncio.CancelledError:
        return Response(status_code=499)
    return JSONResponse({**head, "choices": [completion_choice(server, c, req.echo, req.logprobs)
                                             for c in done["choices"]],
                         "usage": done["usage"]})


async def completion_chunks(req: CompletionRequest, q: asyncio.Queue, head: dict,
                            echoed: list[str]) -> AsyncIterator[dict]:
    def chunk(index: int, text: str, logprobs=None, finish=None) -> dict:
        return {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    for index, text in enumerate(echoed):  # echo: each choice's prompt first
        yield chunk(index, text)
    while True:
        event = await q.get()
        if event["type"] == "error":
            raise ApiError(500, event["message"], type="server_error")
        if event["type"] == "step":
            for index, text, logprob in event["pieces"]:
                lp = legacy_logprobs([logprob]) if logprob is not None else None
                if text or lp:
                    yield chunk(index, text, lp)
        elif event["type"] == "done":
            for c in event["choices"]:
                yield chunk(c.index, "", None, c.finish_reason)
            if (req.stream_options or {}).get("include_usage"):
                yield {**head, "choices": [], "usage": event["usage"]}
            return


# ----------------------------------------------------------------------------- chat

def chat_logprobs(entries: list[dict]) -> dict:
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": [{"token": t, "logprob": lp,
                                           "bytes": list(t.encode("utf-8"))}
                                          for t, lp in e["top"]]} for e in entries]}


async def chat_endpoint(server, request, streaming):
    from starlette.responses import JSONResponse, Response

    req: ChatRequest = await server.body(request, ChatRequest)
    max_tokens = server.cap(req.max_completion_tokens or req.max_tokens)
    ids = [server.encode(chat_prompt(req.messages), exact=False)]
    q, deliver = events(asyncio.get_running_loop())
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job = server.job(req, ids, max_tokens, deliver, logprobs=logprobs, echo=False,
                     extra_stop=[CHAT_STOP])
    head = {"id": request_id("chatcmpl"), "object": "chat.completion",
            "created": int(time.time()), "model": server.model_id}
    if req.stream:
        return streaming(sse(chat_chunks(req, q, {**head, "object": "chat.completion.chunk"}),
                             job), media_type="text/event-stream")
    try:
        done = await collect(q, job, request)
    except asyncio.CancelledError:
        return Response(status_code=499)
    return JSONResponse({**head, "choices": [
        {"index": c.index, "message": {"role": "assistant", "content": c.stream.text.lstrip()},
         "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
         "finish_reason": c.finish_reason} for c in done["choices"]],
        "usage": done["usage"]})


async def chat_chunks(req: ChatRequest, q: asyncio.Queue, head: dict) -> AsyncIterator[dict]:
    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    started: set[int] = set()  # the reply's leading space (after "Assistant:") is dropped
    while True:
        event = await q.get()
        if event["type"] == "error":
            raise ApiError(500, event["message"], type="server_error")
        if event["type"] == "step":
            for index, text, logprob in event["pieces"]:
                if index not in started:
                    text = text.lstrip()
                    if text:
                        started.add(index)
                if text or logprob is not None:
                    yield chunk(index, {"content": text},
                                chat_logprobs([logprob]) if logprob is not None else None)
        elif event["type"] == "done":
            for c in event["choices"]:
                yield chunk(c.index, {}, None, c.finish_reason)
            if (req.stream_options or {}).get("include_usage"):
                yield {**head, "choices": [], "usage": event["usage"]}
            return
