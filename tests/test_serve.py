"""`gpt serve` through the real openai client over HTTP, against a uvicorn server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests use the openai client")
uvicorn = pytest.importorskip("uvicorn", reason="gpt serve needs the serve extra")

from gptcli import chat  # noqa: E402
from gptcli.errors import install_command  # noqa: E402
from gptcli.checkpoint import save_checkpoint  # noqa: E402
from gptcli.config import SampleConfig  # noqa: E402
from gptcli.models import load_model  # noqa: E402
from gptcli.model import GPT  # noqa: E402
from gptcli.generate import generate, prompt_ids  # noqa: E402
from gptcli.serve.server import Server, http_server  # noqa: E402
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

from conftest import randomize_, startup_seconds, tiny_config  # noqa: E402

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
KEY = "secret-key"


@pytest.fixture
def uvicorn_log():
    """The records uvicorn logs during a test. uvicorn's own logging config makes its "uvicorn"
    logger non-propagating, so they never reach the root logger (where pytest before 9 puts
    ``caplog``'s handler): listen to that logger itself."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny character model (context 32, so long requests slide their window) behind a real
    uvicorn server on a free loopback port, in a thread of this process."""
    folder = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_config(vocab_size=len(CHARS))), seed=11)
    path = save_checkpoint(folder / "tiny.safetensors", model, CharTokenizer(CHARS))
    model, tokenizer, _ = load_model(str(path), device="cpu")
    log: list[str] = []
    server = Server(model, tokenizer, model_id="tiny", max_batch=4, max_tokens=200,
                    api_key=KEY, max_body=4096, log=log.append)
    port = free_port()
    server.scheduler.start()  # `gpt serve` runs it on the main thread; here, beside the tests
    uv = http_server(server, "127.0.0.1", port)  # the app and uvicorn settings of gpt serve
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "server": server, "model": model,
           "tokenizer": tokenizer, "path": path, "log": log}
    uv.should_exit = True
    thread.join(15)
    server.scheduler.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)


def reference(served, prompt: str, **settings) -> list[str]:
    """What `gpt generate` makes of the same prompt and settings (the library calls it makes:
    a prompt over the context keeps its last tokens)."""
    tok, model = served["tokenizer"], served["model"]
    ids, _ = prompt_ids(tok, prompt, model.config.context_length)
    samples, _ = generate(model, tok, ids, SampleConfig(**settings))
    return [s.text for s in samples]


def call(served, method: str, path: str, body=None, key: str | None = KEY,
         raw: bytes | None = None):
    """(status, headers, parsed JSON body) of an HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(served["url"] + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def post(served, path: str, body, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON body) of a POST."""
    status, _, reply = call(served, "POST", path, body, key, raw)
    return status, reply


def is_openai_error(reply: dict) -> bool:
    return set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}


def exchange(url: str, *parts: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a new connection, each part after the first once the server has begun
    to answer (as to a request's head, before its body); everything the server sends back
    until it closes."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        for i, part in enumerate(parts):
            if i:
                assert select.select([s], [], [], timeout)[0], "no answer to the first part"
            s.sendall(part)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def sse_events(data: bytes) -> list:
    """The payloads of a server-sent-events body, in order (``[DONE]`` as the string)."""
    return [line[6:] if line == b"data: [DONE]" else json.loads(line[6:])
            for line in data.split(b"\n") if line.startswith(b"data: ")]


# ----------------------------------------------------------------------------- completions

def test_completion_equals_gpt_generate_with_the_same_seed(client, served):
    out = client.completions.create(model="tiny", prompt="hello there", max_tokens=40,
                                    temperature=0.9, top_p=0.95, seed=3)
    assert [c.text for c in out.choices] == reference(
        served, "hello there", max_new_tokens=40, temperature=0.9, top_p=0.95, seed=3)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, 40)


def test_a_prompt_that_continues_an_earlier_one_reuses_its_positions(client, served):
    """A client that sends a conversation back with more at its end (a chat's next turn): the
    server feeds only the new part (usage says how much it kept) and answers as `gpt generate`
    on the whole prompt does."""
    first = client.completions.create(model="tiny", prompt="once upon", max_tokens=10,
                                      temperature=0)
    prompt = "once upon" + first.choices[0].text + " then"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.8,
                                    seed=2, n=2)
    # what the first request fed: its prompt and all its tokens but the last (counted once,
    # as the prompt's tokens are, though two rows decode it)
    assert out.usage.prompt_tokens_details.cached_tokens == len("once upon") + 9
    assert out.usage.prompt_tokens == len(prompt)
    assert [c.text for c in out.choices] == reference(served, prompt, max_new_tokens=5,
                                                      temperature=0.8, seed=2, num_samples=2)


def test_n_samples_equal_num_samples_and_extensions_are_accepted(client, served):
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=25, n=3, seed=7,
                                    temperature=1.0, extra_body={"top_k": 10,
                                                                 "repetition_penalty": 1.3})
    assert [c.text for c in out.choices] == reference(
        served, "abc", max_new_tokens=25, temperature=1.0, seed=7, num_samples=3, top_k=10,
        repetition_penalty=1.3)
    assert [c.index for c in out.choices] == [0, 1, 2]


def test_streamed_chunks_join_to_the_whole_text(client):
    settings = dict(model="tiny", prompt="stream me", max_tokens=60, seed=5, temperature=0.8)
    whole = client.completions.create(**settings).choices[0].text
    chunks = list(client.completions.create(**settings, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(client, served):
    greedy = reference(served, "xy", max_new_tokens=60, temperature=0)[0]
    stop = greedy[10:13]
    out = client.completions.create(model="tiny", prompt="xy", max_tokens=60, temperature=0,
                                    stop=[stop])
    assert out.choices[0].text == greedy[:greedy.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_of_generated_tokens(client, served):
    out = client.completions.create(model="tiny", prompt="log", max_tokens=8, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the best
        assert top[token] == pytest.approx(logprob)


def test_echo_scores_the_prompt_like_a_direct_computation(client, served):
    """What lm-evaluation-harness's local-completions model asks for."""
    text = "the quick brown fox"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True,
                                    logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and lp.token_logprobs[0] is None
    ids = served["tokenizer"].encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(served["model"](torch.tensor([ids]))[0], dim=-1)
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- chat

def test_chat_uses_the_documented_template(client, served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                         seed=2, temperature=0.7)
    prompt = "System: be brief\nUser: hi\nAssistant:"
    expected = reference(served, prompt, max_new_tokens=30, seed=2, temperature=0.7,
                         stop=["\nUser:"])[0].lstrip()
    assert out.choices[0].message.content == expected
    assert out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=30, seed=2, temperature=0.7,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_models_and_health(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["context_length"] == 32
    with urllib.request.urlopen(served["url"] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body,raw,key,status,param,message", [
    (None, b"{nope", KEY, 400, None, "the body is not valid JSON"),
    ({"prompt": "a", "max_tokens": "many"}, None, KEY, 400, "max_tokens", "max_tokens: "),
    ({"prompt": "a", "temperature": -1}, None, KEY, 400, "temperature", "temperature: "),
    ({"prompt": "a", "min_p": 1.5}, None, KEY, 400, "min_p", "min_p: "),
    ({"prompt": "a", "repetition_penalty": 1e-300}, None, KEY, 400, "repetition_penalty",
     "repetition_penalty: Input should be greater than or equal to 0.01"),
    (None, b'{"prompt": "a", "repetition_penalty": Infinity}', KEY, 400, "repetition_penalty",
     "repetition_penalty: Input should be a finite number"),
    ({"prompt": "a"}, None, None, 401, None, "missing or wrong API key"),
    ({"prompt": "a"}, None, "wrong", 401, None, "missing or wrong API key"),
    ({"prompt": "a", "model": "gpt-4"}, None, KEY, 404, "model", "the model 'gpt-4' does not"),
    ({"prompt": "a" * 5000}, None, KEY, 413, None, "request body of 5014 bytes exceeds the limit"),
    ({"prompt": "a" * 40, "echo": True, "logprobs": 1, "max_tokens": 0}, None, KEY, 400,
     "prompt", "the prompt has 40 tokens; echo and logprobs over the prompt need it within"),
    ({"prompt": "a", "frequency_penalty": 0.5}, None, KEY, 400, "frequency_penalty",
     "frequency_penalty is not supported"),
    ({"prompt": "a", "tools": [{"type": "function"}]}, None, KEY, 400, "tools",
     "tools are not supported: this model calls no functions"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, None, KEY, 400,
     "response_format", "response_format 'json_object' is not supported; only text"),
    ({"prompt": "a", "n": 5}, None, KEY, 400, "n", "this request needs 5 rows"),
    ({"prompt": "a", "max_tokens": 500}, None, KEY, 400, "max_tokens",
     "max_tokens 500 exceeds this server's limit of 200 (--max-tokens)"),
    ({"prompt": "a\u00e9"}, None, KEY, 400, "prompt", "the text has 1 character(s) outside"),
    # types are strict, as OpenAI's are (pydantic's lax mode took all of these)
    ({"prompt": "a", "max_tokens": "5"}, None, KEY, 400, "max_tokens",
     "max_tokens: Input should be a valid integer"),
    ({"prompt": "a", "max_tokens": True}, None, KEY, 400, "max_tokens",
     "max_tokens: Input should be a valid integer"),
    ({"prompt": "a", "max_tokens": 5.0}, None, KEY, 400, "max_tokens",
     "max_tokens: Input should be a valid integer"),
    ({"prompt": "a", "echo": "yes"}, None, KEY, 400, "echo",
     "echo: Input should be a valid boolean"),
    ({"prompt": "a", "stream": "yes"}, None, KEY, 400, "stream",
     "stream: Input should be a valid boolean"),
    ({"prompt": "a", "stream_options": {"include_usage": "yes"}}, None, KEY, 400,
     "stream_options.include_usage", "stream_options.include_usage: Input should be a valid"),
    ({"prompt": [True]}, None, KEY, 400, "prompt", "prompt: prompt must be a text, a list of "
     "texts, a list of token ids (integers) or a list of such lists"),
    ({"prompt": "a", "stop": 5}, None, KEY, 400, "stop",
     "stop: stop must be a string or a list of strings"),
    (None, b"", KEY, 400, None, "the body is empty; send a JSON object"),
    (None, b" \r\n", KEY, 400, None, "the body is empty; send a JSON object"),
    (None, b'{"prompt": "a", "n": ' + b"9" * 4000 + b"}", KEY, 400, None,
     "a number in the body is too large (4,000 digits)"),
])
def test_errors_have_their_status_and_openai_shape(served, body, raw, key, status, param,
                                                    message):
    code, reply = post(served, "/v1/completions", body, key=key, raw=raw)
    assert code == status
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["message"].startswith(message)
    assert reply["error"]["param"] == param


def test_null_is_a_field_left_out(served):
    """As in OpenAI's API: max_tokens null is 16 on completions, as when it is left out (it was
    the server's --max-tokens), and a null sampling field is its default, not a 400."""
    settings = {"prompt": "nul", "seed": 4}
    status, missing = post(served, "/v1/completions", settings)
    assert status == 200 and missing["usage"]["completion_tokens"] == 16
    nulls = {"max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None,
             "logprobs": None, "echo": None, "stream": None, "stream_options": None}
    status, null = post(served, "/v1/completions", {**settings, **nulls})
    assert status == 200 and null["usage"]["completion_tokens"] == 16
    assert null["choices"] == missing["choices"]


def test_chat_top_logprobs_needs_logprobs(served):
    messages = [{"role": "user", "content": "hi"}]
    for logprobs in ({}, {"logprobs": False}, {"logprobs": None}):
        status, reply = post(served, "/v1/chat/completions",
                             {"messages": messages, "top_logprobs": 2, **logprobs})
        assert status == 400 and is_openai_error(reply), reply
        assert reply["error"]["message"] == "top_logprobs needs logprobs: true"
        assert reply["error"]["param"] == "top_logprobs"
    status, reply = post(served, "/v1/chat/completions", {
        "messages": messages, "top_logprobs": 2, "logprobs": True, "max_tokens": 3})
    assert status == 200
    assert [len(t["top_logprobs"]) for t in reply["choices"][0]["logprobs"]["content"]] == [2] * 3


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
    {"messages": [{"role": "user", "content": "hi"}], "n": True},
])
def test_chat_types_are_strict(served, body):
    status, reply = post(served, "/v1/chat/completions", body)
    assert status == 400 and is_openai_error(reply), reply
    assert "Input should be a valid" in reply["error"]["message"]


def test_a_number_too_large_for_python_says_so():
    """Python refuses to read an integer of 4,300 digits or more, advising
    sys.set_int_max_str_digits(); a client is told its number is too large."""
    from gptcli.serve.protocol import ApiError, CompletionRequest, parse

    with pytest.raises(ApiError) as error:
        parse(b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", CompletionRequest)
    assert (error.value.status, error.value.message) == (
        400, "a number in the body is too large (5,000 digits)")


def test_a_client_leaving_mid_stream_stops_its_generation(served):
    with own_server(served, max_tokens=100_000) as (server, mine, _):
        response, first = start_stream(mine, {"prompt": "a", "max_tokens": 100_000})
        assert first.startswith(b"data: ")  # it is generating
        steps = server.scheduler.steps
        response.close()  # the client goes away
        assert wait_until_dropped(server.scheduler, 30)
        assert server.scheduler.steps - steps < 99_000  # it did not run to 100,000 tokens


@contextlib.contextmanager
def own_server(served, **settings):
    """The tiny model behind a server of its own (``Server``'s ``settings``), for a test that
    needs other limits than ``served``'s: (server, a ``served``-like dict for it, a client)."""
    server = Server(served["model"], served["tokenizer"], model_id="tiny", **settings)
    with serving(server) as url:
        yield (server, {**served, "url": url, "server": server},
               openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0))


def wait_until_dropped(scheduler, seconds: float) -> bool:
    """Whether, within ``seconds``, the scheduler let go of every job: /health stops counting
    a job as soon as its client leaves, but its loop drops the job's rows at its next step,
    so a test that waited only for ``busy()`` could still see them."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not scheduler.busy() and not scheduler.running and not scheduler.engine.rows:
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def serving(server: Server):
    """``server`` behind the uvicorn server of `gpt serve` on a free loopback port, its
    scheduler on a thread (as ``served`` runs it): its base URL."""
    port = free_port()
    server.scheduler.start()
    uv = http_server(server, "127.0.0.1", port)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(15)
        server.scheduler.stop()


def test_a_client_leaving_before_a_whole_answer_stops_its_generation(served):
    """Not streamed, nothing is written before the answer is whole, so no write fails when
    the client leaves: the server watches the connection while it waits. A client that
    asked for 100,000 tokens and left after half a second is out of the batch at once."""
    server = Server(served["model"], served["tokenizer"], model_id="tiny", max_tokens=100_000)
    with serving(server) as url:
        body = json.dumps({"prompt": "A", "max_tokens": 100_000}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                      b"\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 60
            while not server.scheduler.running and time.time() < deadline:
                time.sleep(0.01)
            assert server.scheduler.running
            time.sleep(0.5)
            assert call({"url": url}, "GET", "/health")[2]["requests"] == 1  # decoding
        assert wait_until_dropped(server.scheduler, 30)  # the client has gone
        assert call({"url": url}, "GET", "/health")[2]["requests"] == 0


# ----------------------------------------------------------------------------- batching

def test_concurrent_requests_each_get_what_they_would_alone(client, served):
    """16 requests at once, with random prompts, lengths (some past the context of 32, so their
    windows slide) and settings, through 4 rows: each result equals its solo run."""
    rng = random.Random(0)
    jobs = []
    for i in range(16):
        settings = dict(max_tokens=rng.randint(1, 45), seed=rng.randint(0, 99),
                        temperature=rng.choice([0.0, 0.7, 1.2]), top_p=rng.choice([1.0, 0.9]))
        prompt = "".join(rng.choice("abcdef gh") for _ in range(rng.randint(1, 20)))
        jobs.append((prompt, settings))

    def ask(job):
        prompt, s = job
        return client.completions.create(model="tiny", prompt=prompt, **s).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, s), text in zip(jobs, got):
        assert text == reference(served, prompt, max_new_tokens=s["max_tokens"], seed=s["seed"],
                                 temperature=s["temperature"], top_p=s["top_p"])[0]


def test_a_new_request_does_not_wait_for_running_ones(served):
    with own_server(served, max_tokens=100_000) as (server, mine, client):
        long, first = start_stream(mine, {"prompt": "long", "max_tokens": 100_000})
        assert first.startswith(b"data: ")  # decoding
        short = client.completions.create(model="tiny", prompt="short", max_tokens=2)
        assert short.choices[0].finish_reason == "length"
        assert server.scheduler.busy() == 1  # it joined the running batch: the long one runs on
        long.close()
        assert wait_until_dropped(server.scheduler, 30)


# ----------------------------------------------------------------------------- hard edges

def solo(served, prompt: str, **settings) -> str:
    return reference(served, prompt, **settings)[0]


def start_stream(served, body: dict):
    """A streamed completion, started: (response, its first line); read the rest later."""
    req = urllib.request.Request(
        served["url"] + "/v1/completions", method="POST",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = urllib.request.urlopen(req, timeout=60)
    return response, response.readline()


def stream_text(first: bytes, response) -> str:
    events = sse_events(first + response.read())
    assert events[-1] == b"[DONE]" and not any("error" in e for e in events[:-1]), events
    return "".join(c["text"] for e in events[:-1] for c in e["choices"])


def test_extreme_sampling_values_are_safe_beside_other_work(served):
    """A temperature or top-p below float32's range passes `> 0` and used to make NaN
    probabilities, failing every request in the batch: now such values are greedy, a
    repetition penalty outside 0.01..100 is a 400, and a request decoding beside them gets
    exactly its solo answer."""
    greedy = solo(served, "hi", max_new_tokens=20, temperature=0)
    expected = solo(served, "unrelated work", max_new_tokens=300, seed=9, temperature=0.9)
    with own_server(served, max_tokens=100_000) as (server, mine, client):
        other = dict(prompt="unrelated work", max_tokens=100_000, seed=9, temperature=0.9)
        response, first = start_stream(mine, other)
        for extreme in (dict(temperature=1e-300), dict(temperature=1e-39), dict(top_p=1e-300),
                        dict(temperature=0.7, top_p=1e-39, extra_body={"min_p": 1.0})):
            out = client.completions.create(model="tiny", prompt="hi", max_tokens=20, **extreme)
            assert out.choices[0].text == greedy, extreme
        chunks = list(client.completions.create(model="tiny", prompt="hi", max_tokens=20,
                                                temperature=1e-300, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == greedy
        assert chunks[-1].choices[0].finish_reason == "length"
        assert server.scheduler.busy() == 1  # the other request was decoding all along,
        text, line = "", first
        while len(text) < len(expected):  # and its first 300 tokens are its solo answer's
            assert line, text
            text += "".join(c["text"] for e in sse_events(line) for c in e["choices"])
            line = response.readline()
        assert text.startswith(expected)
        response.close()
        assert wait_until_dropped(server.scheduler, 30)


def test_min_p_extension_equals_gpt_generate(client, served):
    settings = dict(max_new_tokens=40, seed=5, temperature=1.2)
    out = client.completions.create(model="tiny", prompt="min p", max_tokens=40, seed=5,
                                    temperature=1.2, extra_body={"min_p": 0.8})
    assert out.choices[0].text == solo(served, "min p", min_p=0.8, **settings)
    assert out.choices[0].text != solo(served, "min p", **settings)  # min-p cut something


def failing_for(predicate, real, message: str):
    def wrapper(*args, **kwargs):
        if predicate(*args, **kwargs):
            raise RuntimeError(message)
        return real(*args, **kwargs)
    return wrapper


def test_a_request_whose_sampling_fails_ends_alone(client, served, monkeypatch):
    """A fault injected into sampling, for one request's rows only (seed 666; nothing real
    fails any more): that request gets a 500, or when streamed an error event and [DONE]; the
    requests decoding before and after it in the batch get their solo answers."""
    import gptcli.decode

    monkeypatch.setattr(gptcli.decode, "next_token", failing_for(
        lambda logits, config, *a, **k: config.seed == 666, gptcli.decode.next_token,
        "injected sampling failure"))
    before = dict(prompt="first in the batch", max_tokens=150, seed=1, temperature=0.8)
    response, first = start_stream(served, before)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, served, "/v1/completions",
                          {"prompt": "no", "seed": 666, "max_tokens": 50})
        time.sleep(0.05)  # so that it is ahead of the next one in the batch
        after = pool.submit(client.completions.create, model="tiny", prompt="after it",
                            max_tokens=60, seed=2, temperature=0.8)
        status, reply = bad.result()
        assert after.result().choices[0].text == solo(served, "after it", max_new_tokens=60,
                                                      seed=2, temperature=0.8)
    assert status == 500 and is_openai_error(reply)
    assert reply["error"] == {"message": "generation failed: RuntimeError: injected sampling "
                              "failure", "type": "server_error", "param": None, "code": None}
    bad_stream, bad_first = start_stream(served, {"prompt": "no", "seed": 666, "max_tokens": 9})
    events = sse_events(bad_first + bad_stream.read())
    assert bad_stream.status == 200 and events[-1] == b"[DONE]"
    assert events[-2]["error"]["message"] == "generation failed: RuntimeError: injected " \
                                             "sampling failure"
    assert stream_text(first, response) == solo(served, "first in the batch",
                                                max_new_tokens=150, seed=1, temperature=0.8)
    assert served["server"].scheduler.busy() == 0 and not served["server"].scheduler.engine.rows


def test_a_forward_that_fails_for_the_batch_ends_the_newest_request(served, monkeypatch):
    """A fault injected into the decode step: every batched step fails, as when memory runs
    out once the batch grows. The request that made it grow ends with a 500; the one that was
    running goes on to its solo answer. (Its steps alone wait until the other is queued, so it
    cannot finish first.)"""
    scheduler = served["server"].scheduler
    joined, submitted, waited = threading.Event(), [], []
    real_submit, real_step = scheduler.submit, scheduler.engine.step

    def submit(job):
        real_submit(job)
        submitted.append(job)
        if len(submitted) == 2:
            joined.set()

    def step(idx, *args, **kwargs):  # the engine's decode step (C blocks or the model)
        if idx.size(0) > 1:
            raise RuntimeError("out of memory (injected)")
        waited.append(joined.wait(60))
        return real_step(idx, *args, **kwargs)

    monkeypatch.setattr(scheduler, "submit", submit)
    monkeypatch.setattr(scheduler.engine, "step", step)
    running = dict(prompt="running alone", max_tokens=120, seed=3, temperature=0.8)
    response, first = start_stream(served, running)
    status, reply = post(served, "/v1/completions", {"prompt": "joining", "max_tokens": 50})
    assert status == 500
    assert reply["error"]["message"] == "generation failed: RuntimeError: out of memory " \
                                        "(injected)"
    assert stream_text(first, response) == solo(served, "running alone", max_new_tokens=120,
                                                seed=3, temperature=0.8)
    assert waited and all(waited)


@pytest.mark.parametrize("n", [3, 1])
def test_a_request_whose_prefill_fails_ends_alone(served, monkeypatch, n):
    """A fault injected into the prefill of the prompt "~~", admitted together with another
    request (that needs the other rows of the batch, or one row): it ends with an error, the
    other gets its solo answers, and no half-added rows are left behind (they would take the
    rows the other one needs, and break every later step), nor taken for rows holding their
    prompt (the other one's rows were never fed: its retry must feed them)."""
    from gptcli.serve.scheduler import Job, Scheduler

    model, tok = served["model"], served["tokenizer"]
    mark = tok.encode("~")[0]
    monkeypatch.setattr(model, "forward", failing_for(
        lambda idx, *a, **k: idx.size(1) == 2 and bool((idx == mark).all(dim=1).any()),
        model.forward, "prefill failed (injected)"))
    scheduler = Scheduler(model, tok, max_batch=4)
    config = SampleConfig(max_new_tokens=40, seed=8, temperature=0.8)
    bad, good = [], []
    scheduler.submit(Job([tok.encode("~~")], 1, config, bad.append))
    scheduler.submit(Job([tok.encode("fine")], n, config, good.append))
    while not good or good[-1]["type"] not in ("done", "error"):
        scheduler.run_once()  # the first call admits both at once
    assert bad == [{"type": "error", "status": 500,
                    "message": "could not start: RuntimeError: prefill failed (injected)"}]
    assert [c.stream.text for c in good[-1]["choices"]] == reference(
        served, "fine", max_new_tokens=40, seed=8, temperature=0.8, num_samples=n)
    assert good[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert scheduler.busy() == 0 and not scheduler.engine.rows


def test_log_probs_of_a_vocabulary_smaller_than_asked():
    from gptcli.serve.logprobs import prompt_logprobs

    model = randomize_(GPT(tiny_config(vocab_size=8))).eval()
    scored = prompt_logprobs(model, 8, [1, 2, 3], top=20)
    assert [len(s.top) for s in scored] == [0, 8, 8]


@pytest.mark.parametrize("raw", [
    b"[" * 4000, b'{"prompt": ' + b"[" * 4000, b'{"a":' * 800, b"{", b"\xff\xfe\x00\x00",
    b"NaN", b'"text"', b"[]", b'{"prompt": "a", "temperature": NaN}',
    b'{"prompt": "a", "top_p": -Infinity}', b'{"prompt": "a", "max_tokens": 1e400}',
    b'{"prompt": [[[[[[1]]]]]]}', b'{"prompt": "a", "n": ' + b"9" * 3000 + b"}",
    b'{"prompt": {"nested": {"deeper": [1, 2]}}}', b'{"prompt": "a", "stop": [["x"]]}',
])
def test_bad_json_of_any_shape_is_a_400(served, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, reply = post(served, path, None, raw=raw)
        assert status == 400 and is_openai_error(reply), (path, reply)


WRONG_METHODS = [(method, path, allowed)
                 for path, allowed in [("/v1/completions", "POST"),
                                       ("/v1/chat/completions", "POST"),
                                       ("/v1/models", "GET, HEAD"), ("/health", "GET, HEAD")]
                 for method in ("PUT", "DELETE", "PATCH", "GET", "POST", "OPTIONS", "TRACE")
                 if method not in allowed]


@pytest.mark.parametrize("method,path,allowed", WRONG_METHODS)
def test_a_wrong_method_is_a_405_in_openai_shape(served, method, path, allowed):
    status, headers, reply = call(served, method, path)
    assert status == 405 and headers["Allow"] == allowed
    assert headers["Content-Type"] == "application/json" and is_openai_error(reply)
    assert reply["error"]["message"] == f"{method} is not allowed on {path}; use {allowed}"
    status, headers, reply = call(served, "GET", "/v2/nothing")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert reply["error"]["message"] == "no route /v2/nothing"


def test_every_v1_route_needs_the_key_and_health_does_not(served):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing"),
                         ("PUT", "/v1/completions"), ("GET", "/v1")]:
        for key in (None, "wrong"):
            status, _, reply = call(served, method, path, key=key)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", (path, key)
    assert call(served, "GET", "/v1/models")[0] == 200
    assert call(served, "GET", "/health", key=None)[0] == 200


def test_a_bug_in_an_endpoint_is_a_500_in_openai_shape_and_one_log_line(served, monkeypatch,
                                                                       uvicorn_log):
    def bug(*args):
        raise KeyError("injected bug")

    monkeypatch.setattr(served["server"], "cap", bug)
    lines = len(served["log"])
    status, headers, reply = call(served, "POST", "/v1/completions", {"prompt": "a"})
    assert status == 500 and headers["Content-Type"] == "application/json"
    assert reply["error"]["message"] == "KeyError: 'injected bug'"
    deadline = time.monotonic() + 5  # the server logs after the answer has gone out
    while len(served["log"]) == lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served["log"][lines:] == ["POST /v1/completions: 500 KeyError: 'injected bug'"]
    assert not any(r.exc_info for r in uvicorn_log)  # no traceback from uvicorn either


def test_malformed_http_is_a_400_in_openai_shape(served, uvicorn_log):
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for parts in ([b"GARBAGE\r\n\r\n"], [head + b"zz\r\n"]):  # the second: a bad body
        reply = exchange(served["url"], *parts)
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400 Bad Request") and b"application/json" in status
        assert json.loads(body)["error"]["message"] == "the request is not valid HTTP/1.1"
        assert reply.count(b"HTTP/1.1 ") == 1  # the app's own answer (404) goes nowhere
    # garbage after a request answered before its body was read: a response is already out,
    # so the connection just closes (uvicorn's own 400 raised h11's LocalProtocolError)
    reply = exchange(served["url"], head, b"zz\r\n")
    assert reply.startswith(b"HTTP/1.1 404 ") and reply.count(b"HTTP/1.1 ") == 1
    time.sleep(0.2)
    assert [r.getMessage() for r in uvicorn_log] == ["Invalid HTTP request received."] * 3


def test_bad_requests_of_every_kind_leave_running_work_alone(served):
    """While one request decodes, the others of this section hit the server, and clients
    leave mid-stream and mid-body: it gets its solo answer, and every failure is one log
    line."""
    lines = len(served["log"])
    response, first = start_stream(served, dict(prompt="busy", max_tokens=200, seed=4,
                                                temperature=1.0))
    url = served["url"]
    bad = [lambda: post(served, "/v1/completions", None, raw=b"[" * 4000),
           lambda: call(served, "DELETE", "/v1/completions"),
           lambda: call(served, "GET", "/v1/models", key=None),
           lambda: post(served, "/v1/completions", {"prompt": "x", "temperature": 1e-300,
                                                    "max_tokens": 5}),
           lambda: exchange(url, b"GARBAGE\r\n\r\n"),
           lambda: exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 50\r\n\r\n{\"pro", timeout=0.5),
           lambda: start_stream(served, {"prompt": "gone", "max_tokens": 100})[0].close()]
    for attempt in bad * 2:
        try:
            attempt()
        except TimeoutError:
            pass  # the client that stopped mid-body gives up
    assert stream_text(first, response) == solo(served, "busy", max_new_tokens=200, seed=4,
                                                temperature=1.0)
    assert all("Traceback" not in line and "\n" not in line for line in served["log"][lines:])
    assert any(": 400 the body is not valid JSON: it nests too deeply" in line
               for line in served["log"][lines:])


def test_events_for_a_client_whose_loop_closed_end_its_job_alone(served):
    """At shutdown the HTTP side's event loop closes while the scheduler may still hold jobs:
    delivering to it raises ("Event loop is closed", which used to end `gpt serve` with status
    1); that job is dropped like a client that left, and the next one runs as it would alone."""
    import asyncio

    from gptcli.serve.scheduler import Job, Scheduler
    from gptcli.serve.server import events

    scheduler = Scheduler(served["model"], served["tokenizer"], max_batch=2)
    loop = asyncio.new_event_loop()
    _, deliver = events(loop)
    loop.close()
    tok = served["tokenizer"]
    config = SampleConfig(max_new_tokens=30, seed=3, temperature=0.9)
    orphan = Job([tok.encode("orphan")], 1, config, deliver)
    got: list[dict] = []
    other = Job([tok.encode("other")], 1, config, got.append)
    scheduler.submit(orphan)
    scheduler.submit(other)
    while not got or got[-1]["type"] != "done":
        scheduler.run_once()
    assert orphan.cancelled and scheduler.busy() == 0 and not scheduler.engine.rows
    assert got[-1]["choices"][0].stream.text == solo(served, "other", max_new_tokens=30, seed=3,
                                                     temperature=0.9)


def test_a_request_cancelled_at_shutdown_gets_a_503_not_a_traceback(served, uvicorn_log):
    """When uvicorn's graceful wait runs out while a request still waits (here: a scheduler
    that never runs, as one stuck in a long forward pass would), it cancels the request: the
    client gets a 503 in OpenAI's shape and the log no traceback."""
    server = Server(served["model"], served["tokenizer"], model_id="tiny")  # never started
    port = free_port()
    uv = http_server(server, "127.0.0.1", port)
    uv.config.timeout_graceful_shutdown = 1
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, {"url": f"http://127.0.0.1:{port}"}, "/v1/completions",
                              {"prompt": "never decoded"}, None)
        deadline = time.time() + 30
        while not server.scheduler.busy() and time.time() < deadline:
            time.sleep(0.02)  # until the request waits in the queue
        assert server.scheduler.busy() == 1
        uv.should_exit = True
        assert waiting.result() == (503, {"error": {
            "message": "the server is shutting down", "type": "server_error", "param": None,
            "code": None}})
    thread.join(10)
    assert not any(r.exc_info for r in uvicorn_log)


# ----------------------------------------------------------------------------- the command

@contextlib.contextmanager
def gpt_serve(path, *args: str):
    """A real `gpt serve` subprocess on a free port, answering: (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "--model", str(path),
                             "--port", str(port), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, up = time.time() + 180, False
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                up = True
            except OSError:
                time.sleep(0.2)
        assert up, proc.communicate()[1] if proc.poll() is not None else "no answer"
        try:
            yield proc, f"http://127.0.0.1:{port}"
        except AssertionError as e:  # with what the server said
            if proc.poll() is None:
                proc.kill()
                log = proc.communicate()[1]
                log = "".join(line for _, line in getattr(proc, "seen", [])) + log
                e.args = (f"{e}\n--- gpt serve's log:\n{log}",)
            raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_gpt_serve_subprocess_streams_and_stops_cleanly_on_sigterm(served):
    with gpt_serve(served["path"], "--api-key", "s3cret-key") as (proc, url):
        chunks = list(openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key")
                      .completions.create(model="tiny", prompt="hi", max_tokens=10, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr  # as `gpt train` ends on SIGTERM
    assert f"at {url}/v1" in stderr and "curl" in stderr
    assert 'Authorization: Bearer $KEY"' in stderr and "s3cret" not in stderr  # (logs keep it)
    assert stderr.strip().endswith("stopped: in-flight requests finished or timed out")
    assert "Traceback" not in stderr and "error" not in stderr


def test_gpt_serve_with_a_draft_answers_as_without_and_tallies_its_acceptance(served,
                                                                            tmp_path):
    """--draft-model: the scheduler's engine decodes speculatively; greedy answers (several
    requests at once, at different positions, windows sliding past the context of 32) are the
    ones without a draft, and /health shows the draft's tally."""
    draft = randomize_(GPT(tiny_config(vocab_size=len(CHARS), n_layer=1)), seed=12)
    small = save_checkpoint(tmp_path / "small.safetensors", draft, CharTokenizer(CHARS))
    prompts = ["hi", "a longer prompt, at another position", "x"]
    want = [reference(served, p, max_new_tokens=40, temperature=0)[0] for p in prompts]
    with gpt_serve(served["path"], "--draft-model", str(small), "--draft-tokens", "3") \
            as (proc, url):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda p: post({"url": url}, "/v1/completions", {
                "prompt": p, "max_tokens": 40, "temperature": 0}), prompts))
        assert [r[1]["choices"][0]["text"] for r in replies] == want
        health = call({"url": url}, "GET", "/health")[2]
        tally = health["draft"]
        assert tally["model"] == "small" and tally["tokens_a_round"] == 3
        assert tally["proposed"] > 0 and tally["acceptance_rate"] == \
            tally["accepted"] / tally["proposed"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert "speculative decoding with the draft model small (" in stderr
    assert "Traceback" not in stderr


def test_gpt_serve_refuses_a_draft_before_loading_anything(served, tmp_path):
    missing = tmp_path / "none.safetensors"
    for args, message in (
            (["--draft-model", str(missing)],
             f"error: --draft-model: checkpoint {missing} does not exist"),
            (["--draft-tokens", "2"], "error: --draft-tokens goes with --draft-model")):
        out = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--model",
                              str(served["path"]), "--port", str(free_port()), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.strip() == message, out.stderr


def test_gpt_serve_stops_cleanly_whatever_is_in_flight(served):
    """SIGTERM with a long stream, a long request, a half-sent request, a stream whose client
    stopped reading, a whole answer its client stopped reading and an idle keep-alive
    connection in flight, after requests that used to
    leave tracebacks in the log: the stream ends with an error event (503) and [DONE], the long
    request gets a 503, the half-sent one a 503 at once, the idle connection closes, and the
    server exits 143 with one log line per failed request and no traceback."""
    with gpt_serve(served["path"], "--max-tokens", "100000") as (proc, url):
        head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert exchange(url, head, b"zz\r\n").startswith(b"HTTP/1.1 404 ")
        assert exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close"
                        b"\r\nContent-Length: 100000\r\n\r\n" + b"[" * 100_000,
                        ).startswith(b"HTTP/1.1 400 ")
        server = {"url": url}
        assert post(server, "/v1/completions", {"temperature": 7})[0] == 400
        # A client that stops reading a whole answer larger than the sockets' buffers: the
        # answer is complete, but held in the server's buffer, which a plain close waits on
        unread = socket.socket()
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        unread.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        body = json.dumps({"prompt": "a", "max_tokens": 6000, "n": 8, "logprobs": 5}).encode()
        unread.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                       b"\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while time.time() < deadline and call(server, "GET", "/health")[2]["requests"] == 0:
            time.sleep(0.05)  # until it is decoding (~7 MB of answer),
        assert call(server, "GET", "/health")[2]["requests"] == 1
        deadline = time.time() + 300  # (~8 s on a quiet machine)
        while time.time() < deadline and call(server, "GET", "/health")[2]["requests"]:
            time.sleep(0.2)  # then done
        assert call(server, "GET", "/health")[2]["requests"] == 0
        assert select.select([unread], [], [], 60)[0]  # and its answer on the way
        long = {"prompt": "a", "max_tokens": 100_000}
        stream, first = start_stream(server, long)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            whole = pool.submit(post, server, "/v1/completions", long)
            half = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                         b"\r\n{\"prompt\": ")
            stuck = socket.socket()  # a client that stops reading: the server's writes block
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            body = json.dumps({**long, "stream": True, "logprobs": 5}).encode()
            stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                          b"%d\r\n\r\n%s" % (len(body), body))
            idle = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"}"):  # the whole answer, the connection kept open
                chunk = idle.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 OK")
            deadline = time.time() + 60  # the stream, the long request, the stuck stream:
            while time.time() < deadline and call(server, "GET", "/health")[2]["requests"] < 3:
                time.sleep(0.05)
            assert call(server, "GET", "/health")[2]["requests"] == 3
            time.sleep(3)  # for the stuck client's buffers to fill
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            seen: list[tuple[float, str]] = []  # stderr's lines, with when they came

            def read_log():
                with contextlib.suppress(ValueError, OSError):  # (closed by gpt_serve's kill)
                    for line in proc.stderr:
                        seen.append((time.time(), line))

            proc.seen = seen  # (for gpt_serve's report of a failure)

            reader = threading.Thread(target=read_log, daemon=True)
            reader.start()
            half.settimeout(30)
            status, _, body = read_all(half).partition(b"\r\n\r\n")
            # at once: long before the long request's 503, which waits for the drain (10 s)
            assert status.startswith(b"HTTP/1.1 503 ") and not whole.done()
            assert json.loads(body)["error"]["message"] == "the server is shutting down"
            idle.settimeout(30)
            assert read_all(idle) == b""
            events = sse_events(first + stream.read())
            assert events[-1] == b"[DONE]"
            assert events[-2]["error"]["message"] == "the server is shutting down"
            assert whole.result() == (503, {"error": {
                "message": "the server is shutting down", "type": "server_error", "param": None,
                "code": None}})
        proc.wait(timeout=30)
        reader.join(30)
        proc.communicate(timeout=30)  # (its pipes closed)
        unread.close()
        stderr = "".join(line for _, line in seen)
        stopped = [t for t, line in seen if line.startswith("stopped: ")]
        assert stopped and stopped[0] - t0 < 15, stderr  # the drain's 10 s, not uvicorn's wait
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert "POST /v1/completions: 400 the body is not valid JSON: it nests too deeply" in lines
    assert "POST /v1/completions: 400 temperature: Input should be less than or equal to 2" \
        in lines
    assert "POST /v1/completions: 503 the server is shutting down (in the stream)" in lines
    assert lines[-1] == "stopped: in-flight requests finished or timed out"


