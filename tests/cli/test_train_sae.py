"""``recurrent-lens train-sae`` on a toy: a non-finite learning rate, a device this machine lacks (also ``harvest``),
the options a toy run honours and those it refuses."""

from __future__ import annotations

import pytest
import torch

import json

from tests.support.cli import QUICK_SAE

from recurrent_lens.cli import main


@pytest.mark.parametrize("lr", ["inf", "nan", "-1"])
def test_non_finite_lr_is_refused(lr, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train-sae", "--out", str(tmp_path), "--lr", lr])
    assert "argument --lr: expected a positive finite number" in capsys.readouterr().err


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


@pytest.mark.parametrize("flag", [["--heads", "5"], ["--checkpoint-every", "1"], ["--positions-per-seq", "2"],
                                  ["--dataset", "x.txt"], ["--model-batch-size", "3"]])
def test_a_toy_run_refuses_the_options_of_a_model_run(flag, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train-sae", "--arch", "gdn", "--out", str(tmp_path), *QUICK_SAE, *flag])  # refused before training
    assert f"argument {flag[0]}: applies to --model/--dataset or --states runs" in capsys.readouterr().err


def test_a_toy_run_honours_its_batch_size_and_held_out_sequences(tmp_path, capsys, monkeypatch):
    from recurrent_lens.toy import train as toy_train

    seen = []
    real = toy_train.train_sae
    monkeypatch.setattr(toy_train, "train_sae", lambda *a: seen.append(a[-1]) or real(*a))
    assert main(["train-sae", "--arch", "gdn", "--out", str(tmp_path), *QUICK_SAE, "--batch-size", "7",
                 "--val-sequences", "3"]) == 0
    assert (seen[0].batch_size, seen[0].val_sequences, seen[0].buffer_size) == (7, 3, 4096)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["val"] and log["val"][-1]["step"] == 5
    with pytest.raises(SystemExit):
        main(["train-sae", "--arch", "gdn", "--out", str(tmp_path / "b"), *QUICK_SAE, "--val-sequences", "16"])
    assert "argument --val-sequences: expected fewer than the 16 sequences" in capsys.readouterr().err
