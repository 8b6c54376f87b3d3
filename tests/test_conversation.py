"""`gpt chat`, driven through the real command: standard input from a subprocess pipe (and a
pseudo-terminal for Ctrl-C), every prompt checked token for token against chat.prompt_tokens of
the conversation, every reply against generate() on that prompt with the turn's seed."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gptcli import chat
from gptcli.checkpoint import load_checkpoint, save_checkpoint
from gptcli.cli import app
from gptcli.config import SampleConfig
from gptcli.generate import generate
from gptcli.model import GPT
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import randomize_, tiny_config

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:. \n"
runner = CliRunner()


def make_model(path, tokenizer, context: int, *, size: dict | None = None, **metadata):
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_config(vocab_size=tokenizer.vocab_size, context_length=context,
                                       **(size or {}))), 1).eval()
    return save_checkpoint(path, model, tokenizer, **metadata)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A GPT-2-tokenizer model whose metadata says it was fine-tuned with the template."""
    return make_model(tmp_path_factory.mktemp("m") / "chat.safetensors", GPT2Tokenizer(), 64,
                      chat_template=chat.TEMPLATE)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A character model without a template (the plain layout), context 64."""
    return make_model(tmp_path_factory.mktemp("m") / "base.safetensors",
                      CharTokenizer.from_text(CHARS), 64)


def gpt_chat(model, *args, input: str, json_lines: bool = True):
    """Run `gpt chat` in a subprocess with ``input`` on its standard input (a pipe)."""
    cmd = [sys.executable, "-m", "gptcli", "chat", "--model", str(model), "--device", "cpu",
           *args, *(["--json"] if json_lines else [])]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=300)


def replies(result) -> list[dict]:
    assert result.stdout.endswith("\n") or not result.stdout, result.stdout
    return [json.loads(line) for line in result.stdout.splitlines()]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def expected_reply(model_path, ids, seed, max_new_tokens, template):
    """What generate() makes of ``ids`` with ``seed``: the reply text and its token ids."""
    model, tok, _ = load_checkpoint(model_path)
    cfg = SampleConfig(max_new_tokens=max_new_tokens, seed=seed,
                       stop=chat.stop_strings(template))
    sample = generate(model, tok, ids, cfg)[0][0]
    return chat.reply_content(sample.text, template), sample.token_ids


# ----------------------------------------------------------------------------- the history

def test_earlier_turns_are_in_the_prompt_and_each_reply_is_generate_with_its_seed(chat_model):
    """Each reply is what generate() makes of the whole conversation so far with the turn's
    seed, though a turn feeds only what is new (the session's engine keeps the rest)."""
    tok = GPT2Tokenizer()
    lines = ["Hello there", "How are you?", "Tell me more."]
    result = gpt_chat(chat_model, "--system", "Be brief.", "--max-new-tokens", "6",
                      "--seed", "7", input="".join(f"{x}\n" for x in lines))
    assert result.returncode == 0, result.stderr
    got = replies(result)
    assert len(got) == 3
    history = [{"role": "system", "content": "Be brief."}]
    for k, (line, reply) in enumerate(zip(lines, got)):
        history.append(user(line))
        assert reply["prompt_token_ids"] == chat.prompt_tokens(history, tok, chat.TEMPLATE)
        text, ids = expected_reply(chat_model, reply["prompt_token_ids"], 7 + k, 6, chat.TEMPLATE)
        assert (reply["reply"], reply["token_ids"]) == (text, ids)
        # the earlier turns' keys and values were kept: at least the previous prompt's
        cached = reply["stats"]["cached_prompt_tokens"]
        if k == 0:
            assert cached == 0
        else:
            assert len(got[k - 1]["prompt_token_ids"]) <= cached < len(reply["prompt_token_ids"])
        history.append(assistant(reply["reply"]))
    assert got[1]["reply"] != got[2]["reply"]  # each turn its own seed
    # a template model is not announced as a base model
    assert "not fine-tuned for chat" not in result.stderr

    # without --json: each reply streamed, then a newline; nothing else on stdout
    plain = gpt_chat(chat_model, "--system", "Be brief.", "--max-new-tokens", "6", "--seed", "7",
                     input="".join(f"{x}\n" for x in lines), json_lines=False)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "".join(r["reply"] + "\n" for r in got)


def test_a_draft_model_keeps_greedy_replies_and_reports_its_tokens(chat_model, tmp_path):
    """--draft-model in chat: every turn's greedy reply is the one without a draft (the draft's
    cache follows the conversation across turns; its context of 16 slides), and the stats
    count the draft's tokens."""
    draft = make_model(tmp_path / "draft.safetensors", GPT2Tokenizer(), 16,
                       size=dict(n_layer=1, n_embd=24, n_head=2))
    lines = "".join(f"{x}\n" for x in ["Hello there", "How are you?", "Tell me more."])
    args = ("--system", "Be brief.", "--max-new-tokens", "12", "--temperature", "0")
    plain = gpt_chat(chat_model, *args, input=lines)
    drafted = gpt_chat(chat_model, *args, "--draft-model", str(draft), "--draft-tokens", "3",
                       input=lines)
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    got, expected = replies(drafted), replies(plain)
    assert [(r["reply"], r["token_ids"]) for r in got] == \
        [(r["reply"], r["token_ids"]) for r in expected]
    assert got[-1]["stats"]["cached_prompt_tokens"] > 0  # the kept engine, with its draft
    assert all(r["stats"]["draft_tokens"] > 0 and r["stats"]["acceptance_rate"] is not None
               for r in got)
    assert "draft_tokens" not in expected[0]["stats"] or \
        expected[0]["stats"]["draft_tokens"] is None


def test_base_model_uses_the_plain_layout_and_says_so_once(base_model):
    tok = CharTokenizer.from_text(CHARS)
    result = gpt_chat(base_model, "--max-new-tokens", "5", "--seed", "3",
                      input="hi\n\nok then\n")  # the blank line is no turn
    assert result.returncode == 0, result.stderr
    got = replies(result)
    assert len(got) == 2
    history = [user("hi"), assistant(got[0]["reply"]), user("ok then")]
    assert got[1]["prompt_token_ids"] == tok.encode(
        f"User: hi\nAssistant: {got[0]['reply']}\nUser: ok then\nAssistant:")
    assert got[1]["prompt_token_ids"] == chat.prompt_tokens(history, tok, chat.PLAIN)
    text, _ = expected_reply(base_model, got[1]["prompt_token_ids"], 4, 5, chat.PLAIN)
    assert got[1]["reply"] == text
    assert result.stderr.count("not fine-tuned for chat") == 1


def test_reset_clears_the_history_but_keeps_the_system_message(chat_model):
    result = gpt_chat(chat_model, "--system", "Be brief.", "--max-new-tokens", "4",
                      "--seed", "1", input="Hello\n/reset\nHello\n")
    assert result.returncode == 0, result.stderr
    first, second = replies(result)
    expected = chat.prompt_tokens([{"role": "system", "content": "Be brief."}, user("Hello")],
                                  GPT2Tokenizer(), chat.TEMPLATE)
    assert first["prompt_token_ids"] == second["prompt_token_ids"] == expected
    assert "the history is cleared (the system message stays)" in result.stderr


def test_a_full_context_drops_the_oldest_turns_and_says_so(chat_model, tmp_path):
    """Context 64 with 8 tokens kept for the reply: the prompt may have 56 tokens. Each prompt
    is the system message and the newest turns that fit, oldest dropped first, never brought
    back."""
    tok = GPT2Tokenizer()
    system = {"role": "system", "content": "Answer in one short line."}
    lines = [f"This is message number {n}, friend." for n in range(1, 7)]
    result = gpt_chat(chat_model, "--system", system["content"], "--max-new-tokens", "8",
                      "--seed", "5", input="".join(f"{x}\n" for x in lines) + "/save all.jsonl\n")
    assert result.returncode == 0, result.stderr
    got = replies(result)
    turns: list[dict] = []
    start = 0
    for line, reply in zip(lines, got):
        before = start
        while len(chat.prompt_tokens([system, *turns[start:], user(line)], tok,
                                     chat.TEMPLATE)) > 64 - 8:
            start += 2
        ids = chat.prompt_tokens([system, *turns[start:], user(line)], tok, chat.TEMPLATE)
        assert reply["prompt_token_ids"] == ids
        assert reply["dropped_turns"] == (start - before) // 2
        turns += [user(line), assistant(reply["reply"])]
    assert sum(r["dropped_turns"] for r in got) >= 2
    # dropped turns leave the model's view, not the transcript that /save writes
    saved = json.loads((tmp_path / "all.jsonl").read_text())
    assert saved == {"messages": [system, *turns]}
    assert ("note: the conversation no longer fits the model's context of 64 tokens with room "
            "for a 8-token reply; dropped the oldest turn (the system message stays)"
            ) in result.stderr


def test_system_replaces_and_save_appends_records_train_reads(chat_model, tmp_path):
    tok = GPT2Tokenizer()
    result = gpt_chat(chat_model, "--max-new-tokens", "4", "--seed", "2", input=(
        "/system Be kind.\nHi\n/system Be terse.\nBye\n/save out/chat.jsonl\n"
        "/system\n/reset\nAgain\n/save out/chat.jsonl\n"))
    assert result.returncode == 0, result.stderr
    hi, bye, again = replies(result)
    kind, terse = ({"role": "system", "content": t} for t in ("Be kind.", "Be terse."))
    assert hi["prompt_token_ids"] == chat.prompt_tokens([kind, user("Hi")], tok, chat.TEMPLATE)
    assert bye["prompt_token_ids"] == chat.prompt_tokens(
        [terse, user("Hi"), assistant(hi["reply"]), user("Bye")], tok, chat.TEMPLATE)
    assert again["prompt_token_ids"] == chat.prompt_tokens([user("Again")], tok, chat.TEMPLATE)
    saved = (tmp_path / "out" / "chat.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in saved]
    assert records == [
        {"messages": [terse, user("Hi"), assistant(hi["reply"]), user("Bye"),
                      assistant(bye["reply"])]},
        {"messages": [user("Again"), assistant(again["reply"])]}]
    for n, record in enumerate(records, 1):
        fmt, ids, targets = chat.render_row(record, tok, path="out/chat.jsonl", row=n)
        assert fmt == "messages" and any(targets)
    assert "note: system message set" in result.stderr
    assert "note: system message removed" in result.stderr
    assert "saved 2 turn(s) to out/chat.jsonl" in result.stderr


# ----------------------------------------------------------------------------- bad input

def test_bad_lines_are_one_sentence_and_the_session_goes_on(chat_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    long = "word " * 60
    result = gpt_chat(chat_model, "--max-new-tokens", "4", "--seed", "2", input=(
        "/save early.jsonl\n/bogus\nHi\n/save\n/save afile/x.jsonl\n/save .\n"
        f"{long}\n//slash\n"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the conversation has no reply yet, so there is nothing to save",
        "error: unknown command /bogus; the commands are /reset, /system TEXT, /save FILE, "
        "/quit (start a message with // to send one that begins with /)",
        "error: /save needs a file: /save FILE",
        "error: cannot save the conversation to afile/x.jsonl: a part of the path is a file, "
        "not a folder",
        "error: cannot save the conversation to .: it is a folder",
        "error: this message takes 66 tokens, more than the 60 that fit beside a 4-token reply "
        "in the model's context of 64; shorten it or give a smaller --max-new-tokens",
    ]
    got = replies(result)
    assert len(got) == 2  # "Hi" and "/slash" were answered; the long line left no trace
    assert got[1]["prompt_token_ids"] == chat.prompt_tokens(
        [user("Hi"), assistant(got[0]["reply"]), user("/slash")], GPT2Tokenizer(), chat.TEMPLATE)
    assert result.returncode == 2  # from a pipe, the status of the first refused line
    assert not (tmp_path / "early.jsonl").exists()


def test_characters_outside_a_char_model_are_refused_per_line(base_model):
    result = gpt_chat(base_model, "--max-new-tokens", "3", "--seed", "1", input="hé\nhe\n")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: the text has 1 character(s) outside this model's 56-character vocabulary: 'é'"]
    assert len(replies(result)) == 1


@pytest.mark.parametrize("case", ["missing", "too-long-reply", "char-template", "char-roles",
                                  "system", "draft-tokens", "draft-tokenizer"])
def test_what_stops_a_chat_before_it_starts(case, chat_model, base_model, tmp_path):
    args, message = {
        "missing": (["--model", "nope.safetensors"],
                    "error: checkpoint nope.safetensors does not exist"),
        "too-long-reply": (["--model", str(base_model), "--max-new-tokens", "64"],
                           "error: --max-new-tokens 64 leaves no room for the conversation in "
                           "this model's context of 64 tokens; give at most 63 (say 32)"),
        "char-template": (["--model", str(make_model(
            tmp_path / "ct.safetensors", CharTokenizer.from_text(CHARS), 40,
            chat_template=chat.TEMPLATE))],
            "error: this checkpoint says it was fine-tuned with the gptcli-chat/1 chat template, "
            "which ends turns with an end-of-text token that its char tokenizer does not have"),
        "char-roles": (["--model", str(make_model(
            tmp_path / "lower.safetensors", CharTokenizer.from_text("abc :\n"), 40))],
            "error: this model cannot write the chat layout's role names (System:, User:, "
            "Assistant:): the text has 8 character(s) outside this model's 6-character "
            "vocabulary: 'A', 'U', 'e', 'i', 'n', 'r', 's', 't'"),
        "system": (["--model", str(base_model), "--system", "ça"],
                   "error: the system message cannot be used: the text has 1 character(s) "
                   "outside this model's 56-character vocabulary: 'ç'"),
        "draft-tokens": (["--model", str(chat_model), "--draft-tokens", "2"],
                         "error: --draft-tokens goes with --draft-model"),
        "draft-tokenizer": (["--model", str(chat_model), "--draft-model", str(base_model)],
                            "error: the draft model base uses the char tokenizer "
                            "and the model chat the gpt2 one; a draft model must "
                            "share the model's tokenizer"),
    }[case]
    result = runner.invoke(app, ["chat", *args], input="hello\n")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_default_reply_length_fits_a_small_context(base_model):
    result = gpt_chat(base_model, "--seed", "1", input="hi\n")
    assert result.returncode == 0, result.stderr
    assert "note: replies are at most 32 tokens (half this model's context of 64)" \
        in result.stderr
    (reply,) = replies(result)
    assert len(reply["token_ids"]) == 32 and len(reply["prompt_token_ids"]) <= 32


# ----------------------------------------------------------------------------- a terminal

class Terminal:
    """The parent side of a pseudo-terminal: what it shows, read up to what a test waits for."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending, self.shown = fd, b"", b""

    def _more(self, deadline: float, waiting_for) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
        assert ready, f"no {waiting_for!r} in time; the terminal shows {self.shown[-500:]!r}"
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        assert chunk, f"the terminal closed before {waiting_for!r}: {self.shown[-500:]!r}"
        self.pending += chunk
        self.shown += chunk

    def expect(self, pattern: bytes, seconds: float = 120) -> None:
        """Wait until ``pattern`` is shown (past what earlier waits consumed)."""
        deadline = time.time() + seconds
        while pattern not in self.pending:
            self._more(deadline, pattern)
        self.pending = self.pending[self.pending.index(pattern) + len(pattern):]

    def expect_bytes(self, n: int, seconds: float = 120) -> None:
        """Wait until ``n`` more bytes are shown."""
        deadline = time.time() + seconds
        while len(self.pending) < n:
            self._more(deadline, f"{n} bytes")
        self.pending = b""


def test_ctrl_c_in_a_terminal_stops_the_reply_and_the_session_goes_on(tmp_path):
    """A real terminal (pty): Ctrl-C is the terminal's interrupt character, so the command gets
    SIGINT mid-reply; the partial reply stays in the conversation and the next message works."""
    import pty

    # A model slow enough (a few ms a token) and one thread for the command, so that the reply
    # is still streaming when this process, sharing the CPU with it, gets to send Ctrl-C
    model = make_model(tmp_path / "long.safetensors", CharTokenizer.from_text(CHARS), 4096,
                       size=dict(n_layer=4, n_head=4, n_embd=256))
    argv = [sys.executable, "-m", "gptcli", "chat", "--model", str(model), "--device", "cpu",
            "--max-new-tokens", "4000", "--seed", "1"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the terminal as its stdin, stdout and stderr
        try:
            # as a shell in a terminal starts a command: SIGINT at its default, even where this
            # test runs under a parent that ignores it (a background job of a script does)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, argv, {**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            os._exit(127)
    term = Terminal(fd)
    try:
        term.expect(b"Ctrl-C stops a reply")
        term.expect(b"> ")
        os.write(fd, b"hello\n")
        term.expect(b"hello\r\n")
        term.expect_bytes(30)  # the reply is streaming
        os.write(fd, b"\x03")
        term.expect(b"note: reply stopped; the text so far stays in the conversation")
        term.expect(b"> ")
        os.write(fd, b"again\n")
        term.expect(b"again\r\n")
        term.expect_bytes(30)
        os.write(fd, b"\x03")
        term.expect(b"> ")
        os.write(fd, b"/save saved.jsonl\n")
        term.expect(b"saved 2 turn(s)")
        term.expect(b"> ")
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, term.shown[-1000:]
    (record,) = [json.loads(line) for line in (tmp_path / "saved.jsonl").read_text().splitlines()]
    messages = record["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0]["content"], messages[2]["content"]] == ["hello", "again"]
    first = messages[1]["content"]
    assert 0 < len(first) < 4000  # stopped early, and kept
    terminal = term.shown.decode("utf-8", "replace").replace("\r\n", "\n")
    assert first in terminal  # the kept reply is the text that was shown
