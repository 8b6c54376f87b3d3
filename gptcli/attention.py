"""inspect-attention: capture attention maps, measure what each head does, render them.

The maps come from the model's own manual attention path (``model(idx, need_weights=True)``), in
one forward pass: this module never re-does the attention maths. Renderers: a rich terminal
heatmap, a matplotlib PNG grid, a self-contained HTML explorer and plain JSON data.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError, path_error, require
from .files import make_folder, read_text_arg

INDUCTION_SEED = 0  # the random repeated sequence is the same on every run
INDUCTION_BATCH = 4  # sequences averaged for the induction score
DOMINANT = 0.4  # a score at least this high names the head
BROAD = 0.7  # normalised entropy at least this high (and no dominant score): "broad"
HTML_MAX_VALUES = 3_000_000  # past this the HTML page holds only the selected layers
VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
HTML_TEMPLATE = resources.files("gptcli") / "assets" / "attention.html"


@dataclass
class Inspection:
    """Everything the renderers need. ``weights`` is (n_layer, n_head, T, T), float32, CPU."""

    model: str  # the checkpoint's path
    name: str  # what to call it in titles: the run, the stored model, or the file
    tokens: list[str]  # each token as shown: whitespace visible, a partial character as \xNN
    texts: list[str]  # each token's own text (a partial character as U+FFFD)
    token_ids: list[int]
    weights: torch.Tensor
    layers: list[int]
    heads: list[int]
    summary: list[dict]
    induction_length: int


# ----------------------------------------------------------------------------- capture and stats

def token_label(tokenizer, token_id: int) -> str:
    """One token as readable text: decoded alone, whitespace made visible, the bytes of a partial
    character (a BPE token can hold part of one) as \\xNN, other invisible characters escaped
    as Python writes them (\\x07, \\u200b)."""
    text = tokenizer.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace")
    return "".join(VISIBLE.get(c, c if c.isprintable() else ascii(c)[1:-1]) for c in text)


@torch.no_grad()
def capture_attention(model, idx: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head: (B, n_layer, n_head, T, T), float32, CPU.

    ``idx`` is (B, T) or (T,) token ids. One forward pass through the model's manual attention.
    """
    if idx.dim() == 1:
        idx = idx[None]
    limit = model.config.context_length
    if idx.size(1) > limit:
        raise UserError(f"the text is {idx.size(1)} tokens but this model reads at most {limit} "
                        f"(its context length); shorten the text")
    _, weights = model(idx.to(model.device), need_weights=True)
    return torch.stack([w.float().cpu() for w in weights], dim=1)  # (B, L, nh, T, T)