def test_gpt_serve_chats_in_the_template_the_model_was_fine_tuned_with(tmp_path):
    """A model whose checkpoint says `chat_template: gptcli-chat/1` is prompted with
    chat.prompt_tokens: its reply equals generate() on those ids (which differs from what the
    plain layout would have given: greedy, as this random model's sampled tokens hardly depend
    on the context)."""
    tok = GPT2Tokenizer()
    model = randomize_(GPT(tiny_config(vocab_size=tok.vocab_size, context_length=64)), seed=2)
    path = save_checkpoint(tmp_path / "chatty.safetensors", model, tok,
                           **chat.template_metadata())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    settings = dict(max_new_tokens=30, temperature=0)

    def reply(template: str) -> str:
        ids = chat.prompt_tokens(messages, tok, template)
        samples, _ = generate(model.eval(), tok, ids,
                              SampleConfig(**settings, stop=chat.stop_strings(template)))
        return chat.reply_content(samples[0].text, template)

    with gpt_serve(path) as (proc, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        ask = dict(model="chatty", messages=messages, max_tokens=30, temperature=0)
        whole = client.chat.completions.create(**ask).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**ask, stream=True))
    assert whole == streamed == reply(chat.TEMPLATE) != reply(chat.PLAIN)


def test_gpt_serve_without_the_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from gptcli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "serve", "--model",
                          str(tmp_path / "m.safetensors")], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2
    assert out.stderr.strip() == ('error: gpt serve needs starlette, which is not installed; '
                                  f'install it with {install_command("serve")}')


