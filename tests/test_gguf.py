"""GGUF export: a tiny GPT-2-tokenizer model written and read back with gguf's own reader, through
the writer and through `gpt export --format gguf`, and run by llama.cpp where it is built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_config
from gptcli.checkpoint import model_tensors
from gptcli.model import GPT
from gptcli.errors import GptcliError, UserError, install_command
from gptcli.vocab import gpt2_merges, gpt2_tokens
from test_export import export, gpt, gpt2_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install \"gptcli[gguf]\") is not "
                           "installed")
from gptcli.gguf import write_gguf  # noqa: E402

GPT2 = {"type": "gpt2"}
# n_embd 64: every matrix row is a whole number of q8_0 blocks (32 values)
CONFIG = tiny_config(vocab_size=50257, n_embd=64, n_head=4, n_layer=2, context_length=32)


@pytest.fixture(scope="module")
def tensors():
    torch.manual_seed(0)
    return model_tensors(randomize_(GPT(CONFIG), seed=1))


@pytest.fixture(scope="module")
def files(tensors, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {dtype: write_gguf(folder / f"m-{dtype}.gguf", CONFIG, tensors, GPT2, dtype=dtype,
                              name="tiny", chat_template="{{ messages }}")
            for dtype in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def readers(files):
    """One GGUFReader per file, made when first asked for (parsing the 100,000 vocabulary
    strings takes gguf's reader about 3 s a file)."""
    cache = {}

    def read(dtype: str):
        if dtype not in cache:
            cache[dtype] = gguf.GGUFReader(files[dtype]["path"])
        return cache[dtype]
    return read


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# The map written out again here, independently of gptcli.gguf's table: llama.cpp's name and
# whether gptcli's (in, out) weight must be transposed to llama.cpp's (out, in) rows.
BLOCK = {"ln_1.weight": ("attn_norm.weight", False), "ln_1.bias": ("attn_norm.bias", False),
         "attn.c_attn.weight": ("attn_qkv.weight", True),
         "attn.c_attn.bias": ("attn_qkv.bias", False),
         "attn.c_proj.weight": ("attn_output.weight", True),
         "attn.c_proj.bias": ("attn_output.bias", False),
         "ln_2.weight": ("ffn_norm.weight", False), "ln_2.bias": ("ffn_norm.bias", False),
         "mlp.c_fc.weight": ("ffn_up.weight", True), "mlp.c_fc.bias": ("ffn_up.bias", False),
         "mlp.c_proj.weight": ("ffn_down.weight", True),
         "mlp.c_proj.bias": ("ffn_down.bias", False)}
TOP = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
       "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}


def _expected(tensors) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold: gptcli's, projections transposed to (out, in)."""
    out = {theirs: tensors[ours].numpy() for ours, theirs in TOP.items()}
    for n in range(CONFIG.n_layer):
        for ours, (theirs, transposed) in BLOCK.items():
            t = tensors[f"h.{n}.{ours}"]
            out[f"blk.{n}.{theirs}"] = (t.t() if transposed else t).contiguous().numpy()
    return out


def test_metadata(files, readers):
    info = files["f32"]
    assert info["dtype"] == "f32" and info["tensors"] == 4 + 12 * CONFIG.n_layer
    assert info["size"] == os.path.getsize(info["path"]) > 50257 * 64 * 4
    reader = readers("f32")
    meta = _fields(reader)
    assert meta["general.architecture"] == "gpt2" and meta["general.name"] == "tiny"
    assert meta["gpt2.context_length"] == 32 and meta["gpt2.embedding_length"] == 64
    assert meta["gpt2.feed_forward_length"] == 256 and meta["gpt2.block_count"] == 2
    assert meta["gpt2.attention.head_count"] == 4
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens == gpt2_tokens() and tokens[50256] == "<|endoftext|>"
    types = meta["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[:3] == ["Ġ t", "Ġ a", "h e"]
    assert merges == gpt2_merges()
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 50256
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == "{{ messages }}"


def test_f32_tensors_are_bit_exact(readers, tensors):
    reader = readers("f32")
    expected = _expected(tensors)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    assert "output.weight" not in expected  # tied: llama.cpp reuses token_embd
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        want = expected[t.name]
        assert list(t.shape) == list(reversed(want.shape))  # GGUF lists the fastest dim first
        assert np.array_equal(np.asarray(t.data).view(np.uint32), want.view(np.uint32)), t.name
    # spot-check the layout: row j of attn_qkv is output j's weights, gptcli's column j
    qkv = next(t for t in reader.tensors if t.name == "blk.1.attn_qkv.weight")
    assert np.array_equal(qkv.data[5], tensors["h.1.attn.c_attn.weight"][:, 5].numpy())


def test_f16_types_and_rounding(readers, tensors):
    reader = readers("f16")
    assert _fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = _expected(tensors)
    for t in reader.tensors:
        want = expected[t.name]
        # as llama.cpp's converter: matrices f16, but 1-D tensors and positions float32
        if want.ndim == 1 or t.name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert np.array_equal(t.data, want)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            # exactly IEEE half rounding of gptcli's float32 (round to nearest even)
            assert np.array_equal(np.asarray(t.data), torch.from_numpy(want).half().numpy())


def test_q8_0_within_half_a_step(readers, tensors):
    reader = readers("q8_0")
    assert _fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = _expected(tensors)
    quantized = []
    for t in reader.tensors:
        want = expected[t.name]
        if want.ndim == 1 or t.name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert np.array_equal(t.data, want)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
        quantized.append(t.name)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one block's scale
        # half a step, plus the scale's own rounding to f16 (at most 127 * 2^-11 of a step)
        bound = step * (0.5 + 127 * 2.0 ** -11) + 1e-12
        assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), t.name
    assert "token_embd.weight" in quantized and len(quantized) == 1 + 4 * CONFIG.n_layer


def test_untied_output_and_q8_0_fallback(tmp_path):
    """An untied output matrix is written as output.weight. Rows of 48 values are not whole
    q8_0 blocks (32 values): such matrices are f16, as llama.cpp's converter makes them."""
    config = tiny_config(vocab_size=50257, n_embd=48, tie_embeddings=False)
    torch.manual_seed(0)
    tensors = model_tensors(randomize_(GPT(config)))
    info = write_gguf(tmp_path / "m.gguf", config, tensors, GPT2, dtype="q8_0")
    found = {t.name: t for t in gguf.GGUFReader(info["path"]).tensors}
    out = found["output.weight"]
    assert out.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(out.data, tensors["lm_head.weight"].half().numpy())
    assert not np.array_equal(out.data, tensors["wte.weight"].half().numpy())
    assert found["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert found["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # 192


def _sentence(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.count(". ") == 0, text
    return text


@pytest.mark.parametrize("overrides, spec, message", [
    (dict(norm="rmsnorm"), GPT2, r"cannot express this model \(norm=rmsnorm\)"),
    (dict(position="rope"), GPT2, r"\(position=rope\)"),
    (dict(position="sinusoidal", bias=False), GPT2, r"\(position=sinusoidal, bias=False\)"),
    ({}, {"type": "char", "chars": "ab"}, "needs the GPT-2 tokenizer, but this model uses the "
     "char tokenizer"),
    (dict(vocab_size=101), GPT2, "has 101 token ids but the GPT-2 tokenizer has 50257"),
])
def test_refusals(tmp_path, overrides, spec, message):
    config = tiny_config(**{"vocab_size": 50257, **overrides})
    with pytest.raises(UserError, match=message) as err:
        write_gguf(tmp_path / "m.gguf", config, {}, spec)
    _sentence(err)
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_and_dtype(tmp_path, tensors):
    with pytest.raises(UserError, match="unknown GGUF type 'q4'") as err:
        write_gguf(tmp_path / "m.gguf", CONFIG, tensors, GPT2, dtype="q4")
    _sentence(err)
    partial = {k: v for k, v in tensors.items() if k != "h.1.ln_2.bias"}
    with pytest.raises(UserError, match="it lacks h.1.ln_2.bias") as err:
        write_gguf(tmp_path / "m.gguf", CONFIG, partial, GPT2)
    _sentence(err)
    wrong = {**tensors, "wpe.weight": torch.zeros(16, 64)}
    with pytest.raises(UserError, match=r"wpe.weight has shape \(16, 64\)") as err:
        write_gguf(tmp_path / "m.gguf", CONFIG, wrong, GPT2)
    _sentence(err)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file(tmp_path, tensors, monkeypatch):
    """A failure while writing leaves the previous file as it was and no temporary file."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous")

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(GptcliError, match="no space left on device; the previous GGUF file is "
                       "intact") as err:
        write_gguf(path, CONFIG, tensors, GPT2)
    _sentence(err)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_missing_gguf_package(tmp_path, tensors, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(UserError) as err:
        write_gguf(tmp_path / "m.gguf", CONFIG, tensors, GPT2)
    assert str(err.value) == ('writing GGUF needs gguf, which is not installed; install it with '
                              f'{install_command("gguf")}')


# ----------------------------------------------------------------------------- gpt export, llama.cpp

def test_gguf_through_the_command_line(tmp_path):
    path = gpt2_checkpoint(tmp_path / "m.safetensors", chat_template="gptcli-chat/1")
    sizes = {}
    for dtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{dtype}.gguf"
        result = export("--model", path, "--out", out, "--format", "gguf", "--dtype", dtype)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"wrote m-{dtype}.gguf (")
        # -n: half the model's 32 positions (llama.cpp's gpt2 stops past the last one)
        assert f"llama-completion -m {out} -p \"The\" -n 16 --temp 0" in result.stderr
        assert f"FROM ./m-{dtype}.gguf" in result.stderr
        sizes[dtype] = out.stat().st_size
    reader = gguf.GGUFReader(tmp_path / "m-q8_0.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "gpt2" and fields["general.name"] == "m"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert len(reader.tensors) == 4 + 12 * 2
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]
    result = export("--model", path, "--out", tmp_path / "m-f32.gguf", "--format", "gguf",
                    "--force", "--json")
    info = json.loads(result.stdout.splitlines()[-1])
    assert info["format"] == "gguf" and info["dtype"] == "f32" and info["tensors"] == 28
    # a .gguf name is a GGUF file without --format (before: a Hugging Face folder so named)
    result = export("--model", path, "--out", tmp_path / "plain.GGUF")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plain.GGUF").read_bytes() == (tmp_path / "m-f32.gguf").read_bytes()
    result = export("--model", path, "--out", tmp_path / "hf.gguf", "--format", "hf")
    assert (result.exit_code, result.stderr.strip()) == (
        2, f"error: --out {tmp_path / 'hf.gguf'} is a GGUF file's name, but --format hf writes "
           "a Hugging Face folder; leave --format out (or give gguf) for a GGUF file")
    assert not (tmp_path / "hf.gguf").exists()


def test_gguf_refuses_char_models_before_writing(tmp_path, char_checkpoint):
    result = export("--model", char_checkpoint, "--out", tmp_path / "c.gguf", "--format", "gguf")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: GGUF export needs the GPT-2 tokenizer, but "
                                            "this model uses the char tokenizer")
    assert not (tmp_path / "c.gguf").exists()


def llama_completion() -> str | None:
    """llama.cpp's llama-completion: $LLAMA_CPP_BIN, the PATH, or this project's build."""
    for folder in (os.environ.get("LLAMA_CPP_BIN"), "/work/llamacpp/src/build/bin"):
        if folder and os.access(Path(folder) / "llama-completion", os.X_OK):
            return str(Path(folder) / "llama-completion")
    return shutil.which("llama-completion")


LLAMA_PROMPT = "Café  naïve\tdéjà vu — «ok» 123 日本"  # runs of spaces, a tab, Unicode


def test_llama_cpp_continues_as_gpt_generate_greedy(tmp_path):
    """The f32 GGUF in llama.cpp itself: the same prompt tokens (tokenizer, no start token) and
    the same greedy text. (22 prompt tokens + 8 stay within the model's 32 positions: past
    them llama.cpp's gpt2 stops with an assertion, where gptcli slides its window.)"""
    import re

    binary = llama_completion()
    if binary is None:
        pytest.skip("llama.cpp is not built here (set LLAMA_CPP_BIN to its bin folder)")
    path = gpt2_checkpoint(tmp_path / "m.safetensors", seed=5)
    out = tmp_path / "m.gguf"
    assert export("--model", path, "--out", out, "--format", "gguf").exit_code == 0
    ours = gpt(tmp_path, "generate", "--model", str(path), "--prompt", LLAMA_PROMPT,
               "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos", "--json")
    assert ours.returncode == 0, ours.stderr
    ours = json.loads(ours.stdout.splitlines()[-1])
    theirs = subprocess.run([binary, "-m", str(out), "-p", LLAMA_PROMPT, "-n", "8", "--temp",
                             "0", "-no-cnv", "--no-display-prompt", "--ignore-eos", "-t", "2",
                             "--no-warmup", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-c",
                             "32", "--verbose-prompt"], capture_output=True, timeout=300)
    # (token pieces can be parts of a character: bytes, decoded as a whole)
    stdout = theirs.stdout.decode("utf-8", "replace")
    stderr = theirs.stderr.decode("utf-8", "replace")
    assert theirs.returncode == 0, stderr[-2000:]
    # --verbose-prompt logs each prompt token as "<id> -> '<text>'"
    prompt = stderr.split("number of tokens in prompt", 1)[1].split("sampler", 1)[0]
    assert [int(i) for i in re.findall(r"^\S+ I +(\d+) -> '", prompt, re.M)] == \
        ours["prompt_token_ids"]
    assert stdout == ours["samples"][0]["text"] + "\n\n"  # llama-completion ends so
