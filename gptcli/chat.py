"""The chat template and the record formats of chat/instruction data.

Two named layouts turn a conversation (messages with a ``role`` of ``system``, ``user`` or
``assistant`` and a string ``content``) into token ids. Every command reaches both through
``prompt_tokens`` / ``stop_strings``, with the name read from checkpoint metadata by
``template_for``.

``gptcli-chat/1`` (``TEMPLATE``): what ``gpt train`` fine-tunes with and records in the checkpoint.
A conversation is a list of segments; each text segment is encoded on its own with
``tokenizer.encode`` (ordinary text: it can never produce the end-of-text token, so message text
cannot forge a turn boundary) and turn ends are the end-of-text id itself::

    for each message:   "{Role}:"   " {content}"   <|endoftext|>
    generation prompt:  the messages as above, then "Assistant:"

Roles are ``System``, ``User``, ``Assistant``; the content segment is one space then the content
exactly as given (nothing stripped). Because no BPE merge crosses a segment boundary, the prompt
for a reply is token for token a prefix of what training saw for the same conversation, and the
reply the model learned is ``" {content}"`` followed by end-of-text, which ends generation (the
samplers stop at ``eot_id``). Training targets (``mask_prompt=True``) are exactly the tokens of
each assistant turn's content segment and its end-of-text; headers, system and user turns are
context. A system turn may appear anywhere: every role has the same shape, so a later system turn
is as well defined as a first one, and OpenAI's chat API (which `gpt serve` implements) accepts
one anywhere. The template needs an end-of-text token: the char tokenizer has none.

``plain/1`` (``PLAIN``): base models never fine-tuned with the template (no ``chat_template``
key in their metadata) get the plain-text layout `gpt serve` has always used: one line
``"{Role}: {content}"`` per message joined by newlines, then ``"\\nAssistant:"``, encoded as one
string; generation stops before the model starts a ``"\\nUser:"`` line.

Record formats of ``gpt train --data`` JSON lines (``detect_format``), checked in this order,
extra keys ignored (Alpaca dumps often carry a pre-rendered ``text`` too):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``, at least one assistant turn;
- ``prompt_completion``: ``{"prompt", "completion"}`` (strings): one user turn, one assistant turn;
- ``alpaca``: ``{"instruction", "input" (optional, may be empty or null), "output"}``: one user
  turn (the instruction, or the instruction, a blank line and the input) and one assistant turn;
- ``text``: ``{"text"}`` (or the ``--text-column``): plain text, every token a target, followed by
  end-of-text when the tokenizer has one.

A rendered record is ``(ids, targets)``: ``targets[i]`` says whether token ``i`` is one the model
should learn to produce (predicted from tokens ``< i``); a trainer shifts by one as usual and
gives the other positions ``ignore_index``. Every chat record ends with an end-of-text, so
records can be packed back to back with no separator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UserError
from .tokenizer import Tokenizer

TEMPLATE = "gptcli-chat/1"
PLAIN = "plain/1"
TEMPLATES = (TEMPLATE, PLAIN)
METADATA_KEY = "chat_template"  # checkpoint metadata: the template a model was fine-tuned with
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FORMATS = ("text", "messages", "prompt_completion", "alpaca")
CHAT_FORMATS = FORMATS[1:]
RECORD_FIELDS = ("messages", "prompt", "completion", "instruction", "input", "output")
PLAIN_STOP = "\nUser:"
FIELDS_HELP = ("'messages'; 'prompt' and 'completion'; 'instruction' and 'output'; or {column!r} "
               "(pick another text field with --text-column)")


class RecordError(ValueError):
    """What is wrong with one record or message list, as a clause without its location
    (``located`` adds the file and row)."""


# ----------------------------------------------------------------------------- templates

def template_for(metadata: Mapping[str, str]) -> str:
    """The chat layout of a checkpoint from its metadata: ``TEMPLATE`` when it was fine-tuned
    with it, ``PLAIN`` when the key is absent (base models); an unknown name is a UserError."""
    name = metadata.get(METADATA_KEY)
    if name is None:
        return PLAIN
    if name not in TEMPLATES:
        raise UserError(f"this model was fine-tuned with chat template {name!r}, which this "
                        f"gptcli does not know (it knows {', '.join(TEMPLATES)}); upgrade gptcli")
    return name


def template_metadata() -> dict[str, str]:
    """The metadata entry to store in a checkpoint fine-tuned on chat/instruction records."""
    return {METADATA_KEY: TEMPLATE}


def require_eot(tokenizer: Tokenizer) -> int:
    """The end-of-text id the template ends turns with; a UserError for tokenizers without one."""
    if tokenizer.eot_id is None:
        raise UserError(f"the {TEMPLATE} chat template ends every turn with an end-of-text token, "
                        f"which the {tokenizer.name} tokenizer does not have; use chat and "
                        f"instruction data with a GPT-2 tokenizer (--tokenizer gpt2)")
    return tokenizer.eot_id


def _check_name(template_name: str) -> None:
    if template_name not in TEMPLATES:
        raise ValueError(f"unknown chat template {template_name!r}; "
                         f"known: {', '.join(TEMPLATES)}")


def prompt_tokens(messages: Sequence[Any], tokenizer: Tokenizer, template_name: str) -> list[int]:
    """Token ids that ask the model for the next assistant turn after ``messages`` (dicts, or
    objects with ``role`` and ``content`` such as serve's pydantic messages)."""
    _check_name(template_name)
    pairs = _messages(messages)
    if template_name == PLAIN:
        return tokenizer.encode(_plain_text(pairs))
    ids, _ = _render(pairs, tokenizer, mask_prompt=True)
    return ids + tokenizer.encode(f"{ROLES['assistant']}:")


def stop_strings(template_name: str) -> list[str]:
    """Strings that end a reply besides the end-of-text token (which stops every sampler unless
    ``ignore_eos``): none for the template, the next user line for the plain layout."""
    _check_name(template_name)
    return [PLAIN_STOP] if template_name == PLAIN else []


def reply_content(text: str, template_name: str) -> str:
    """A generated reply as message content. The template's replies start with the one space of
    their content segment, which is removed (only it, so the reply rendered back into the
    history is the text the model produced); the plain layout keeps `gpt serve`'s lstrip."""
    _check_name(template_name)
    if template_name == PLAIN:
        return text.lstrip()
    return text[1:] if text.startswith(" ") else text


def plain_prompt(messages: Sequence[Any]) -> str:
    """The ``plain/1`` text: one ``"Role: content"`` line per message, then ``"Assistant:"``."""
    return _plain_text(_messages(messages))


def _plain_text(pairs: list[tuple[str, str]]) -> str:
    lines = [f"{ROLES[role]}: {content}" for role, content in pairs]
    return "\n".join(lines) + f"\n{ROLES['assistant']}:"


def render_messages(messages: Sequence[Any], tokenizer: Tokenizer, *,
                    mask_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """A whole conversation in the template, for training: ``(ids, targets)``. Needs at least
    one assistant turn (the only turns that are targets)."""
    pairs = _messages(messages)
    if not any(role == "assistant" for role, _ in pairs):
        raise RecordError("the conversation has no assistant turn, so there is nothing to learn")
    return _render(pairs, tokenizer, mask_prompt=mask_prompt)


def _render(pairs: list[tuple[str, str]], tokenizer: Tokenizer, *,
            mask_prompt: bool) -> tuple[list[int], list[bool]]:
    """The template's segments for (role, content) pairs; targets as documented above."""
    eot = require_eot(tokenizer)
    ids: list[int] = []
    targets: list[bool] = []

    def add(segment: list[int], target: bool) -> None:
        ids.extend(segment)
        targets.extend([target or not mask_prompt] * len(segment))

    for role, content in pairs:
        reply = role == "assistant"
        add(tokenizer.encode(f"{ROLES[role]}:"), False)  # the header is always given, never learned
        add(tokenizer.encode(f" {content}"), reply)
        add([eot], reply)  # the assistant's end-of-text is how the model learns to stop
    return ids, targets


def _messages(messages: Any) -> list[tuple[str, str]]:
    """Validated (role, content) pairs from dicts or role/content objects."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RecordError("'messages' must be a non-empty array of {\"role\", \"content\"} "
                          "objects")
    pairs = []
    for n, message in enumerate(messages, 1):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif hasattr(message, "role") and hasattr(message, "content"):
            role, content = message.role, message.content
        else:
            raise RecordError(f'message {n} is not a {{"role", "content"}} object')
        if not isinstance(role, str) or role not in ROLES:  # (a list role is unhashable)
            has = "no role" if role is None else f"role {role!r}"
            raise RecordError(f"message {n} has {has}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"the content of message {n} ({role}) is {_kind(content)}, "
                              f"not a string")
        pairs.append((role, content))
    return pairs


JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array", dict: "an object"}


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words (the user wrote JSON, not Python)."""
    return "null" if value is None else JSON_KINDS.get(type(value), _article(type(value).__name__))


# ----------------------------------------------------------------------------- record formats

def detect_format(record: Any, text_column: str = "text") -> str:
    """The format of one JSON record: ``messages``, ``prompt_completion``, ``alpaca`` or
    ``text``, by the keys present (in that order of precedence); anything else: RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError(f"the record is {_kind(record)}, not a JSON object")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_column in record:
        return "text"
    keys = ", ".join(repr(k) for k in list(record)[:6]) or "none"
    raise RecordError(f"the record has none of the known fields ("
                      f"{FIELDS_HELP.format(column=text_column)}); its keys are {keys}")


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def to_messages(record: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation a chat-like record stands for, as ``{"role", "content"}`` messages
    (validated when rendered)."""
    if fmt == "messages":
        return record["messages"]
    if fmt == "prompt_completion":
        prompt, completion = _string(record, "prompt"), _string(record, "completion")
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": completion}]
    if fmt == "alpaca":
        instruction, output = _string(record, "instruction"), _string(record, "output")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError(f"'input' is {_kind(extra)}; it must be a string, null or absent")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError(f"{fmt!r} is not a chat format; chat formats: messages, prompt_completion, "
                     "alpaca")


def _string(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"{key!r} is {_kind(value)}, not a string")
    return value


def render_record(record: Mapping[str, Any], fmt: str, tokenizer: Tokenizer, *,
                  mask_prompt: bool = True, text_column: str = "text",
                  ) -> tuple[list[int], list[bool]]:
    """One record of format ``fmt`` as ``(ids, targets)`` (see the module docstring).

    ``text``: the text's tokens then end-of-text (none for tokenizers without one), all targets.
    Chat formats: the template; with ``mask_prompt`` only assistant content and its end-of-text
    are targets, without it every token is. Bad values raise RecordError (wrap with
    ``located``); a tokenizer without end-of-text meeting a chat record raises UserError."""
    if fmt == "text":
        text = _string(record, text_column)
        ids = tokenizer.encode(text)
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        return ids, [True] * len(ids)
    return render_messages(to_messages(record, fmt), tokenizer, mask_prompt=mask_prompt)


# ----------------------------------------------------------------------------- files

def where(path: Any, row: int) -> str:
    """Row ``row`` of ``path`` as a user finds it: the line of a JSON-lines file (1-based, blank
    lines counted, as an editor numbers them), the row of another."""
    return f"{'line' if str(path).endswith(('.jsonl', '.json')) else 'row'} {row}"


def located(path: Any, row: int, error: str | Exception) -> UserError:
    """A one-sentence user error about row ``row`` of ``path``."""
    return UserError(f"{path} {where(path, row)}: {error}")


def render_row(record: Any, tokenizer: Tokenizer, *, path: Any, row: int,
               expected: str | None = None, mask_prompt: bool = True,
               text_column: str = "text") -> tuple[str, list[int], list[bool]]:
    """Detect, check and render one row of a data file: ``(format, ids, targets)``.

    ``expected`` is the format of the file's earlier rows (None for the first): a file holds one
    format, so a row of another is refused. Every problem is a UserError naming file and row::

        fmt = None
        for row, record in enumerate(records, 1):
            fmt, ids, targets = render_row(record, tok, path=path, row=row, expected=fmt)
    """
    try:
        fmt = detect_format(record, text_column)
    except RecordError as e:
        raise located(path, row, e) from None
    if expected is not None and fmt != expected:
        noun = "line" if str(path).endswith((".jsonl", ".json")) else "row"
        raise UserError(f"{path} {noun} {row} is {_article(fmt)} record but the {noun}s before "
                        f"it are {expected} records; keep one format per file")
    try:
        ids, targets = render_record(record, fmt, tokenizer, mask_prompt=mask_prompt,
                                     text_column=text_column)
    except (RecordError, UserError) as e:  # bad values; a char model meeting an unknown char
        raise located(path, row, e) from None
    return fmt, ids, targets
