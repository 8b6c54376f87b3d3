"""The OpenAI protocol of `gpt serve`: request shapes (validated with pydantic), response and
chunk shapes, log-prob objects, errors in OpenAI's shape, and the one server-sent-events loop
that turns scheduler events into chunks. No HTTP server and no model here: ``server.py`` has
the app, the rules (limits) and the lifecycle; ``guard.py`` the API key and HTTP's own errors;
``scheduler.py`` the decoding.

Requests follow the OpenAI API; ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as
extensions, within the ranges ``SampleConfig`` allows (see ``sampling`` for why every value in
them is safe). Types are strict, as OpenAI's are: ``"5"``, ``true`` or ``5.0`` is not an
integer, ``"yes"`` not a boolean (an integer is a number, though); a field set to null is one
left out (``parse`` drops them before validation). Chat layouts (the template a model was
fine-tuned with, or the plain-text one of base models) are ``chat.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import chat
from ..config import SEED_LIMIT
from ..tokenizer import Tokenizer
from .logprobs import Logprob
from .scheduler import Choice


# ----------------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None


class Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus top_k, min_p and
    repetition_penalty). Numbers must be finite: Python's JSON reader accepts NaN and Infinity."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)
    logit_bias: dict | None = None
    tools: list | None = None  # (known, to be refused: a model of ours calls none)
    response_format: dict | None = None

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
        if self.tools:
            return "tools", "tools are not supported: this model calls no functions"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", (f"response_format {self.response_format.get('type')!r} "
                                       "is not supported; only text")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int = Field(16, ge=0)  # OpenAI's default (null too: it is left out)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt):
        # one message for every wrong shape (a union's errors would name its first member)
        def ids(p) -> bool:
            return isinstance(p, list) and all(type(t) is int for t in p)  # not bools

        if isinstance(prompt, str) or ids(prompt) or isinstance(prompt, list) and (
                all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
            return prompt
        raise ValueError("prompt must be a text, a list of texts, a list of token ids "
                         "(integers) or a list of such lists")

    def prompts(self) -> list:
        """The prompt(s): text, a list of texts, token ids, or a list of token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [self.prompt]
        return list(self.prompt) or [""]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


MAX_DIGITS = 100  # a longer integer in a body fits no field (Python refuses 4,300 and more)


def parse(raw: bytes, shape: type[Sampling]) -> Sampling:
    """A request body as ``shape``, or a 400 that says what is wrong with it: not JSON (or
    nested too deeply), not an object, or a field of the wrong type or out of range. A field
    set to null is one left out, as in OpenAI's API (max_tokens: null is 16 on completions)."""
    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_int=_integer)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # `[[[[...` a hundred thousand deep
        raise ApiError(400, "the body is not valid JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return shape.model_validate({k: v for k, v in data.items() if v is not None})
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        msg = first.get("msg", "").removeprefix("Value error, ")  # our validators' own words
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from None


def _integer(text: str) -> int:
    """An integer of a JSON body (``json.loads``' ``parse_int``): one of more than
    ``MAX_DIGITS`` digits is a 400 that says so (Python's own refusal, from 4,300 digits,
    advises calling ``sys.set_int_max_str_digits``)."""
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise ApiError(400, f"a number in the body is too large ({digits:,} digits)")
    return int(text)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------- log-probs

def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def legacy_logprobs(tokenizer: Tokenizer, entries: list[Logprob]) -> dict:
    """/v1/completions' log-prob object for a run of tokens."""
    tokens = [_text(tokenizer, e.token) for e in entries]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(tokenizer, t): lp for t, lp in e.top}
                             if e.logprob is not None else None for e in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[Logprob]) -> dict:
    """/v1/chat/completions' log-prob object for a run of tokens."""
    def item(token: int, logprob: float | None) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


# ----------------------------------------------------------------------------- responses

def completion_choice(tokenizer: Tokenizer, choice: Choice, echo: bool,
                      logprobs: int | None) -> dict:
    prompt_text = tokenizer.decode(choice.prompt) if echo else ""
    entries = (choice.prompt_logprobs if echo else []) + choice.logprobs
    return {"index": choice.index, "text": prompt_text + choice.stream.text,
            "logprobs": legacy_logprobs(tokenizer, entries) if logprobs is not None else None,
            "finish_reason": choice.finish_reason}


