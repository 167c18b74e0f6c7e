"""What the `hetlora` command prints: -v/-q anywhere, quiet third parties, closed pipes, missing extras."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetlora import output
from hetlora.cli import COMMANDS, _subparsers, build_parser, main
from hetlora.demo_data import BANKING77
from hetlora.extras import extra_for, missing_extra_message
from tests.conftest import ARTIFACT_BACKENDS

PROJECT = Path(__file__).resolve().parents[2]
def small_csv(tmp_path: Path) -> Path:
    rows = ["text,label"] + [f"row {i},{'ab'[i % 2]}" for i in range(40)]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("flags, level", [
    ([], 0), (["-q"], -1), (["--quiet"], -1), (["-v"], 1), (["--verbose"], 1)])
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbosity_flags_work_before_and_after_the_subcommand(flags, level, where, tmp_path):
    command = ["partition", "--data", str(small_csv(tmp_path)), "--clients", "2", "--out", str(tmp_path / "p")]
    argv = [*flags, *command] if where == "before" else [*command, *flags]
    try:
        assert main(argv) == 0
        assert output.verbosity() == level
        hetlora_level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[level]
        assert logging.getLogger("hetlora").level == hetlora_level
        assert logging.getLogger("edge_client.backends").getEffectiveLevel() == hetlora_level
        assert logging.getLogger().level == (logging.DEBUG if level > 0 else logging.WARNING)
        assert logging.getLogger("torchao").level == (logging.NOTSET if level > 0 else logging.ERROR)
        assert output.show_progress() == (level >= 0 and sys.stderr.isatty())
    finally:
        output.configure(0)


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(terminal, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert output.show_progress() is terminal
    output.configure(-1)
    try:
        assert output.show_progress() is False
    finally:
        output.configure(0)


def test_quiet_and_verbose_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["partition", "-q", "-v", "--data", "x", "--clients", "2", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`hetlora partition --json | head`: 300 clients print about 330 KB, far more than a pipe holds, so the
    writer is still printing when the reader goes away."""
    cmd = [sys.executable, "-m", "hetlora.cli", "partition", "--data", str(BANKING77 / "train.csv"),
           "--clients", "300", "--min-per-client", "5", "--out", str(tmp_path / "parts"), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert first.strip() == b"{"
    assert err == ""


def test_a_complete_json_document_still_reaches_a_reader_that_stays(tmp_path):
    cmd = [sys.executable, "-m", "hetlora.cli", "partition", "--data", str(small_csv(tmp_path)), "--clients", "2",
           "--out", str(tmp_path / "parts"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(json.loads(proc.stdout)["clients"]) == 2


@pytest.mark.parametrize("command, module, extra", [
    ("serve", "uvicorn", "server"), ("serve", "fastapi.responses", "server"), ("export", "executorch.exir", "export"),
    ("export", "onnxruntime", "export"), ("client", "executorch", "executorch"), ("bench", "onnxruntime", "export"),
    ("demo", "matplotlib.pyplot", "plots"), ("client", "torch", "client"), ("serve", "transformers", "server")])
def test_each_missing_package_names_the_extra_that_installs_it(command, module, extra):
    assert extra_for(command, module) == extra
    assert missing_extra_message(command, module).endswith(f"pip install 'hetlora-edge[{extra}]'")


def test_an_unknown_missing_module_is_not_explained_away():
    assert missing_extra_message("serve", "server_stub.nonexistent") is None


def without_packages(tmp_path: Path, blocked: set[str]) -> Path:
    """A copy (by symlinks) of this interpreter's site-packages without the `blocked` top-level packages and
    their metadata: as if their extra had not been installed."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    folder = tmp_path / "site-packages"
    folder.mkdir()
    normalised = {b.replace("-", "_").lower() for b in blocked}
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in normalised and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def run_blocked(tmp_path: Path, blocked: str, *argv: str) -> subprocess.CompletedProcess:
    """`hetlora ARGV` in a Python that has the project and the site-packages minus `blocked` (-S: no site.py)."""
    site = without_packages(tmp_path, set(blocked.split(",")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{PROJECT}{os.pathsep}{site}"}
    return subprocess.run([sys.executable, "-S", "-m", "hetlora.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env=env)


def test_serve_without_the_server_extra_says_which_extra_to_install(tmp_path):
    proc = run_blocked(tmp_path, "fastapi,uvicorn,starlette", "serve", "--state-dir", str(tmp_path / "state"), "--port", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "install the server extra: pip install 'hetlora-edge[server]'" in proc.stderr


@pytest.mark.slow
def test_export_without_the_export_extra_says_which_extra_to_install(tiny_bert_dir, tmp_path):
    proc = run_blocked(tmp_path, "executorch,onnx,onnxruntime,onnxruntime_training_cpu,onnxscript", "export", "--model", str(tiny_bert_dir), "--task",
                       "classification", "--num-labels", "3", "--ranks", "4", "--batch-size", "2", "--seq-len", "8",
                       "--backends", "executorch", "--out", str(tmp_path / "art"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "install the export extra: pip install 'hetlora-edge[export]'" in proc.stderr


@pytest.mark.slow
def test_export_prints_at_most_twenty_lines_by_default(tiny_export):
    """The session's export (conftest.tiny_export: `hetlora export` in its own process, default output), both
    backends (ExecuTorch alone without onnxruntime-training), two ranks: the summary, without third-party chatter."""
    _, proc = tiny_export
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 20, "\n".join(lines[:40])
    assert proc.stdout.strip().startswith(f"wrote {2 * len(ARTIFACT_BACKENDS)} artifacts")
    assert not any(word in proc.stderr for word in ("INFO root", "Failed to load", "_pytree", "[W:onnxruntime"))


@pytest.mark.slow
def test_a_non_editable_install_carries_the_demo_data(tmp_path):
    """`pip install` (a built wheel, not the checkout) puts BANKING77 inside the installed package, and the
    defaults resolve there, run from a folder that is not the checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PROJECT)], check=True, capture_output=True, timeout=600)
    installed = target / "hetlora" / "data" / "banking77"
    assert sorted(p.name for p in installed.iterdir()) == sorted(p.name for p in BANKING77.iterdir())
    probe = "from hetlora.demo_data import banking77; print(banking77('categories.json', '--labels'))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True,
                          env={**os.environ, "PYTHONPATH": str(target)})
    resolved = Path(proc.stdout.strip())
    assert resolved == installed / "categories.json" and len(json.loads(resolved.read_text())) == 77


