"""The README's "Reproduce GPT-2 124M" commands, run as written against the Hub look-alike,
shrunk to run here: a tiny model and two steps (flags appended, which win over the README's),
2 CPU processes under real torchrun instead of 8 GPUs, and no --compile (minutes on a CPU)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hf_server import HubServer, Repo

ROOT = Path(__file__).resolve().parents[1]
SHRINK = {
    "bench": ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0"],
    "train": ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-length", "32",
              "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1",
              "--eval-interval", "2", "--eval-steps", "1", "--val-fraction", "0.2",
              "--sample-interval", "0", "--workers", "1"],
    "eval": ["--limit", "4", "--batch-size", "4"],
}
CPU = {"--nproc_per_node 8": "--nproc_per_node 2", "--device cuda": "--device cpu",
       " --compile": ""}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reproduce GPT-2 124M", 1)[1]
    block = section.split("```", 2)[1]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def parquet(docs: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), sink,
                   row_group_size=16)
    return sink.getvalue()


def test_the_readme_recipe_runs(tmp_path):
    commands = readme_commands()
    assert commands[0] == 'python -m pip install -e ".[data,eval,tensorboard]"'
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"data", "eval", "tensorboard"} <= set(extras)  # what the install line names
    docs = [f"Lesson {i}: plants turn light, water and air into sugar and oxygen. " * 2
            for i in range(64)]
    fineweb = Repo({"README.md": b"FineWeb-Edu",
                    "sample/10BT/000_00000.parquet": parquet(docs[:32]),
                    "sample/10BT/001_00000.parquet": parquet(docs[32:]),
                    "sample/100BT/000_00000.parquet": parquet(["not this sample"]),
                    "data/CC-MAIN-2024-10/train-00000.parquet": parquet(["nor this"])},
                   repo_type="dataset")
    hella = [{"ind": i, "activity_label": "Gardening", "ctx_a": f"A man waters plant {i}.",
              "ctx_b": "he", "endings": ["smiles.", "sings to it.", "walks away.", "sits."],
              "label": str(i % 4)} for i in range(6)]
    hellaswag = Repo({"data/hellaswag_val.jsonl": "".join(json.dumps(r) + "\n"
                                                         for r in hella).encode()},
                     repo_type="dataset")
    env = {**os.environ, "GPTCLI_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    with HubServer({"datasets/HuggingFaceFW/fineweb-edu": fineweb,
                    "datasets/Rowan/hellaswag": hellaswag}) as hub:
        env["HF_ENDPOINT"] = hub.url
        for command in commands[1:]:
            for old, new in CPU.items():
                command = command.replace(old, new)
            argv = shlex.split(command)
            if argv[0] == "torchrun":  # the real launcher, from this interpreter
                argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
            verb = next(a for a in argv if a in SHRINK or a == "download")
            argv += SHRINK.get(verb, [])
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, f"{command}\n{out.stdout}\n{out.stderr}"
            assert "Traceback" not in out.stderr, out.stderr

    stored = sorted(p.relative_to(tmp_path / "home" / "datasets").as_posix() for p in
                    (tmp_path / "home" / "datasets").rglob("*.parquet"))
    assert [re.sub(r"^[^/]*/", "", p) for p in stored] == [
        "sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    run = tmp_path / "runs" / "gpt2-124m"
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["tokens_per_step"] == 2 * 1 * 2 * 32
    assert config["train"]["lr"] == 6e-4 and config["train"]["beta2"] == 0.95
    assert config["train"]["dtype"] == "bfloat16" and len(config["shards"]) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and 0 <= records[-1]["hellaswag/acc_norm"] <= 1
    assert any((run / "tensorboard").iterdir())
