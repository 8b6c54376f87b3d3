import json
import os
import re
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
            "export", "plot", "quantize", "serve"]


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
    # --kernel offers inductor only where the command has --compile, which inductor needs
    flags = " ".join(result.stdout.split())
    if "--kernel" in flags:
        assert ("inductor (with --compile" in flags) == ("--compile" in flags.replace(
            "(with --compile", "")), name


def test_cli_import_does_not_import_torch():
    code = "import sys, gptcli.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "gptcli", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("gptcli ")


def test_info_prints_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", GPT(tiny_config(vocab_size=4)),
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


def test_flags_that_do_not_parse_are_one_line_too():
    """What click itself refuses (before: its usage lines and an error in a frame); `gpt`
    alone still shows the help, and --help exits 0."""
    cases = {("train", "--max-steps", "1e3"): "Invalid value for '--max-steps': Input should "
             "be a valid integer, unable to parse string as an integer (see `gpt train --help`)",
             ("train", "--bogus"): "No such option: --bogus (Possible options: --out) (see `gpt "
             "train --help`)",
             ("nope",): "No such command 'nope' (see `gpt --help`)",
             ("sweep", "show"): "Missing argument 'DIR' (see `gpt sweep show --help`)"}
    for args, message in cases.items():
        out = subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True,
                             text=True)
        assert (out.returncode, out.stderr.strip()) == (2, f"error: {message}"), args
    alone = subprocess.run([sys.executable, "-m", "gptcli"], capture_output=True, text=True)
    assert alone.returncode == 2 and "Usage: gpt [OPTIONS] COMMAND" in alone.stdout + alone.stderr
    helped = subprocess.run([sys.executable, "-m", "gptcli", "train", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "Usage: gpt train" in helped.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(tmp_path, where):
    """--debug belongs to `gpt` itself, but works after the command too."""
    args = ["info", str(tmp_path / "model.pt")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    out = subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "looks like a pickle file" in out.stderr


# ----------------------------------------------------------------------------- closed stdout

def run_into_closed_pipe(*args, cwd=None):
    """Run `gpt ARGS` with a stdout whose reader has gone away (like `| head -c 0`)."""
    read, write = __import__("os").pipe()
    __import__("os").close(read)  # nobody will ever read: every write fails with EPIPE
    try:
        return subprocess.run([sys.executable, "-m", "gptcli", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=cwd)
    finally:
        __import__("os").close(write)


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "abc", "--max-new-tokens", "200", "--seed", "1"],
    ["generate", "--prompt", "abc", "--max-new-tokens", "5", "--json"],
    ["info"],
    ["eval", "--data", "corpus.txt"],
    ["inspect-attention", "--text", "abc abc"],
])
def test_a_closed_stdout_ends_quietly(char_checkpoint, tmp_path, command):
    (tmp_path / "corpus.txt").write_text("abc def. " * 20)
    model = [str(char_checkpoint)] if command[0] == "info" else ["--model", str(char_checkpoint)]
    out = run_into_closed_pipe(*command[:1], *model, *command[1:], cwd=tmp_path)
    assert out.returncode == 141, out.stderr
    assert out.stderr == "" or "tokens/s]" in out.stderr  # generate's stats go to stderr
    assert "Error" not in out.stderr and "error" not in out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux's) here")
def test_a_full_stdout_is_one_sentence(char_checkpoint):
    """`gpt generate ... > /dev/full`: every write fails with ENOSPC."""
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "gptcli", "generate", "--model",
                              str(char_checkpoint), "--prompt", "abc", "--max-new-tokens", "5"],
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == \
        "error: could not write to standard output or a file: No space left on device", \
        out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr


