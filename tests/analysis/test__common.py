"""What the analyses share: cache branching against hook edits, the statistics (Wilson, Wilcoxon against scipy)
and the ``device`` argument."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from tests.support.analysis import HOOK, MODELS, _hook_edit_logits, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis, toy
from recurrent_lens.analysis._common import branch_logits, native_run
from recurrent_lens.states.cells import parse_cell


@pytest.mark.parametrize("arch", list(MODELS))
def test_branch_matches_full_forward_and_hook_edit(arch):
    model = MODELS[arch]()
    tokens = _tokens(model)
    site = parse_cell(model, HOOK, 1, kinds=("state",))
    native = native_run(model, tokens, site)
    b = torch.tensor([0, 2, 1, 0])
    t = torch.tensor([3, 3, 7, 9])
    X = torch.randn(4, model.cfg.d_k, model.cfg.d_v)
    logits = branch_logits(model, tokens, site, b, t, lambda S, i: torch.stack([S, S + X[i]]), readout_offset=1)
    torch.testing.assert_close(logits[0], native["logits"][b, t + 1], atol=1e-4, rtol=0)
    # blocks.1 is the last layer, so a hook edit of S_t (also read at t) changes the logits at t + 1
    # exactly as the cache-based continuation does
    for i in range(4):
        S_new = native["state"][b[i], t[i]] + X[i]
        ref = _hook_edit_logits(model, tokens, 1, 1, int(b[i]), int(t[i]), S_new)
        torch.testing.assert_close(logits[1, i], ref[b[i], t[i] + 1], atol=1e-4, rtol=0)


def test_branch_errors():
    model = tiny_gdn(0)
    tokens = _tokens(model)
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    with pytest.raises(ValueError, match="readout_offset"):
        branch_logits(model, tokens, site, torch.tensor([0]), torch.tensor([1]), lambda S, i: S[None], 0)
    with pytest.raises(ValueError, match="positions"):
        branch_logits(model, tokens, site, torch.tensor([0]), torch.tensor([11]), lambda S, i: S[None], 1)
    with pytest.raises(ValueError, match="hook_name"):
        parse_cell(model, "blocks.1.mixer.hook_write", 0, kinds=("state",))
    with pytest.raises(ValueError, match="head"):
        parse_cell(model, HOOK, 9, kinds=("state",))


def test_wilson_and_wilcoxon():
    lo, hi = analysis.wilson_interval(924, 1000)
    assert abs(lo - 0.9062) < 1e-3 and abs(hi - 0.9385) < 1e-3
    assert analysis.wilson_interval(0, 10)[0] == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.randn(80, generator=torch.Generator().manual_seed(0)) + 0.3
    ref = scipy_stats.wilcoxon(x.numpy(), method="approx", correction=False).pvalue
    assert abs(analysis.wilcoxon_signed_rank(x) - ref) < 1e-6


@pytest.mark.parametrize("name", ["substitution_test", "logit_shift_prediction", "partition_atoms"])
def test_each_analysis_takes_device(name):
    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(4, seed=10_000)[0]
    run = getattr(analysis, name)
    kwargs = {"n_atoms": 2, "positions_per_atom": 10} if name == "logit_shift_prediction" else {}
    default = run(model, sae, "blocks.1.mixer.hook_state", 0, tokens, **kwargs)
    on_cpu = run(model, sae, "blocks.1.mixer.hook_state", 0, tokens, device="cpu", **kwargs)
    pd.testing.assert_frame_equal(default.rows, on_cpu.rows)
    with pytest.raises(ValueError, match="^device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu'"):
        run(model, sae, "blocks.1.mixer.hook_state", 0, tokens, device="gpu", **kwargs)
