"""``recurrent-lens train-sae`` on a toy: a non-finite learning rate, a device this machine lacks (also ``harvest``)."""

from __future__ import annotations

import pytest
import torch

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
