"""`gpt export`: complete Hugging Face folders (transformers' Auto classes load them, the model
card's front matter is YAML), back in with `--model DIR`, and the refusals, each one sentence
with nothing half-written left behind. `gpt export --format gguf` is in tests/test_gguf.py;
--model org/name and --push-to-hub, which need the Hub look-alike, in tests/test_hub.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import randomize_, tiny_config
from gptcli.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from gptcli.cli import app
from gptcli.model import GPT
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer
from gptcli.vocab import tokenizer_files
from test_vocab import CORPUS

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
yaml = pytest.importorskip("yaml", reason="PyYAML comes with transformers")

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The meaning of life is"


def gpt2_checkpoint(path: Path, seed: int = 3, **meta) -> Path:
    """A tiny random GPT-2-tokenizer model (n_embd 64: whole q8_0 blocks) saved at ``path``."""
    model = randomize_(GPT(tiny_config(vocab_size=50257, n_embd=64, n_head=4)), seed=seed)
    return save_checkpoint(path, model, GPT2Tokenizer(), **meta)


def export(*args) -> object:
    result = runner.invoke(app, ["export", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def gpt(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The real `gpt` command in a subprocess, with this test's store."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "gptcli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=180)


def greedy_ids(cwd: Path, model, prompt: str = PROMPT, n: int = 12) -> list[int]:
    result = gpt(cwd, "generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens",
                 str(n), "--temperature", "0", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])["samples"][0]["token_ids"]


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 3)])


# ----------------------------------------------------------------------------- Hugging Face folders

def test_the_folder_loads_with_the_auto_classes_and_agrees(tmp_path):
    path = gpt2_checkpoint(tmp_path / "m.safetensors", step=40, val_loss=5.25)
    result = export("--model", path, "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"])
    # the tokenizer files are vocab.py's, which tests/test_vocab.py checks on its corpus
    for name, text in tokenizer_files({"type": "gpt2"}, context_length=32).items():
        assert (folder / name).read_text(encoding="utf-8") == text, name
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ours, ours_tok, _ = load_checkpoint(path)
    for text in CORPUS[:3] + CORPUS[6:7]:
        assert tok(text)["input_ids"] == ours_tok.encode(text), repr(text)
    ids = torch.tensor([ours_tok.encode(PROMPT)])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert greedy_ids(tmp_path, path) == theirs


def test_back_in_with_model_dir_gives_the_same_tokens_and_is_kept(tmp_path, isolated_home):
    path = gpt2_checkpoint(tmp_path / "m.safetensors", step=7, chat_template="gptcli-chat/1")
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    assert greedy_ids(tmp_path, tmp_path / "hf") == greedy_ids(tmp_path, path)
    cached = list((isolated_home / "models" / "hf-folders").glob("*.safetensors"))
    assert len(cached) == 1
    meta = read_safetensors(cached[0], tensors=False)[1]
    assert meta["chat_template"] == "gptcli-chat/1" and meta["step"] == "7"
    assert meta["source"] == f"local:{(tmp_path / 'hf').resolve()}"
    info = gpt(tmp_path, "info", str(tmp_path / "hf"), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"] == str(cached[0])


def test_the_folder_cache_is_cheap_and_follows_the_content(tmp_path, isolated_home, monkeypatch):
    from gptcli import convert
    from gptcli.models import resolve_model

    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    first = resolve_model(tmp_path / "hf")
    stamp = first.stat().st_mtime_ns
    real_hash = convert._content_hash

    def no_hashing(files):
        raise AssertionError("an unchanged folder must be found by stat alone")

    monkeypatch.setattr(convert, "_content_hash", no_hashing)
    assert resolve_model(tmp_path / "hf") == first  # the second use reads no weights
    monkeypatch.setattr(convert, "_content_hash", real_hash)
    weights = tmp_path / "hf" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert resolve_model(tmp_path / "hf") == first and first.stat().st_mtime_ns == stamp
    gpt2_checkpoint(tmp_path / "other.safetensors", seed=4)
    assert export("--model", tmp_path / "other.safetensors", "--out", tmp_path / "hf",
                  "--force").exit_code == 0
    second = resolve_model(tmp_path / "hf")
    assert second != first and not first.exists()  # the old conversion is not kept
    assert [p.name for p in second.parent.glob("*.safetensors")] == [second.name]


def test_char_models_export_their_tokenizer_and_come_back(tmp_path):
    tok = CharTokenizer.from_text("abcdefghij klmnopqrstuvwxyz.\n")
    model = randomize_(GPT(tiny_config(vocab_size=tok.vocab_size)), seed=3)
    path = save_checkpoint(tmp_path / "c.safetensors", model, tok)
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("hello world.")])
    assert hf_tok("hello world.")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    assert greedy_ids(tmp_path, tmp_path / "hf", "hello") == greedy_ids(tmp_path, path, "hello")


# ----------------------------------------------------------------------------- the model card

def test_card_of_a_model_trained_here(tmp_path):
    path = gpt2_checkpoint(tmp_path / "m.safetensors", step=40, val_loss=5.25)
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    meta = front_matter(tmp_path / "hf" / "README.md")
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["gptcli", "gpt2", "text-generation"]}
    body = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "| steps | 40 |" in body and "| validation loss | 5.2500" in body
    assert "| layers / heads / width | 2 / 4 / 64 |" in body
    assert f"{GPT(tiny_config(vocab_size=50257, n_embd=64, n_head=4)).num_params():,}" in body
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder")' in body
    assert "Chat template" not in body


def test_card_of_a_chat_fine_tune_of_gpt2(tmp_path):
    """A run fine-tuned from the downloaded gpt2 on a Hub dataset, with the chat template."""
    run = tmp_path / "runs" / "ft"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {
        "init_from": "gpt2", "data": ["tinystories", "notes.txt"], "batch_size": 8, "lr": 3e-4,
        "grad_accum": 2}}))
    path = gpt2_checkpoint(run / "best.safetensors", step=300, val_loss=2.5,
                           chat_template="gptcli-chat/1")
    result = export("--model", run, "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    meta = front_matter(tmp_path / "hf" / "README.md")
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["base_model_relation"] == "finetune" and meta["license"] == "mit"
    assert meta["datasets"] == ["roneneldan/TinyStories"]
    assert "conversational" in meta["tags"] and meta["library_name"] == "transformers"
    body = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "## Chat template" in body and "| data | roneneldan/TinyStories, notes.txt |" in body
    assert "| batch size (sequences) | 8 |" in body and path.is_file()
    assert "tokenizer_config.json" not in body and "chat_template" not in json.loads(
        (tmp_path / "hf" / "tokenizer_config.json").read_text())


def test_card_of_a_downloaded_model(tmp_path):
    path = gpt2_checkpoint(tmp_path / "d.safetensors", source="hf:openai-community/gpt2")
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    meta = front_matter(tmp_path / "hf" / "README.md")
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] == "mit"
    assert "base_model_relation" not in meta


def test_chat_template_renders_as_gptcli_encodes():
    """The Jinja template of the card and the GGUF makes exactly chat.py's text."""
    jinja2 = pytest.importorskip("jinja2", reason="transformers' chat templates need jinja2")
    from gptcli.card import chat_jinja
    from gptcli.chat import TEMPLATE, prompt_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = jinja2.Template(chat_jinja(TEMPLATE)).render(messages=messages,
                                                        add_generation_prompt=True)
    assert text == "System: Be brief.<|endoftext|>User: Hi<|endoftext|>Assistant:"
    tok = GPT2Tokenizer()
    pieces = text.split("<|endoftext|>")
    ids = [i for piece in pieces[:-1] for i in tok.encode(piece) + [50256]] + \
        tok.encode(pieces[-1])
    assert ids == prompt_tokens(messages, tok, TEMPLATE)
    assert chat_jinja(None) is None


