"""inspect-attention: the maps, the head statistics and every output of the command."""

import json
import math
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gptcli.errors import install_command
from gptcli import attention
from gptcli.checkpoint import save_checkpoint
from gptcli.cli import app
from gptcli.model import GPT
from gptcli.tokenizer import CharTokenizer, get_tokenizer

from conftest import randomize_, tiny_config

runner = CliRunner()
CHARS = "abcdefgh .\n"
TEXT = "abc def gha."


def invoke(*args):
    # rich sizes the terminal view from COLUMNS: pin it so the layout checks hold anywhere
    return runner.invoke(app, ["inspect-attention", *map(str, args)], env={"COLUMNS": "80"})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """2 layers x 3 heads, context 32, random weights, char tokenizer."""
    model = randomize_(GPT(tiny_config(vocab_size=len(CHARS))))
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", model,
                           CharTokenizer(sorted(CHARS)))


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """2 layers x 3 heads, context 64, random weights, the GPT-2 tokenizer."""
    gpt2 = get_tokenizer("gpt2")
    model = randomize_(GPT(tiny_config(vocab_size=gpt2.vocab_size, context_length=64)))
    return save_checkpoint(tmp_path_factory.mktemp("m") / "bpe.safetensors", model, gpt2)


def previous_token_model(context_length=16, n_embd=48, scale=200.0) -> GPT:
    """One layer, two heads. Head 0 attends to the previous token; head 1 attends uniformly.

    Tokens carry no information (wte = 0); position t is the angle theta*t written as
    (cos, sin, -cos, -sin, 0, ...): zero mean, so LayerNorm only rescales it. Head 0's query
    rotates the angle back by one step (theta*(t-1)), its key is the angle itself, so the score
    q_t . k_j ~ scale * cos(theta * (t-1-j)) peaks at j = t-1 and, with theta*T < pi, nowhere
    else; the scale makes the neighbours' weights ~exp(-19). Head 1 has zero queries and keys.
    """
    cfg = tiny_config(vocab_size=len(CHARS), context_length=context_length, n_layer=1,
                      n_head=2, n_embd=n_embd)
    model = GPT(cfg).eval()
    theta = math.pi / context_length
    angle = theta * torch.arange(context_length, dtype=torch.float32)
    C = n_embd
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wpe.weight.zero_()
        model.wpe.weight[:, :4] = torch.stack([angle.cos(), angle.sin(), -angle.cos(),
                                               -angle.sin()], dim=1)
        w = model.h[0].attn.c_attn.weight.t()  # (3C, C) view: rows of q, then k, then v
        w[: 2 * C].zero_()
        c, s = math.cos(theta), math.sin(theta)
        w[0:2, 0:2] = scale * torch.tensor([[c, s], [-s, c]])  # q: rotate by -theta
        w[C:C + 2, 0:2] = torch.eye(2)  # k: the position angle itself
        model.h[0].attn.c_attn.bias.zero_()
    return model


# ----------------------------------------------------------------------------- the maps

def test_rows_sum_to_one_and_nothing_attends_to_the_future():
    model = randomize_(GPT(tiny_config())).eval()
    idx = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    w = attention.capture_attention(model, idx)  # (B, L, nh, T, T)
    assert w.shape == (2, 2, 3, 20, 20)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3, 20))
    assert (w >= 0).all()
    assert torch.count_nonzero(w.triu(diagonal=1)) == 0


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_maps_equal_a_direct_recomputation_from_q_and_k(norm):
    model = randomize_(GPT(tiny_config(norm=norm))).eval()
    attn_inputs = {}
    hooks = [block.ln_1.register_forward_hook(
        lambda mod, inp, out, i=i: attn_inputs.__setitem__(i, out.detach()))
        for i, block in enumerate(model.h)]
    idx = torch.randint(0, 101, (1, 17), generator=torch.Generator().manual_seed(2))
    w = attention.capture_attention(model, idx)[0]  # (L, nh, T, T)
    for h in hooks:
        h.remove()
    cfg, T = model.config, idx.size(1)
    for layer, block in enumerate(model.h):
        x = attn_inputs[layer]  # (1, T, C): what the attention read
        q, k, _ = F.linear(x, block.attn.c_attn.weight.t(), block.attn.c_attn.bias).split(
            cfg.n_embd, dim=2)
        q = q.view(1, T, cfg.n_head, cfg.head_size).transpose(1, 2)  # (1, nh, T, hs)
        k = k.view(1, T, cfg.n_head, cfg.head_size).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_size)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        expected = scores.masked_fill(future, float("-inf")).softmax(-1)[0]
        torch.testing.assert_close(w[layer], expected, rtol=1e-5, atol=1e-6)


