"""`gpt eval --task`: scoring checked by hand on tiny fixtures in the published formats, parity
with transformers, and task data through the Hub look-alike."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptcli.errors import install_command
from gptcli.checkpoint import save_checkpoint
from gptcli.cli import app
from gptcli.config import ModelConfig
from gptcli.model import GPT
from gptcli.tasks import (hellaswag_text, score, split_pair, wikitext_detokenize)
from gptcli.tokenizer import GPT2Tokenizer

from conftest import randomize_

runner = CliRunner()
TOK = GPT2Tokenizer()
LAMBADA = ["the cat sat on the mat and then the cat sat on the mat again , said the cat",
           "she opened the door and saw her old friend standing there holding a small dog",
           "in the morning the birds sing and the sun rises over the hills of the valley",
           "he ran as fast as he could but the bus had already left the station",
           "they sailed across the sea for many days until they finally saw land",
           "the teacher asked the students to open their books to page ten",
           "after the storm the streets were full of water and broken branches",
           "we ate dinner together and talked about the old days until midnight"]
ENDINGS = ["puts it on the stove [title] and waits.", "throws it out the window.",
           "starts singing.", "pours the water into a cup  slowly."]
WIKI = [" = Robert Boulter = \n Robert Boulter is an English film , television and theatre "
        "actor . He had a guest @-@ starring role on The Bill in 2000 . \n",
        " = Du Fu = \n Du Fu ( 712 – 770 ) was a prominent Chinese poet . Along with Li Bai , "
        "he is called the greatest of the Chinese poets . \n"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small GPT-2-vocabulary model whose weights make sharp, varied predictions."""
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, context_length=64)), 3)
    return save_checkpoint(tmp_path_factory.mktemp("m") / "m.safetensors", model, TOK)


@pytest.fixture(scope="module")
def model(model_file):
    from gptcli.checkpoint import load_checkpoint

    return load_checkpoint(model_file)[0]


@pytest.fixture
def files(tmp_path):
    hella = [{"ind": i, "activity_label": "Making tea", "ctx_a": f"A woman fills kettle {i}.",
              "ctx_b": "she", "endings": ENDINGS, "label": str(i % 4)} for i in range(8)]
    return {"lambada": write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in LAMBADA]),
            "hellaswag": write_jsonl(tmp_path / "h.jsonl", hella),
            "wikitext-2": write_jsonl(tmp_path / "w.jsonl", [{"page": p} for p in WIKI])}


