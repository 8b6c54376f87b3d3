"""The lm-evaluation-harness adapter, on local task configs (no network): its figures equal
`gpt eval --task`'s on the same data."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gptcli.cli import app

from test_tasks import LAMBADA, WIKI, model_file, write_jsonl  # noqa: F401 - fixtures

lm_eval = pytest.importorskip("lm_eval", reason="the adapter needs the eval extra")
runner = CliRunner()

LAMBADA_YAML = """task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

WIKITEXT_YAML = """task: wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function wikitext_local.detokenize
process_results: !function wikitext_local.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

# What the harness's wikitext task does around the model call, for a local copy of the data.
WIKITEXT_PY = '''import re
from gptcli.tasks import wikitext_detokenize

def detokenize(doc):
    return wikitext_detokenize(doc["page"])

def process_results(doc, results):
    (loglikelihood,) = results
    text = detokenize(doc)
    words, n_bytes = len(re.split(r"\\s+", text)), len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words),
            "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
'''


@pytest.fixture
def harness_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    lam = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in LAMBADA])
    wiki = write_jsonl(tmp_path / "wiki.jsonl", [{"page": p} for p in WIKI])
    tasks = tmp_path / "harness-tasks"
    tasks.mkdir()
    (tasks / "lambada_local.yaml").write_text(LAMBADA_YAML.format(data=lam))
    (tasks / "wikitext_local.yaml").write_text(WIKITEXT_YAML.format(data=wiki))
    (tasks / "wikitext_local.py").write_text(WIKITEXT_PY)
    return {"dir": tasks, "lambada": lam, "wikitext-2": wiki}


def ours(model_file, files, task):  # noqa: F811
    result = runner.invoke(app, ["eval", "--model", str(model_file), "--task", task,
                                 "--task-file", f"{task}={files[task]}", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tasks"][task]["metrics"]


def test_the_adapter_gives_the_figures_of_gpt_eval_task(model_file, harness_tasks):  # noqa: F811
    import gptcli.harness  # noqa: F401 - registers the model type
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model="gptcli", model_args=f"model={model_file},device=cpu",
                              tasks=["lambada_local", "wikitext_local"], batch_size=4,
                              task_manager=TaskManager(include_path=str(harness_tasks["dir"])))
    lam = results["results"]["lambada_local"]
    wiki = results["results"]["wikitext_local"]
    expected = ours(model_file, harness_tasks, "lambada")
    assert lam["acc,none"] == pytest.approx(expected["acc"])
    assert lam["perplexity,none"] == pytest.approx(expected["perplexity"], rel=1e-5)
    expected = ours(model_file, harness_tasks, "wikitext-2")
    assert wiki["word_perplexity,none"] == pytest.approx(expected["word_perplexity"], rel=1e-5)
    assert wiki["bits_per_byte,none"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)


def test_generate_until_stops_before_the_task_strings(model_file):  # noqa: F811
    from lm_eval.api.instance import Instance

    from gptcli.harness import GptcliLM

    lm = GptcliLM(str(model_file), device="cpu")
    free = lm.generate_until([Instance("generate_until", {}, ("Once upon a time",
                                                               {"max_gen_toks": 12}), 0)])[0]
    stop = free[3:6]
    cut = lm.generate_until([Instance("generate_until", {}, ("Once upon a time",
                                                              {"max_gen_toks": 12,
                                                               "until": [stop]}), 0)])[0]
    assert cut == free[:free.index(stop)]


def test_gpt_eval_harness_runs_a_local_task(model_file, harness_tasks):  # noqa: F811
    result = runner.invoke(app, ["eval", "--model", str(model_file), "--harness",
                                 "lambada_local", "--harness-include", str(harness_tasks["dir"]),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["results"]["lambada_local"]
    assert got["acc,none"] == pytest.approx(ours(model_file, harness_tasks, "lambada")["acc"])
    unknown = runner.invoke(app, ["eval", "--model", str(model_file), "--harness", "no_such"])
    assert unknown.exit_code == 2
    assert "lm-evaluation-harness has no task no_such" in unknown.stderr


def test_task_data_the_hub_cannot_send_is_one_line_at_once(model_file, tmp_path):  # noqa: F811
    """Offline, a task whose data is not cached ends in one sentence (not the datasets
    library's ConnectionError after ~24 s of huggingface_hub's retries)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_only.yaml").write_text(LAMBADA_YAML.replace("lambada_local", "hub_only").replace(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n",
        "dataset_path: someone/not-cached\n"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there after this
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gptcli", "eval", "--model", str(model_file),
                             "--harness", "hub_only", "--harness-include", str(tasks),
                             "--device", "cpu"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the data of hub_only is not in the datasets cache and the Hugging Face Hub "
        "cannot be reached (ConnectionRefusedError: [Errno 111] Connection refused); run the "
        "command once with network access (lm-evaluation-harness fetches task data with the "
        "datasets library)")
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 120