def test_constructed_previous_token_head_is_found_and_labelled(tmp_path):
    model = previous_token_model()
    maps = attention.capture_attention(model, torch.tensor([0, 3, 1, 4, 1, 5, 2, 6]))[0]
    t = torch.arange(1, 8)
    assert maps[0, 0, t, t - 1].min() > 0.99
    path = save_checkpoint(tmp_path / "prev.safetensors", model, CharTokenizer(sorted(CHARS)))
    result = invoke("--model", path, "--text", TEXT, "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["layer"], r["head"]): r for r in json.loads(result.stdout)["summary"]}
    assert rows[0, 0]["previous_token"] > 0.99
    assert rows[0, 0]["label"] == "previous token"
    assert rows[0, 0]["induction"] < 0.1  # t-n+1 is not t-1
    assert rows[0, 1]["label"] == "broad" and rows[0, 1]["entropy_norm"] > 0.99


def test_head_statistics_on_hand_made_maps():
    T = 6
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    sink = torch.zeros(T, T)
    sink[:, 0] = 1
    w = torch.stack([uniform, sink])[None]  # (1 layer, 2 heads, T, T)
    rows = attention.head_summary(w, torch.tensor([[0.0, 0.0]]))
    assert rows[0]["entropy_norm"] == pytest.approx(1.0) and rows[0]["label"] == "broad"
    assert rows[0]["entropy"] == pytest.approx(sum(math.log(t + 1) for t in range(1, T)) / (T - 1),
                                               abs=1e-4)
    assert rows[1]["first_token"] == 1.0 and rows[1]["label"] == "first token / sink"
    assert attention.head_label(0.1, 0.2, 0.8, 0.3) == "induction"
    assert attention.head_label(0.1, 0.2, 0.3, 0.3) == "mixed"


def test_token_labels_show_whitespace_and_broken_bytes():
    chars = CharTokenizer([" ", "\n", "a"])
    assert [attention.token_label(chars, i) for i in range(3)] == ["·", "↵", "a"]
    gpt2 = get_tokenizer("gpt2")
    assert [attention.token_label(gpt2, i) for i in gpt2.encode(" cat\tsat")][0] == "·cat"
    labels = [attention.token_label(gpt2, i) for i in gpt2.encode("🙂")]
    assert "\ufffd" not in "".join(labels) and "\\x" in "".join(labels)
    # invisible characters are escaped the way Python writes them: \x07 but \u200b, not \x200b
    assert [attention.token_label(gpt2, i) for i in gpt2.encode("\a \u200b")] == ["\\x07",
                                                                                "·\\u200b"]


# ----------------------------------------------------------------------------- the command

def test_terminal_view_fits_80_columns_and_windows_long_text(tmp_path):
    model = randomize_(GPT(tiny_config(vocab_size=len(CHARS), context_length=64)))
    path = save_checkpoint(tmp_path / "m.safetensors", model, CharTokenizer(sorted(CHARS)))
    result = invoke("--model", path, "--text", "abcdefgh\n" * 5, "--layer", "1", "--head", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "layer 1, head 2" in out and "top-3 attended tokens" in out
    assert "showing the last 33 of 45 tokens (positions 12-44)" in out
    assert " 44 ↵" in out and " 11 ↵" not in out
    assert "head summary" in out and out.count("\n│") >= 6  # 2 layers x 3 heads
    assert max(len(line) for line in out.splitlines()) <= 80


def test_json_parses_with_selected_weights(tiny_ckpt):
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--layer", "all", "--head", "0,2",
                    "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == list(TEXT)  # the tokens' own text
    assert data["display"] == [c.replace(" ", "·") for c in TEXT]  # as the terminal shows them
    assert data["layers"] == [0, 1] and data["heads"] == [0, 2]
    w = torch.tensor(data["weights"])
    assert w.shape == (2, 2, len(TEXT), len(TEXT))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, len(TEXT)), atol=1e-4, rtol=0)
    assert len(data["summary"]) == 6 and {"entropy", "first_token", "previous_token",
                                          "induction", "label"} <= set(data["summary"][0])


