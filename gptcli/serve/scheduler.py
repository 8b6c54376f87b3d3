"""Continuous batching for `gpt serve`: one thread owns the model and a ``decode.Engine``; jobs
(requests) join the running batch at the next step and leave it when they finish or their
client goes away.

A job is one request: one or more prompts, ``n`` samples of each (a group of rows that sample
together, seeded like `gpt generate --seed`), its sampling settings, and a ``deliver`` callback
that receives events from the scheduler thread (the HTTP side hands them to its event loop):

- ``{"type": "step", "pieces": [(choice, text, logprob)]}`` after each decode step (``logprob``
  a ``Logprob`` when the job asked for them, else None);
- ``{"type": "done", "choices": [...], "usage": {...}}`` when every choice has finished;
- ``{"type": "error", "message": ..., "status": ...}`` if the job could not run or finish
  (500: it failed; 503: the server is shutting down).

Admission is first in, first out: a job waits until the batch has rows for all its samples, so
a large request is never starved by a stream of small ones. The engine's cache keeps what
finished requests fed, in its free rows: a prompt that continues one (a chat's next turn) is fed
only from where they part, and its usage says how many positions were kept
(``prompt_tokens_details``); it keeps as many conversations as the batch has rows, and a new one
pushes out the one left longest ago (``KVCache.reuse``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import SampleConfig
from ..decode import Engine, Row
from ..speculative import Draft
from ..generate import TextStream
from ..model import GPT
from ..tokenizer import Tokenizer
from .logprobs import Logprob, prompt_logprobs, token_logprob

GATHER_S = 0.005  # measured: 8 requests sent at once reach the server within a few ms


@dataclass
class Choice:
    """One sample of a job: its text stream and, when asked, its tokens' log-probs."""

    index: int
    prompt: list[int]
    stream: TextStream
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stream.finish_reason in ("eos", "stop") else "length"


@dataclass
class Job:
    prompts: list[list[int]]
    n: int
    config: SampleConfig  # max_new_tokens is the request's max_tokens
    deliver: Callable[[dict], None]
    logprobs: int | None = None  # top-N log-probs per generated token
    echo_logprobs: bool = False  # also the prompt tokens' log-probs
    cancelled: bool = False
    ended: bool = False  # its last event (done or error) is sent
    choices: list[Choice] = field(default_factory=list)
    rows: dict[int, Choice] = field(default_factory=dict)  # id(row) -> choice
    cached: int = 0  # prompt positions the engine's cache held already (a conversation's past)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """The client went away: the job leaves the batch at the next step."""
        self.cancelled = True