def test_a_missing_bundled_file_is_a_one_line_error_naming_the_flag(tmp_path, monkeypatch):
    from hetlora import demo_data
    from hetlora.errors import UserError

    monkeypatch.setattr(demo_data, "BANKING77", tmp_path)
    with pytest.raises(UserError, match="pass --test FILE"):
        demo_data.banking77("test.csv", "--test")


def test_help_shows_defaults_once_and_only_real_ones():
    commands = _subparsers(build_parser())
    serve = " ".join(commands["serve"].format_help().split())
    assert "--rounds ROUNDS (default: 5)" in serve and "--seed SEED (default: 0)" in serve
    assert "--ranks RANKS the rank set (default 4,8,16,32,64) --global-rank" in serve  # its own words, not twice
    assert "(default: None)" not in serve and "(default: False)" not in serve and "(default: [])" not in serve
    peft_export = _subparsers(commands["peft"])["export"].format_help()
    assert "--task {classification,causal-lm} (default: classification)" in " ".join(peft_export.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_and_each_of_its_subcommands_answers_help(command, capsys):
    parser = _subparsers(build_parser([command]))[command]
    nested = [[name] for action in parser._actions if isinstance(action, argparse._SubParsersAction)
              for name in action.choices]
    for words in [[], *nested]:
        with pytest.raises(SystemExit) as stop:
            main([command, *words, "--help"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith(" ".join(["usage: hetlora", command, *words]))


HELP_PROBE = """
import contextlib, io, json, sys
from hetlora.cli import COMMANDS, main

def loaded(words):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*words, "--help"])
    return sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))

print(json.dumps({"": loaded([]), **{name: loaded([name]) for name in COMMANDS}}))
"""


def test_help_imports_no_command_and_no_command_help_imports_torch_or_the_server():
    """`hetlora --help` imports no command; `hetlora CMD --help` neither torch, transformers nor the server extra:
    instant on a small device, and working without the extra (hetlora/cli.py). One process, in the table's order,
    so a command that loads one of them shows under its own name."""
    watched = ["edge_client", "server_stub", "simulation", "exporter", "torch", "transformers", "fastapi", "uvicorn"]
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(watched)], capture_output=True, text=True,
                          cwd=PROJECT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded.pop("") == []
    heavy = {"torch", "transformers", "fastapi", "uvicorn"}
    assert {name: sorted(heavy & set(modules)) for name, modules in loaded.items()} == {name: [] for name in COMMANDS}
