"""``recurrent-lens dashboard``: a toy's SAE, a shipped SAE on an excerpt, bad arguments."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import gdn_sae  # noqa: F401 (a fixture)
from recurrent_lens import toy
from recurrent_lens.cli import main


def test_dashboard_command(tmp_path, capsys, gdn_sae):
    out = tmp_path / "site"
    assert main(["dashboard", "--model", "gdn", "--sae", gdn_sae, "--out", str(out), "--features", "0,5,9",
                 "--n-examples", "4", "--context", "3", "--max-sequences", "16", "--n-writers", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"feature dashboard: {out / 'index.html'}" in text
    assert "Dashboard(3 features of WriteSAE at blocks.1.mixer.hook_state head 0, 16 sequences" in text
    assert [f["feature"] for f in json.loads((out / "data" / "features.json").read_text())] == [0, 5, 9]
    record = json.loads((out / "data" / "feature_5.json").read_text())
    assert len(record["top_examples"]) <= 4 and all(len(e["tokens"]) <= 7 for e in record["top_examples"])
    names = set(toy.load("gdn", progress=False).task.token_strings())
    assert all(set(e["tokens"]) <= names for e in record["top_examples"])  # the toy's token names, not ids
    assert record["top_examples"] and all(len(e["writers"]["top"]) == 2 for e in record["top_examples"])


def test_dashboard_command_without_writers(tmp_path, gdn_sae):
    out = tmp_path / "site"
    assert main(["dashboard", "--model", "gdn", "--sae", gdn_sae, "--out", str(out), "--features", "5",
                 "--max-sequences", "8", "--n-writers", "0", "--no-progress"]) == 0
    record = json.loads((out / "data" / "feature_5.json").read_text())
    assert record["top_examples"] and all("writers" not in e for e in record["top_examples"])


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


@pytest.mark.parametrize("sample_by, n_end_of_text", [("line", 6), ("document", 0)])
def test_dashboard_command_sample_by(tmp_path, sample_by, n_end_of_text):
    """A play read line by line gets an end-of-text token after every line; read as one document, none."""
    from recurrent_lens.pretrained import PRETRAINED_DIR

    out = tmp_path / "site"
    assert main(["dashboard", "--model", "shakespeare-gdn", "--sae", "shakespeare-gdn/blocks.1.mixer.hook_state.h0",
                 "--dataset", str(PRETRAINED_DIR / "excerpts" / "macbeth.txt"), "--context-length", "64",
                 "--max-sequences", "1", "--out", str(out), "--sample-by", sample_by, "--n-writers", "0",
                 "--context", "64", "--no-progress"]) == 0
    windows = {}
    for record in json.loads((out / "data" / "features.json").read_text()):
        for e in json.loads((out / "data" / f"feature_{record['feature']}.json").read_text())["top_examples"]:
            windows[e["position"]] = e["tokens"]  # with --context 64 each example shows the whole window
    tokens = max(windows.values(), key=len)
    assert len(tokens) == 64 and tokens[1:].count("<|endoftext|>") == n_end_of_text


def test_sample_by_is_refused_by_name_outside_txt(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "To be, or not to be"}) + "\n")
    with pytest.raises(SystemExit):
        main(["dashboard", "--model", "shakespeare-gdn", "--sae", "shakespeare-gdn/blocks.1.mixer.hook_state.h0",
              "--dataset", str(data), "--context-length", "4", "--sample-by", "document", "--out",
              str(tmp_path / "site")])
    assert "argument --sample-by: sample_by: applies to .txt files only" in capsys.readouterr().err


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
