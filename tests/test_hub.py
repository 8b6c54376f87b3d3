"""`gpt download`, `--model` (Hugging Face folders, Hub ids), `gpt export` and its
`--push-to-hub` against a Hugging Face Hub look-alike on 127.0.0.1.

The downloads run the real `gpt` CLI in a subprocess (huggingface_hub reads HF_ENDPOINT, HF_HOME
and HF_HUB_OFFLINE when it is imported), with the real huggingface_hub client talking HTTP to
tests/hf_server.py, which serves tiny random GPT-2 repos that transformers writes at test time.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from gptcli.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gptcli.cli import app  # noqa: E402
from gptcli.model import GPT  # noqa: E402
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

from conftest import randomize_, startup_seconds, tiny_config  # noqa: E402
from hf_server import HubServer, Repo  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def hf_model(seed: int) -> transformers.GPT2LMHeadModel:
    """A tiny random GPT-2 with the real vocabulary size (so the GPT-2 tokenizer fits)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4)
    return randomize_(transformers.GPT2LMHeadModel(config), seed).eval()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory):
    """Repos written by transformers once per module: (repos for the server, HF models, folders)."""
    root = tmp_path_factory.mktemp("hf-repos")
    single, sharded = hf_model(0), hf_model(1)
    single.save_pretrained(root / "single")
    sharded.save_pretrained(root / "sharded", max_shard_size="2MB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    config = json.loads((root / "single" / "config.json").read_text())
    pickle_files = {"config.json": json.dumps(config).encode(), "pytorch_model.bin": b"\x80\x04"}
    llama = folder_files(root / "single")
    llama["config.json"] = json.dumps({**config, "model_type": "llama"}).encode()
    repos = {
        "t/single": Repo(folder_files(root / "single")),
        "t/sharded": Repo(folder_files(root / "sharded")),
        "t/pickle": Repo(pickle_files),
        "t/llama": Repo(llama),
        "t/drop": Repo(folder_files(root / "single"), drop=True),
        "datasets/t/text": Repo({"a.txt": b"Once upon a time.\n", "b.txt": b"The end.\n"},
                                repo_type="dataset"),
    }
    return {"repos": repos, "models": {"t/single": single, "t/sharded": sharded}, "root": root}


@pytest.fixture
def hub(hub_data):
    """The look-alike Hub, started for one test and shut down after it."""
    with HubServer(hub_data["repos"]) as server:
        yield server


@pytest.fixture(scope="module")
def downloaded(hub_data, tmp_path_factory) -> Path:
    """A folder whose HF cache and gptcli store hold t/single, downloaded once by the CLI; the
    server is gone afterwards, so everything that uses it runs offline."""
    home = tmp_path_factory.mktemp("downloaded")
    with HubServer(hub_data["repos"]) as server:
        result = gpt(home, "download", "t/single", endpoint=server.url)
    assert result.returncode == 0, result.stderr
    return home


def dead_endpoint() -> str:
    """An address on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def gpt(tmp_path: Path, *args: str, endpoint: str, offline: bool = False,
        token: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `gpt` CLI with its own Hub endpoint, HF cache and gptcli store (and no
    Hugging Face token unless ``token`` is given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GPTCLI_"))}
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"),
               GPTCLI_HOME=str(tmp_path / "gptcli"), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gptcli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1] if lines else ""


def assert_same_logits(path: Path, reference: torch.nn.Module, vocab: int = 50257) -> None:
    model, tokenizer, meta = load_checkpoint(path)
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = reference(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def stored(tmp_path: Path, name: str) -> Path:
    return tmp_path / "gptcli" / "models" / f"{name}.safetensors"


# ----------------------------------------------------------------------------- download

def test_download_single_file_matches_transformers(tmp_path, hub, hub_data):
    result = gpt(tmp_path, "download", "t/single", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    path = stored(tmp_path, "t--single")
    assert result.stdout.startswith("stored t/single: ") and str(path) in result.stdout
    assert_same_logits(path, hub_data["models"]["t/single"])
    meta = load_checkpoint(path)[2]
    assert meta["source"] == "hf:t/single"
    assert meta["revision"] == hub_data["repos"]["t/single"].commit
    assert json.loads(meta["tokenizer"]) == {"type": "gpt2"}


def test_download_sharded_matches_transformers(tmp_path, hub, hub_data):
    out = tmp_path / "mine.safetensors"
    result = gpt(tmp_path, "download", "t/sharded", "--out", str(out), "--json", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(out) and info["parameters"] == sum(
        p.numel() for p in hub_data["models"]["t/sharded"].parameters())
    shards = {path for method, path in hub.requests if method == "GET" and "model-0000" in path}
    assert len(shards) == 2
    assert_same_logits(out, hub_data["models"]["t/sharded"])


def test_offline_after_download_works(downloaded, hub_data):
    # --offline: nothing is asked of the network (the endpoint is dead anyway).
    result = gpt(downloaded, "download", "t/single", "--offline", "--out", "a.safetensors",
                 endpoint=dead_endpoint())
    assert result.returncode == 0, result.stderr
    assert_same_logits(downloaded / "a.safetensors", hub_data["models"]["t/single"])
    # HF_HUB_OFFLINE=1 alone does the same.
    result = gpt(downloaded, "download", "t/single", "--out", "b.safetensors",
                 endpoint=dead_endpoint(), offline=True)
    assert result.returncode == 0, result.stderr
    assert (downloaded / "b.safetensors").is_file()


def test_offline_before_download_says_what_is_missing(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/single", "--offline", endpoint=hub.url)
    assert result.returncode == 2
    assert error_line(result).startswith(
        "error: offline, and config.json of model repo t/single is not in the local cache")
    assert hub.requests == []


def test_unknown_repo_is_a_404_message(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/missing", endpoint=hub.url)
    assert result.returncode == 2
    assert error_line(result) == (f"error: no model repo 't/missing' on {hub.url} "
                                  "(or it is private: set HF_TOKEN)")


def test_unknown_revision(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/single", "--revision", "v9", endpoint=hub.url)
    assert result.returncode == 2
    assert error_line(result) == "error: model repo t/single has no revision 'v9'"


def test_non_gpt2_model_type_is_refused_before_weights(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/llama", endpoint=hub.url)
    assert result.returncode == 2
    assert error_line(result) == ("error: this is not a GPT-2 model: config.json says "
                                  "model_type 'llama'; gptcli converts only model_type 'gpt2'")
    assert not any("model.safetensors" in path for method, path in hub.requests)


def test_pickle_only_repo_is_refused_unopened(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/pickle", endpoint=hub.url)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: t/pickle has only pickle weights (pytorch_model.bin)")
    assert "unpickling can run arbitrary code" in line
    assert ("GET", "/t/pickle/resolve/main/pytorch_model.bin") not in hub.requests


def test_connection_dropped_mid_file(tmp_path, hub):
    result = gpt(tmp_path, "download", "t/drop", endpoint=hub.url)
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"error: downloading model.safetensors of t/drop from {hub.url} "
                           "failed (")
    assert line.endswith("; run the command again to resume")
    assert not stored(tmp_path, "t--drop").exists()


def test_download_dataset_text_files(tmp_path, hub):
    result = gpt(tmp_path, "download", "--dataset", "t/text", "--include", "a.txt", "--include",
                 "b.txt", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "gptcli" / "datasets" / "t--text"
    assert (folder / "a.txt").read_text() == "Once upon a time.\n"
    assert (folder / "b.txt").read_text() == "The end.\n"
    assert "gpt train --data t/text" in result.stdout


def test_dataset_files_must_be_text(tmp_path):
    result = runner.invoke(app, ["download", "--dataset", "t/text", "--include", "x.bin"],
                           env={"GPTCLI_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: gptcli trains on .txt, .jsonl and .parquet files, "
                                     "not x.bin")


def closed_port() -> int:
    """A loopback port nothing listens on (a connection is refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [("download", "gpt2"),
                                  ("download", "--dataset", "t/text", "--include", "*.txt")])
def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, args):
    """huggingface_hub retries a dead endpoint with back-off for ~24 s, printing a warning per
    try; gptcli checks the endpoint first and says so at once, in one line."""
    import time

    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    result = gpt(tmp_path, *args, endpoint=endpoint)
    assert time.monotonic() - start - startup_seconds() < 15  # (the process's start aside)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert error_line(result).startswith(f"error: could not reach {endpoint} to download ")
    assert "ConnectionRefusedError" in result.stderr and "Retrying" not in result.stderr