def run(model_file, files, *tasks, extra=()):
    args = ["eval", "--model", str(model_file), "--json", "--batch-size", "3"]
    for t in tasks:
        args += ["--task", t, "--task-file", f"{t}={files[t]}"]
    result = runner.invoke(app, args + list(extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tasks"]


def continuation_ll(model, text_ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Brute force: one forward over the whole sequence, the last n_cont tokens' log-probs."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([text_ids[:-1]]))[0], -1)
    targets = text_ids[-n_cont:]
    rows = logp[-n_cont:]
    return (sum(rows[i, t].item() for i, t in enumerate(targets)),
            all(rows[i].argmax().item() == t for i, t in enumerate(targets)))


def test_lambada_against_brute_force(model_file, model, files):
    got = run(model_file, files, "lambada")["lambada"]
    lls, hits = [], []
    for text in LAMBADA:
        context, word = text.rsplit(" ", 1)
        ctx, cont = TOK.encode(context), TOK.encode(context + " " + word)[len(TOK.encode(context)):]
        ll, greedy = continuation_ll(model, ctx + cont, len(cont))
        lls.append(ll)
        hits.append(greedy)
    assert got["items"] == 8
    assert got["metrics"]["acc"] == pytest.approx(np.mean(hits))
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)


def test_hellaswag_against_brute_force(model_file, model, files):
    got = run(model_file, files, "hellaswag")["hellaswag"]["metrics"]
    acc, acc_norm = [], []
    for i in range(8):
        query = f"Making tea: A woman fills kettle {i}. She"
        endings = [hellaswag_text(e) for e in ENDINGS]
        lls = []
        for e in endings:
            ids = TOK.encode(query + " " + e)
            lls.append(continuation_ll(model, ids, len(ids) - len(TOK.encode(query)))[0])
        acc.append(int(np.argmax(lls)) == i % 4)
        acc_norm.append(int(np.argmax(np.array(lls) / [len(e) for e in endings])) == i % 4)
    assert got["acc"] == pytest.approx(np.mean(acc))
    assert got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert hellaswag_text(ENDINGS[0]) == "puts it on the stove. and waits."  # the harness's cleaning
    assert hellaswag_text(ENDINGS[3]) == "pours the water into a cup slowly."


def test_wikitext_against_brute_force(model_file, model, files):
    got = run(model_file, files, "wikitext-2")["wikitext-2"]["metrics"]
    total, words, n_bytes = 0.0, 0, 0
    for page in WIKI:
        doc = wikitext_detokenize(page)
        ids = [TOK.eot_id] + TOK.encode(doc)  # shorter than the context: one window
        total += continuation_ll(model, ids, len(ids) - 1)[0]
        words += len(re.split(r"\s+", doc))  # the harness's word count
        n_bytes += len(doc.encode())
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
    assert wikitext_detokenize(" a @-@ b ( c ) d , e . \n") == " a-b (c) d, e.\n"


def test_long_inputs_keep_their_last_tokens_and_batches_do_not_change_scores(model):
    pairs = [(list(range(100, 190)), [5, 6, 7]), ([11, 12], [13]), ([21] * 70, [22, 23])]
    one_by_one = [score(model, [p], batch_size=1)[0] for p in pairs]
    batched = score(model, pairs, batch_size=3)
    for (a, ga), (b, gb) in zip(one_by_one, batched):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    ll, _ = continuation_ll(model, (list(range(100, 190)) + [5, 6, 7])[-65:], 3)
    assert batched[0][0] == pytest.approx(ll, abs=1e-5)  # the last 64 + 1 tokens


def test_loglikelihoods_equal_transformers():
    """The same random weights in transformers' GPT2LMHeadModel give the same per-item
    log-likelihoods (what makes gptcli's figures comparable with the harness's)."""
    transformers = pytest.importorskip("transformers")
    from gptcli.hf import from_hf

    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = randomize_(transformers.GPT2LMHeadModel(hf_config), 4).eval()
    config, state = from_hf(hf_config.to_dict(), hf.state_dict())
    ours = GPT(config)
    ours.load_state_dict(state, strict=False)
    ours.eval()
    pairs = [split_pair(TOK, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in LAMBADA]
    got = score(ours, pairs, batch_size=4)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0], -1)
        expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ll == pytest.approx(expected, abs=1e-4)


def test_split_pair_moves_trailing_spaces_into_the_continuation():
    ctx, cont = split_pair(TOK, "Hello there ", "world")
    assert ctx == TOK.encode("Hello there")
    assert cont == TOK.encode("Hello there world")[len(ctx):]


@pytest.mark.parametrize("content,message", [
    ('{"text": "fine"}\n{oops\n', "line 2 is not valid JSON"),
    ('{"words": "no text field"}\n', "item 1 has no text: it is not a lambada file"),
    ("", "has no items"),
])
def test_a_damaged_task_file_is_one_sentence(model_file, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = runner.invoke(app, ["eval", "--model", str(model_file), "--task", "lambada",
                                 "--task-file", f"lambada={path}"])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


NO_ENDINGS = ("endings must be a list of two or more texts that keep some words once their "
           "[bracketed] tags are removed")
GOOD = {"activity_label": "Cooking", "ctx_a": "He cuts.", "ctx_b": "then", "label": "1",
        "endings": ["eats.", "sleeps.", "runs.", "sings."]}


@pytest.mark.parametrize("change,message", [
    ({"label": "5"}, "label '5' is not the index of one of its 4 endings"),
    ({"label": True}, "label True is not the index of one of its 4 endings"),
    ({"label": "-1"}, "label '-1' is not the index of one of its 4 endings"),
    ({"label": "²"}, "label '²' is not the index of one of its 4 endings"),
    ({"endings": ["eats.", "", "runs.", "sings."]},
     NO_ENDINGS),
    ({"endings": ["eats.", "[title]"]}, NO_ENDINGS),
    ({"endings": "eats."}, NO_ENDINGS),
    ({"ctx_a": 3}, "activity_label, ctx_a and ctx_b must be texts"),
])
def test_a_hellaswag_item_that_cannot_be_scored_is_refused(model_file, tmp_path, change, message):
    """(before: a label past the endings scored as wrong, an empty ending divided by zero with
    numpy's warning on stderr, and the scores were reported)"""
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    result = runner.invoke(app, ["eval", "--model", str(model_file), "--task", "hellaswag",
                                 "--task-file", f"hellaswag={path}", "--offline"])
    assert (result.exit_code, result.stderr.strip()) == (2, f"error: {path} item 2: {message}")


@pytest.mark.parametrize("args,message", [
    (["--task", "mmlu"], "--task must be 'lambada', 'hellaswag', 'wikitext-2' or"),
    (["--task", "lambada", "--task-file", "x.jsonl"], "--task-file 'x.jsonl': write it as"),
    (["--task", "lambada", "--task-file", "hellaswag=x"], "--task-file hellaswag: x is not a"),
    (["--limit", "3"], "--task-file, --limit, --offline and --log-to go with --task"),
    (["--task", "lambada", "--data", "x.txt"], "--data and --task are two kinds"),
])
def test_bad_task_options(model_file, args, message):
    result = runner.invoke(app, ["eval", "--model", str(model_file), *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_limit_scores_the_first_items(model_file, files):
    got = run(model_file, files, "lambada", extra=["--limit", "3"])["lambada"]
    assert got["items"] == 3


def test_parquet_task_files_and_the_missing_extra(model_file, files, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": LAMBADA}), tmp_path / "l.parquet")
    from_parquet = run(model_file, {"lambada": tmp_path / "l.parquet"}, "lambada")["lambada"]
    assert from_parquet["metrics"] == run(model_file, files, "lambada")["lambada"]["metrics"]
    code = "import sys; sys.modules['pyarrow'] = None\nfrom gptcli.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "eval", "--model", str(model_file),
                          "--task", "lambada", "--task-file", f"lambada={tmp_path / 'l.parquet'}"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ('error: reading l.parquet needs pyarrow, which is not '
                                  f'installed; install it with {install_command("eval")}')


# ----------------------------------------------------------------------------- Hub data

def test_task_data_from_the_hub_then_offline(model_file, files, tmp_path):
    from hf_server import HubServer, Repo

    repo = Repo({"README.md": b"LAMBADA", "data/lambada_test.jsonl": files["lambada"].read_bytes(),
                 "data/lambada_test_de.jsonl": b"{}\n"}, repo_type="dataset")
    home = tmp_path / "home"
    env = {**os.environ, "GPTCLI_HOME": str(home), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0"}
    base = [sys.executable, "-m", "gptcli", "eval", "--model", str(model_file), "--task",
            "lambada", "--json"]
    with HubServer({"datasets/EleutherAI/lambada_openai": repo}) as hub:
        first = subprocess.run(base, capture_output=True, text=True,
                               env={**env, "HF_ENDPOINT": hub.url}, timeout=120)
        assert first.returncode == 0, first.stderr
        assert "downloading lambada (EleutherAI/lambada_openai: data/lambada_test.jsonl)" \
            in first.stderr
    got = json.loads(first.stdout)["tasks"]["lambada"]
    assert got["source"]["repo"] == "EleutherAI/lambada_openai"
    assert got["source"]["revision"] == repo.commit
    again = subprocess.run(base + ["--offline"], capture_output=True, text=True,
                           env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["tasks"]["lambada"]["metrics"] == got["metrics"]


def test_task_data_errors(model_file, tmp_path):
    from hf_server import HubServer, Repo

    env = {**os.environ, "GPTCLI_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0"}
    base = [sys.executable, "-m", "gptcli", "eval", "--model", str(model_file), "--task",
            "lambada"]
    damaged = Repo({"lambada_test.jsonl": b'{"text": "ok"}\n{"te'}, repo_type="dataset")
    with HubServer({"datasets/EleutherAI/lambada_openai": damaged}) as hub:
        missing = subprocess.run(base[:-1] + ["hellaswag"], capture_output=True, text=True,
                                 env={**env, "HF_ENDPOINT": hub.url}, timeout=120)
        broken = subprocess.run(base, capture_output=True, text=True,
                                env={**env, "HF_ENDPOINT": hub.url}, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("no dataset repo 'Rowan/hellaswag' on " + hub.url +
                                           " (or it is private: set HF_TOKEN)")
    assert broken.returncode == 2
    assert "lambada_test.jsonl line 2 is not valid JSON" in broken.stderr.strip()
    offline = subprocess.run(base[:-1] + ["hellaswag", "--offline"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert offline.returncode == 2
    assert "offline, and Rowan/hellaswag is not in the gptcli store yet" in offline.stderr
