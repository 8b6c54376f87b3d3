import json

from typer.testing import CliRunner

from gptcli.errors import install_command
from gptcli.cli import app
from gptcli.plot import compare_runs
from gptcli.runs import RunFolder

runner = CliRunner()


def fake_run(folder, lr, val_losses):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"train": {"lr": lr, "batch_size": 12, "out": str(folder)}, "model": {"n_layer": 4}}))
    lines = []
    for step, val in enumerate(val_losses, 1):
        lines.append(json.dumps({"step": step * 10, "train_loss": val + 0.1, "lr": lr}))
        lines.append(json.dumps({"step": step * 10, "val_loss": val}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_runs_lists_only_differing_settings(tmp_path):
    a = fake_run(tmp_path / "a", 1e-3, [3.0, 2.5, 2.6])
    b = fake_run(tmp_path / "b", 3e-4, [3.1, 2.8])
    differ, rows = compare_runs([a, b])
    assert differ == ["lr"]
    assert rows[0]["best_val"] == 2.5 and rows[1]["best_val"] == 2.8
    train, val = RunFolder(a).losses()
    assert train[0] == (10, 3.1) and val[-1] == (30, 2.6)


def test_gpt_plot_writes_png_and_table(tmp_path):
    a = fake_run(tmp_path / "a", 1e-3, [3.0, 2.5])
    b = fake_run(tmp_path / "b", 3e-4, [3.1, 2.8])
    result = runner.invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lr" in result.stdout and "2.5000" in result.stdout and "2.8000" in result.stdout
    again = runner.invoke(app, ["plot", str(a), "--out", str(tmp_path / "cmp.png")])
    assert again.exit_code == 0, again.output  # its own picture: redrawn
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n someone's photo")
    again = runner.invoke(app, ["plot", str(a), "--out", str(tmp_path / "photo.png")])
    assert (again.exit_code, again.stderr.strip()) == (
        2, f"error: --out {tmp_path / 'photo.png'} already exists and gptcli did not write it; "
           "pass --force to overwrite it")
    again = runner.invoke(app, ["plot", str(a), "--out", str(tmp_path / "photo.png"), "--force"])
    assert again.exit_code == 0, again.output


def test_gpt_plot_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty'} is not a run folder (it has no metrics.jsonl)"


def test_a_cut_off_last_line_is_skipped(tmp_path):
    run = fake_run(tmp_path / "a", 1e-3, [3.0, 2.5])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "train_lo')  # the run was killed mid-write
    train, val = RunFolder(run).losses()
    assert len(train) == 2 and val[-1] == (20, 2.5)


def test_gpt_plot_without_matplotlib_names_the_extra(tmp_path):
    import subprocess
    import sys

    a = fake_run(tmp_path / "a", 1e-3, [3.0, 2.5])
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
            "from gptcli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "plot", str(a), "--out",
                          str(tmp_path / "p.png")], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ('error: plotting needs matplotlib, which is not installed; '
                                  f'install it with {install_command("plot")}')
    assert out.stdout == ""  # (the runs' table came first)
    assert not (tmp_path / "p.png").exists()


def test_the_table_shows_settings_as_written_not_as_python(tmp_path):
    a = fake_run(tmp_path / "a", 1e-3, [3.0])
    b = fake_run(tmp_path / "b", 1e-3, [3.1])
    for run, data in ((a, None), (b, ["x.txt", "y.txt"])):
        config = json.loads((run / "config.json").read_text())
        config["train"]["data"] = data
        (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "bundled corpus" in text and "x.txt, y.txt" in text
    assert "None" not in text and "['x.txt'" not in text