# ----------------------------------------------------------------------------- refusals

def test_int8_checkpoints_are_refused_naming_the_float_one(tmp_path):
    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    assert runner.invoke(app, ["quantize", str(path)]).exit_code == 0
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        result = export("--model", tmp_path / "m-int8.safetensors", "--out", out, "--format", fmt)
        assert result.exit_code == 2
        assert result.stderr.strip() == (f"error: {tmp_path / 'm-int8.safetensors'} is an int8 "
                                         "checkpoint; export the float checkpoint it was made "
                                         f"from ({path})")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "gptcli-home") == [
        "m-int8.safetensors", "m.safetensors"]


def test_existing_out_needs_force_and_foreign_files_are_kept(tmp_path):
    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "m.gguf").write_text("mine")
    result = export("--model", path, "--out", tmp_path / "m.gguf", "--format", "gguf")
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: --out {tmp_path / 'm.gguf'} already exists; pass --force to overwrite it")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    result = export("--model", path, "--out", tmp_path / "hf", "--force")
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: --out {tmp_path / 'hf'} holds files gpt export does not write (notes.txt); "
           "give a new or empty folder")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert (tmp_path / "m.gguf").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "unknown --format 'onnx'; use hf (a Hugging Face folder) or gguf "
                           "(one file for llama.cpp and Ollama)"),
    (["--dtype", "q8_0"], "--dtype q8_0 is not a hf export type; use one of: f32, f16, bf16"),
    (["--format", "gguf", "--dtype", "q4"], "--dtype q4 is not a gguf export type; use one of: "
                                            "f32, f16, q8_0"),
    (["--revision", "dev"], "--revision is the branch to push to; use it with --push-to-hub"),
    (["--private"], "--private makes the --push-to-hub repo private; use it with --push-to-hub"),
    (["--out", ""], "--out is empty; give the folder (or .gguf file) to write"),
])
def test_bad_options(tmp_path, args, message):
    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    result = export("--model", path, *(["--out", tmp_path / "out"] if "--out" not in args
                                       else []), *args)
    assert (result.exit_code, result.stderr.strip()) == (2, f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_unwritable_places_are_one_sentence_and_leave_nothing(tmp_path):
    from test_checkpoint import gpt_held_by_file_modes

    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "file").write_text("x")
    result = export("--model", path, "--out", tmp_path / "file" / "hf")
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: cannot write Hugging Face folder to {tmp_path / 'file' / 'hf'}: a part of "
           "the path is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for fmt, out, what in (("hf", locked / "hf", "Hugging Face folder"),
                           ("gguf", locked / "m.gguf", "GGUF file")):
        held = gpt_held_by_file_modes("export", "--model", str(path), "--out", str(out),
                                      "--format", fmt)
        assert (held.returncode, held.stderr.strip()) == (
            2, f"error: cannot write {what} to {out}: permission denied")
    assert list(locked.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "gptcli-home") == [
        "file", "locked", "m.safetensors"]


def test_a_failure_midway_leaves_the_old_folder_and_no_temporary_one(tmp_path, monkeypatch):
    path = gpt2_checkpoint(tmp_path / "m.safetensors")
    assert export("--model", path, "--out", tmp_path / "hf").exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gptcli.card.model_card", full_disk)
    result = export("--model", path, "--out", tmp_path / "hf", "--force")
    assert (result.exit_code, result.stderr.strip()) == (
        1, f"error: cannot write Hugging Face folder to {tmp_path / 'hf'}: no space left on "
           "device")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "gptcli-home") == [
        "hf", "m.safetensors"]
