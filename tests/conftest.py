"""Shared fixtures: tiny configs and models that run in milliseconds on a CPU."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.model import GPT

# Keep the suite on the CPU threads CI has, and silence Hugging Face's network lookups.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@functools.lru_cache(maxsize=1)
def startup_seconds() -> float:
    """How long a Python process here takes to import torch and gptcli's CLI and exit: the
    part of a timed subprocess that says nothing about the code under test (seconds on a
    loaded 2-core machine). Measured once a session."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, gptcli.cli"], check=True,
                   capture_output=True, timeout=120)
    return time.monotonic() - start


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=101, context_length=32, n_layer=2, n_head=3, n_embd=48)
    fields.update(overrides)
    return ModelConfig(**fields)


def char_tokenizer(n: int):
    """A character tokenizer of exactly ``n`` distinct characters (to pair with a vocab of n)."""
    from gptcli.tokenizer import CharTokenizer

    return CharTokenizer([chr(0x100 + i) for i in range(n)])


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (biases and norms too) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return randomize_(GPT(tiny_config())).eval()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own model store and token cache, and runs in a scratch folder."""
    home = tmp_path / "gptcli-home"
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(autouse=True)
def undisturbed_timings(monkeypatch):
    """Kernel timings in this process read as undisturbed by other programs (the system "does
    not say": ``tuning.undisturbed``), so that whether a test finds a choice cached does not
    depend on what else the machine runs. test_kernels.py tests the real reading in a process
    of its own, and the retry with a stand-in."""
    from gptcli import hardware

    monkeypatch.setattr(hardware, "queued_ns", lambda: None)


@pytest.fixture
def corpus(tmp_path):
    """A 30,000-character piece of the bundled Shakespeare."""
    from gptcli.data import bundled_corpus

    path = tmp_path / "corpus.txt"
    path.write_text(bundled_corpus().read_text()[:30_000])
    return path


@pytest.fixture
def char_checkpoint(tmp_path):
    """A tiny character model (context 16) saved as a checkpoint file."""
    from gptcli.checkpoint import save_checkpoint
    from gptcli.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghij klmnopqrstuvwxyz.\n")
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_config(vocab_size=tok.vocab_size, context_length=16)), 3)
    return save_checkpoint(tmp_path / "m.safetensors", model, tok)
