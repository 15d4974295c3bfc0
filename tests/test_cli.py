"""The ``recurrent-lens`` command line: help texts, a quick demo, train-sae -> substitution / logit-shift /
partition / erase, bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest
import torch

from recurrent_lens import toy
from recurrent_lens.cli import main

QUICK_SAE = ["--steps", "5", "--n-features", "16", "--k", "2", "--train-sequences", "16", "--no-progress"]
COMMANDS = ["demo", "train-sae", "substitution", "logit-shift", "erase", "partition"]
ANALYSES = ["substitution", "logit-shift", "erase", "partition"]


@pytest.fixture(scope="module")
def gdn_sae(tmp_path_factory) -> str:
    """A tiny WriteSAE (16 features) on the toy GDN's default hook, saved by ``train-sae``."""
    sae_dir = str(tmp_path_factory.mktemp("gdn") / "sae")
    assert main(["train-sae", "--arch", "gdn", "--out", sae_dir, *QUICK_SAE]) == 0
    return sae_dir


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "recurrent_lens.cli", "--help"], capture_output=True, text=True,
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--arch", "gdn", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^atom beats delete: \d+\.\d% \(n=\d+\)$", text, re.M)
    assert "median KL" in text and "92.4%" in text
    assert "--quick: these numbers are a smoke test of the pipeline" in text  # not results next to the paper's
    assert "firings at the value positions [2, 4, 6, 8, 10, 12, 14, 16], read at t + 16, rising atom" in text
    assert re.search(r"^with the dominant atom instead: atom beats delete \d+\.\d% \(n=\d+\)", text, re.M)
    assert (tmp_path / "substitution_kl.png").stat().st_size > 1000
    assert (tmp_path / "substitution.csv").exists() and (tmp_path / "sae" / "cfg.json").exists()
    index = tmp_path / "dashboard" / "index.html"
    assert f"feature dashboard: {index}" in text and index.is_file()
    features = json.loads((tmp_path / "dashboard" / "data" / "features.json").read_text())
    assert len(features) == 32 and any(f["win_rate"] is not None for f in features)


