import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gptcli.checkpoint import save_checkpoint
from gptcli.cli import app
from gptcli.model import GPT
from gptcli.tokenizer import CharTokenizer

from conftest import tiny_config

runner = CliRunner()
COMMANDS = ["train", "generate", "download", "inspect-attention", "bench", "info", "eval",
            "export", "plot"]


def test_root_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_cli_import_does_not_import_torch():
    code = "import sys, gptcli.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "gptcli", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("gptcli ")


def test_info_prints_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config()),
                           CharTokenizer.from_text("hello"))
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "n_layer" in result.stdout and "char (4 characters)" in result.stdout
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert json.loads(result.stdout)["config"]["n_embd"] == 48


def test_user_error_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'missing.safetensors'} does not exist"]
    assert "Traceback" not in result.output


def test_debug_shows_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gptcli", "--debug", "info",
                          str(tmp_path / "model.pt")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "looks like a pickle file" in out.stderr
