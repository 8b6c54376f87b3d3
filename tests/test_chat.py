"""The chat template and the record formats: exact tokens and targets, written out by hand."""

from __future__ import annotations

import pytest

from gptcli import chat
from gptcli.chat import (PLAIN, TEMPLATE, RecordError, detect_format, prompt_tokens,
                         render_record, render_row, stop_strings, template_for)
from gptcli.errors import UserError
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import char_tokenizer

EOT = "<|endoftext|>"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer()


def pieces(tok, ids, targets):
    """Each token's text with 'T' (target) or '.' (context): the mask is read off the text."""
    assert len(ids) == len(targets)
    return [(tok.decode([i]), "T" if t else ".") for i, t in zip(ids, targets)]


def test_messages_exact_tokens_and_targets(tok):
    record = {"messages": CONVERSATION}
    assert detect_format(record) == "messages"
    ids, targets = render_record(record, "messages", tok)
    assert tok.decode(ids) == (f"System: Be brief.{EOT}User: Hi{EOT}Assistant: Hello!{EOT}"
                               f"User: Bye{EOT}Assistant: Bye.{EOT}")
    assert pieces(tok, ids, targets) == [
        ("System", "."), (":", "."), (" Be", "."), (" brief", "."), (".", "."), (EOT, "."),
        ("User", "."), (":", "."), (" Hi", "."), (EOT, "."),
        ("Assistant", "."), (":", "."), (" Hello", "T"), ("!", "T"), (EOT, "T"),
        ("User", "."), (":", "."), (" Bye", "."), (EOT, "."),
        ("Assistant", "."), (":", "."), (" Bye", "T"), (".", "T"), (EOT, "T"),
    ]
    assert ids.count(tok.eot_id) == 5


def test_no_mask_prompt_makes_every_token_a_target(tok):
    ids, targets = render_record({"messages": CONVERSATION}, "messages", tok, mask_prompt=False)
    assert ids == render_record({"messages": CONVERSATION}, "messages", tok)[0]
    assert all(targets)


def test_prompt_completion(tok):
    record = {"prompt": "2+2=", "completion": "4", "id": 7}  # extra keys are ignored
    assert detect_format(record) == "prompt_completion"
    ids, targets = render_record(record, "prompt_completion", tok)
    assert tok.decode(ids) == f"User: 2+2={EOT}Assistant: 4{EOT}"
    assert pieces(tok, ids, targets) == [
        ("User", "."), (":", "."), (" 2", "."), ("+", "."), ("2", "."), ("=", "."), (EOT, "."),
        ("Assistant", "."), (":", "."), (" 4", "T"), (EOT, "T"),
    ]


def test_alpaca_with_and_without_input(tok):
    record = {"instruction": "Translate.", "input": "chat", "output": "cat",
              "text": "a pre-rendered prompt that alpaca dumps carry"}
    assert detect_format(record) == "alpaca"  # the chat fields win over a stray "text"
    ids, targets = render_record(record, "alpaca", tok)
    assert tok.decode(ids) == f"User: Translate.\n\nchat{EOT}Assistant: cat{EOT}"
    assert pieces(tok, ids, targets) == [
        ("User", "."), (":", "."), (" Trans", "."), ("late", "."), (".", "."),
        ("\n", "."), ("\n", "."), ("chat", "."), (EOT, "."),
        ("Assistant", "."), (":", "."), (" cat", "T"), (EOT, "T"),
    ]
    for empty in ({"input": ""}, {"input": None}, {}):
        record = {"instruction": "Say hi.", "output": "hi", **empty}
        ids, targets = render_record(record, "alpaca", tok)
        assert tok.decode(ids) == f"User: Say hi.{EOT}Assistant: hi{EOT}"
        assert [t for _, t in pieces(tok, ids, targets)] == list("........TT")


def test_text_records_are_all_targets_and_end_with_end_of_text(tok):
    assert detect_format({"text": "Hello world"}) == "text"
    ids, targets = render_record({"text": "Hello world"}, "text", tok)
    assert pieces(tok, ids, targets) == [("Hello", "T"), (" world", "T"), (EOT, "T")]
    assert detect_format({"body": "x"}, text_column="body") == "text"
    assert render_record({"body": "x"}, "text", tok, text_column="body")[0] == [87, tok.eot_id]
    char = char_tokenizer(5)  # no end-of-text: the caller's own separator applies
    assert render_record({"text": "\u0100\u0101"}, "text", char) == ([0, 1], [True, True])


def test_prompt_is_a_prefix_of_the_training_tokens(tok):
    """The generation prompt is token for token what training saw, up to the content of the
    last assistant turn; the learned reply is that content and end-of-text."""
    ids, targets = render_record({"messages": CONVERSATION}, "messages", tok)
    prompt = prompt_tokens(CONVERSATION[:-1], tok, TEMPLATE)
    assert ids[:len(prompt)] == prompt
    assert tok.decode(prompt).endswith(f"User: Bye{EOT}Assistant:")
    assert ids[len(prompt):] == tok.encode(" Bye.") + [tok.eot_id]
    assert all(targets[len(prompt):]) and not targets[len(prompt) - 1]
    # awkward contents: leading/trailing spaces, newlines, an end-of-text look-alike
    odd = [{"role": "user", "content": "  two spaces\n"},
           {"role": "assistant", "content": f" {EOT} not special\n\n"}]
    ids, _ = render_record({"messages": odd}, "messages", tok)
    prompt = prompt_tokens(odd[:1], tok, TEMPLATE)
    assert ids[:len(prompt)] == prompt
    assert ids.count(tok.eot_id) == 2  # message text cannot forge a turn boundary
    assert chat.reply_content(tok.decode(ids[len(prompt):-1]), TEMPLATE) == odd[1]["content"]