# ----------------------------------------------------------------------------- local, in process

def test_download_list(tmp_path):
    env = {"GPTCLI_HOME": str(tmp_path)}
    save_checkpoint(tmp_path / "models" / "gpt2.safetensors", GPT(tiny_config(vocab_size=50257)),
                    GPT2Tokenizer())
    result = runner.invoke(app, ["download", "--list"], env=env)
    assert result.exit_code == 0, result.output
    assert "openai-community/gpt2-xl" in result.stdout and "roneneldan/TinyStories" in result.stdout
    assert f"in {tmp_path / 'models'}: gpt2" in result.stdout
    info = json.loads(runner.invoke(app, ["download", "--list", "--json"], env=env).stdout)
    assert info["models"]["gpt2"] == {"repo": "openai-community/gpt2", "stored": True}
    assert info["models"]["distilgpt2"]["stored"] is False


def test_download_local_folder(tmp_path, hub_data):
    folder = hub_data["root"] / "sharded"
    result = runner.invoke(app, ["download", str(folder)], env={"GPTCLI_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert_same_logits(tmp_path / "models" / "sharded.safetensors", hub_data["models"]["t/sharded"])


def test_download_replaces_no_file_the_user_has(tmp_path, hub_data):
    """An existing --out, or a stored model of the same name made from another folder, is
    refused unless --force; the same folder again updates its stored model."""
    env = {"GPTCLI_HOME": str(tmp_path)}
    first = hub_data["root"] / "single"
    other = tmp_path / "elsewhere" / "single"  # the same folder name, other weights
    other.mkdir(parents=True)
    for name, data in folder_files(hub_data["root"] / "sharded").items():
        (other / name).write_bytes(data)
    assert runner.invoke(app, ["download", str(first)], env=env).exit_code == 0
    path = tmp_path / "models" / "single.safetensors"
    before = path.read_bytes()
    result = runner.invoke(app, ["download", str(other)], env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: the store already has a model called single (from "
                                     f"{first}); pass --force to replace it, or --out FILE to "
                                     "write this one elsewhere")
    assert path.read_bytes() == before
    assert runner.invoke(app, ["download", str(first)], env=env).exit_code == 0  # an update
    assert runner.invoke(app, ["download", str(other), "--force"], env=env).exit_code == 0
    assert_same_logits(path, hub_data["models"]["t/sharded"])

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = runner.invoke(app, ["download", str(first), "--out", str(notes)], env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {notes} already exists; pass --force to overwrite "
                                     "it, or another --out")
    assert notes.read_text() == "mine"
    result = runner.invoke(app, ["download", str(first), "--out", str(notes), "--force"],
                           env=env)
    assert result.exit_code == 0, result.output
    assert_same_logits(notes, hub_data["models"]["t/single"])


def test_download_of_a_path_that_is_no_folder_says_so_offline(tmp_path, monkeypatch):
    """``./x`` can never be a Hub repo: a missing path or a file is named as such, with no
    network asked (before: "could not reach huggingface.co to download config.json of ./x")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "m.safetensors").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("x")  # one slash: like org/name
    for name, message in (
            ("./no-such-folder", "./no-such-folder does not exist (a folder to convert?), and it "
             "is not a Hub repo id (org/name)"),
            ("../x/y", "../x/y does not exist (a folder to convert?), and it is not a Hub repo "
             "id (org/name)"),
            ("./notes.txt", "./notes.txt is a file; gpt download converts a Hugging Face folder "
             "(its config.json and weights), a Hub repo or a known name"),
            ("out/model.safetensors", "out/model.safetensors is a file; gpt download converts "
             "a Hugging Face folder (its config.json and weights), a Hub repo or a known name (a "
             "gptcli checkpoint needs none: gpt generate --model out/model.safetensors)"),
            ("m.safetensors", "m.safetensors is a file; gpt download converts a Hugging Face "
             "folder (its config.json and weights), a Hub repo or a known name (a gptcli "
             "checkpoint needs none: gpt generate --model m.safetensors)")):
        result = runner.invoke(app, ["download", name], env={"GPTCLI_HOME": str(tmp_path)})
        assert (result.exit_code, result.stderr.strip()) == (2, f"error: {message}")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_local_folder_with_pickle_only_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = runner.invoke(app, ["download", str(tmp_path / "hf")],
                           env={"GPTCLI_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'hf'} has only pickle weights")


def test_local_folder_whose_config_does_not_fit_its_weights(tmp_path, hub_data):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, data in folder_files(hub_data["root"] / "single").items():
        (folder / name).write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_positions": 128}))
    result = runner.invoke(app, ["download", str(folder)], env={"GPTCLI_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.json: the weights do not match the config (wrong shape: wpe.weight "
        "(64, 32) (config: (128, 32)))")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x08" + bytes(15))
    result = runner.invoke(app, ["download", str(folder)], env={"GPTCLI_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {folder / 'model.safetensors'} is not a "
                                            "readable safetensors file (truncated or corrupt?): ")
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_export_round_trip_with_transformers(tmp_path, tokenizer):
    vocab = 50257 if tokenizer == "gpt2" else 101
    model = randomize_(GPT(tiny_config(vocab_size=vocab)), seed=3).eval()
    tok = GPT2Tokenizer() if tokenizer == "gpt2" else CharTokenizer([chr(33 + i)
                                                                     for i in range(101)])
    path = save_checkpoint(tmp_path / "m.safetensors", model, tok)
    result = runner.invoke(app, ["export", "--model", str(path), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    tokenizer_files = ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                       "tokenizer_config.json", "vocab.json"] if tokenizer == "gpt2" else \
        ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted([
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        *tokenizer_files])
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(path, reference, vocab)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == ({"bos_token_id": 50256, "eos_token_id": 50256}
                          if tokenizer == "gpt2" else {})


@pytest.mark.parametrize("option, shown", [
    (dict(norm="rmsnorm"), "norm=rmsnorm"), (dict(position="rope"), "position=rope"),
    (dict(position="sinusoidal"), "position=sinusoidal"),
    (dict(tie_embeddings=False), "tie_embeddings=False"), (dict(bias=False), "bias=False")])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, option, shown):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(n_embd=48, **option)),
                           CharTokenizer.from_text("abc"))
    result = runner.invoke(app, ["export", "--model", str(path), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: Hugging Face GPT-2 cannot express this model "
                                     f"({shown})")
    assert not (tmp_path / "hf").exists()


def test_export_into_a_folder_with_files_needs_force(tmp_path):
    model = randomize_(GPT(tiny_config(vocab_size=50257)), seed=3).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, GPT2Tokenizer())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("mine")
    result = runner.invoke(app, ["export", "--model", str(path), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: --out {tmp_path / 'hf'} already has files; pass "
                                     "--force to overwrite them, or give an empty or new folder")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["config.json"]
    assert (tmp_path / "hf" / "config.json").read_text() == "mine"
    result = runner.invoke(app, ["export", "--model", str(path), "--out", str(tmp_path / "hf"),
                                 "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"


# ----------------------------------------------------------------------------- using downloads

def test_greedy_generate_after_download_equals_transformers_offline(downloaded, hub_data):
    prompt = "The meaning of life is"
    result = gpt(downloaded, "generate", "--model", "t/single", "--prompt", prompt,
                 "--max-new-tokens", "8", "--temperature", "0", "--json",
                 endpoint=dead_endpoint(), offline=True)
    assert result.returncode == 0, result.stderr
    sample = json.loads(result.stdout)["samples"][0]
    ids = torch.tensor([GPT2Tokenizer().encode(prompt)])
    with torch.no_grad():
        theirs = hub_data["models"]["t/single"].generate(
            ids, max_new_tokens=8, do_sample=False, pad_token_id=50256)[0, ids.shape[1]:]
    ours = sample["token_ids"]
    assert ours == theirs[:len(ours)].tolist()
    assert len(ours) == 8 or sample["finish_reason"] == "eos"


def test_eval_after_download_offline(downloaded):
    (downloaded / "text.txt").write_text("Once upon a time there was a tiny model. " * 20)
    result = gpt(downloaded, "eval", "--model", "t/single", "--data", "text.txt", "--json",
                 endpoint=dead_endpoint(), offline=True)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["tokens"] > 0
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-3)


# ----------------------------------------------------------------------------- --model: folders, Hub ids

def greedy(result) -> list[int]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["samples"][0]["token_ids"]


def transformers_greedy(model, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([GPT2Tokenizer().encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=50256)
    return out[0, ids.shape[1]:].tolist()


def test_model_hf_folder_offline_is_converted_once(tmp_path, hub_data):
    folder = hub_data["root"] / "sharded"
    args = ("generate", "--model", str(folder), "--prompt", "Once upon a time",
            "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", "--json")
    first = greedy(gpt(tmp_path, *args, endpoint=dead_endpoint(), offline=True))
    assert first == transformers_greedy(hub_data["models"]["t/sharded"], "Once upon a time", 6)
    kept = tmp_path / "gptcli" / "models" / "hf-folders"
    converted = list(kept.glob("*.safetensors"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    assert greedy(gpt(tmp_path, *args, endpoint=dead_endpoint(), offline=True)) == first
    assert list(kept.glob("*.safetensors")) == converted
    assert converted[0].stat().st_mtime_ns == stamp  # found again, not converted again


def test_model_hub_id_is_downloaded_when_online_then_used_offline(tmp_path, hub, hub_data):
    result = gpt(tmp_path, "export", "--model", "t/single", "--out", "hf-out", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert "t/single is not in " in result.stderr and "downloading it once" in result.stderr
    assert stored(tmp_path, "t--single").is_file()
    card = (tmp_path / "hf-out" / "README.md").read_text()
    assert '\nbase_model: "t/single"\n' in card
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf-out").eval()
    assert_same_logits(stored(tmp_path, "t--single"), reference)
    requests = len(hub.requests)
    again = gpt(tmp_path, "generate", "--model", "t/single", "--prompt", "Hello",
                "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos", "--json",
                endpoint=dead_endpoint(), offline=True)
    assert greedy(again) == transformers_greedy(hub_data["models"]["t/single"], "Hello", 5)
    assert len(hub.requests) == requests


def test_model_hub_id_offline_or_unreachable_says_gpt_download(tmp_path, hub):
    result = gpt(tmp_path, "export", "--model", "t/single", "--out", "x", endpoint=hub.url,
                 offline=True)
    assert result.returncode == 2
    assert error_line(result).startswith("error: t/single is not downloaded yet: get it with "
                                          "`gpt download t/single` (once, with network access)")
    assert hub.requests == []
    endpoint = dead_endpoint()
    result = gpt(tmp_path, "export", "--model", "t/single", "--out", "x", endpoint=endpoint)
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"error: could not reach {endpoint} to download the weights of "
                           "t/single (")
    assert line.endswith("; t/single is not downloaded yet: run `gpt download t/single` once "
                         "with network access")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "this is not a GPT-2 model: config.json says model_type 'llama'; "
                              "gptcli converts only model_type 'gpt2'"),
    ({"scale_attn_by_inverse_layer_idx": True},
     "this GPT-2 variant is not supported: config.json sets scale_attn_by_inverse_layer_idx=True; "
     "gptcli converts plain GPT-2 only"),
    ({"tokenizer": "other"}, "the tokenizer of {folder} is not GPT-2's (3 tokens, 1 merges, not "
                             "GPT-2's exact 50257 tokens and 50000 merges); gptcli pairs GPT-2 "
                             "models with the GPT-2 tokenizer only"),
])
def test_a_folder_that_is_not_gpt2_is_refused(tmp_path, hub_data, change, message):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in folder_files(hub_data["root"] / "single").items():
        (folder / name).write_bytes(data)
    if "tokenizer" in change:
        (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
        (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    result = runner.invoke(app, ["generate", "--model", str(folder), "--prompt", "Hi"],
                           env={"GPTCLI_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: " + message.format(folder=folder)
    assert not list((tmp_path / "home").rglob("*.safetensors"))


# ----------------------------------------------------------------------------- --push-to-hub

WRITER = "hf_look_alike_writer"


@pytest.fixture
def writable_hub(hub_data):
    """The look-alike with upload endpoints: WRITER may write to the namespace "me"."""
    with HubServer(dict(hub_data["repos"]), writers={WRITER: {"me"}}) as server:
        yield server


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = randomize_(GPT(tiny_config(vocab_size=50257)), seed=3).eval()
    return save_checkpoint(tmp_path / "m.safetensors", model, GPT2Tokenizer(), step=5)


def test_push_to_hub_uploads_exactly_the_folder(tmp_path, writable_hub, checkpoint):
    result = gpt(tmp_path, "export", "--model", str(checkpoint), "--out", "hf-out",
                 "--push-to-hub", "me/tiny", "--private", endpoint=writable_hub.url, token=WRITER)
    assert result.returncode == 0, result.stderr
    assert WRITER not in result.stdout + result.stderr
    assert f"pushed to {writable_hub.url}/me/tiny (main)" in result.stdout
    repo = writable_hub.repos["me/tiny"]
    assert repo.private and repo.files == folder_files(tmp_path / "hf-out")
    # a branch, then back down through the Hub: the same model
    result = gpt(tmp_path, "export", "--model", str(checkpoint), "--out", "m.gguf", "--format",
                 "gguf", "--push-to-hub", "me/tiny", "--revision", "dev",
                 endpoint=writable_hub.url, token=WRITER)
    assert result.returncode == 0, result.stderr
    assert repo.branches["dev"]["m.gguf"] == (tmp_path / "m.gguf").read_bytes()
    assert repo.files == folder_files(tmp_path / "hf-out")  # main as it was
    back = gpt(tmp_path, "download", "me/tiny", "--out", "back.safetensors",
               endpoint=writable_hub.url)
    assert back.returncode == 0, back.stderr
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf-out").eval()
    assert_same_logits(tmp_path / "back.safetensors", reference)


@pytest.mark.parametrize("repo, token, message", [
    ("me/tiny", None, "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN, "
                      "or run `hf auth login` once"),
    ("me/tiny", "hf_wrong", "{url} refused the token (401 Unauthorized) when uploading to "
                            "me/tiny; set HF_TOKEN to a valid token with write access, or run "
                            "`hf auth login` again"),
    ("nobody/tiny", WRITER, "there is no user or organisation 'nobody' on {url} (404), or the "
                            "token cannot see it; check the name in --push-to-hub nobody/tiny"),
    ("t/tiny", WRITER, "the token may not write to 't' on {url} (403 Forbidden); use a token "
                       "with write access to it, or push to your own namespace"),
])
def test_push_refusals_are_one_sentence_before_writing(tmp_path, writable_hub, checkpoint, repo,
                                                       token, message):
    result = gpt(tmp_path, "export", "--model", str(checkpoint), "--out", "hf-out",
                 "--push-to-hub", repo, endpoint=writable_hub.url, token=token)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: " + message.format(url=writable_hub.url)
    assert not (tmp_path / "hf-out").exists()
    assert repo not in writable_hub.repos
    assert token is None or token not in result.stdout + result.stderr
