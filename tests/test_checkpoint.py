import json

import pytest
import torch
from safetensors.torch import save_file

from gptcli import checkpoint
from gptcli.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from gptcli.model import GPT
from gptcli.runtime import UserError
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import randomize_, tiny_config


@pytest.mark.parametrize("options", [dict(), dict(tie_embeddings=False, position="rope",
                                                  norm="rmsnorm", bias=False)])
def test_round_trip_is_bit_exact(tmp_path, options):
    model = randomize_(GPT(tiny_config(**options)))
    tok = CharTokenizer.from_text("abcdefg")
    path = save_checkpoint(tmp_path / "m.safetensors", model, tok, step=7, val_loss=1.25)
    loaded, tok2, meta = load_checkpoint(path)
    assert loaded.config == model.config
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    assert tok2.spec() == tok.spec()
    assert meta["format"] == "gptcli/1" and meta["step"] == "7" and meta["val_loss"] == "1.25"
    assert not loaded.training


def test_tied_weights_are_stored_once(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), GPT2Tokenizer())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "wte.weight" in f.keys()


def test_compiled_or_wrapped_models_save_plain_names(tmp_path):
    model = GPT(tiny_config())

    class Wrapper(torch.nn.Module):  # the shape of DDP: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_checkpoint(tmp_path / "m.safetensors", Wrapper(model), GPT2Tokenizer())
    loaded, _, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config == model.config


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="looks like a pickle file .* unpickling can run arbitrary code"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), GPT2Tokenizer())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_safetensors_without_gptcli_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a gptcli checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), GPT2Tokenizer(), step=1)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, GPT(tiny_config()), GPT2Tokenizer(), step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_info_reads_header_only(tmp_path):
    model = GPT(tiny_config())
    path = save_checkpoint(tmp_path / "m.safetensors", model, GPT2Tokenizer(), source="test")
    info = checkpoint_info(path)
    assert info["parameters"] == model.num_params()
    assert info["config"]["n_layer"] == 2 and info["tokenizer"] == "gpt2"
    assert info["provenance"]["source"] == "test"
    json.dumps(info)


def test_saved_files_follow_the_umask_not_private(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), GPT2Tokenizer())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
