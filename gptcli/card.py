"""The README.md model card of an exported Hugging Face folder: the Hub's YAML front matter and
a body, both made from what the checkpoint and its run folder record (no guesses: what is not
known is left out or said to be unknown).

Front matter: ``library_name`` (transformers), ``pipeline_tag``, ``tags``, ``base_model`` (a
downloaded model's repo, or the model a run was fine-tuned from when that came from the Hub),
``license`` (the base model's, where gptcli knows it), ``datasets`` (Hub datasets the run
trained on). Scalars are written as JSON strings, which YAML reads as double-quoted scalars, so
no YAML library is needed to write it.

Also here: the chat template of ``chat.TEMPLATE`` as a Jinja template (what GGUF files and the
Hub call a chat template), and the known licenses of Hub base models. The folder's
tokenizer_config.json gets no ``chat_template``: transformers renders a template to text and
encodes that, and the exported tokenizer reads the text ``<|endoftext|>`` as ordinary characters
(as gptcli does, see ``vocab.py``), so the turn ends would not be the end-of-text token. The card
shows the template and how to build the ids instead; llama.cpp, which parses special tokens in
rendered templates, gets it in the GGUF.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .chat import METADATA_KEY, ROLES, TEMPLATE
from .config import ModelConfig
from .store import KNOWN_DATASETS, KNOWN_MODELS, is_repo_id

# Licenses of the base models gptcli knows by name (their Hub model cards say so).
LICENSES = {"openai-community/gpt2": "mit", "openai-community/gpt2-medium": "mit",
            "openai-community/gpt2-large": "mit", "openai-community/gpt2-xl": "mit",
            "distilbert/distilgpt2": "apache-2.0"}


def chat_jinja(template_name: str | None) -> str | None:
    """``chat.TEMPLATE`` as a Jinja chat template (messages -> text, the end-of-text token
    spelled out, as llama.cpp and Ollama render it); None for models without one."""
    if template_name != TEMPLATE:
        return None
    role = "".join(f"{'{% if' if i == 0 else '{% elif'} message['role'] == '{k}' %}}{v}"
                   for i, (k, v) in enumerate(ROLES.items())) + "{% endif %}"
    return ("{% for message in messages %}" + role + ":{{ ' ' + message['content'] }}"
            "<|endoftext|>{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def base_model(metadata: Mapping[str, str], run: Mapping[str, Any],
               init_metadata: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """(the Hub repo this model comes from, whether it was fine-tuned from it): a downloaded
    model's ``source`` (``hf:org/name``), else the run's ``init_from`` when that named a Hub
    model (directly, or a checkpoint whose own source was one)."""
    source = str(metadata.get("source") or "")
    if source.startswith("hf:"):
        return source[3:], False
    init = run.get("init_from")
    if not init:
        return None, False
    init_source = str((init_metadata or {}).get("source") or "")
    if init_source.startswith("hf:"):
        return init_source[3:], True
    if init in KNOWN_MODELS:
        return KNOWN_MODELS[init], True
    return (init, True) if is_repo_id(str(init)) and not Path(str(init)).exists() else (None, True)


def datasets(run: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(Hub dataset repos, other data) a run trained on, from its --data entries."""
    hub, other = [], []
    for entry in run.get("data") or []:
        entry = str(entry)
        if entry in KNOWN_DATASETS:
            hub.append(KNOWN_DATASETS[entry][0])
        elif is_repo_id(entry) and not Path(entry).exists():
            hub.append(entry)
        else:
            other.append(Path(entry).name or entry)
    return hub, other


def _yaml(fields: Mapping[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v, ensure_ascii=False)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines + ["---", ""])


