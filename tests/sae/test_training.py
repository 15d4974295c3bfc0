"""A run's settings and one SAE's optimisation: the learning-rate schedule, the learner's order of updates,
evaluation (the trainer is tested in test_trainer.py)."""

import pytest
import torch

from recurrent_lens.sae import TrainConfig, WriteSAE
from recurrent_lens.sae.training import Learner, evaluate


def test_lr_schedule():
    cfg = TrainConfig(n_steps=100, warmup_steps=10, lr=1.0, lr_min=0.1)
    assert cfg.lr_at(0) == 0.0 and cfg.lr_at(5) == pytest.approx(0.5)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(100) == pytest.approx(0.1)
    assert TrainConfig(n_steps=20, warmup_steps=50).effective_warmup == 5


def test_learner_updates_counters_before_the_aux_loss():
    """Training keeps the counters: fired features restart at 0, the others grow by one, and the
    dead-feature loss of this step already uses the updated counters (as the reference does)."""
    torch.manual_seed(0)
    sae = WriteSAE(4, 3, 16, k=2, k_aux=4, dead_threshold=3)
    S = torch.randn(8, 4, 3)
    fired = (sae.encode(S) > 0).any(0)
    sae.steps_since_active.copy_(torch.where(fired, 5, 2))  # fired ones will revive, the others die now
    expected_dead = ~fired
    expected = sae.losses(sae.autoencode(S), dead=expected_dead)
    learner = Learner(sae, TrainConfig(n_steps=10, lr=0.0, log_every=1, progress=False), torch.Generator())
    row = learner.update(S)
    assert sae.steps_since_active.tolist() == [0 if f else 3 for f in fired.tolist()]
    assert row["dead"] == int(expected_dead.sum()) > 0
    assert row["aux_loss"] == pytest.approx(expected.aux_loss.item(), rel=1e-6) and row["aux_loss"] > 0


def test_evaluate_matches_the_metrics_written_out_by_hand():
    torch.manual_seed(0)
    sae = WriteSAE(4, 3, 8, k=2, center=False)
    S = torch.randn(10, 4, 3)
    got = evaluate(sae, S, batch_size=3)  # batches of 3, 3, 3 and 1 add up to the whole
    recon = sae.autoencode(S)  # one batch: fp32 rounding differs from batches of 3 by ~1e-8
    err = (recon.reconstruction - S).double().pow(2)
    assert got["val_mse"] == pytest.approx(err.mean().item(), rel=1e-6)
    assert got["val_nmse"] == pytest.approx((err.mean() / S.double().pow(2).mean()).item(), rel=1e-6)
    centred = (S.double() - S.double().mean(0)).pow(2).sum()
    assert got["val_explained_variance"] == pytest.approx(1 - (err.sum() / centred).item(), rel=1e-6)
    assert got["val_l0"] == pytest.approx((recon.acts > 0).sum().item() / 10)
    assert got["val_dead"] == int((~(recon.acts > 0).any(0)).sum())


def test_a_divergence_seen_on_another_rank_stops_this_one():
    """Data-parallel, a rank whose own batches stayed finite and bounded still stops at the check where a peer
    diverged, instead of waiting for it at the next collective."""
    from recurrent_lens.integrity import NonFiniteError

    class OtherRankDiverged:  # DataParallelSync's calls for a peer that saw a NaN; the rest are no-ops here
        def counters(self, sae):
            pass

        def gradients(self, params):
            pass

        def anywhere(self, flag):
            return True

    torch.manual_seed(0)
    learner = Learner(WriteSAE(4, 3, 16, k=2), TrainConfig(n_steps=10, log_every=1, progress=False),
                      torch.Generator(), OtherRankDiverged(), label="cell")
    with pytest.raises(NonFiniteError, match="cell: training diverged on another rank"):
        learner.update(torch.randn(8, 4, 3))