def test_json_tokens_are_the_text_and_partial_characters_are_u_fffd(bpe_ckpt):
    # the parrot is three GPT-2 tokens, none a whole character
    result = invoke("--model", bpe_ckpt, "--text", "I ate 🦜 <b>", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["token_ids"] == [40, 15063, 12520, 99, 250, 1279, 65, 29]
    assert data["tokens"] == ["I", " ate", " \ufffd", "\ufffd", "\ufffd", " <", "b", ">"]
    assert data["display"] == ["I", "·ate", "·\\xf0\\x9f", "\\xa6", "\\x9c", "·<", "b", ">"]


def test_dtype_loads_the_weights_in_it_and_maps_are_float32(tiny_ckpt):
    maps = {}
    for dtype in ("float32", "bfloat16"):
        result = invoke("--model", tiny_ckpt, "--text", TEXT, "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.output
        maps[dtype] = torch.tensor(json.loads(result.stdout)["weights"])
    assert not torch.equal(maps["float32"], maps["bfloat16"])  # bf16 weights: other maths
    torch.testing.assert_close(maps["bfloat16"], maps["float32"], atol=0.03, rtol=0)
    insp = attention.inspect(str(tiny_ckpt), text=TEXT, device="cpu", dtype="bfloat16")
    assert insp.weights.dtype == torch.float32


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_a_valid_image_of_the_expected_size(tiny_ckpt, tmp_path):
    # one layer: its 3 heads in a row -> (3 * 2.5 + 1) x (1 * 2.5 + 0.5) inches at 100 dpi
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--out", tmp_path / "one.png")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "one.png") == (850, 300)
    # all layers: a layer x head grid, 2 x 3
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--layer", "all",
                    "--out", tmp_path / "grid.png", "--json")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "grid.png") == (850, 550)
    json.loads(result.stdout)  # the PNG message went to stderr


def test_png_colour_bar_is_thin_even_beside_one_panel(tiny_ckpt, tmp_path):
    from gptcli.attention import inspect, png_figure

    for head, panels in (("0", 1), ("all", 3)):
        fig = png_figure(inspect(str(tiny_ckpt), text=TEXT, head=head, device="cpu"))
        fig.canvas.draw()
        *heatmaps, bar = fig.axes
        assert len(heatmaps) == panels
        panel = heatmaps[0].get_window_extent().width
        assert bar.get_window_extent().width < 0.15 * panel, (head, bar.get_window_extent())
        # the bar's column (bar, ticks, label) leaves the panels most of the width
        assert panels * panel > 0.6 * fig.bbox.width, (head, panel, fig.bbox.width)
        assert fig._suptitle.get_text() == "tiny: row attends to column"  # tiny.safetensors


def test_png_draws_dollar_signs_as_text(bpe_ckpt, tmp_path):
    # " $$" is one GPT-2 token; matplotlib would read "$...$" in a label or title as maths
    name = tmp_path / "a$b$.safetensors"
    name.write_bytes(bpe_ckpt.read_bytes())
    result = invoke("--model", name, "--text", "costs $$ or $x$", "--out", tmp_path / "d.png")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "d.png")[0] > 0
    fig = attention.png_figure(attention.inspect(str(name), text="costs $$", device="cpu"))
    assert "·$$" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert fig._suptitle.get_text() == "a$b$: row attends to column"