def model_card(*, name: str, config: ModelConfig, tokenizer: dict, metadata: Mapping[str, str],
               run: Mapping[str, Any], repo: str | None = None,
               init_metadata: Mapping[str, str] | None = None) -> str:
    """README.md text for the Hugging Face folder of a checkpoint. ``metadata`` is the
    checkpoint's, ``run`` the TrainConfig fields of the run that made it ({} when none),
    ``repo`` the Hub repo it is pushed to (used in the loading examples)."""
    base, finetuned = base_model(metadata, run, init_metadata)
    hub_data, other_data = datasets(run)
    chat = metadata.get(METADATA_KEY)
    gpt2_tok = tokenizer.get("type") == "gpt2"
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": ["gptcli", "gpt2", "text-generation"]
                             + (["conversational"] if chat else [])}
    if base:
        front["base_model"] = base
        if finetuned:
            front["base_model_relation"] = "finetune"
    if base in LICENSES:
        front["license"] = LICENSES[base]
    if hub_data:
        front["datasets"] = hub_data
    where = repo or "path/to/this/folder"
    prompt = "The" if gpt2_tok else "ROMEO:"
    tok_name = "GPT-2's byte-level BPE (50,257 tokens)" if gpt2_tok else \
        f"gptcli's character vocabulary ({len(tokenizer.get('chars', ''))} characters)"
    lines = [f"# {name}", "",
             f"A GPT-2 language model ({config.num_params():,} parameters) "
             + ("fine-tuned" if finetuned else "downloaded" if base else "trained")
             + " with [gptcli](https://pypi.org/project/gptcli/)"
             + (f" from [{base}](https://huggingface.co/{base})" if base else "") + ".", "",
             "## Model", "", "| | |", "|---|---|",
             "| architecture | GPT-2 (`GPT2LMHeadModel`): pre-LayerNorm blocks, learned "
             "positions, GELU (tanh), tied input/output embeddings |",
             f"| layers / heads / width | {config.n_layer} / {config.n_head} / {config.n_embd} |",
             f"| context | {config.context_length} tokens |",
             f"| parameters | {config.num_params():,} |",
             f"| tokenizer | {tok_name} |", "", "## Training", ""]
    lines += _training(metadata, run, hub_data + other_data)
    if chat:
        lines += ["", "## Chat template", "",
                  f"Fine-tuned with gptcli's `{chat}` template: each message is "
                  "`{Role}: {content}` followed by the end-of-text token (id 50256), roles "
                  "`System`, `User`, `Assistant`; a reply is prompted with `Assistant:`. As Jinja "
                  "(the GGUF export stores it as `tokenizer.chat_template`):", "", "```jinja",
                  chat_jinja(chat) or chat, "```", "",
                  "Encode each piece on its own and put the token id 50256 between turns: this "
                  "tokenizer reads the text `<|endoftext|>` as ordinary characters, on purpose, "
                  "so text cannot forge a turn boundary."]
    lines += ["", "## Use it", "", "With gptcli (`pip install gptcli`):", "", "```",
              f'gpt generate --model {where} --prompt "{prompt}"',
              "```", "", "With transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
              f'model = AutoModelForCausalLM.from_pretrained("{where}")',
              f'ids = tokenizer("{prompt}", return_tensors="pt").input_ids',
              "out = model.generate(ids, max_new_tokens=50, do_sample=False)",
              "print(tokenizer.decode(out[0]))", "```", ""]
    if not gpt2_tok:
        lines += ["The character tokenizer gives one token per character; a character it has "
                  "not seen is an error, not an unknown token.", ""]
    return _yaml(front) + "\n" + "\n".join(lines)


def _training(metadata: Mapping[str, str], run: Mapping[str, Any], data: list[str]) -> list[str]:
    def meta(key: str):
        try:
            return json.loads(metadata[key])
        except (KeyError, ValueError):
            return metadata.get(key)

    step, val = meta("step"), meta("val_loss")
    rows = []
    if data:
        rows.append(f"| data | {', '.join(data)} |")
    if step is not None:
        rows.append(f"| steps | {step} |")
    for key, label in (("batch_size", "batch size (sequences)"), ("grad_accum", "grad-accum"),
                       ("lr", "peak learning rate")):
        if run.get(key) is not None:
            rows.append(f"| {label} | {run[key]} |")
    if isinstance(val, (int, float)):
        rows.append(f"| validation loss | {val:.4f} (nats per token) |")
    if not rows:
        return ["Not recorded in the checkpoint (a downloaded model: see its own card)."
                if str(metadata.get("source", "")).startswith("hf:") else
                "Not recorded in the checkpoint."]
    return ["| | |", "|---|---|", *rows]
