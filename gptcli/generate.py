"""Text generation on top of the decode engine: per-sample text streams (incremental UTF-8,
stop strings), ``generate`` (the CLI's and training samples'), prompt ids, and loading a model
to generate with (and its draft model, for speculative decoding). The layers below:
``decode.Engine`` (the one decode loop), then ``speculative`` and ``sampling.next_token``."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SampleConfig
from .decode import Engine, compile_step
from .devices import synchronize
from .errors import UserError
from .model import GPT
from .speculative import Draft
from .tokenizer import Tokenizer

class TextStream:
    """One sample's text as its tokens arrive: incremental UTF-8 decoding (a character split
    across tokens is never emitted half), stop strings, and the text held back while it could
    still be the start of a stop string. One per sample; serving keeps one per request."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], eot_id: int | None) -> None:
        self.tokenizer, self.stop, self.eot_id = tokenizer, stop, eot_id
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that became final (maybe empty)."""
        if self.done:
            return ""
        if token == self.eot_id:
            return self.close("eos")
        self.token_ids.append(token)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = min((c for c in (self.text.find(s, max(0, self.emitted - self.hold))
                               for s in self.stop) if c >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.close("stop")
        return self._take(len(self.text) - self.hold)

    def close(self, reason: str = "length") -> str:
        """Finish the sample (end-of-text, a stop string, or its length); returns the rest."""
        if self.done:
            return ""
        if reason != "stop":
            self.text += self.decoder.decode(b"", final=True)
        self.finish_reason = reason
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


@dataclass
class Sample:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0
    total_time_s: float = 0.0
    cached_prompt_tokens: int = 0  # prompt positions whose keys and values were kept (Engine)
    draft_tokens: int | None = None  # with a draft model: tokens it proposed, and how many
    accepted_tokens: int = 0  # of them were kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def decode_tokens_per_s(self) -> float:
        # tokens after the first, per second of decoding (per sequence in the batch)
        steps = self.new_tokens - 1
        return steps / self.decode_time_s if steps > 0 and self.decode_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens, "new_tokens": self.new_tokens,
                "time_to_first_token_s": self.time_to_first_token_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "total_time_s": self.total_time_s,
                **({} if self.draft_tokens is None else {
                    "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                    "acceptance_rate": self.acceptance_rate})}


def generate(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], config: SampleConfig, *,
             on_text: Callable[[int, str], None] | None = None,
             on_done: Callable[[int], None] | None = None,
             step: Callable | None = None, draft: Draft | None = None,
             engine: Engine | None = None) -> tuple[list[Sample], GenerationStats]:
    """Generate ``config.num_samples`` continuations of ``prompt_ids`` as one batch.

    Stops a sample at end-of-text (unless ``ignore_eos``) or just before a stop string; a
    finished sample leaves the batch. ``on_text(sample_index, piece)`` receives text as soon as
    it is final (see TextStream); ``on_done(sample_index)`` is called once a sample has all its
    text. With a ``draft``, decodes speculatively (``speculative.py``): the same greedy tokens,
    the same distribution of sampled ones, and the acceptance rate in the stats. ``engine`` (made
    with ``step`` and ``draft``, and ``num_samples`` free rows) keeps its cache between calls:
    a prompt that starts with an earlier call's prompt and reply, such as a conversation's next
    turn, is fed only from where they part.
    """
    device = model.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eot = None if config.ignore_eos else tokenizer.eot_id
    streams = [TextStream(tokenizer, config.stop, eot) for _ in range(config.num_samples)]
    emit = on_text or (lambda i, piece: None)
    finished = on_done or (lambda i: None)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    if engine is None:
        engine = Engine(model, config.num_samples, step=step, vocab_size=tokenizer.vocab_size,
                        draft=draft)
    t_first, before = t0, (engine.proposed, engine.accepted)
    try:
        rows = engine.add([prompt_ids] * config.num_samples, config, generator)
        stats.cached_prompt_tokens = rows[0].cached
        live = dict(zip(map(id, rows), range(len(rows))))  # row -> its sample
        for n in range(config.max_new_tokens):
            tokens = engine.pick()  # one host sync per step: needed to stream and to stop
            if n == 0:
                synchronize(device)
                t_first = time.perf_counter()
                stats.time_to_first_token_s = t_first - t0
            stats.new_tokens = n + 1
            for row, token in zip(list(engine.rows), tokens):
                stream = streams[live[id(row)]]
                if piece := stream.push(token):
                    emit(live[id(row)], piece)
                if stream.done:
                    engine.remove(row)
                    finished(live[id(row)])
            if not engine.rows or n + 1 == config.max_new_tokens:
                break
            engine.advance()
    finally:  # (interrupted too: what the cache holds stays known, for the engine's next call)
        for row in list(engine.rows):
            engine.remove(row)
    for i, stream in enumerate(streams):
        if not stream.done:  # ran to its length
            if piece := stream.close():
                emit(i, piece)
            finished(i)
    synchronize(device)
    end = time.perf_counter()
    stats.decode_time_s, stats.total_time_s = end - t_first, end - t0
    if engine.draft is not None:
        stats.draft_tokens = engine.proposed - before[0]
        stats.accepted_tokens = engine.accepted - before[1]
    return [Sample(s.token_ids, s.text, s.finish_reason) for s in streams], stats


# ----------------------------------------------------------------------------- setting up

@dataclass
class Loaded:
    """A model ready to generate: the model, its tokenizer, where it came from, and the compiled
    one-token step (None: the model itself), and the draft model for speculative decoding."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    step: Callable | None = None
    draft: Draft | None = None
    warm: bool = False  # a generate call has run (a compiled step: compiled)

    def engine(self, rows: int) -> Engine:
        """A decode engine of ``rows`` rows for this model, its step and draft, to keep between
        ``generate`` calls (a prompt that starts as the last one did is fed from there)."""
        return Engine(self.model, rows, step=self.step, vocab_size=self.tokenizer.vocab_size,
                      draft=self.draft)