def test_html_is_self_contained_and_holds_the_tokens(bpe_ckpt, tmp_path):
    path = bpe_ckpt
    text = "Attention heads </script> look back"
    result = invoke("--model", path, "--text", text, "--html", tmp_path / "a.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    for token in ("Att", "ention", "·heads", "·look", "·back"):
        assert f'"{token}"' in page
    assert "http://" not in page and "https://" not in page
    assert "src=" not in page and "href=" not in page and "@import" not in page
    assert page.count("</script>") == 2  # the text's own </script> is escaped
    assert '<select id="layer">' in page and '<select id="head">' in page
    assert "<title>bpe: attention</title>" in page  # the model's name, not "gptcli attention"
    assert "fillText(label(D.tokens[i])" in page  # the heatmap is labelled with the tokens


# Just enough DOM for the page's script: elements record their text, the canvas records its
# fillText calls and counts its cells. Prints what the page shows.
PAGE_DOM = r"""
const fs = require('fs'), vm = require('vm'), page = fs.readFileSync(process.argv[1], 'utf8');
const code = page.match(/<script>([\s\S]*)<\/script>/)[1];
const texts = [], els = {};
let cells = 0;
const ctx = {fillText: t => texts.push(t), fillRect: () => cells++, save() {}, restore() {},
             translate() {}, rotate() {}};
const el = () => ({children: [], style: {}, classList: {toggle() {}}, textContent: '', value: '',
  add(o) { if (this.value === '') this.value = o.value; }, appendChild(c) { this.children.push(c); },
  insertRow() { const r = {innerHTML: ''}; this.children.push(r); return r; },
  getContext: () => ctx});
const document = {getElementById: id => els[id] || (els[id] = el()), createElement: el};
document.getElementById('data').textContent =
  page.match(/<script type="application\/json" id="data">([\s\S]*?)<\/script>/)[1];
vm.runInNewContext(code, {document, Option: function (t, v) { this.value = String(v); }});
console.log(JSON.stringify({name: els.name.textContent, labels: texts, cells,
  spans: els.text.children.map(s => s.textContent), info: els.info.textContent,
  rows: els.summary.children.length}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_html_script_runs_and_labels_the_heatmap_with_the_tokens(tiny_ckpt, tmp_path):
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--html", tmp_path / "a.html")
    assert result.exit_code == 0, result.output
    run = subprocess.run(["node", "-e", PAGE_DOM, str(tmp_path / "a.html")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    tokens, T = [c.replace(" ", "·") for c in TEXT], len(TEXT)
    assert shown["name"] == "tiny" and shown["spans"] == tokens
    assert shown["labels"] == [t for t in tokens for _ in range(2)]  # row and column labels
    assert shown["cells"] == 1 + T * (T + 1) // 2  # the background, then the lower triangle
    assert shown["info"].startswith(f"#{T - 1} . attends to: ")
    assert shown["rows"] == 1 + 6  # header, 2 layers x 3 heads


def test_html_placeholder_in_the_model_name_stays_text(tiny_ckpt, tmp_path):
    path = tmp_path / "__DATA__.safetensors"  # the page's own placeholder as a file name
    path.write_bytes(tiny_ckpt.read_bytes())
    result = invoke("--model", path, "--text", TEXT, "--html", tmp_path / "a.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert "<title>__DATA__: attention</title>" in page
    assert page.count('"n_head":3') == 1  # the data once, in its script block


@pytest.mark.parametrize("flag, target, reason", [
    ("--html", "file/a.html", "a part of the path is a file, not a folder"),
    ("--out", "file/sub/a.png", "a part of the path is a file, not a folder"),
    ("--out", "folder.png", "it is a folder"),
    ("--html", "folder.png", "it is a folder"),
])
def test_unwritable_outputs_are_one_sentence(tiny_ckpt, tmp_path, flag, target, reason):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    result = invoke("--model", tiny_ckpt, "--text", TEXT, flag, tmp_path / target)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot write {flag} {tmp_path / target}: {reason}"


def test_outputs_that_exist_need_force(tiny_ckpt, tmp_path):
    for flag, name in (("--html", "mine.html"), ("--out", "mine.png")):
        (tmp_path / name).write_text("mine")
        result = invoke("--model", tiny_ckpt, "--text", TEXT, flag, tmp_path / name)
        assert (result.exit_code, result.stderr.strip()) == (
            2, f"error: {flag} {tmp_path / name} already exists and gptcli did not write it; "
               "pass --force to overwrite it")
        assert (tmp_path / name).read_text() == "mine"
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--html", tmp_path / "mine.html",
                    "--force")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mine.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    again = invoke("--model", tiny_ckpt, "--text", TEXT, "--html", tmp_path / "mine.html")
    assert again.exit_code == 0, again.output  # its own page: redrawn without --force


def test_outputs_into_missing_folders_create_them(tiny_ckpt, tmp_path):
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--out", tmp_path / "a" / "b" / "m.png",
                    "--html", tmp_path / "c" / "m.html", "--json")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "a" / "b" / "m.png") == (850, 300)
    assert (tmp_path / "c" / "m.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, message", [
    (["--layer", "2"], "--layer 2 is out of range: this model has 2 layers, numbered 0-1"),
    (["--layer", "first"], "--layer 'first' is not a layer number: use 0-1 (0-based) or 'all'"),
    (["--head", "3"], "--head 3 is out of range: this model has 3 heads, numbered 0-2"),
    (["--head", "-1"], "--head -1 is out of range"),
    (["--text", "a" * 33], "the text is 33 tokens but this model reads at most 32"),
    (["--text", "xyz"], "outside this model's"),
    (["--text", ""], "the text is empty"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_ckpt, args, message):
    if "--text" not in args:
        args = ["--text", TEXT, *args]
    result = invoke("--model", tiny_ckpt, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_text_sources(tiny_ckpt, tmp_path):
    result = invoke("--model", tiny_ckpt)
    assert result.exit_code == 2 and "--text TEXT or --text-file FILE" in result.stderr
    result = invoke("--model", tiny_ckpt, "--text-file", tmp_path / "nope.txt")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot read text file {tmp_path}/nope.txt: it does " \
                                    "not exist"
    result = invoke("--model", tiny_ckpt, "--text-file", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot read text file {tmp_path}: it is a folder"
    (tmp_path / "latin1.txt").write_bytes("abc é".encode("latin-1"))
    result = invoke("--model", tiny_ckpt, "--text-file", tmp_path / "latin1.txt")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: text file {tmp_path}/latin1.txt is not UTF-8 text "
                                     "(byte offset 4)")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    result = invoke("--model", tiny_ckpt, "--text-file", tmp_path / "t.txt", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["tokens"]) == len(TEXT)


def test_missing_matplotlib_says_how_to_install(tiny_ckpt, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
            "from gptcli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "inspect-attention", "--model",
                          str(tiny_ckpt), "--text", TEXT, "--out", str(tmp_path / "a.png")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ('error: --out needs matplotlib, which is not installed; install '
                                  f'it with {install_command("plot")}')
    assert not (tmp_path / "a.png").exists()


def test_without_model_uses_the_latest_run(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTCLI_HOME", str(tmp_path / "home"))
    result = invoke("--text", TEXT)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no --model given, and there is no trained run under "
                                    "./runs. Train one with `gpt train`")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "best.safetensors").write_bytes(tiny_ckpt.read_bytes())
    result = invoke("--text", TEXT, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"].endswith("best.safetensors")


@pytest.mark.parametrize("name,hint", [
    ("attn.html", "; for an interactive page use --html {path}"), ("attn.jpg", "")])
def test_out_with_a_page_name_points_to_html(tiny_ckpt, tmp_path, name, hint):
    path = tmp_path / name
    result = invoke("--model", tiny_ckpt, "--text", TEXT, "--out", path)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: --out {path}: use a .png (or .svg, .pdf) file "
                                     f"name" + hint.format(path=path))
    assert not path.exists()
