"""The front door: what the package imports is declared, and CI runs the README's commands.

A plain `pip install .` (no extras) must run every core command; this broke once because the
test extras installed numpy for the tests while users did not get it.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gptcli"


def requirement_names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of PEP 508 requirement strings."""
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group(0)).lower()
            for r in requirements}


@functools.cache
def installed() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (a scan of every installed
    distribution: 0.3 s, once, where it was once per import)."""
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide the top-level ``module``."""
    return {re.sub(r"[-_.]+", "-", d).lower() for d in installed().get(module, [])}


class Import:
    def __init__(self, module: str, file: Path, line: int, in_function: bool) -> None:
        self.module, self.file, self.line, self.in_function = module, file, line, in_function

    def __repr__(self) -> str:
        return f"{self.module} ({self.file.relative_to(ROOT)}:{self.line})"


def third_party_imports() -> list[Import]:
    """Every absolute import in the package that is not the standard library or gptcli."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("gptcli", "__future__"):
                    continue
                found.append(Import(top, path, node.lineno, id(node) in inside))
    return found


def required_extras() -> dict[str, str]:
    """Modules the package loads through ``errors.require(module, extra)`` -> the extra."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", None)) == "require" and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) for a in node.args)):
                out[node.args[0].value.split(".")[0]] = node.args[1].value
    return out


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = requirement_names(PYPROJECT["dependencies"])
EXTRAS = {name: requirement_names(reqs)
          for name, reqs in PYPROJECT.get("optional-dependencies", {}).items()}


def test_the_scan_sees_the_core_imports():
    modules = {i.module for i in third_party_imports()}
    assert {"torch", "numpy", "typer", "pydantic", "safetensors", "rich"} <= modules


def test_every_imported_module_is_declared():
    undeclared = [i for i in third_party_imports()
                  if not distributions_of(i.module) & (CORE | set().union(*EXTRAS.values()))]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_modules_only_in_an_extra_are_loaded_lazily_through_require():
    """A module that a plain install lacks may only be imported inside a function, and the
    package must load it through ``errors.require`` somewhere, so a missing extra is named."""
    optional = required_extras()
    for imp in third_party_imports():
        if distributions_of(imp.module) & CORE:
            continue
        assert imp.in_function, f"{imp} is only in an extra but imported at module level"
        assert imp.module in optional, \
            f"{imp} is only in an extra; load it with errors.require({imp.module!r}, EXTRA)"
        extra = optional[imp.module]
        assert extra in EXTRAS and distributions_of(imp.module) & EXTRAS[extra], \
            f"require({imp.module!r}, {extra!r}) names an extra that does not install it"


def readme_setup_commands() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)\n```", section, re.S)
    assert len(blocks) >= 2, "the set-up section names a main command and a test command"
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_commands():
    main, tests = readme_setup_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert main.endswith("gpt train") and "[" not in main, \
        "the main command installs the project without extras and runs gpt train"
    assert any(line.strip().startswith(main + " ") for line in ci), \
        "CI runs the README's main command (with a shortened gpt train)"
    assert tests in [line.strip() for line in ci], "CI runs the README's test command"
    venv = next(i for i, line in enumerate(ci) if "-m venv" in line)
    assert venv < next(i for i, line in enumerate(ci) if line.strip().startswith(main))


@pytest.mark.parametrize("recorded, command", [
    ('{"url": "file:///src/gpt%20cli", "dir_info": {"editable": true}}',
     'pip install -e "/src/gpt cli[serve]"'),  # the README's `pip install -e .`
    ('{"url": "file:///src/gptcli", "dir_info": {}}', 'pip install "/src/gptcli[serve]"'),
    ('{"url": "file:///dl/gptcli-1.0.whl", "archive_info": {}}', 'pip install "gptcli[serve]"'),
    ('{"url": "https://example.org/x", "dir_info": {}}', 'pip install "gptcli[serve]"'),
    (None, 'pip install "gptcli[serve]"'),  # from an index: pip records no origin
    ("not json", 'pip install "gptcli[serve]"'),
])
def test_a_missing_extra_is_installed_from_where_gptcli_came_from(monkeypatch, recorded,
                                                                   command):
    """A checkout's user is told to install the extra from the checkout, not by name from
    the package index (whose "gptcli" may be another project)."""
    from gptcli.errors import install_command

    class Installed:
        def read_text(self, name):
            return recorded if name == "direct_url.json" else None

    class Checkout:  # the egg-info `pip install -e .` leaves in a checkout: no origin
        def read_text(self, name):
            return None

    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda name: iter([Checkout(), Installed()]))
    assert install_command("serve") == command