def load_generator(model_name: str | None, *, device: str = "auto", dtype: str = "auto",
                   compile: bool = False, quantize: str | None = None,
                   kernel: str | None = None, draft_model: str | None = None,
                   draft_tokens: int = 4, batch: int = 1) -> Loaded:
    """Load a model for generation (see ``models.load_model``; kernels chosen for 1 row and
    ``batch`` rows), compiling its one-token step when asked; and ``draft_model`` the same way
    (``load_draft``)."""
    from .locate import load_model

    rows = (1, batch)
    draft_path = None if draft_model is None else find_draft(draft_model)  # before the wait
    model, tokenizer, path = load_model(model_name, device=device, dtype=dtype,
                                        quantize=quantize, kernel=kernel, rows=rows,
                                        steps=not compile)  # (a compiled step is its own)
    loaded = Loaded(model, tokenizer, path, compile_step(model) if compile else None)
    if draft_path is not None:
        loaded.draft = load_draft(draft_path, tokenizer, path, device=device, dtype=dtype,
                                  quantize=quantize, kernel=kernel, rows=rows, compile=compile,
                                  tokens=draft_tokens)
    return loaded


def find_draft(name: str) -> Path:
    """Where ``--draft-model`` is, its errors said to be about the draft model."""
    from .locate import find_model

    try:
        return find_model(name)
    except UserError as e:
        raise UserError(f"--draft-model: {e}") from None


def load_draft(draft_path: Path, tokenizer: Tokenizer, path: Path, *, device: str, dtype: str,
               quantize: str | None, kernel: str | None, rows: tuple[int, ...], compile: bool,
               tokens: int) -> Draft:
    """The draft model at ``draft_path`` (``find_draft``'s) for the model at ``path`` (whose
    tokenizer it must share), loaded as the model was, with ``tokens`` proposals a round."""
    from .models import display_name, load_model

    small, small_tokenizer, small_path = load_model(draft_path, device=device, dtype=dtype,
                                                    quantize=quantize, kernel=kernel,
                                                    rows=rows, steps=not compile)
    if small_tokenizer.spec() != tokenizer.spec():
        names = (display_name(small_path), display_name(path))
        differ = f"the {small_tokenizer.name} tokenizer and the model {names[1]} the " \
            f"{tokenizer.name} one" if small_tokenizer.name != tokenizer.name else \
            f"another {tokenizer.name} vocabulary than the model {names[1]}"
        raise UserError(f"the draft model {names[0]} uses {differ}; a draft model must share "
                        "the model's tokenizer")
    return Draft(small, tokens, compile_step(small) if compile else None)


def prompt_ids(tokenizer: Tokenizer, text: str, context_length: int) -> tuple[list[int], str | None]:
    """Token ids of the prompt (an empty prompt starts from ``tokenizer.start_id``: end-of-text,
    or a newline for char models) and a warning when it had to be cut to the context."""
    ids = (tokenizer.encode(text) if text else []) or [tokenizer.start_id]
    if len(ids) > context_length:
        return ids[-context_length:], (f"the prompt has {len(ids)} tokens, more than the "
                                       f"model's context of {context_length}; keeping the last "
                                       f"{context_length}")
    return ids, None
