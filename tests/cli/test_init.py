"""The ``recurrent-lens`` command: the console script, ``python -m recurrent_lens`` under torchrun's environment,
every module importing first, each subcommand's help, usage errors of every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recurrent_lens.cli import main


COMMANDS = ["demo", "train-sae", "substitution", "logit-shift", "erase", "partition"]


ANALYSES = ["substitution", "logit-shift", "erase", "partition"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "recurrent_lens", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


_IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
import recurrent_lens
names = [m.name for m in pkgutil.walk_packages(recurrent_lens.__path__, "recurrent_lens.")]
failed = []
for name in ["recurrent_lens"] + [n for n in names if not n.endswith(".__main__")]:
    for loaded in [m for m in sys.modules if m == "recurrent_lens" or m.startswith("recurrent_lens.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_first():
    """No import cycle that only some entry point exposes: each module imports as the first of a fresh package.

    One interpreter drops the package's modules from ``sys.modules`` before each import (torch and the
    other dependencies stay loaded, so this takes seconds, not a fresh process per module). ``__main__``
    modules are skipped: importing them runs their command (the toy's rebuilds the shipped weights).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--arch" in text and "--hook" in text and "--head" in text and "--no-progress" in text
    assert "--threads" in text
    if command in ANALYSES:
        assert "--sae" in text and "--csv" in text


@pytest.mark.parametrize("argv, argument", [
    (["demo", "--arch", "transformer"], "--arch"),
    (["demo", "--k", "0"], "--k"),
    (["demo", "--steps", "many"], "--steps"),
    (["demo", "--scale", "huge"], "--scale"),
    (["demo", "--positions", "queries"], "--positions"),
    (["demo", "--quick", "--hook", "blocks.7.mixer.hook_state"], "--hook"),
    (["demo", "--quick", "--hook", "blocks.1.mixer.hook_write"], "--hook"),
    (["demo", "--quick", "--head", "5"], "--head"),
    (["train-sae"], "--out"),
    (["substitution", "--sae", "/nonexistent/sae"], "--sae"),
    (["logit-shift", "--sae", "/nonexistent/sae"], "--sae"),
    (["erase", "--sae", "/nonexistent/sae", "--atom", "0"], "--sae"),
    (["partition", "--sae", "/nonexistent/sae"], "--sae"),
    (["partition"], "--sae"),
    (["erase", "--sae", "/nonexistent/sae"], "--atom"),
    (["erase", "--sae", "/nonexistent/sae", "--atom", "first"], "--atom"),
    (["logit-shift", "--sae", "/nonexistent/sae", "--eps", "0"], "--eps"),
    (["logit-shift", "--sae", "/nonexistent/sae", "--readout", "lens"], "--readout"),
    (["erase", "--sae", "/nonexistent/sae", "--atom", "0", "--control-multipliers", "-1"], "--control-multipliers"),
    (["partition", "--sae", "/nonexistent/sae", "--tau", "2"], "--tau"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(argv, argument, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(argv + (["--out", str(tmp_path)] if argv[0] == "demo" else []))
    assert e.value.code == 2
    assert argument in capsys.readouterr().err


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["train-sae"], 2)])
def test_python_m_under_torchruns_environment_keeps_the_exit_status_and_the_output(argv, status):
    """A rank of a torchrun run leaves without interpreter shutdown, with the status and output it would have."""
    env = {**os.environ, "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "recurrent_lens", *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == status
    assert "usage: recurrent-lens" in (done.stdout if status == 0 else done.stderr)
