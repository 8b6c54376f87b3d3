import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gptcli import checkpoint
from gptcli.checkpoint import checkpoint_info, expected_shapes, load_checkpoint, save_checkpoint
from gptcli.cli import app
from gptcli.model import GPT
from gptcli.errors import RuntimeFailure, UserError
from gptcli.tokenizer import GPT2Tokenizer

from conftest import char_tokenizer, randomize_, tiny_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


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


def test_tensors_are_read_into_memory_of_their_own_on_64_byte_lines(tmp_path):
    """The file's tensors lie where its header puts them (32 bytes past a line for these);
    read as safetensors reads them, but into memory torch allocates: every dtype, a 0-d and an
    empty tensor too (test_quantize: what a torch kernel did with the file's own)."""
    from safetensors.torch import load_file

    path = tmp_path / "t.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 7, generator=g),
               "bf16": torch.randn(5, generator=g).bfloat16(),
               "f16": torch.randn(9, generator=g).half(),
               "f64": torch.randn(2, generator=g).double(),
               "i8": torch.arange(-7, 6, dtype=torch.int8),
               "u8": torch.arange(3, dtype=torch.uint8),
               "i64": torch.tensor(2**40), "i32": torch.arange(5, dtype=torch.int32),
               "i16": torch.arange(4, dtype=torch.int16), "bool": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(path), metadata={"k": "v"})
    got, meta = checkpoint.read_safetensors(path)
    theirs = load_file(str(path))
    assert meta == {"k": "v"} and got.keys() == theirs.keys() == tensors.keys()
    for name, t in theirs.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.numel())


def test_a_header_pointing_past_the_file_is_refused(tmp_path, monkeypatch):
    """Safetensors checks the header against the file's size first; should a file shrink
    between that and the reads, the read says so rather than leaving memory unread."""
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), char_tokenizer(101))
    real = checkpoint.read_tensors

    def shrink_then_read(p, raw, f):
        data = Path(p).read_bytes()
        Path(p).write_bytes(data[:-8])
        return real(p, raw, f)

    monkeypatch.setattr(checkpoint, "read_tensors", shrink_then_read)
    with pytest.raises(UserError, match="not a readable safetensors file.*ends past the end"):
        load_checkpoint(path)


def test_a_file_replaced_while_it_is_read_is_refused(tmp_path, monkeypatch):
    """A run saving the checkpoint (atomically: a new file renamed over it) just as another
    command opens it: the tensors are read from the file opened first, so safetensors' reader
    must have opened that one too; when the path changed in between, the load is refused
    (without the check: a KeyError traceback, the new file's tensor names looked up in the old
    file's header)."""
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(n_layer=1)),
                           char_tokenizer(101))
    other = save_checkpoint(tmp_path / "o.safetensors", GPT(tiny_config(n_layer=2)),
                            char_tokenizer(101))
    real_open = checkpoint.safe_open

    def replaced_then_opened(name, **kwargs):
        # not when read_safetensors reads the header alone (its ``tensors`` is False); the
        # caller's frame, since modules hold read_safetensors under their own names
        if sys._getframe(1).f_locals["tensors"] and other.exists():
            os.replace(other, path)
        return real_open(name, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", replaced_then_opened)
    result = runner.invoke(app, ["generate", "--model", str(path), "--prompt", chr(0x100)])
    assert not other.exists(), result.output
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {path} was replaced while it was being read (a "
                                     "run saving it?); try again")


def test_safetensors_without_gptcli_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a gptcli checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["gguf", "json", "state"])
def test_a_file_of_another_kind_says_what_it_is(tmp_path, kind):
    """What sits beside a run's checkpoints (its config.json and training state) or comes out
    of `gpt export` (GGUF), given as --model: named for what it is, with what to give."""
    model = GPT(tiny_config())
    path = {"gguf": tmp_path / "model.gguf", "json": tmp_path / "config.json",
            "state": tmp_path / "last.state.safetensors"}[kind]
    if kind == "gguf":
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    elif kind == "json":
        path.write_text(json.dumps({"train": {}, "model": {}}, indent=2))
    else:
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
        optimizer.step()
        checkpoint.save_training_state(path, optimizer, None, rng={}, meta={"step": "1"})
    result = runner.invoke(app, ["generate", "--model", str(path), "--prompt", "x"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path} is " + {
        "gguf": "a GGUF file (for llama.cpp or Ollama), not a gptcli checkpoint: give the run or "
                "checkpoint it was exported from",
        "json": "a JSON file, not a checkpoint: give the run folder or a .safetensors file",
        "state": "a run's training state (what --resume reads), not a model; give the run "
                 "folder or its last.safetensors"}[kind]


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
    real_read = checkpoint.read_tensors  # (which reads every tensor of the file)
    monkeypatch.setattr(checkpoint, "read_tensors",
                        lambda p, raw, f: read.extend(f.keys()) or real_read(p, raw, f))
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