def test_prompt_accepts_objects_with_role_and_content(tok):
    from gptcli.serve.protocol import Message

    messages = [Message(role="user", content="Hi")]
    assert prompt_tokens(messages, tok, TEMPLATE) == \
        prompt_tokens([{"role": "user", "content": "Hi"}], tok, TEMPLATE)


def test_plain_layout_for_base_models(tok):
    """Base models (no template in their metadata) keep the plain-text layout `gpt serve` has
    always used: a line per message, then "Assistant:", stopping at the next "User:" line."""
    messages = CONVERSATION[:2]
    assert tok.decode(prompt_tokens(messages, tok, PLAIN)) == \
        "System: Be brief.\nUser: Hi\nAssistant:"
    assert chat.plain_prompt(messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert stop_strings(PLAIN) == ["\nUser:"]
    assert stop_strings(TEMPLATE) == []  # the end-of-text token ends the reply
    # the plain layout needs no end-of-text, so character models keep chatting as before
    letters = CharTokenizer(sorted(set("System: Be brief.\nUser: HiAssistant")))
    assert letters.decode(prompt_tokens(messages, letters, PLAIN)).endswith("\nAssistant:")


def test_template_from_metadata():
    assert template_for({}) == PLAIN
    assert template_for({"config": "{}"}) == PLAIN
    assert template_for(chat.template_metadata()) == TEMPLATE
    assert chat.template_metadata() == {"chat_template": "gptcli-chat/1"}
    with pytest.raises(UserError, match=r"chat template 'gptcli-chat/9', which this gptcli does"):
        template_for({"chat_template": "gptcli-chat/9"})
    with pytest.raises(ValueError, match="unknown chat template"):
        stop_strings("chatml")


def test_template_needs_end_of_text():
    char = char_tokenizer(40)
    with pytest.raises(UserError) as info:
        render_record({"prompt": "\u0100", "completion": "\u0101"}, "prompt_completion", char)
    message = str(info.value)
    assert message.count(".") == 0 and "end-of-text" in message and "char tokenizer" in message
    with pytest.raises(UserError, match="end-of-text"):
        prompt_tokens([{"role": "user", "content": "\u0100"}], char, TEMPLATE)


def test_system_turns_anywhere_and_consecutive_roles(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, targets = render_record({"messages": messages}, "messages", tok)
    assert tok.decode(ids) == f"User: a{EOT}System: b{EOT}User: c{EOT}Assistant: d{EOT}"
    assert sum(targets) == 2


@pytest.mark.parametrize("record, message", [
    ([1, 2], "the record is an array, not a JSON object"),
    ({"body": "x"}, "the record has none of the known fields ('messages'; 'prompt' and "
                    "'completion'; 'instruction' and 'output'; or 'text' (pick another text "
                    "field with --text-column)); its keys are 'body'"),
    ({"prompt": "x"}, "the record has none of the known fields"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": "hi"}, "'messages' must be a non-empty array"),
    ({"messages": [{"role": "user", "content": "x"}]},
     "the conversation has no assistant turn, so there is nothing to learn"),
    ({"messages": [{"role": "tool", "content": "x"}]},
     "message 1 has role 'tool'; the roles are system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]},
     "message 2 has no role"),
    ({"messages": [{"role": "assistant", "content": None}]},
     "the content of message 1 (assistant) is null, not a string"),
    ({"messages": [{"role": "assistant", "content": [{"type": "text"}]}]},
     "the content of message 1 (assistant) is an array, not a string"),
    ({"messages": ["hi"]}, 'message 1 is not a {"role", "content"} object'),
    ({"prompt": 1, "completion": "x"}, "'prompt' is a number, not a string"),
    ({"instruction": "x", "input": ["y"], "output": "z"},
     "'input' is an array; it must be a string, null or absent"),
    ({"text": None}, "'text' is null, not a string"),
])
def test_record_errors_name_file_and_row(tok, record, message):
    with pytest.raises(UserError) as info:
        render_row(record, tok, path="data/chat.jsonl", row=12)
    text = str(info.value)
    assert text.startswith("data/chat.jsonl line 12: ")  # JSON lines: the line, as an editor
    assert message in text
    assert "\n" not in text and text.count(". ") == 0  # one sentence


def test_tokenizer_errors_get_the_row_too():
    char = char_tokenizer(3)
    with pytest.raises(UserError, match=r"^notes\.jsonl line 2: the text has 1 character\(s\) "
                                        r"outside this model's 3-character vocabulary: 'z'$"):
        render_row({"text": "z"}, char, path="notes.jsonl", row=2)
    with pytest.raises(UserError, match=r"^notes\.jsonl line 1: the gptcli-chat/1 chat template"):
        render_row({"prompt": "a", "completion": "b"}, char, path="notes.jsonl", row=1)


def test_a_file_holds_one_format(tok):
    fmt = None
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
            {"messages": CONVERSATION}]
    with pytest.raises(UserError) as info:
        for row, record in enumerate(rows, 1):
            fmt, ids, targets = render_row(record, tok, path="x.jsonl", row=row, expected=fmt)
    assert fmt == "prompt_completion"
    assert str(info.value) == ("x.jsonl line 3 is a messages record but the lines before it "
                               "are prompt_completion records; keep one format per file")
    with pytest.raises(UserError, match=r"^x\.parquet row 3 is a messages record but the rows "):
        render_row(rows[2], tok, path="x.parquet", row=3, expected="prompt_completion")


def test_record_errors_are_value_errors(tok):
    with pytest.raises(RecordError):
        detect_format({"nothing": 1})
    assert issubclass(RecordError, ValueError)