def test_demo_on_shakespeare_gdn(tmp_path, capsys):
    """``demo --model``: an SAE trained from text by sae.train on the excerpt's later windows, tested on its first."""
    argv = ["demo", "--quick", "--eval-sequences", "2", "--out", str(tmp_path), "--no-progress"]  # the default model
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  58 windows of 256 tokens train the SAE, the first 2 of .*macbeth\.txt are held out", text,
                     re.M)
    assert "hook_name='blocks.1.mixer.hook_state', head=0" in text
    assert "firings at every position of 2 held-out windows, read at t + 1, rising atom" in text
    assert re.search(r"^atom beats delete: \d+\.\d% \(n=\d+\)$", text, re.M)
    assert (tmp_path / "substitution.csv").exists() and (tmp_path / "sae" / "cfg.json").exists()
    assert (tmp_path / "dashboard" / "index.html").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "argument --dataset: required with a --model that does not ship"),
    (["--model", "shakespeare-gdn", "--eval-sequences", "60"],
     "argument --eval-sequences: expected fewer than the 60 windows of --dataset"),
    (["--model", "shakespeare-gdn", "--head", "4"],
     "argument --head: expected an int in [0, 4) for blocks.1.mixer.hook_state, got 4"),
    (["--model", "shakespeare-gdn", "--arch", "gdn"], "argument --arch: a toy or --model, not both"),
])
def test_demo_on_a_model_refuses(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--no-progress", "--out", str(tmp_path)] + argv)  # refused before any training
    assert message in capsys.readouterr().err


def test_dashboard_command(tmp_path, capsys, gdn_sae):
    out = tmp_path / "site"
    assert main(["dashboard", "--model", "gdn", "--sae", gdn_sae, "--out", str(out), "--features", "0,5,9",
                 "--n-examples", "4", "--context", "3", "--max-sequences", "16", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"feature dashboard: {out / 'index.html'}" in text
    assert "Dashboard(3 features of WriteSAE at blocks.1.mixer.hook_state head 0, 16 sequences" in text
    assert [f["feature"] for f in json.loads((out / "data" / "features.json").read_text())] == [0, 5, 9]
    record = json.loads((out / "data" / "feature_5.json").read_text())
    assert len(record["top_examples"]) <= 4 and all(len(e["tokens"]) <= 7 for e in record["top_examples"])
    names = set(toy.load("gdn", progress=False).task.token_strings())
    assert all(set(e["tokens"]) <= names for e in record["top_examples"])  # the toy's token names, not ids


def test_dashboard_command_shipped_sae_on_an_excerpt(tmp_path, capsys):
    """docs/dashboard.md's command: a shipped model and SAE by name, a shipped excerpt by its path."""
    from recurrent_lens.pretrained import PRETRAINED_DIR

    out = tmp_path / "site"
    assert main(["dashboard", "--model", "shakespeare-gdn", "--sae", "shakespeare-gdn/blocks.1.mixer.hook_state.h0",
                 "--dataset", str(PRETRAINED_DIR / "excerpts" / "macbeth.txt"), "--context-length", "64",
                 "--max-sequences", "2", "--features", "0,1", "--out", str(out), "--no-progress"]) == 0
    assert "Dashboard(2 features of WriteSAE at blocks.1.mixer.hook_state head 0, 2 sequences x 64 positions" in \
        capsys.readouterr().out
    record = json.loads((out / "data" / "feature_1.json").read_text())
    assert all(isinstance(t, str) for e in record["top_examples"] for t in e["tokens"])


@pytest.mark.parametrize("argv, flag", [
    (["--features", "0,16"], "--features"),
    (["--sae", "nowhere"], "--sae"),
    (["--model", "no_such_dir"], "--dataset"),
    (["--out", "NOTES"], "--out"),
])
def test_dashboard_command_errors(tmp_path, capsys, gdn_sae, argv, flag):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("not a dashboard")
    base = {"--model": "gdn", "--sae": gdn_sae, "--out": str(tmp_path / "site")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    base["--out"] = base["--out"].replace("NOTES", str(tmp_path / "notes"))
    with pytest.raises(SystemExit):
        main(["dashboard", *[x for kv in base.items() for x in kv], "--no-progress"])
    assert f"argument {flag}" in capsys.readouterr().err


def test_demo_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    """The plot draws on its own Figure: a session's backend (a notebook's, say) is not switched to Agg."""
    monkeypatch.setitem(matplotlib.rcParams, "backend", "pdf")
    assert main(["demo", "--arch", "gdn", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "substitution_kl.png").stat().st_size > 1000
    assert matplotlib.rcParams["backend"] == "pdf"


def test_train_sae_then_substitution(tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    assert main(["train-sae", "--arch", "mamba2", "--out", str(sae_dir), *QUICK_SAE]) == 0
    assert os.path.exists(sae_dir / "sae_weights.safetensors")
    csv = tmp_path / "rows.csv"
    assert main(["substitution", "--arch", "mamba2", "--sae", str(sae_dir), "--eval-sequences", "4",
                 "--csv", str(csv), "--scale", "match_norm", "--positions", "all", "--atom", "dominant",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"atom beats delete: \d+\.\d% \(n=\d+\)", text)
    # mamba2's probe site (where its recall lives) is layer 0
    assert "substitution test on blocks.0.mixer.hook_state head 0" in text and "read at t + 1, dominant atom" in text
    rows = pd.read_csv(csv)
    assert rows["pos"].nunique() > 8 and rows["pos"].max() <= 32  # every position, read at t + 1


def test_substitution_controls_and_flat_svd_options(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    assert main(["substitution", "--sae", gdn_sae, "--eval-sequences", "4", "--random", "empirical", "--rank1-atoms",
                 "--csv", str(csv), "--no-progress"]) == 0
    assert re.search(r"atom beats delete: \d+\.\d% \(n=\d+\)", capsys.readouterr().out)
    assert set(pd.read_csv(csv)["pos"]) <= {2, 4, 6, 8, 10, 12, 14, 16}


def test_logit_shift(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "shift.csv"
    assert main(["logit-shift", "--sae", gdn_sae, "--eval-sequences", "4", "--atoms", "3", "0", "--eps", "0.5", "-2",
                 "--positions-per-atom", "6", "--readout", "final_norm", "--readout-offset", "2", "--csv", str(csv),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "read at t0 + 2 through final_norm: 2 atoms x 2 eps (n=24)" in text
    for line in (r"R\^2 zero-parameter  -?\d", r"R\^2 one-parameter   -?\d.* \(fitted scale ",
                 r"median cell R\^2 .* over 4 "):
        assert re.search("^  " + line, text, re.M), line
    rows = pd.read_csv(csv)
    assert len(rows) == 24 and set(rows["atom"]) == {0, 3} and set(rows["eps"]) == {0.5, -2.0}
    assert rows["pos"].min() >= 1 and rows["pos"].max() <= 31  # BOS skipped, read at t0 + 2 <= 33


def test_partition_then_erase(gdn_sae, tmp_path, capsys):
    parts = tmp_path / "partition.csv"
    assert main(["partition", "--sae", gdn_sae, "--eval-sequences", "4", "--tau", "0.01", "--csv", str(parts),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    alive = pd.read_csv(parts)
    assert re.search(rf"^  alive {len(alive)}, dead {16 - len(alive)}$", text, re.M)
    registers = int((alive["label"] == "register").sum())
    assert re.search(rf"^  registers {registers}, bundles {len(alive) - registers} ", text, re.M)
    assert re.search(r"^  delta BIC \S+ \(", text, re.M)

    atom = int(alive.sort_values("n")["atom"].iloc[-1])  # the most frequent, so it fires at t <= 32
    erased = tmp_path / "erase.csv"
    assert main(["erase", "--sae", gdn_sae, "--atom", str(atom), "--eval-sequences", "4", "--max-positions", "5",
                 "--control-multipliers", "1", "3", "--target", "20", "--csv", str(erased), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (f"erase atom {atom} on blocks.1.mixer.hook_state head 0 where it fires, read at t + 1: "
            "target token 20") in text
    for condition in ("erase", "add_x1", "add_x3"):
        assert re.search(rf"^  {condition} +5 +-?\d", text, re.M), condition
    rows = pd.read_csv(erased)
    assert rows.groupby("condition").size().to_dict() == {"erase": 5, "add_x1": 5, "add_x3": 5}


@pytest.mark.parametrize("argv, message", [
    (["erase", "--atom", "16"], "argument --atom: expected an atom index in [0, 16), got 16"),
    (["erase", "--atom", "-1"], "argument --atom: expected an atom index in [0, 16), got -1"),
    (["erase", "--atom", "0", "--target", "34"], "argument --target: expected a token id in [0, 34), got 34"),
    (["erase", "--atom", "0", "--readout-offset", "33"], "argument --readout-offset: expected at most 32"),
    (["logit-shift", "--atoms", "2", "99", "-3"], "argument --atoms: expected atom indices in [0, 16), got 99, -3"),
    (["partition", "--hook", "blocks.0.mixer.hook_write"], "argument --hook"),
    (["partition", "--sae", "{parent}"], "argument --sae: cannot load an SAE from"),
])
def test_bad_arguments_with_sae(argv, message, gdn_sae, capsys):
    argv = [a.format(parent=os.path.dirname(gdn_sae)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


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


def test_logit_shift_n_atoms(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "shift.csv"
    assert main(["logit-shift", "--sae", gdn_sae, "--eval-sequences", "4", "--n-atoms", "3", "--eps", "0.5",
                 "--positions-per-atom", "2", "--csv", str(csv), "--no-progress"]) == 0
    assert ": 3 atoms x 1 eps (n=6)" in capsys.readouterr().out
    assert pd.read_csv(csv)["atom"].nunique() == 3


def test_progress_bars_of_erase_and_partition(gdn_sae, tmp_path, capsys):
    parts = tmp_path / "partition.csv"
    assert main(["partition", "--sae", gdn_sae, "--eval-sequences", "4", "--csv", str(parts)]) == 0
    assert "partition:" in capsys.readouterr().err
    atom = int(pd.read_csv(parts).sort_values("n")["atom"].iloc[-1])
    assert main(["erase", "--sae", gdn_sae, "--atom", str(atom), "--eval-sequences", "4", "--max-positions", "2"]) == 0
    err = capsys.readouterr().err
    assert "erase:" in err and "erase controls:" in err


@pytest.mark.parametrize("argv, message", [
    (["logit-shift", "--atoms", "1", "--n-atoms", "3"], "argument --n-atoms: not allowed with argument --atoms"),
    (["logit-shift", "--n-atoms", "0"], "argument --n-atoms: expected a positive integer, got 0"),
])
def test_bad_n_atoms(argv, message, gdn_sae, capsys):
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["substitution", "--readout-offset", "40"], "argument --readout-offset: expected at most 32"),
    (["substitution", "--csv", "{blocker}/x.csv"], "argument --csv: cannot write"),
    (["partition", "--csv", "{blocker}/x.csv"], "argument --csv: cannot write"),
])
def test_bad_arguments_refused_before_work(argv, message, gdn_sae, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker) for a in argv]
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("lr", ["inf", "nan", "-1"])
def test_non_finite_lr_is_refused(lr, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train-sae", "--out", str(tmp_path), "--lr", lr])
    assert "argument --lr: expected a positive finite number" in capsys.readouterr().err


def test_demo_refuses_an_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--out", str(blocker / "out")])
    assert "argument --out: cannot write" in capsys.readouterr().err


def test_sae_from_another_site_gets_a_warning(gdn_sae, capsys):
    assert main(["partition", "--sae", gdn_sae, "--head", "1", "--eval-sequences", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the SAE in" in err and "trained on head 0, this run uses 1" in err


@pytest.mark.parametrize("device, message", [
    ("bogus", "expected a torch device such as cpu, cuda or cuda:1, got 'bogus'"),
    ("cuda", "CUDA is not available on this machine, got 'cuda'"),
    ("cuda:3", "CUDA is not available on this machine, got 'cuda:3'"),
])
@pytest.mark.parametrize("command", ["train-sae", "harvest"])
def test_bad_device_is_a_parser_error(command, device, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main([command, "--model", "/nonexistent", "--dataset", "/nonexistent", "--out", str(tmp_path),
              "--device", device])
    assert e.value.code == 2
    assert f"argument --device: {message}" in capsys.readouterr().err
