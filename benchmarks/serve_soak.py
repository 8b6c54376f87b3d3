"""Soak test of `gpt serve`: many clients for minutes, with good, bad and abandoned requests.

Starts a real `gpt serve` subprocess (on a small random-weight model with the GPT-2 vocabulary
that this script saves, or the `gpt2` preset with --preset gpt2, or --model) with an API key,
then runs --clients threads for --minutes, each sending, at random:

- good requests: completions and chats with random lengths and sampling settings (seeded or
  not, top-k / top-p / min-p / repetition penalty, n = 2, log-probs, echo scoring), streamed or
  not, /v1/models, /health; and edge values that must just work (temperature 1e-300, top-p
  1e-300, min-p 1);
- bad ones, each with the status it must get: JSON nested 100,000 deep, NaN, a repetition
  penalty of 1e-300, a wrong method, no key, another model, an unknown path, a body over
  --max-body, max_tokens over --max-tokens, an unsupported field, malformed HTTP, garbage after
  a request answered early (the old h11 LocalProtocolError);
- abandoned ones: a stream closed after its first chunk, a request given up after 0.2 s, a body
  never finished.

Reports the requests served by kind, the answers by status (and any that were not the status
expected; the goal is no 5xx at all), p50 / p99 latency, the server's memory (RSS) after start,
after the first minute and at the end, its log (lines, tracebacks), and how it stopped on
SIGTERM. Not a test: run it by hand.

    python benchmarks/serve_soak.py                 # 8 clients, 10 minutes
    python benchmarks/serve_soak.py --minutes 1 --clients 4 --json
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "soak-key"
WORDS = ("the river city ancient market light stone winter voice road garden letter iron "
         "quiet morning north bridge").split()
MAX_TOKENS, MAX_BODY = 256, 1 << 18


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- requests

class Client:
    """One soak client: its own random stream of requests against the server on ``port``."""

    def __init__(self, port: int, seed: int) -> None:
        self.port, self.rng = port, random.Random(seed)

    def text(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def http(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
             stream: bool = False, timeout: float = 600) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read()
            if response.status == 200 and stream:
                events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
                assert events[-1] == b"[DONE]", data[-200:]
                assert not any("error" in json.loads(e) for e in events[:-1]), data[-300:]
            elif response.status >= 400:
                assert response.getheader("Content-Type") == "application/json", response.status
                assert set(json.loads(data)) == {"error"}
            return response.status
        finally:
            conn.close()

    def raw(self, data: bytes, *more: bytes, timeout: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            for part in more:
                time.sleep(0.05)
                s.sendall(part)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def sampling(self) -> dict:
        r = self.rng
        settings = {"temperature": r.choice([0, 0.7, 1.0, 1.3]), "max_tokens": r.randint(1, 48)}
        for name, values in (("top_p", [0.5, 0.9]), ("top_k", [5, 40]), ("min_p", [0.05, 0.3]),
                             ("repetition_penalty", [0.8, 1.3]), ("seed", [1, 2, 3, 4])):
            if r.random() < 0.3:
                settings[name] = r.choice(values)
        return settings

    # -- the scenarios: (kind, expected status or None for abandoned, function)

    def completion(self) -> int:
        body = {"prompt": self.text(self.rng.randint(1, 30)), **self.sampling()}
        if self.rng.random() < 0.3:
            body["n"] = 2
        if self.rng.random() < 0.3:
            body["logprobs"] = 3
        stream = self.rng.random() < 0.5
        return self.http("POST", "/v1/completions", json.dumps({**body, "stream": stream}).encode(),
                         stream=stream)

    def chat(self) -> int:
        messages = [{"role": "user", "content": self.text(self.rng.randint(1, 20))}]
        if self.rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": self.text(5)})
        stream = self.rng.random() < 0.5
        return self.http("POST", "/v1/chat/completions", json.dumps(
            {"messages": messages, **self.sampling(), "stream": stream}).encode(), stream=stream)

    def echo(self) -> int:
        return self.http("POST", "/v1/completions", json.dumps(
            {"prompt": self.text(20), "max_tokens": 0, "echo": True, "logprobs": 1}).encode())

    def edge_values(self) -> int:
        edge = self.rng.choice([{"temperature": 1e-300}, {"top_p": 1e-300}, {"min_p": 1.0}])
        return self.http("POST", "/v1/completions", json.dumps(
            {"prompt": self.text(5), "max_tokens": 16, **edge}).encode())

    def bad_body(self) -> int:
        body = self.rng.choice([
            b"[" * 100_000, b'{"prompt": "a", "temperature": NaN}',
            b'{"prompt": "a", "repetition_penalty": 1e-300}', b'{"prompt": "a", "max_tokens": '
            + str(MAX_TOKENS + 1).encode() + b"}", b'{"prompt": "a", "logit_bias": {"1": 2}}',
            b'{"messages": [{"role": "robot", "content": "hi"}]}'])
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        return self.http("POST", path, body)

    def wrong_method(self) -> int:
        method, path = self.rng.choice([("PUT", "/v1/completions"), ("DELETE", "/v1/models"),
                                        ("GET", "/v1/chat/completions"), ("PATCH", "/health")])
        return self.http(method, path)

    def no_key(self) -> int:
        return self.http("GET", "/v1/models", key=self.rng.choice([None, "wrong"]))

    def other_model(self) -> int:
        return self.http("POST", "/v1/completions", b'{"prompt": "a", "model": "gpt-5"}')

    def unknown_path(self) -> int:
        return self.http("GET", "/v2/anything")

    def too_big(self) -> int:
        return self.http("POST", "/v1/completions", json.dumps(
            {"prompt": "a" * (MAX_BODY + 10)}).encode())

    def malformed(self) -> int:
        if self.rng.random() < 0.5:
            reply = self.raw(b"GARBAGE\r\n\r\n")
        else:  # garbage after a request answered before its body was read
            reply = self.raw(b"POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n", b"zz\r\n")
        return int(reply.split(b" ", 2)[1])

    def models(self) -> int:
        return self.http("GET", self.rng.choice(["/v1/models", "/health"]))

    def leave_stream(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": self.text(5), "max_tokens": MAX_TOKENS, "stream": True}),
            {"Authorization": f"Bearer {KEY}"})
        conn.getresponse().readline()
        conn.close()

    def give_up(self) -> None:
        try:
            self.http("POST", "/v1/completions", json.dumps(
                {"prompt": self.text(5), "max_tokens": MAX_TOKENS}).encode(), timeout=0.2)
        except TimeoutError:
            pass
        return None

    def half_body(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n{\"prompt\": ")
            time.sleep(0.1)


LEFT = {None}  # the client left: no status
SCENARIOS = [  # (name, weight, the statuses it may get)
    ("completion", 30, {200}), ("chat", 15, {200}), ("echo", 4, {200}), ("models", 3, {200}),
    ("edge_values", 6, {200}), ("bad_body", 8, {400}), ("wrong_method", 4, {405}),
    ("no_key", 3, {401}), ("other_model", 2, {404}), ("unknown_path", 2, {404}),
    ("too_big", 2, {413}), ("malformed", 4, {400, 404}),  # 404: garbage after a 404
    ("leave_stream", 6, LEFT), ("give_up", 5, LEFT), ("half_body", 4, LEFT),
]


def soak(port: int, clients: int, seconds: float) -> list[tuple]:
    """Run the clients; returns (kind, statuses allowed, status or error, latency s) per
    request."""
    results: list[tuple] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    names = [n for n, _, _ in SCENARIOS]
    weights = [w for _, w, _ in SCENARIOS]
    expected = {n: e for n, _, e in SCENARIOS}

    def run(seed: int) -> None:
        client = Client(port, seed)
        while time.monotonic() < deadline:
            kind = client.rng.choices(names, weights)[0]
            t0 = time.perf_counter()
            try:
                status = getattr(client, kind)()
            except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
                status = f"{type(e).__name__}: {e}"[:120]
            with lock:
                results.append((kind, expected[kind], status, time.perf_counter() - t0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ----------------------------------------------------------------------------- main

def model_path(args, scratch: Path) -> str:
    if args.model:
        return args.model
    import torch

    from gptcli.checkpoint import save_checkpoint
    from gptcli.config import ModelConfig
    from gptcli.model import GPT
    from gptcli.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    config = ModelConfig() if args.preset == "gpt2" else ModelConfig(
        n_layer=4, n_head=4, n_embd=128, context_length=256)
    return str(save_checkpoint(scratch / f"soak-{args.preset}.safetensors", GPT(config),
                               GPT2Tokenizer()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", help="a checkpoint (default: a small random model, see --preset)")
    ap.add_argument("--preset", choices=["small", "gpt2"], default="small",
                    help="small: 4 layers of 128 (random weights); gpt2: GPT-2 124M's shape")
    ap.add_argument("--json", action="store_true", help="the last line is the report as JSON")
    args = ap.parse_args()
    model = model_path(args, Path(tempfile.mkdtemp()))
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    with open(log, "w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "gptcli", "serve", "--model", model, "--port", str(port),
             "--device", "cpu", "--api-key", KEY, "--max-batch", "8", "--max-tokens",
             str(MAX_TOKENS), "--max-body", str(MAX_BODY)], stderr=err)
    try:
        for _ in range(600):
            try:
                Client(port, 0).http("GET", "/health")
                break
            except OSError:
                time.sleep(0.2)
        Client(port, 0).completion()  # warm-up
        memory = [(0.0, rss_mib(server.pid))]
        stop = threading.Event()
        t_start = time.monotonic()

        def sample() -> None:
            while not stop.wait(5):
                memory.append((time.monotonic() - t_start, rss_mib(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results = soak(port, args.clients, args.minutes * 60)
        stop.set()
        memory.append((time.monotonic() - t_start, rss_mib(server.pid)))
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        stopped_s = time.monotonic() - t0
    finally:
        if server.poll() is None:
            server.kill()
    lines = log.read_text().splitlines()
    report = summarize(results, memory, args, code, stopped_s, lines)
    print_report(report)
    if args.json:
        print(json.dumps(report))


def summarize(results, memory, args, code, stopped_s, lines) -> dict:
    statuses = collections.Counter(str(status) for _, want, status, _ in results
                                   if want is not LEFT)
    unexpected = collections.Counter(f"{kind}: {status}" for kind, want, status, _ in results
                                     if status not in want)
    good = sorted(t for kind, want, status, t in results if want == {200} and status == 200)
    minute = next((m for t, m in memory if t >= 60), memory[-1][1])
    pct = (lambda q: 1000 * good[min(len(good) - 1, int(q * len(good)))]) if good else \
        (lambda q: float("nan"))
    return {
        "cpu": cpu_name(), "minutes": args.minutes, "clients": args.clients,
        "model": args.model or args.preset, "requests": len(results),
        "requests_per_s": len(results) / (args.minutes * 60),
        "by_kind": dict(collections.Counter(kind for kind, *_ in results)),
        "by_status": dict(statuses), "unexpected": dict(unexpected),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "good_p50_ms": pct(0.5), "good_p99_ms": pct(0.99),
        "good_mean_ms": 1000 * statistics.mean(good) if good else float("nan"),
        "rss_mib": {"start": memory[0][1], "after_1_min": minute, "end": memory[-1][1],
                    "max": max(m for _, m in memory)},
        "log_lines": len(lines), "log_tracebacks": sum("Traceback" in ln for ln in lines),
        "log_uvicorn_errors": sum(ln.startswith("ERROR") for ln in lines),
        "exit_status": code, "shutdown_s": stopped_s,
    }


def print_report(r: dict) -> None:
    print(f"gpt serve soak: {r['clients']} clients for {r['minutes']:g} min on {r['model']} "
          f"({r['cpu']})")
    print(f"  requests: {r['requests']} ({r['requests_per_s']:.1f}/s)")
    print("  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(r["by_kind"].items())))
    print("  answers by status (abandoned requests aside): " + ", ".join(
        f"{k} {n}" for k, n in sorted(r["by_status"].items())))
    print(f"  5xx: {r['server_errors_5xx']}; not the expected answer: {r['unexpected'] or 0}")
    print(f"  good requests: p50 {r['good_p50_ms']:.0f} ms, p99 {r['good_p99_ms']:.0f} ms")
    m = r["rss_mib"]
    print(f"  server RSS: {m['start']:.0f} MiB after start, {m['after_1_min']:.0f} after a "
          f"minute, {m['end']:.0f} at the end (max {m['max']:.0f})")
    print(f"  log: {r['log_lines']} lines, {r['log_tracebacks']} tracebacks, "
          f"{r['log_uvicorn_errors']} uvicorn errors; SIGTERM: exit {r['exit_status']} after "
          f"{r['shutdown_s']:.1f} s")


if __name__ == "__main__":
    main()