class Scheduler:
    """The serving loop (see the module docstring), on a thread of its own.

    A failure is its job's alone: a job whose sampling, text or delivery fails ends with an
    error while the others keep decoding (and finish as they would have alone); the engine keeps
    exactly the rows of the running jobs, whatever failed. Only the batched forward pass belongs
    to no one job: when it fails, the newest job leaves and the step is tried again.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int,
                 draft: Draft | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        # a cache of the model's dtype: rows at different positions (requests that came at
        # different times) run torch's attention, which would widen an fp16 cache at each step
        # (the C blocks read either; startup.py's memory check counts this dtype)
        self.engine = Engine(model, max_batch, vocab_size=tokenizer.vocab_size,
                             cache_dtype=model.dtype, draft=draft)
        self.max_batch = max_batch
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.head: Job | None = None  # the next job to admit, waiting for free rows
        self.running: list[Job] = []  # in order of admission
        self.live: list[Job] = []  # submitted, neither ended nor cancelled yet (``busy``)
        self.live_lock = threading.Lock()
        self.stopping = threading.Event()
        self.closing = False  # shutting down: no new jobs (see ``drain``)
        self.deadline: float | None = None
        self.thread = threading.Thread(target=self._run, name="gptcli-scheduler", daemon=True)
        self.steps = 0

    def start(self) -> None:
        """Run the loop on a thread of its own (`gpt serve` runs it on the main thread instead:
        torch decodes ~20% slower from a second thread here, measured)."""
        self.thread.start()

    def drain(self, seconds: float) -> None:
        """Shutting down: refuse new jobs; the admitted and queued ones go on for up to
        ``seconds``, then end with a 503 (so every response is complete before the HTTP server
        stops waiting for them)."""
        self.closing = True
        self.deadline = time.monotonic() + seconds

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.waiting.put(None)  # wake the loop
        if self.thread.is_alive():
            self.thread.join(timeout)
        self._end_all()

    def submit(self, job: Job) -> None:
        if job.size > self.max_batch:
            raise ValueError(f"this request needs {job.size} rows (prompts x n) but the server "
                             f"decodes at most {self.max_batch} at once (--max-batch)")
        self._live(job)
        self.waiting.put(job)

    def busy(self) -> int:
        """Jobs submitted, not ended, whose client is still there (`/health`'s "requests"; one
        whose client left stays where it is until the loop reaches it), wherever they are:
        queued, next in line, prefilled, decoding (not read off those places: a job moving
        from one to the next is in neither for a moment)."""
        return self._live()

    def _live(self, *new: Job) -> int:
        with self.live_lock:
            self.live = [job for job in [*self.live, *new] if not (job.ended or job.cancelled)]
            return len(self.live)

    # ------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.run_once()

    def run_once(self) -> None:
        """Admit what fits (waiting a little when idle), then one decode step."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._end_all()
        try:
            self._admit(block=not self.engine.rows)
            if self.engine.rows:
                self._step()
        except Exception as e:  # noqa: BLE001 - a bug outside any one job's part must not end
            for job in list(self.running):  # the server: the batch ends, the loop goes on
                self._fail(job, f"generation failed: {type(e).__name__}: {e}")
            self._reconcile()

    def _end_all(self) -> None:
        """End every job, running or queued, with a 503: the server is going away."""
        jobs = [*self.running, *([self.head] if self.head else [])]
        self.head = None
        while True:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if job is not None:
                self._fail(job, "the server is shutting down", status=503)

    def _admit(self, block: bool) -> None:
        """Move waiting jobs into the batch while it has rows for them (first in, first out);
        the jobs admitted together are prefilled together. An idle server that gets a request
        waits ``GATHER_S`` for others arriving with it, so a burst starts as one prefill."""
        admitted, free, idle = [], self.engine.free, block
        gather_until = None
        while True:
            if self.head is None:
                try:
                    if gather_until is not None:
                        self.head = self.waiting.get(
                            timeout=max(0.0, gather_until - time.perf_counter()))
                    else:
                        self.head = self.waiting.get(timeout=0.5) if block else \
                            self.waiting.get_nowait()
                except queue.Empty:
                    break
                if self.head is None:  # stop() woke us
                    break
            job = self.head
            if job.cancelled:
                self.head = None
                continue
            if job.size > free:
                break
            self.head, block = None, False
            admitted.append(job)
            free -= job.size
            if idle and gather_until is None:
                gather_until = time.perf_counter() + GATHER_S
        if admitted:
            self._start(admitted)

    @torch.no_grad()
    def _start(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs together; if that fails, each alone, so that one request
        that cannot start (its prompt's log-probs, its prefill) fails by itself."""
        ready = []
        for job in jobs:
            try:
                self._choices(job)
            except Exception as e:  # noqa: BLE001 - the job's own failure
                self._fail(job, f"could not start: {type(e).__name__}: {e}")
                continue
            if job.config.max_new_tokens == 0:  # echo only
                self._finish(job)
            else:
                ready.append(job)
        try:
            self._add(ready)
        except Exception:  # noqa: BLE001 - find whose it was
            self._reconcile()
            for job in ready:
                try:
                    self._add([job])
                except Exception as e:  # noqa: BLE001
                    self._reconcile()
                    self._fail(job, f"could not start: {type(e).__name__}: {e}")

    def _choices(self, job: Job) -> None:
        eot = None if job.config.ignore_eos else self.tokenizer.eot_id
        job.choices.clear()
        for prompt in job.prompts:
            echo = prompt_logprobs(self.model, self.tokenizer.vocab_size, prompt,
                                   job.logprobs or 0) if job.echo_logprobs else []
            for _ in range(job.n):
                stream = TextStream(self.tokenizer, job.config.stop, eot)
                job.choices.append(Choice(len(job.choices), prompt, stream,
                                          prompt_logprobs=echo))

    def _add(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` into the engine (one group per prompt, seeded like `gpt generate`)
        and start decoding them."""
        groups, owners = [], []
        for job in jobs:
            for p, prompt in enumerate(job.prompts):
                generator = None
                if job.config.seed is not None:
                    generator = torch.Generator(device=self.model.device)
                    generator.manual_seed(job.config.seed)
                groups.append(([prompt] * job.n, job.config, generator, (id(job), p)))
                owners.append((job, p))
        for (job, p), rows in zip(owners, self.engine.add_groups(groups)):
            job.cached += rows[0].cached  # (per prompt, as usage counts prompt tokens)
            for k, row in enumerate(rows):
                job.rows[id(row)] = job.choices[p * job.n + k]
        self.running.extend(jobs)

    def _reconcile(self) -> None:
        """Free the engine rows no running job owns (those of a prefill that failed half-way),
        so a failure never leaves rows behind to break the next steps."""
        owned = {key for job in self.running for key in job.rows}
        for row in [r for r in self.engine.rows if id(r) not in owned]:
            self.engine.remove(row)

    def _step(self) -> None:
        for job in [j for j in self.running if j.cancelled]:
            self._drop(job)
        rows = list(self.engine.rows)
        owners = {id(row): self._owner(row) for row in rows}
        before = [len(row.tokens) for row in rows]
        try:
            self.engine.pick()
        except Exception as e:  # noqa: BLE001
            # Engine.pick samples group by group in row order, appending each group's tokens
            # before it samples the next: the first row without a new token is the failed
            # group's. Its job ends; the rows after it pick at the next step (nothing of theirs
            # was used, and advance recomputes the position they are at).
            failed = next((owners[id(r)] for r, n in zip(rows, before) if len(r.tokens) == n),
                          None)
            if failed is not None:
                self._fail(failed, f"generation failed: {type(e).__name__}: {e}")
        self.steps += 1
        pieces: dict[int, list] = {}
        for row, n in zip(rows, before):
            job = owners[id(row)]
            if id(row) not in job.rows or len(row.tokens) == n:  # its job failed, or no token
                continue
            try:
                pieces.setdefault(id(job), []).append(self._take(job, row, row.tokens[-1]))
            except Exception as e:  # noqa: BLE001 - the job's own failure
                self._fail(job, f"generation failed: {type(e).__name__}: {e}")
        for job in list(self.running):
            if id(job) in pieces:
                self._send(job, {"type": "step", "pieces": pieces[id(job)]})
            if not job.rows and job in self.running:
                self._finish(job)
        self._advance()

    def _take(self, job: Job, row: Row, token: int) -> tuple:
        """One row's new token into its choice: (choice index, final text, log-prob)."""
        choice = job.rows[id(row)]
        logprob = token_logprob(row, token, self.tokenizer.vocab_size, job.logprobs) \
            if job.logprobs is not None else None
        text = choice.stream.push(token)
        if logprob is not None and not choice.stream.done:
            choice.logprobs.append(logprob)
        if len(choice.stream.token_ids) >= job.config.max_new_tokens:
            text += choice.stream.close("length")
        if choice.stream.done:
            self.engine.remove(row)
            del job.rows[id(row)]
        return choice.index, text, logprob

    def _advance(self) -> None:
        """One forward for every row. It is shared, so its error names no job; running it again
        is harmless (each row recomputes the position it is at), so the newest job leaves and
        the rest try again: a step that fails because of one request (its memory, its window's
        prefill) ends that request, one that fails for everyone ends them one by one."""
        while self.engine.rows:
            try:
                self.engine.advance()
                return
            except Exception as e:  # noqa: BLE001
                if not self.running:
                    self._reconcile()
                    return
                self._fail(self.running[-1], f"generation failed: {type(e).__name__}: {e}")

    def _owner(self, row: Row) -> Job:
        return next(job for job in self.running if id(row) in job.rows)

    def _drop(self, job: Job) -> None:
        for row in [r for r in self.engine.rows if id(r) in job.rows]:
            self.engine.remove(row)
        job.rows.clear()
        if job in self.running:
            self.running.remove(job)

    def _send(self, job: Job, event: dict) -> None:
        """Hand an event to the job's client; one that cannot take it any more (its event loop
        closed at shutdown) is gone, like a client that disconnected."""
        job.ended = job.ended or event["type"] in ("done", "error")
        try:
            job.deliver(event)
        except Exception:  # noqa: BLE001
            job.cancel()

    def _finish(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
        prompt_tokens = sum(len(p) for p in job.prompts)
        completion = sum(len(c.stream.token_ids) for c in job.choices)
        self._send(job, {"type": "done", "choices": job.choices,
                         "usage": {"prompt_tokens": prompt_tokens,
                                   "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion,
                                   "prompt_tokens_details": {"cached_tokens": job.cached}}})

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        self._drop(job)
        self._send(job, {"type": "error", "message": message, "status": status})