def repeated_random_tokens(vocab_size: int, context_length: int, batch: int,
                           generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(batch, 2n) ids: n random tokens, then the same n again; and n."""
    n = max(1, min(64, context_length // 2))
    first = torch.randint(0, vocab_size, (batch, n), generator=generator)
    return torch.cat([first, first], dim=1), n


def induction_scores(model, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """(n_layer, n_head) induction scores and the repeat length n.

    On [r_0..r_{n-1}, r_0..r_{n-1}], position t of the second half holds r_{t-n}, seen before at
    t-n; an induction head looks at what came next there: position t-n+1. The score is the mean
    weight on that position.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(INDUCTION_SEED)
    cfg = model.config
    idx, n = repeated_random_tokens(cfg.vocab_size, cfg.context_length, INDUCTION_BATCH, generator)
    if n < 2:
        return torch.full((cfg.n_layer, cfg.n_head), float("nan")), n
    w = capture_attention(model, idx).mean(0)  # (L, nh, 2n, 2n)
    t = torch.arange(n, 2 * n)
    return w[:, :, t, t - n + 1].mean(-1), n


def head_label(sink: float, prev: float, induction: float, entropy_norm: float) -> str:
    scores = {"previous token": prev, "induction": induction, "first token / sink": sink}
    scores = {k: v for k, v in scores.items() if not math.isnan(v)}
    if scores:
        name, best = max(scores.items(), key=lambda kv: kv[1])
        if best >= DOMINANT:
            return name
    if not math.isnan(entropy_norm) and entropy_norm >= BROAD:
        return "broad"
    return "mixed"


def head_summary(weights: torch.Tensor, induction: torch.Tensor) -> list[dict]:
    """One row per (layer, head) from (L, nh, T, T) maps of the text and (L, nh) induction scores.

    Averages over rows t >= 1 (row 0 can only look at itself): entropy in nats and normalised by
    ln(t+1) (0 = one token, 1 = uniform), weight on the first token, weight on token t-1.
    """
    L, H, T, _ = weights.shape
    nan = torch.full((L, H), float("nan"))
    if T >= 2:
        rows = weights[:, :, 1:, :]  # (L, nh, T-1, T)
        ent = -(rows * rows.clamp_min(1e-12).log()).sum(-1)  # (L, nh, T-1)
        entropy, entropy_norm = ent.mean(-1), (ent / torch.arange(2, T + 1).log()).mean(-1)
        sink = rows[..., 0].mean(-1)
        t = torch.arange(1, T)
        prev = weights[:, :, t, t - 1].mean(-1)
    else:
        entropy = entropy_norm = sink = prev = nan
    out = []
    for layer in range(L):
        for head in range(H):
            vals = {k: float(v[layer, head]) for k, v in dict(
                entropy=entropy, entropy_norm=entropy_norm, first_token=sink,
                previous_token=prev, induction=induction).items()}
            label = head_label(vals["first_token"], vals["previous_token"], vals["induction"],
                               vals["entropy_norm"])
            out.append({"layer": layer, "head": head,
                        **{k: None if math.isnan(v) else round(v, 4) for k, v in vals.items()},
                        "label": label})
    return out


def parse_selection(value: str, count: int, flag: str, noun: str) -> list[int]:
    """``all``, ``N`` or ``N,M,...`` (0-based) -> sorted indices, or a UserError saying why."""
    value = str(value).strip().lower()
    if value == "all":
        return list(range(count))
    picked = []
    for part in value.split(","):
        try:
            i = int(part)
        except ValueError:
            raise UserError(f"{flag} {value!r} is not a {noun} number: use 0-{count - 1} "
                            f"(0-based) or 'all'") from None
        if not 0 <= i < count:
            raise UserError(f"{flag} {i} is out of range: this model has {count} {noun}s, "
                            f"numbered 0-{count - 1} (or use 'all')")
        picked.append(i)
    return sorted(set(picked))


def read_text(text: str | None, text_file: str | Path | None) -> str:
    if (text is None) == (text_file is None):
        raise UserError("give the text to inspect with either --text TEXT or --text-file FILE")
    if text_file is not None:
        text = read_text_arg(text_file, "text file")
    if not text:
        raise UserError("the text is empty; give at least one character")
    return text


def inspect(model_name: str | None, *, text: str | None = None, text_file=None,
            layer: str = "0", head: str = "all", device: str = "auto", dtype: str = "auto",
            quantize: str | None = None) -> Inspection:
    """Load a model, run the text through it once, and measure every head. The maps are those
    of the model as loaded (in ``dtype``, int8 with ``quantize``), returned as float32."""
    from .locate import load_model
    from .models import display_name

    text = read_text(text, text_file)
    model, tokenizer, path = load_model(model_name, device=device, dtype=dtype,
                                        quantize=quantize, steps=False)  # one forward
    cfg = model.config
    layers = parse_selection(layer, cfg.n_layer, "--layer", "layer")
    heads = parse_selection(head, cfg.n_head, "--head", "head")
    ids = tokenizer.encode(text)
    weights = capture_attention(model, torch.tensor(ids, dtype=torch.long))[0]
    induction, n = induction_scores(model)
    texts = [tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]
    return Inspection(str(path), display_name(path), [token_label(tokenizer, i) for i in ids],
                      texts, ids, weights, layers, heads, head_summary(weights, induction), n)


def selected_map(insp: Inspection, layer: int) -> torch.Tensor:
    """(T, T): the one selected head of ``layer``, or the mean of the selected heads."""
    return insp.weights[layer, insp.heads].mean(0)


def heads_title(insp: Inspection) -> str:
    if len(insp.heads) == 1:
        return f"head {insp.heads[0]}"
    if insp.heads == list(range(insp.weights.shape[1])):
        return "mean of all heads"
    return "mean of heads " + ",".join(map(str, insp.heads))


def to_json(insp: Inspection) -> dict:
    w = insp.weights[insp.layers][:, insp.heads]  # (layers, heads, T, T)
    return {"model": insp.model, "tokens": insp.texts, "display": insp.tokens,
            "token_ids": insp.token_ids,
            "layers": insp.layers, "heads": insp.heads,
            "weights": [[[[round(x, 6) for x in row] for row in m] for m in lay]
                        for lay in w.tolist()],
            "summary": insp.summary,
            "induction": {"sequence": f"{insp.induction_length} random tokens, twice",
                          "batch": INDUCTION_BATCH, "seed": INDUCTION_SEED}}


# ----------------------------------------------------------------------------- terminal

_COLOURS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_SHADES = " ░▒▓█"


def _cell(w: float) -> tuple[str, str]:
    """Two characters whose shade (for plain terminals) and colour (viridis) follow ``w``."""
    level = 0 if w < 0.01 else 1 if w < 0.1 else 2 if w < 0.3 else 3 if w < 0.6 else 4
    x = min(max(w, 0.0), 1.0) * (len(_COLOURS) - 1)
    lo = min(int(x), len(_COLOURS) - 2)
    rgb = [round(a + (b - a) * (x - lo)) for a, b in zip(_COLOURS[lo], _COLOURS[lo + 1])]
    return _SHADES[level] * 2, "rgb({},{},{})".format(*rgb)


def render_terminal(console, insp: Inspection, label_width: int = 8) -> None:
    """Heatmaps of the selected layers (rows attend to columns), top-3 per row, head summary."""
    from rich.table import Table
    from rich.text import Text

    T = len(insp.tokens)
    prefix = 4 + label_width + 1  # "idx label " before the cells
    window = max(4, (console.width - prefix) // 2)
    start = max(0, T - window)
    labels = [t[:label_width] for t in insp.tokens]
    for layer in insp.layers:
        m = selected_map(insp, layer)
        console.print(Text(f"layer {layer}, {heads_title(insp)}: row attends to column",
                           style="bold"))
        if start:
            console.print(f"[dim]showing the last {T - start} of {T} tokens (positions "
                          f"{start}-{T - 1}) to fit {console.width} columns; weight on earlier "
                          f"tokens is not drawn. --html, --json and --out show all.[/dim]")
        cols = range(start, T)
        depth = min(5, max(len(labels[j]) for j in cols))
        for k in range(depth):  # column labels, written downwards
            console.print(Text(" " * prefix + "".join(
                (labels[j][k] if k < len(labels[j]) else " ") + " " for j in cols)))
        for i in cols:
            line = Text(f"{i:>3} {labels[i]:<{label_width}} ")
            for j in cols:
                if j <= i:
                    line.append(*_cell(float(m[i, j])))
                else:  # the future: masked
                    line.append(" ·", "dim")
            console.print(line, no_wrap=True, overflow="crop")
        console.print(Text("shade: ' ' <0.01  ░ <0.1  ▒ <0.3  ▓ <0.6  █ >=0.6;  · the future "
                           "(masked)", style="dim"))
        console.print(Text("top-3 attended tokens:", style="bold"))
        for i in cols:
            top = torch.topk(m[i, : i + 1], min(3, i + 1))
            picks = "  ".join(f"{insp.tokens[j]}[{j}] {w:.2f}"
                              for w, j in zip(top.values.tolist(), top.indices.tolist()))
            console.print(Text(f"{i:>3} {labels[i]:<{label_width}} -> {picks}"), overflow="fold")
        console.print()
    table = Table(title="head summary (all layers and heads)", title_justify="left",
                  caption="entropy in nats (uniform over n tokens = ln n); first token, previous "
                  f"token: mean weight on this text; induction: on {insp.induction_length} "
                  "random tokens repeated", caption_justify="left")
    for name in ("layer", "head", "entropy", "first tok", "prev tok", "induction", "label"):
        table.add_column(name, justify="left" if name == "label" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for row in insp.summary:
        table.add_row(str(row["layer"]), str(row["head"]), fmt(row["entropy"]),
                      fmt(row["first_token"]), fmt(row["previous_token"]),
                      fmt(row["induction"]), row["label"])
    console.print(table)


# ----------------------------------------------------------------------------- PNG

PANEL_INCHES, DPI = 2.5, 100


def require_matplotlib() -> None:
    require("matplotlib", "plot", needed_for="--out")


def png_grid(insp: Inspection) -> tuple[list[list[tuple[int, int]]], int, int]:
    """Panels as rows of (layer, head): one layer -> its heads, 4 a row; several -> layer x head."""
    if len(insp.layers) == 1:
        pairs = [(insp.layers[0], h) for h in insp.heads]
        ncols = min(4, len(pairs))
        rows = [pairs[i:i + ncols] for i in range(0, len(pairs), ncols)]
    else:
        ncols = len(insp.heads)
        rows = [[(lay, h) for h in insp.heads] for lay in insp.layers]
    return rows, len(rows), ncols


def png_figure(insp: Inspection):
    """A grid of heatmaps with token labels and a thin colour bar at the right. Size:
    (cols*2.5+1) x (rows*2.5+0.5) inches at 100 dpi (panels shrink past 12 rows or columns)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid, nrows, ncols = png_grid(insp)
    panel = PANEL_INCHES if max(nrows, ncols) <= 12 else 30 / max(nrows, ncols)
    fig = Figure(figsize=(ncols * panel + 1.0, nrows * panel + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    T = len(insp.tokens)
    step = max(1, math.ceil(T / 32))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    ticks = list(range(0, T, step))
    small = max(3, min(7, 160 / max(T, 1) / max(1, ncols / 4)))
    image = None
    for r, row in enumerate(axes):
        for c, ax in enumerate(row):
            if c >= len(grid[r]):
                ax.set_axis_off()
                continue
            layer, head = grid[r][c]
            m = insp.weights[layer, head].masked_fill(future, float("nan"))  # future: blank
            image = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"L{layer} H{head}", fontsize=8)
            # parse_math=False: a token or name with "$" is text, not matplotlib maths
            ax.set_xticks(ticks, [insp.tokens[i] for i in ticks] if r == nrows - 1 else [],
                          rotation=90, fontsize=small, parse_math=False)
            ax.set_yticks(ticks, [insp.tokens[i] for i in ticks] if c == 0 else [],
                          fontsize=small, parse_math=False)
    # A bar of fixed width in inches: a fraction of the axes would be half of a 1-panel figure.
    bar = fig.colorbar(image, ax=axes, fraction=0.25 / (ncols * panel), aspect=25, pad=0.02)
    bar.set_label("attention weight", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{insp.name}: row attends to column", fontsize=9, parse_math=False)
    return fig


def write_png(insp: Inspection, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        hint = f"; for an interactive page use --html {path}" if path.suffix.lower() in (
            ".html", ".htm") else ""
        raise UserError(f"--out {path}: use a .png (or .svg, .pdf) file name{hint}")
    fig = png_figure(insp)
    return write_output(path, lambda: fig.savefig(path, dpi=DPI), "--out")


def write_output(path: Path, write, flag: str) -> Path:
    """Run ``write`` for an output file the user named, creating its folder; an OS error on the
    path is one sentence."""
    make_folder(path.parent, f"write {flag}", shown=path)
    try:
        write()
    except OSError as e:
        raise path_error(e, f"write {flag}", path) from None
    return path


# ----------------------------------------------------------------------------- HTML

def html_data(insp: Inspection) -> dict:
    """Lower-triangle rows in thousandths. All layers unless that is too big for one page."""
    L, H, T, _ = insp.weights.shape
    layers = list(range(L)) if L * H * T * (T + 1) // 2 <= HTML_MAX_VALUES else insp.layers
    q = (insp.weights[layers] * 1000).round().to(torch.int32).tolist()
    w = [[[row[: i + 1] for i, row in enumerate(m)] for m in lay] for lay in q]
    return {"model": insp.name, "tokens": insp.tokens, "layers": layers,
            "n_head": H, "w": w, "summary": insp.summary,
            "start": {"layer": insp.layers[0],
                      "head": insp.heads[0] if len(insp.heads) == 1 else "mean"}}


def write_html(insp: Inspection, path: str | Path) -> Path:
    """One self-contained page (inline CSS/JS, no network): hover a token to see what it
    attends to; layer/head selectors; the head summary."""
    data = json.dumps(html_data(insp), separators=(",", ":"), ensure_ascii=False)
    data = data.replace("<", "\\u003c")  # no "</script>" can end the data block early
    fill = {"__TITLE__": html.escape(f"{insp.name}: attention"), "__DATA__": data}
    # One pass, so a placeholder inside the name or the text is never filled in itself.
    page = re.sub("__TITLE__|__DATA__", lambda m: fill[m[0]],
                  HTML_TEMPLATE.read_text(encoding="utf-8"))
    path = Path(path)
    return write_output(path, lambda: path.write_text(page, encoding="utf-8"), "--html")
