"""`gpt chat`: a conversation with a model in the terminal (or driven through standard input).

The conversation is the system message (at most one, always first) and the turns since the last
``/reset``: pairs of a user message and the reply to it. Every prompt is rendered from it with
``chat.prompt_tokens`` in the checkpoint's layout (``chat.template_for`` its metadata) and every
reply ends at ``chat.stop_strings``; the reply stored is ``chat.reply_content`` of the text.

- Context: the prompt may use the model's context less the room kept for the reply
  (``--max-new-tokens``). When it does not fit, the oldest turns leave the model's view, whole,
  one at a time, and stay out of it for the rest of the conversation (said on stderr); the
  system message and the new message always stay. They are still part of what ``/save``
  writes: the window is what the model sees, the transcript is what was said.
- Ctrl-C stops the reply being made; the text shown so far stays in the conversation as the
  reply (as a chat app's "stop" button leaves it), and the session goes on.
- Seeds: with ``--seed S`` the k-th reply of the session (from 0, /reset does not restart the
  count) is sampled with seed ``S + k``, so the same input gives the same conversation.
- Standard input that is not a terminal: each line is a user turn (blank lines are skipped),
  each reply is printed as its text and a newline; nothing else goes to stdout. ``--json``
  prints one JSON object per reply instead. A refused line is one ``error:`` line on stderr and
  the session goes on; the exit status is then that of the first refusal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import chat
from .config import SEED_LIMIT, SampleConfig
from .decode import Engine
from .errors import GptcliError, UserError, path_error
from .generate import Loaded, generate

COMMANDS = "/reset, /system TEXT, /save FILE, /quit"


@dataclass
class Conversation:
    """What was said: the system message and the turns, alternately user and assistant
    messages (``{"role", "content"}``); ``start`` is the first turn message the model still
    sees (the ones before it were dropped to fit the context)."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    start: int = 0

    def _system(self) -> list[dict[str, str]]:
        return [] if self.system is None else [{"role": "system", "content": self.system}]

    def window(self, start: int | None = None) -> list[dict[str, str]]:
        """The messages the model sees (from ``start``, a turn boundary, when given)."""
        return self._system() + self.turns[self.start if start is None else start:]

    def transcript(self) -> list[dict[str, str]]:
        """Everything said since the last /reset, dropped turns included."""
        return self._system() + self.turns

    def reset(self) -> None:
        self.turns, self.start = [], 0


def fit(conv: Conversation, message: str, tokenizer, template: str, *, context: int,
        room: int) -> tuple[list[int], int]:
    """The prompt ids for ``message`` after the conversation, dropping the oldest turns (and
    committing the drop to ``conv``) until ``room`` tokens for the reply fit beside them in the
    ``context``; returns the ids and how many turns were dropped. A message that does not fit
    even alone is a UserError (and ``conv`` is left as it was)."""
    user = {"role": "user", "content": message}
    start = conv.start
    while True:
        ids = chat.prompt_tokens(conv.window(start) + [user], tokenizer, template)
        if len(ids) + room <= context:
            dropped, conv.start = (start - conv.start) // 2, start
            return ids, dropped
        if start >= len(conv.turns):
            with_system = " with the system message" if conv.system is not None else ""
            raise UserError(f"this message{with_system} takes {len(ids)} tokens, more than the "
                            f"{context - room} that fit beside a {room}-token reply in the "
                            f"model's context of {context}; shorten it or give a smaller "
                            f"--max-new-tokens")
        start += 2  # one whole turn: a user message and its reply


