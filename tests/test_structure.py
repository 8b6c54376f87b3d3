"""The package's shape: imports point one way (no cycles, counting imports inside functions),
modules a reader takes in at once, a visible training loop, short commands, and one flag
vocabulary across every command's --help."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from gptcli.cli import app

PACKAGE = Path(__file__).resolve().parents[1] / "gptcli"
MAX_MODULE_LINES = 400
runner = CliRunner()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The gptcli modules ``name`` imports anywhere in its file (module level or in a function):
    ``from .x import y`` counts as importing ``x.y`` when that is a module, else ``x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("gptcli")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("gptcli"):
                base = node.module
            else:
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_scan_sees_imports_inside_functions():
    """The scan must see what it is meant to police: generate imports models inside a function,
    and a made-up cycle is found."""
    mods = modules()
    assert "gptcli.models" in imports_of("gptcli.generate", mods["gptcli.generate"], set(mods))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    found = cycles(graph)
    assert not found, "import cycles (a lower layer reaches up): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_model_knows_no_quantization_lora_or_files():
    mods = modules()
    assert imports_of("gptcli.model", mods["gptcli.model"], set(mods)) <= {
        "gptcli.config", "gptcli.kv_cache"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_modules_a_reader_takes_in_at_once(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module_name(path)} has {lines} lines: split it by concern"


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_training_loop_reads_in_one_screen():
    assert function_lengths(PACKAGE / "train.py")["fit"] <= 70


def test_commands_stay_short():
    """A command parses, calls one library function and renders: no body over ~40 lines."""
    for path in (PACKAGE / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "command"
                    for d in node.decorator_list):
                body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
                length = body[-1].end_lineno - body[0].lineno + 1
                assert length <= 40, f"{node.name} in {path.name} has a {length}-line body"


# ----------------------------------------------------------------------------- one vocabulary

def command_options() -> dict[str, dict[str, object]]:
    group = typer.main.get_command(app)
    return {name: {opt: p for p in cmd.params for opt in p.opts}
            for name, cmd in group.commands.items()}


READS_A_MODEL = ("generate", "eval", "inspect-attention", "bench", "serve", "info", "quantize",
                 "export", "chat")
WRITES_A_FILE = ("train", "download", "quantize", "export", "plot", "inspect-attention")


def test_one_flag_vocabulary():
    """DESIGN.md's vocabulary: a model is --model/-m, an output path --out, generated tokens
    --max-new-tokens, --json one flag with one meaning; retired spellings are gone."""
    options = command_options()
    for name in READS_A_MODEL:
        if name in options:
            assert "--model" in options[name] and "-m" in options[name], name
            assert options[name]["--model"] is options[name]["-m"], name
    for name in WRITES_A_FILE:
        assert "--out" in options[name], name
    retired = {"--to", "--new-tokens", "--file", "--num-tokens", "--tokens", "--output", "-o"}
    for name, opts in options.items():
        assert not retired & set(opts), (name, retired & set(opts))
    helps = {opts["--json"].help for opts in options.values() if "--json" in opts}
    assert len(helps) == 1, helps


@pytest.mark.parametrize("name", sorted(command_options()))
def test_help_uses_the_vocabulary(name):
    """What the user reads agrees: --context-length is always the model's context, --json's
    help is the shared one, and the retired spellings appear nowhere in the help."""
    raw = runner.invoke(app, [name, "--help"], terminal_width=200).stdout
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", raw).split())  # the words, without rich's boxes
    assert not re.search(r"--to\b|--new-tokens|--file\b", text), name
    if "--context-length" in text:
        assert "Context length" in text or "context length" in text, name
    if "--json" in text:
        assert "Print the result as one JSON object, the last line of stdout." in text, name
    assert "[default:" not in text, f"{name}: defaults are shown one way, as (default: X)"
    for option in re.split(r" (?=--[a-z])", text):
        assert option.count("(default:") <= 1, (name, option[:60])
