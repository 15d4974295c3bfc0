"""``recurrent-lens demo``: the quick toy demo, the default text model, its refusals, the plot's backend."""

from __future__ import annotations

import json
import re

import matplotlib
import pytest

from recurrent_lens.cli import main


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
    assert re.search(r"^  59 windows of 256 tokens train the SAE, the first 2 of .*macbeth\.txt are held out", text,
                     re.M)
    assert "hook_name='blocks.1.mixer.hook_state', head=0" in text
    assert "firings at every position of 2 held-out windows, read at t + 1, rising atom" in text
    assert re.search(r"^atom beats delete: \d+\.\d% \(n=\d+\)$", text, re.M)
    assert (tmp_path / "substitution.csv").exists() and (tmp_path / "sae" / "cfg.json").exists()
    assert (tmp_path / "dashboard" / "index.html").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "argument --dataset: required with a --model that does not ship"),
    (["--model", "shakespeare-gdn", "--eval-sequences", "61"],
     "argument --eval-sequences: expected fewer than the 61 windows of --dataset"),
    (["--model", "shakespeare-gdn", "--head", "4"],
     "argument --head: expected an int in [0, 4) for blocks.1.mixer.hook_state, got 4"),
    (["--model", "shakespeare-gdn", "--arch", "gdn"], "argument --arch: a toy or --model, not both"),
    (["--arch", "gdn", "--context-length", "7"], "argument --context-length: applies to a text model (--model)"),
    (["--arch", "gdn", "--dataset", "x.txt"], "argument --dataset: applies to a text model (--model)"),
])
def test_demo_on_a_model_refuses(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--no-progress", "--out", str(tmp_path)] + argv)  # refused before any training
    assert message in capsys.readouterr().err


def test_demo_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    """The plot draws on its own Figure: a session's backend (a notebook's, say) is not switched to Agg."""
    monkeypatch.setitem(matplotlib.rcParams, "backend", "pdf")
    assert main(["demo", "--arch", "gdn", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "substitution_kl.png").stat().st_size > 1000
    assert matplotlib.rcParams["backend"] == "pdf"


def test_demo_refuses_an_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--out", str(blocker / "out")])
    assert "argument --out: cannot write" in capsys.readouterr().err
