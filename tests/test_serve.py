"""`gpt serve` through the real openai client over HTTP, against a uvicorn server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
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

from gptcli.checkpoint import save_checkpoint  # noqa: E402
from gptcli.config import SampleConfig  # noqa: E402
from gptcli.models import load_model  # noqa: E402
from gptcli.model import GPT  # noqa: E402
from gptcli.generate import generate, prompt_ids  # noqa: E402
from gptcli.serve.protocol import CHAT_STOP  # noqa: E402
from gptcli.serve.server import Server, create_app  # noqa: E402
from gptcli.tokenizer import CharTokenizer  # noqa: E402

from conftest import randomize_, tiny_config  # noqa: E402

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
KEY = "secret-key"


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
    server = Server(model, tokenizer, model_id="tiny", max_batch=4, max_tokens=200,
                    api_key=KEY, max_body=4096)
    port = free_port()
    server.scheduler.start()  # `gpt serve` runs it on the main thread; here, beside the tests
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "server": server, "model": model,
           "tokenizer": tokenizer, "path": path}
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


def post(served, path: str, body, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON body) of a raw HTTP request."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(served["url"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----------------------------------------------------------------------------- completions

def test_completion_equals_gpt_generate_with_the_same_seed(client, served):
    out = client.completions.create(model="tiny", prompt="hello there", max_tokens=40,
                                    temperature=0.9, top_p=0.95, seed=3)
    assert [c.text for c in out.choices] == reference(
        served, "hello there", max_new_tokens=40, temperature=0.9, top_p=0.95, seed=3)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, 40)


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
                         stop=[CHAT_STOP])[0].lstrip()
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
    ({"prompt": "a"}, None, None, 401, None, "missing or wrong API key"),
    ({"prompt": "a"}, None, "wrong", 401, None, "missing or wrong API key"),
    ({"prompt": "a", "model": "gpt-4"}, None, KEY, 404, "model", "the model 'gpt-4' does not"),
    ({"prompt": "a" * 5000}, None, KEY, 413, None, "request body of 5014 bytes exceeds the limit"),
    ({"prompt": "a" * 40, "echo": True, "logprobs": 1, "max_tokens": 0}, None, KEY, 400,
     "prompt", "the prompt has 40 tokens; echo and logprobs over the prompt need it within"),
    ({"prompt": "a", "frequency_penalty": 0.5}, None, KEY, 400, "frequency_penalty",
     "frequency_penalty is not supported"),
    ({"prompt": "a", "n": 5}, None, KEY, 400, "n", "this request needs 5 rows"),
    ({"prompt": "a", "max_tokens": 500}, None, KEY, 400, "max_tokens",
     "max_tokens 500 exceeds this server's limit of 200 (--max-tokens)"),
    ({"prompt": "a\u00e9"}, None, KEY, 400, "prompt", "the text has 1 character(s) outside"),
])
def test_errors_have_their_status_and_openai_shape(served, body, raw, key, status, param,
                                                    message):
    code, reply = post(served, "/v1/completions", body, key=key, raw=raw)
    assert code == status
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["message"].startswith(message)
    assert reply["error"]["param"] == param


def test_a_client_leaving_mid_stream_stops_its_generation(served):
    req = urllib.request.Request(
        served["url"] + "/v1/completions", method="POST",
        data=json.dumps({"prompt": "a", "max_tokens": 200, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = urllib.request.urlopen(req, timeout=60)
    assert response.readline().startswith(b"data: ")  # it is generating
    steps = served["server"].scheduler.steps
    response.close()  # the client goes away
    deadline = time.time() + 10
    while served["server"].scheduler.busy() and time.time() < deadline:
        time.sleep(0.05)
    assert served["server"].scheduler.busy() == 0
    assert served["server"].scheduler.steps - steps < 190  # it did not run to 200 tokens


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


def test_a_new_request_does_not_wait_for_running_ones(client, served):
    long = concurrent.futures.ThreadPoolExecutor(1).submit(
        client.completions.create, model="tiny", prompt="long", max_tokens=200, temperature=0)
    time.sleep(0.3)
    t0 = time.perf_counter()
    client.completions.create(model="tiny", prompt="short", max_tokens=2)
    short = time.perf_counter() - t0
    assert not long.done() or short < 5  # it joined the running batch
    long.result(timeout=60)


# ----------------------------------------------------------------------------- the command

def test_gpt_serve_subprocess_streams_and_stops_cleanly_on_sigterm(served):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "--model",
                             str(served["path"]), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, up = time.time() + 60, False
        while time.time() < deadline and not up:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                up = True
            except OSError:
                time.sleep(0.2)
        assert up, proc.stderr.read() if proc.poll() is not None else "no answer"
        chunks = list(openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
                      .completions.create(model="tiny", prompt="hi", max_tokens=10, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr  # as `gpt train` ends on SIGTERM
    assert f"at http://127.0.0.1:{port}/v1" in stderr and "curl" in stderr
    assert stderr.strip().endswith("stopped: in-flight requests finished or timed out")
    assert "Traceback" not in stderr and "error" not in stderr


def test_gpt_serve_without_the_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from gptcli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "serve", "--model",
                          str(tmp_path / "m.safetensors")], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2
    assert out.stderr.strip() == ('error: gpt serve needs starlette, which is not installed; '
                                  'install it with pip install "gptcli[serve]"')


def test_a_port_in_use_is_one_sentence(served):
    port = int(served["url"].rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--model",
                          str(served["path"]), "--port", str(port)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