def test_a_full_disk_under_a_working_stdout_keeps_what_stdout_holds():
    """A file's write on a full disk (an open file's: no name in the error) while stdout (a
    pipe) works: one sentence, and the log already printed still reaches stdout."""
    code = ("import errno, sys, typer\n"
            "from gptcli.cli.app import handle_errors\n"
            "def command():\n"
            "    print('logged before the failure')\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "try:\n"
            "    handle_errors(command, '')()\n"
            "except typer.Exit as e:\n"
            "    sys.exit(e.exit_code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout) == (1, "logged before the failure\n"), out.stderr
    assert out.stderr == "error: could not write to standard output or a file: No space left " \
        "on device\n"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_into_a_closed_pipe_ends_quietly_too(args):
    """`gpt --help | head -3`: rich prints help, and its own closed-pipe hook exited 1."""
    out = run_into_closed_pipe(*args)
    assert (out.returncode, out.stderr) == (141, "")


def test_head_cuts_generate_short(char_checkpoint):
    """The shape from the issue: `gpt generate ... | head -c 20` ends at once, quietly."""
    out = subprocess.run(f"{sys.executable} -m gptcli generate --model {char_checkpoint} "
                         "--prompt abc --max-new-tokens 100000 --ignore-eos | head -c 20; "
                         "echo \" ${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.endswith(" 141\n") and len(out.stdout) == 20 + len(" 141\n")
    assert "error" not in out.stderr


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize("name", COMMANDS)
def test_help_reads_like_a_cli_not_like_code(name):
    result = runner.invoke(app, [name, "--help"], terminal_width=80)
    text = result.stdout
    for code_like in ("<bool>", "<str>", "<int>", "<float>", "<list", "{model}", "<path>"):
        assert code_like not in text, f"{code_like} in gpt {name} --help"
    switches = [line for line in text.splitlines() if "--json " in line or "--compile " in line]
    for line in switches:  # a switch takes no value: nothing between the flag and its help
        flag = "--json" if "--json " in line else "--compile"
        assert line.split(flag, 1)[1].lstrip().split(" ")[0] not in ("BOOL", "BOOLEAN", "bool")


def test_train_help_is_grouped_and_fits_80_columns():
    text = runner.invoke(app, ["train", "--help"], terminal_width=80).stdout
    panels = [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in text.splitlines()
              if line.startswith("╭─ ")]
    assert panels == ["Data", "Model", "LoRA", "Optimisation", "Run", "Device"]
    assert re.search(r"--batch-size +N ", text) and re.search(r"--data +PATH ", text)
    assert re.search(r"--mask-prompt +--no-mask-prompt ", text)  # on by default: both ways
    assert max(len(line) for line in text.splitlines()) <= 80


def test_every_config_field_is_a_flag_and_every_flag_a_field():
    """Settings exist once, in the pydantic configs: each command's flags are exactly its
    configs' fields (plus the listed command-line-only options), with the field's help."""
    import typer.main

    from gptcli.cli.app import field_info, flag_name
    from gptcli.config import KERNEL_INDUCTOR
    from gptcli.config import (BenchConfig, EvalConfig, LoadConfig, SampleConfig, ServeConfig,
                               TrainConfig)

    group = typer.main.get_command(app)
    DRAFT = ("draft_model", "draft_tokens")  # speculative decoding: generate, bench, serve
    cases = {
        "train": ((TrainConfig,), set(), {"--config", "--resume", "--resume-auto", "--force"}),
        "generate": ((LoadConfig, SampleConfig), set(),
                     {"--prompt", "--prompt-file", "--interactive", "--json"}),
        "eval": ((LoadConfig, EvalConfig), {"compile", *DRAFT}, {"--json"}),
        "inspect-attention": ((LoadConfig,), {"compile", *DRAFT},
                              {"--text", "--text-file", "--layer", "--head", "--out", "--html",
                               "--force", "--json"}),
        "bench": ((LoadConfig, BenchConfig), set(), {"--json"}),
        "serve": ((LoadConfig, ServeConfig), {"compile"}, set()),
    }
    own_help = {("bench", "--model")}  # the same flag, with a default of its own (a preset)
    for name, (models, excluded, own) in cases.items():
        command = group.commands[name]
        flags = {p.opts[0]: p for p in command.params if p.param_type_name == "option"
                 and p.opts[0] != "--help"}
        fields = {flag_name(f): field for model in models
                  for f, field in model.model_fields.items() if f not in excluded}
        assert set(flags) == set(fields) | own, name
        for flag, field in fields.items():
            help_text, _ = field_info(field)
            if flag == "--kernel" and "compile" in excluded:  # inductor needs --compile
                help_text = help_text.replace(KERNEL_INDUCTOR, "")
            assert help_text and (flags[flag].help.startswith(help_text)
                                  or (name, flag) in own_help), (name, flag)
            assert flags[flag].default is None  # "not given": the config supplies the default