def chat_choice(tokenizer: Tokenizer, choice: Choice, logprobs: bool, template: str) -> dict:
    return {"index": choice.index,
            "message": {"role": "assistant",
                        "content": chat.reply_content(choice.stream.text, template)},
            "logprobs": chat_logprobs(tokenizer, choice.logprobs) if logprobs else None,
            "finish_reason": choice.finish_reason}


class ChunkShape:
    """How one endpoint's streamed chunks look: the chunks that open the stream, a piece of text
    (with its log-prob), and the end of a choice."""

    def __init__(self, head: dict, opening: list[dict], piece: Callable, finish: Callable):
        self.head, self.opening, self.piece, self.finish = head, opening, piece, finish


def completion_chunks(tokenizer: Tokenizer, head: dict, echoed: list[str]) -> ChunkShape:
    def chunk(index: int, text: str, logprobs=None, finish=None) -> dict:
        return {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    def piece(index: int, text: str, logprob: Logprob | None) -> dict | None:
        lp = legacy_logprobs(tokenizer, [logprob]) if logprob is not None else None
        return chunk(index, text, lp) if text or lp else None

    return ChunkShape(head, [chunk(i, text) for i, text in enumerate(echoed)], piece,
                      lambda index, reason: chunk(index, "", None, reason))


def chat_chunks(tokenizer: Tokenizer, head: dict, n: int, template: str) -> ChunkShape:
    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    # A reply's start is trimmed as chat.reply_content trims the whole text: the text before
    # the first content is held (by choice) and trimmed as one, so the deltas join to exactly
    # what a non-streamed request returns.
    leading: dict[int, str] = {}
    started: set[int] = set()

    def piece(index: int, text: str, logprob: Logprob | None) -> dict | None:
        if index not in started:
            leading[index] = leading.get(index, "") + text
            text = chat.reply_content(leading[index], template)
            if text:
                started.add(index)
                del leading[index]
        if not text and logprob is None:
            return None
        return chunk(index, {"content": text},
                     chat_logprobs(tokenizer, [logprob]) if logprob is not None else None)

    return ChunkShape(head, [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)],
                      piece, lambda index, reason: chunk(index, {}, None, reason))


# ----------------------------------------------------------------------------- streaming

async def chunks(q: asyncio.Queue, shape: ChunkShape, include_usage: bool,
                 ) -> AsyncIterator[dict]:
    """The one loop from scheduler events to chunks: pieces as they come, then each choice's
    end and (when asked) the usage. A failed job raises ``ApiError`` (500, or 503 when the
    server is shutting down)."""
    for chunk in shape.opening:
        yield chunk
    while True:
        event = await q.get()
        if event["type"] == "error":
            raise ApiError(event.get("status", 500), event["message"])
        if event["type"] == "step":
            for index, text, logprob in event["pieces"]:
                if (chunk := shape.piece(index, text, logprob)) is not None:
                    yield chunk
        elif event["type"] == "done":
            for choice in event["choices"]:
                yield shape.finish(choice.index, choice.finish_reason)
            if include_usage:
                yield {**shape.head, "choices": [], "usage": event["usage"]}
            return


async def sse(stream: AsyncIterator[dict], on_close: Callable[[], None],
              on_error: Callable[[ApiError], None] = lambda e: None) -> AsyncIterator[bytes]:
    """Server-sent events ending with ``[DONE]``. A failure after the response has started is
    sent as an error event (OpenAI's shape) before ``[DONE]`` and reported to ``on_error`` (the
    log), so a client never sees a stream cut off without a word; when the client goes away,
    the ASGI server cancels this generator and ``on_close`` lets the job leave the batch."""
    try:
        async for chunk in stream:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except Exception as e:  # noqa: BLE001 - whatever it was, the stream ends in OpenAI's shape
        error = e if isinstance(e, ApiError) else ApiError(500, f"{type(e).__name__}: {e}")
        on_error(error)
        yield f"data: {json.dumps(error.body())}\n\n".encode()
    finally:
        on_close()
    yield b"data: [DONE]\n\n"
