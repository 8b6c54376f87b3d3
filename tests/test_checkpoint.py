import json

import pytest
import torch
from safetensors.torch import save_file

from gptcli import checkpoint
from gptcli.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from gptcli.model import GPT
from gptcli.runtime import RuntimeFailure, UserError
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import char_tokenizer, randomize_, tiny_config


@pytest.mark.parametrize("options", [dict(), dict(tie_embeddings=False, position="rope",
                                                  norm="rmsnorm", bias=False)])
def test_round_trip_is_bit_exact(tmp_path, options):
    model = randomize_(GPT(tiny_config(**options)))
    tok = char_tokenizer(101)
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

    save_checkpoint(tmp_path / "m.safetensors", Wrapper(model), char_tokenizer(101))
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
    with pytest.raises(RuntimeFailure) as err:
        save_checkpoint(path, GPT(tiny_config()), GPT2Tokenizer(), step=2)
    assert str(err.value) == f"cannot write checkpoint to {path}: disk full; the previous " \
        "checkpoint is intact"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_info_reads_header_only(tmp_path, monkeypatch):
    model = GPT(tiny_config())
    path = save_checkpoint(tmp_path / "m.safetensors", model, char_tokenizer(101), source="t")
    real_open = checkpoint.safe_open
    read = []

    class Spy:  # safe_open, noting every tensor whose data is read
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            get_tensor = handle.get_tensor

            class Handle:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def get_tensor(self, name):
                    read.append(name)
                    return get_tensor(name)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", Spy)
    info = checkpoint_info(path)
    assert read == []  # the header alone
    assert info["parameters"] == model.num_params()
    assert info["config"]["n_layer"] == 2 and info["tokenizer"] == "char (101 characters)"
    assert info["provenance"]["source"] == "t" and info["quantization"] is None
    json.dumps(info)
    load_checkpoint(path)
    assert read  # the spy does see tensor reads


def test_saved_files_follow_the_umask_not_private(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), GPT2Tokenizer())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- hostile files

def rewrite_metadata(path, **changes):
    """The same tensors, with some metadata entries replaced (as a damaged or hostile file)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with checkpoint.safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **changes}
    save_file(tensors, str(path), metadata=meta)
    return path


def tiny_file(tmp_path, **config):
    return save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(**config)),
                           char_tokenizer(101))


def test_a_header_asking_for_a_huge_model_is_refused_before_building_anything(tmp_path,
                                                                              monkeypatch):
    path = tiny_file(tmp_path)
    config = json.loads(checkpoint.read_safetensors(path, tensors=False)[1]["config"])
    rewrite_metadata(path, config=json.dumps({**config, "n_layer": 100000}))
    monkeypatch.setattr(checkpoint, "GPT", lambda *a: pytest.fail("built a model"))
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: the weights do not match the config: it describes "
                              "100000 layers and 2,827,206,480 parameters, the tensors hold 2 "
                              "layers and 63,024 values")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    path = tiny_file(tmp_path)
    config = json.loads(checkpoint.read_safetensors(path, tensors=False)[1]["config"])
    rewrite_metadata(path, config=json.dumps({**config, "n_embd": 24, "n_head": 3}))
    with pytest.raises(UserError, match=r"the weights do not match the config"):
        load_checkpoint(path)


@pytest.mark.parametrize("spec,message", [
    ("[1, 2]", "its tokenizer entry is not a tokenizer spec (an object with a type)"),
    ("7", "its tokenizer entry is not a tokenizer spec (an object with a type)"),
    ('{"type": "char", "chars": "abc"}', "is damaged: its char tokenizer has 3 tokens but the "
                                         "model's embedding has 101 rows"),
    ('{"type": "gpt2"}', "is damaged: its gpt2 tokenizer has 50257 tokens but the model's "
                         "embedding has 101 rows"),
])
def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path, spec, message):
    path = rewrite_metadata(tiny_file(tmp_path), tokenizer=spec)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert message in str(err.value)


def test_generate_refuses_nan_weights_naming_the_tensor(tmp_path):
    from typer.testing import CliRunner

    from gptcli.cli import app

    model = GPT(tiny_config())
    with torch.no_grad():
        model.h[0].attn.c_attn.weight[3, 5] = float("nan")
    path = save_checkpoint(tmp_path / "m.safetensors", model, char_tokenizer(101))
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--temperature", "0",
                                      "--prompt", chr(0x100)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {path}: the checkpoint's weights contain NaN or "
                                     "infinite values (tensor h.0.attn.c_attn.weight)")


def test_paths_that_cannot_be_read_say_why(tmp_path):
    path = tiny_file(tmp_path)
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    cases = {
        tmp_path / "loop.safetensors": f"cannot read checkpoint {tmp_path}/loop.safetensors: it "
                                       "is a symbolic link loop",
        tmp_path / "dangling.safetensors": f"checkpoint {tmp_path}/dangling.safetensors is a "
                                           f"symbolic link to {tmp_path}/gone.safetensors, "
                                           "which does not exist",
        path / "x.safetensors": f"cannot read checkpoint {path}/x.safetensors: a part of the "
                                "path is a file, not a folder",
    }
    for where, message in cases.items():
        with pytest.raises(UserError) as err:
            load_checkpoint(where)
        assert str(err.value) == message


def test_permission_denied_is_worded_as_such():
    """Tests run as root, which no file mode stops, so the wording is checked on the error the
    OS gives for an unreadable file."""
    import errno

    from gptcli.runtime import path_error

    e = PermissionError(errno.EACCES, "Permission denied", "m.safetensors")
    err = path_error(e, "read checkpoint", "m.safetensors")
    assert isinstance(err, UserError)
    assert str(err) == "cannot read checkpoint m.safetensors: permission denied"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), char_tokenizer(101))
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(RuntimeFailure) as err:
        save_checkpoint(path, GPT(tiny_config()), char_tokenizer(101))
    assert str(err.value) == (f"cannot write checkpoint to {path}: no space left on device; the "
                              "previous checkpoint is intact")
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
