"""The ``recurrent-lens`` command line: help texts, a quick demo, train-sae -> substitution, bad arguments."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from recurrent_lens.cli import main

QUICK_SAE = ["--steps", "5", "--n-features", "16", "--k", "2", "--train-sequences", "16", "--no-progress"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "recurrent_lens.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for command in ("demo", "train-sae", "substitution"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["demo", "train-sae", "substitution"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--arch" in text and "--hook" in text and "--head" in text


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^atom beats delete: \d+\.\d% \(n=\d+\)$", text, re.M)
    assert "median KL" in text and "92.4%" in text
    assert "firings at the value positions [2, 4, 6, 8, 10, 12, 14, 16], read at t + 16" in text
    assert (tmp_path / "substitution_kl.png").stat().st_size > 1000
    assert (tmp_path / "substitution.csv").exists() and (tmp_path / "sae" / "cfg.json").exists()


def test_train_sae_then_substitution(tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    assert main(["train-sae", "--arch", "mamba2", "--out", str(sae_dir), *QUICK_SAE]) == 0
    assert os.path.exists(sae_dir / "sae_weights.safetensors")
    csv = tmp_path / "rows.csv"
    assert main(["substitution", "--arch", "mamba2", "--sae", str(sae_dir), "--eval-sequences", "4",
                 "--csv", str(csv), "--scale", "match_norm", "--positions", "all", "--no-progress"]) == 0
    assert re.search(r"atom beats delete: \d+\.\d% \(n=\d+\)", capsys.readouterr().out)
    rows = pd.read_csv(csv)
    assert rows["pos"].nunique() > 8 and rows["pos"].max() <= 32  # every position, read at t + 1


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
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(argv, argument, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(argv + (["--out", str(tmp_path)] if argv[0] == "demo" else []))
    assert e.value.code == 2
    assert argument in capsys.readouterr().err