def with_config(path, **changes):
    """The file's own config with some fields changed."""
    config = json.loads(checkpoint.read_safetensors(path, tensors=False)[1]["config"])
    return rewrite_metadata(path, config=json.dumps({**config, **changes}))


def tiny_file(tmp_path, **config):
    return save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(**config)),
                           char_tokenizer(101))


def only_on_meta(monkeypatch):
    """Let checkpoint build models only on the meta device (where nothing is allocated)."""
    real = checkpoint.GPT

    def gpt(config):
        assert torch.empty(0).device.type == "meta", "built a model with real tensors"
        return real(config)

    monkeypatch.setattr(checkpoint, "GPT", gpt)


def test_a_header_asking_for_a_huge_model_is_refused_before_building_anything(tmp_path,
                                                                              monkeypatch):
    path = tiny_file(tmp_path)
    with_config(path, n_layer=100000)
    monkeypatch.setattr(checkpoint, "GPT", lambda *a: pytest.fail("built a model"))
    for read in (load_checkpoint, checkpoint_info):
        with pytest.raises(UserError) as err:
            read(path)
        assert str(err.value) == (f"{path}: the weights do not match the config: it describes "
                                  "100,000 layers and 2,827,206,480 parameters, the weights have "
                                  "2 layers and 63,024 values")


@pytest.mark.parametrize("change", [dict(n_embd=2**30, n_head=1), dict(vocab_size=2**49)])
def test_a_header_asking_for_huge_tensors_is_refused_before_building_anything(tmp_path,
                                                                             monkeypatch, change):
    path = tiny_file(tmp_path)
    with_config(path, **change)
    if "vocab_size" in change:
        rewrite_metadata(path, tokenizer=json.dumps({"type": "gpt2"}))
    monkeypatch.setattr(checkpoint, "GPT", lambda *a: pytest.fail("built a model"))
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: the weights do not match the config: it "
                                     "describes 2 layers and ")
    assert str(err.value).endswith(" parameters, the weights have 2 layers and 63,024 values")


def test_larger_tensors_than_the_file_holds_are_named_without_allocating(tmp_path, monkeypatch):
    path = tiny_file(tmp_path)
    with_config(path, n_embd=2**16, n_head=1)
    only_on_meta(monkeypatch)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(
        f"{path}: the weights do not match the config (wrong shape: wte.weight (101, 48) "
        "(config: (101, 65536)), wpe.weight (32, 48) (config: (32, 65536)),")


@pytest.mark.parametrize("change,problem", [
    (dict(n_embd=24), "wrong shape: wte.weight (101, 48) (config: (101, 24)), wpe.weight "
                      "(32, 48) (config: (32, 24)), h.0.ln_1.weight (48,) (config: (24,)), "
                      "h.0.ln_1.bias (48,) (config: (24,)), ..."),
    (dict(context_length=64), "wrong shape: wpe.weight (32, 48) (config: (64, 48))"),
    (dict(tie_embeddings=False), "missing: lm_head.weight"),
    (dict(position="rope"), "unexpected: wpe.weight"),
    (dict(n_layer=1), "unexpected: h.1.attn.c_attn.bias, h.1.attn.c_attn.weight, "
                      "h.1.attn.c_proj.bias, h.1.attn.c_proj.weight, ..."),
    (dict(bias=False), "unexpected: h.0.attn.c_attn.bias, h.0.attn.c_proj.bias, h.0.ln_1.bias, "
                       "h.0.ln_2.bias, ..."),
])
def test_tensors_that_do_not_match_the_config_are_named(tmp_path, change, problem):
    path = tiny_file(tmp_path)
    with_config(path, **change)
    for read in (load_checkpoint, checkpoint_info):
        with pytest.raises(UserError) as err:
            read(path)
        assert str(err.value) == f"{path}: the weights do not match the config ({problem})"


def test_extra_blocks_are_named_from_the_first(tmp_path):
    path = tiny_file(tmp_path, n_layer=11)
    with_config(path, n_layer=2)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: the weights do not match the config (unexpected: "
                              "h.2.attn.c_attn.bias, h.2.attn.c_attn.weight, h.2.attn.c_proj.bias, "
                              "h.2.attn.c_proj.weight, ...)")


@pytest.mark.parametrize("options", [dict(), dict(tie_embeddings=False, position="rope",
                                                  norm="rmsnorm", bias=False, n_layer=3)])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_expected_shapes_are_the_models_own(options, quantization):
    """expected_shapes builds one block and repeats it: the same table as the whole model's."""
    from gptcli.quantize import prepare

    with torch.device("meta"):
        model = GPT(tiny_config(**options))
        if quantization:
            prepare(model, quantization)
    whole = {k: tuple(v.shape) for k, v in checkpoint.model_tensors(model).items()}
    assert list(expected_shapes(model.config, quantization).items()) == list(whole.items())