def test_a_port_in_use_is_one_sentence(served):
    port = int(served["url"].rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--model",
                          str(served["path"]), "--port", str(port)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: address already "
                                  "in use; pick another --port (or stop what uses it)")


@pytest.mark.parametrize("host,why", [
    ("256.1.1.1", "'256.1.1.1' is not an address or a host name that resolves ("),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine; "),  # TEST-NET-1: nobody's
])
def test_a_host_that_cannot_be_used_is_blamed_not_the_port(served, host, why):
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--model",
                          str(served["path"]), "--host", host, "--port", str(port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    message = out.stderr.strip()
    assert message.startswith(f"error: cannot listen on {host}:{port}: {why}"), message
    assert message.endswith("; pick another --host (an address of this machine such as "
                            "127.0.0.1, or 0.0.0.0 for all of them)")
    assert "\n" not in message and "--port" not in message


def test_a_max_batch_whose_memory_cannot_fit_is_refused_at_once(served):
    """The KV cache of every row is allocated when the server starts (and on a CPU kernels are
    measured at --max-batch rows): a --max-batch far beyond the machine's memory used to run
    out of it after seconds of work (exit 1), or to take minutes; it is refused from the
    checkpoint's header, before anything is allocated."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--model",
                          str(served["path"]), "--port", str(free_port()), "--device", "cpu",
                          "--max-batch", str(10 ** 12)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    message = out.stderr.strip()
    assert message.startswith("error: --max-batch 1000000000000 needs about "), message
    assert "per sequence for its KV cache over a context of 32" in message
    assert " available: try --max-batch " in message and message.endswith(" or less")
    assert "\n" not in message and time.time() - t0 - startup_seconds() < 30


def test_the_memory_estimate_counts_the_kv_cache_the_scheduler_allocates(served):
    from gptcli.serve.scheduler import Scheduler
    from gptcli.serve.startup import batch_memory

    model = served["model"]
    cache = Scheduler(model, served["tokenizer"], max_batch=3).engine.cache
    allocated = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
    need, per_row = batch_memory(model.config, 3, 4, weight_bytes=1000)
    logits = 4 * 4 * model.config.vocab_size  # per row
    assert need == 1000 + 3 * per_row and 3 * (per_row - logits) == allocated


def test_a_draft_counts_in_the_memory_a_max_batch_needs(served, tmp_path, monkeypatch):
    """With --draft-model, the draft's weights and cache rows count too: memory enough for the
    model's 4 rows alone is not enough with a draft's beside them."""
    from gptcli import hardware
    from gptcli.errors import UserError
    from gptcli.serve.startup import batch_memory, check_batch

    draft = randomize_(GPT(tiny_config(vocab_size=len(CHARS), n_layer=1)), seed=12)
    small = save_checkpoint(tmp_path / "small.safetensors", draft, CharTokenizer(CHARS))
    config = served["model"].config
    alone, _ = batch_memory(config, 4, 4, config.num_params() * 4)
    monkeypatch.setattr(hardware, "available_memory", lambda device: alone)
    check_batch(served["path"], 4, "cpu", "float32", None)  # fits exactly
    with pytest.raises(UserError) as refused:
        check_batch(served["path"], 4, "cpu", "float32", None, draft=small)
    assert "per sequence for its KV cache (the model's and the draft's) over a context of 32" \
        in str(refused.value) and " available: try " in str(refused.value)
    with pytest.raises(UserError):  # a draft whose header cannot be read: the model's check
        check_batch(served["path"], 5, "cpu", "float32", None, draft=tmp_path / "none")


def test_health_counts_no_job_whose_client_went_away(served):
    """`/health`'s "requests" (``Scheduler.busy``): a job whose client left is not counted,
    whether it is decoding, next in line for rows, or still queued behind it; the loop then
    drops them and the batch is empty."""
    from gptcli.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(served["model"], served["tokenizer"], max_batch=1)
    tok, config = served["tokenizer"], SampleConfig(max_new_tokens=50, seed=1)
    jobs = [Job([tok.encode(f"job {i}")], 1, config, lambda event: None) for i in range(3)]
    for job in jobs:
        scheduler.submit(job)
    assert scheduler.busy() == 3
    scheduler.run_once()  # the first decodes; the second waits for its row, the third behind
    assert scheduler.running == jobs[:1] and scheduler.head is jobs[1]
    for job, left in zip(reversed(jobs), (2, 1, 0)):
        job.cancel()
        assert scheduler.busy() == left
    scheduler.run_once()
    scheduler.run_once()
    assert not scheduler.running and not scheduler.engine.rows and scheduler.busy() == 0


def test_health_counts_a_job_while_it_is_admitted(served, monkeypatch):
    """A job between the queue and the batch (gathered with others, then prefilled) is counted:
    /health used to read 0 there, and a client polling it saw its request vanish."""
    from gptcli.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(served["model"], served["tokenizer"], max_batch=4)
    counted, real = [], scheduler.engine.add_groups

    def add_groups(groups):  # the prefill
        counted.append(scheduler.busy())
        return real(groups)

    monkeypatch.setattr(scheduler.engine, "add_groups", add_groups)
    tok, config = served["tokenizer"], SampleConfig(max_new_tokens=3, seed=1)
    got: list[dict] = []
    for prompt in ("one", "two"):  # admitted together, in one prefill
        scheduler.submit(Job([tok.encode(prompt)], 2, config, got.append))
    scheduler.run_once()
    assert counted == [2] and scheduler.busy() == 2
    while sum(event["type"] == "done" for event in got) < 2:
        scheduler.run_once()
    assert scheduler.busy() == 0 and not scheduler.live
