"""A run's settings and one SAE's optimisation: the learning-rate schedule (the trainer is tested in
test_trainer.py)."""

import pytest

from recurrent_lens.sae import TrainConfig


def test_lr_schedule():
    cfg = TrainConfig(n_steps=100, warmup_steps=10, lr=1.0, lr_min=0.1)
    assert cfg.lr_at(0) == 0.0 and cfg.lr_at(5) == pytest.approx(0.5)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(100) == pytest.approx(0.1)
    assert TrainConfig(n_steps=20, warmup_steps=50).effective_warmup == 5