def reply_room(max_new_tokens: int, context: int, given: bool, log: Callable[[str], None]) -> int:
    """Tokens kept for each reply: --max-new-tokens; its default, on a model whose context is
    under twice it, becomes half the context (so `gpt chat` works on the tiny presets)."""
    if given and max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for the conversation "
                        f"in this model's context of {context} tokens; give at most "
                        f"{context - 1} (say {context // 2})")
    if not given and max_new_tokens > context // 2:
        log(f"note: replies are at most {context // 2} tokens (half this model's context of "
            f"{context}); --max-new-tokens sets it")
        return max(1, context // 2)
    return max_new_tokens


def check_layout(tokenizer, template: str, system: str | None) -> None:
    """Refuse a model that cannot write its chat layout, and a system message it cannot read."""
    if template == chat.TEMPLATE and tokenizer.eot_id is None:
        raise UserError(f"this checkpoint says it was fine-tuned with the {chat.TEMPLATE} chat "
                        f"template, which ends turns with an end-of-text token that its "
                        f"{tokenizer.name} tokenizer does not have")
    probe = [{"role": "user", "content": ""}]
    try:
        chat.prompt_tokens(probe, tokenizer, template)
    except UserError as e:
        raise UserError(f"this model cannot write the chat layout's role names "
                        f"(System:, User:, Assistant:): {e}") from None
    if system is not None:
        check_system(tokenizer, template, system)


def check_system(tokenizer, template: str, system: str) -> None:
    try:
        chat.prompt_tokens([{"role": "system", "content": system}], tokenizer, template)
    except UserError as e:
        raise UserError(f"the system message cannot be used: {e}") from None


def save(conv: Conversation, path: str) -> str:
    """Append the conversation to ``path`` as one JSON line, ``{"messages": [...]}`` (the
    chat record `gpt train --data` reads); returns what was written, for the note."""
    from .files import make_folder

    if not any(m["role"] == "assistant" for m in conv.turns):
        raise UserError("the conversation has no reply yet, so there is nothing to save")
    target = Path(path).expanduser()
    line = json.dumps({"messages": conv.transcript()}, ensure_ascii=False) + "\n"
    doing = "save the conversation to"
    make_folder(target.parent, doing, shown=target)
    try:
        with open(target, "a+b") as f:
            f.seek(0, 2)
            if f.tell() > 0:  # a file whose last line has no newline gets one first
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
    except OSError as e:
        raise path_error(e, doing, target) from None
    return f"saved {len(conv.turns) // 2} turn(s) to {target} (one JSON line)"


class ReplyWriter:
    """A reply's text on stdout as it is made, as ``chat.reply_content`` will store it (the
    template's leading space, the plain layout's leading blanks are not shown)."""

    def __init__(self, template: str, stream: bool) -> None:
        self.template, self.stream = template, stream
        self.raw, self.shown = "", 0

    def text(self, i: int, piece: str) -> None:
        self.raw += piece
        if self.stream:
            content = chat.reply_content(self.raw, self.template)
            sys.stdout.write(content[self.shown:])
            sys.stdout.flush()
            self.shown = len(content)

    @property
    def content(self) -> str:
        return chat.reply_content(self.raw, self.template)


@dataclass
class Session:
    loaded: Loaded
    template: str
    sample: SampleConfig  # max_new_tokens: the room kept for each reply
    conv: Conversation
    as_json: bool
    log: Callable[[str], None]
    replies: int = 0  # replies made in the session: the seed offset
    # one decode engine for the session: its cache keeps the conversation so far, so each turn
    # feeds only what is new (``generate``'s ``engine``)
    engine: Engine | None = None

    def say(self, message: str) -> None:
        """One user turn: fit the prompt, stream the reply, keep both in the conversation."""
        tokenizer = self.loaded.tokenizer
        ids, dropped = fit(self.conv, message, tokenizer, self.template,
                           context=self.loaded.model.config.context_length,
                           room=self.sample.max_new_tokens)
        if dropped:
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            kept = " (the system message stays)" if self.conv.system is not None else ""
            self.log(f"note: the conversation no longer fits the model's context of "
                     f"{self.loaded.model.config.context_length} tokens with room for a "
                     f"{self.sample.max_new_tokens}-token reply; dropped the oldest {turns}"
                     f"{kept}")
        seed = self.sample.seed
        cfg = self.sample.model_copy(update={
            "num_samples": 1, "stop": [*self.sample.stop, *chat.stop_strings(self.template)],
            "seed": None if seed is None else (seed + self.replies) % SEED_LIMIT})
        self.replies += 1
        writer = ReplyWriter(self.template, stream=not self.as_json)
        if self.engine is None or self.engine.rows:  # (or one a second Ctrl-C left busy)
            self.engine = self.loaded.engine(1)
        result: dict = {"finish_reason": "interrupted", "token_ids": None, "stats": None}
        try:
            samples, stats = generate(self.loaded.model, tokenizer, ids, cfg,
                                      on_text=writer.text, engine=self.engine)
            result = {"finish_reason": samples[0].finish_reason,
                      "token_ids": samples[0].token_ids, "stats": stats.as_dict()}
        except KeyboardInterrupt:  # Ctrl-C: this reply ends here, the session goes on
            pass
        self.conv.turns += [{"role": "user", "content": message},
                            {"role": "assistant", "content": writer.content}]
        if self.as_json:
            print(json.dumps({"reply": writer.content, "prompt_token_ids": ids,
                              "dropped_turns": dropped, **result}), flush=True)
        else:
            print(flush=True)
        if result["stats"] is None:
            self.log("note: reply stopped; the text so far stays in the conversation")

    def command(self, line: str) -> bool:
        """A /command; False ends the session."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return False
        if name == "/reset":
            self.conv.reset()
            self.log("note: the history is cleared" + (
                " (the system message stays)" if self.conv.system is not None else ""))
        elif name == "/system":
            if arg:
                check_system(self.loaded.tokenizer, self.template, arg)
            self.conv.system = arg or None
            self.log("note: system message " + ("set" if arg else "removed"))
        elif name == "/save":
            if not arg:
                raise UserError("/save needs a file: /save FILE")
            self.log(f"note: {save(self.conv, arg)}")
        else:
            raise UserError(f"unknown command {name}; the commands are {COMMANDS} (start a "
                            f"message with // to send one that begins with /)")
        return True


def read_line(interactive: bool) -> str | None:
    """The next input line (None at the end); in a terminal after a "> " prompt, and Ctrl-C
    there starts a fresh prompt."""
    if not interactive:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")
    while True:
        try:
            if sys.stdout.isatty():
                return input("> ")
            sys.stderr.write("> ")  # a prompt never goes into redirected output
            sys.stderr.flush()
            return input()
        except KeyboardInterrupt:
            sys.stderr.write("\n")
        except EOFError:
            sys.stderr.write("\n")
            return None


def run_chat(loaded: Loaded, sample: SampleConfig, *, system: str | None, as_json: bool,
             reply_given: bool, log: Callable[[str], None]) -> int:
    """`gpt chat` from a loaded model until /quit or the end of the input; returns the exit
    status (see the module docstring)."""
    from .checkpoint import read_safetensors

    template = chat.template_for(read_safetensors(loaded.path, tensors=False)[1])
    system = system or None
    check_layout(loaded.tokenizer, template, system)
    room = reply_room(sample.max_new_tokens, loaded.model.config.context_length, reply_given,
                      log)
    session = Session(loaded, template, sample.model_copy(update={"max_new_tokens": room}),
                      Conversation(system), as_json, log)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing for input()
        except ImportError:
            pass
    if template == chat.PLAIN:
        log("note: this model was not fine-tuned for chat, so its replies are continuations "
            "of the conversation written as 'User:' and 'Assistant:' lines")
    if interactive:
        log(f"chat: {COMMANDS} (or Ctrl-D); Ctrl-C stops a reply")
    status = 0
    while (line := read_line(interactive)) is not None:
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not session.command(line.strip()):
                    break
            else:
                session.say(line[1:] if line.startswith("//") else line)
        except GptcliError as e:
            log(f"error: {e}")
            status = status or (0 if interactive else e.exit_code)
    return status