@pytest.mark.parametrize("spec,message", [
    ("[1, 2]", "its tokenizer entry is not a tokenizer spec (an object with a type)"),
    ("7", "its tokenizer entry is not a tokenizer spec (an object with a type)"),
    ('{"type": "char", "chars": "abc"}', "is damaged: its char tokenizer has 3 tokens but the "
                                         "model's embedding has 101 rows"),
    ('{"type": "gpt2"}', "is damaged: its gpt2 tokenizer has 50257 tokens but the model's "
                         "embedding has 101 rows"),
    ('{"type": "char", "chars": "aab"}', ": damaged char tokenizer spec: a char vocabulary is a "
                                         "list of distinct single characters"),
    ('{"type": "spm"}', ": unknown tokenizer type 'spm'; this gptcli knows gpt2 and char"),
])
def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path, spec, message):
    path = rewrite_metadata(tiny_file(tmp_path), tokenizer=spec)
    for read in (load_checkpoint, checkpoint_info):
        with pytest.raises(UserError) as err:
            read(path)
        assert str(err.value).startswith(str(path)) and str(err.value).endswith(message)


def test_a_padded_gpt2_vocabulary_loads(tmp_path):
    """nanoGPT pads GPT-2's 50,257 tokens to 50,304 rows; the extra rows are never decoded."""
    path = tiny_file(tmp_path, vocab_size=50304)
    rewrite_metadata(path, tokenizer=json.dumps({"type": "gpt2"}))
    model, tokenizer, _ = load_checkpoint(path)
    assert model.config.vocab_size == 50304 and tokenizer.vocab_size == 50257


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
    # through the CLI, where a name without a suffix is first looked for as a run or a download
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name, args in (("loop.safetensors", ["info", "loop.safetensors"]),
                       ("a", ["generate", "--model", "a", "--prompt", "x"])):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.stderr.strip() == (f"error: cannot read checkpoint {name}: it is a "
                                         "symbolic link loop")


def gpt_held_by_file_modes(*args: str) -> subprocess.CompletedProcess:
    """Run the `gpt` CLI in a process that file modes stop. Tests may run as root, which no
    mode stops: its child then gives up the capabilities that let it read and write past them
    (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, dropped from the bounding set, which is all a
    root process keeps across exec)."""
    def drop() -> None:
        if os.geteuid() == 0:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
            for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "cannot drop a capability")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True,
                          text=True, env=env, preexec_fn=drop, timeout=120)


def test_permission_denied_is_worded_as_such(tmp_path):
    path = tiny_file(tmp_path)
    path.chmod(0)
    read = gpt_held_by_file_modes("info", str(path))
    assert (read.returncode, read.stderr.strip()) == (
        2, f"error: cannot read checkpoint {path}: permission denied")
    path.chmod(0o644)
    (tmp_path / "locked").mkdir(mode=0o555)
    out = tmp_path / "locked" / "q.safetensors"
    write = gpt_held_by_file_modes("quantize", str(path), "--out", str(out))
    assert (write.returncode, write.stderr.strip()) == (
        2, f"error: cannot write checkpoint to {out}: permission denied")
    assert list((tmp_path / "locked").iterdir()) == []


def test_a_write_the_system_stops_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: a file size limit (RLIMIT_FSIZE) stops safetensors' writer part-way,
    as a full disk would."""
    import resource
    import signal

    path = tiny_file(tmp_path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killing signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(RuntimeFailure) as err:
            save_checkpoint(path, GPT(tiny_config()), char_tokenizer(101))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(err.value) == (f"cannot write checkpoint to {path}: file too large; the previous "
                              "checkpoint is intact")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_writing_where_a_file_or_folder_is_in_the_way(tmp_path):
    path = tiny_file(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "q.safetensors"
    result = runner.invoke(app, ["quantize", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: cannot write checkpoint to {out}: a part of the path "
                                     "is a file, not a folder")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError) as err:
        save_checkpoint(tmp_path / "folder", GPT(tiny_config()), char_tokenizer(101))
    assert str(err.value) == f"cannot write checkpoint to {tmp_path / 'folder'}: it is a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.safetensors", "notes.txt"]
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # safetensors' own error for it, with Rust's wording of the OS error
    "Error while serializing: I/O error: No space left on device (os error 28)",
])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    from safetensors import SafetensorError

    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()), char_tokenizer(101))
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"the start of a checkpoint")
        raise SafetensorError(error) if isinstance(error, str) else error

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(RuntimeFailure) as err:
        save_checkpoint(path, GPT(tiny_config()), char_tokenizer(101))
    assert str(err.value) == (f"cannot write checkpoint to {path}: no space left on device; the "
                              "previous checkpoint is intact")
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
