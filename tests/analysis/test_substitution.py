"""``substitution_test``: atom vs delete vs random substitution of the native write, under both protocols, against
hook-based edits of the state through run_with_hooks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tests.support.analysis import HOOK, MODELS, _hook_edit_logits, _sae, _tokens
from tests.support.helpers import tiny_gdn
from tests.support.tiny_arch_mamba2 import tiny_mamba2

from recurrent_lens import analysis, toy
from recurrent_lens.analysis._common import kl_divergence, native_run
from recurrent_lens.sae import WriteSAE
from recurrent_lens.states.cells import parse_cell


@pytest.mark.parametrize("arch", list(MODELS))
def test_substitution_conditions_against_hook_reference(arch):
    model = MODELS[arch]()
    tokens = _tokens(model)
    sae = _sae(model)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=None, seed=1)
    rows = res.to_pandas()
    assert res.n == 3 * 11 and set(rows.columns) >= {"kl_atom", "kl_delete", "kl_random", "win", "chain"}
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    native = native_run(model, tokens, site)
    codes = sae.encode(native["state"]).detach()
    atoms = sae.decoder_atoms().detach()
    for _, r in rows.sample(5, random_state=0).iterrows():
        b, t, a = int(r.batch), int(r.pos), int(r.atom)
        assert a == int(codes[b, t].argmax()) and math.isclose(r.coefficient, float(codes[b, t].max()), rel_tol=1e-6)
        S, U = native["state"][b, t], native["update"][b, t]
        base = native["logits"][b, t + 1]
        for col, S_new in (("kl_atom", S - U + codes[b, t, a] * atoms[a]), ("kl_delete", S - U)):
            ref = _hook_edit_logits(model, tokens, 1, 0, b, t, S_new)[b, t + 1]
            assert abs(float(kl_divergence(base, ref)) - r[col]) < 1e-4 + 1e-3 * r[col]
    assert (rows["win"] == (rows["kl_atom"] < rows["kl_delete"])).all()
    lo, hi = res.win_ci
    assert lo <= res.win_rate <= hi
    assert "atom beats delete:" in res.report() and "n=33" in res.report()
    s = res.summary()
    assert s["n"] == 33 and s["ratio_atom_delete_random"][0] == 1.0
    sub = res.where_delete_matters(1e-3)
    assert sub.n == int((rows["kl_delete"] > 1e-3).sum()) and (sub.to_pandas()["kl_delete"] > 1e-3).all()


def test_substitution_options_and_cap():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=10)
    sae = _sae(model, n=8, k=2)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=2, replace="write",
                                     scale="match_norm", random="sae_atom", kl="condition_to_native",
                                     readout_offset=2, skip_positions=1)
    rows = res.to_pandas()
    assert rows.groupby("atom").size().max() <= 2
    assert rows["pos"].min() >= 1 and rows["pos"].max() <= 7
    for name, bad in (("replace", "erase"), ("scale", "huge"), ("random", "gauss"), ("kl", "js"), ("atom", "top")):
        with pytest.raises((ValueError, TypeError), match=name):  # TypeError: the type checker of the tests
            analysis.substitution_test(model, sae, HOOK, 0, tokens, **{name: bad})
    with pytest.raises(ValueError, match="sae"):
        analysis.substitution_test(model, WriteSAE(3, 3, 8), HOOK, 0, tokens)


def test_substitution_rising_atom_against_hook_reference():
    model = tiny_gdn(0)
    tokens = _tokens(model)
    sae = _sae(model, n=8, k=2)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=None, atom="rising",
                                     scale="coefficient")
    rows = res.to_pandas()
    assert res.settings["atom"] == "rising" and res.n > 0
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    native = native_run(model, tokens, site)
    S, U = native["state"], native["update"]
    rise = (sae.encode(S) - sae.encode(S - U)).detach()
    fired = (rise > 0).any(-1)[:, :-1]
    assert res.n == int(fired.sum())
    atoms = sae.decoder_atoms().detach()
    for _, r in rows.sample(4, random_state=0).iterrows():
        b, t, a = int(r.batch), int(r.pos), int(r.atom)
        assert a == int(rise[b, t].argmax()) and math.isclose(r.coefficient, float(rise[b, t].max()), rel_tol=1e-5)
        ref = _hook_edit_logits(model, tokens, 1, 0, b, t, S[b, t] - U[b, t] + rise[b, t, a] * atoms[a])[b, t + 1]
        assert abs(float(kl_divergence(native["logits"][b, t + 1], ref)) - r.kl_atom) < 1e-4 + 1e-3 * r.kl_atom


def test_flat_svd_baseline_uses_rank1_atoms():
    from recurrent_lens.sae import FlatSAE

    model = tiny_gdn(0)
    tokens = _tokens(model)
    torch.manual_seed(0)
    sae = FlatSAE(model.cfg.d_k, model.cfg.d_v, 8, k=2)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=None, scale="match_norm",
                                     rank1_atoms=True)
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    native = native_run(model, tokens, site)
    S, U = native["state"], native["update"]
    for _, r in res.to_pandas().sample(4, random_state=1).iterrows():
        b, t, a = int(r.batch), int(r.pos), int(r.atom)
        atom = sae.decoder_atoms().detach()[a]
        u, s, vh = torch.linalg.svd(atom)
        svd1 = s[0] * torch.outer(u[:, 0], vh[0])  # σ₁u₁v₁ᵀ, rescaled to ‖Δ_nat‖_F below
        X = svd1 * U[b, t].norm() / svd1.norm()
        ref = _hook_edit_logits(model, tokens, 1, 0, b, t, S[b, t] - U[b, t] + X)[b, t + 1]
        assert abs(float(kl_divergence(native["logits"][b, t + 1], ref)) - r.kl_atom) < 1e-4 + 1e-3 * r.kl_atom


def test_empirical_resample_draws_each_coordinate_from_the_native_factors():
    from recurrent_lens.analysis.substitution import empirical_resample

    g = torch.Generator().manual_seed(0)
    keys, values = torch.rand(6, 4, generator=g) + 0.1, torch.randn(6, 3, generator=g)
    R = empirical_resample(keys[:, :, None] * values[:, None, :], torch.Generator().manual_seed(1))
    assert R.shape == (6, 4, 3)
    for r in R:
        u, s, vh = torch.linalg.svd(r)
        assert s[1] < 1e-5 * s[0]
    # with positive keys and norm-1 values, the per-coordinate pools are the native factors up to one scale
    # per update; a sample built from update 0's factors alone reproduces update 0 exactly
    same = empirical_resample((keys[:1, :, None] * values[:1, None, :]).repeat(3, 1, 1), g)
    torch.testing.assert_close(same, (keys[:1, :, None] * values[:1, None, :]).expand(3, -1, -1), atol=1e-5, rtol=1e-5)
    model = tiny_mamba2(0)
    res = analysis.substitution_test(model, _sae(model), HOOK, 0, _tokens(model), random="empirical")
    rows = res.to_pandas()
    assert res.settings["random"] == "empirical" and rows["kl_random"].notna().all()


def test_substitution_positions():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=10)
    sae = _sae(model, n=8, k=2)
    full = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=None, readout_offset=3)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, max_firings_per_atom=None, readout_offset=3,
                                     positions=[2, 5])
    rows, all_rows = res.to_pandas(), full.to_pandas()
    assert set(rows["pos"]) <= {2, 5} and res.settings["positions"] == [2, 5]
    expected = all_rows[all_rows["pos"].isin([2, 5])].reset_index(drop=True)
    # the same firings and atom/delete KLs as the full run (the random controls are drawn per run)
    pd.testing.assert_frame_equal(rows[["batch", "pos", "atom", "coefficient"]],
                                  expected[["batch", "pos", "atom", "coefficient"]])
    pd.testing.assert_frame_equal(rows[["kl_atom", "kl_delete"]], expected[["kl_atom", "kl_delete"]],
                                  check_exact=False, rtol=1e-3, atol=1e-6)  # fp32 batching noise
    for bad in ([], [7], [-1]):
        with pytest.raises(ValueError, match="positions"):
            analysis.substitution_test(model, sae, HOOK, 0, tokens, readout_offset=3, positions=bad)


def test_substitution_on_toy_gdn_smoke():
    model, task = toy.load("gdn", progress=False)
    tokens, _ = task.make_batch(8, seed=3)
    res = analysis.substitution_test(model, _sae(model, n=16, k=2), HOOK, 0, tokens, skip_positions=1)
    assert res.n > 0 and 0 <= res.win_rate <= 1
    assert "atom beats delete" in repr(res) or "atom_beats_delete" in repr(res)


def test_paper_substitution_against_hook_reference_at_the_last_position():
    """write removed, atom at ‖write‖_F, read at the last position: checked by editing S_t through the hook."""
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=9)
    sae = _sae(model, n=8, k=2)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, protocol="paper", max_firings_per_atom=None)
    rows = res.to_pandas()
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    native = native_run(model, tokens, site)
    codes = sae.encode(native["state"]).detach()
    atoms = sae.decoder_atoms().detach()
    T = tokens.shape[1]
    assert res.n == int((codes[:, : T - 1] != 0).any(-1).sum()) and rows["pos"].max() <= T - 2
    for _, r in rows.sample(5, random_state=0).iterrows():
        b, t, a = int(r.batch), int(r.pos), int(r.atom)
        assert a == int(codes[b, t].argmax()) == int(r.feature)
        S, W = native["state"][b, t], native["write"][b, t]
        A = atoms[a] * W.norm() / atoms[a].norm()
        base = native["logits"][b, T - 1]
        for col, S_new in (("kl_atom", S - W + A), ("kl_delete", S - W)):
            ref = _hook_edit_logits(model, tokens, 1, 0, b, t, S_new)[b, T - 1]
            assert abs(float(kl_divergence(base, ref)) - r[col]) < 1e-4 + 1e-3 * r[col]
    assert np.isfinite(rows["kl_random"]).all()


def test_features_and_the_feature_atom():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=10)
    sae = _sae(model, n=8, k=3)
    codes = sae.encode(native_run(model, tokens, parse_cell(model, HOOK, 0, kinds=("state",)))["state"]).detach()
    feats = [int(i) for i in (codes[:, :-1] != 0).flatten(0, 1).sum(0).argsort(descending=True)[:2]]
    own = analysis.substitution_test(model, sae, HOOK, 0, tokens, atom="feature", features=feats,
                                     max_firings_per_atom=None).to_pandas()
    dom = analysis.substitution_test(model, sae, HOOK, 0, tokens, atom="dominant", features=feats,
                                     max_firings_per_atom=None).to_pandas()
    expected = sum(int((codes[:, :-1, f] != 0).sum()) for f in feats)
    assert len(own) == len(dom) == expected
    assert (own["atom"] == own["feature"]).all() and set(own["feature"]) == set(feats)
    for _, r in own.iterrows():
        assert math.isclose(r.coefficient, float(codes[int(r.batch), int(r.pos), int(r.feature)]), rel_tol=1e-6)
    for _, r in dom.iterrows():
        assert int(r.atom) == int(codes[int(r.batch), int(r.pos)].argmax()) and codes[int(r.batch), int(r.pos),
                                                                                          int(r.feature)] != 0
    capped = analysis.substitution_test(model, sae, HOOK, 0, tokens, atom="feature", features=feats,
                                        max_firings_per_atom=2).to_pandas()
    assert capped.groupby("feature").size().max() <= 2
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, atom="feature", max_firings_per_atom=3)
    assert res.per_atom(1)["n"].max() <= 3
    for bad in ([], [8], [-1]):
        with pytest.raises(ValueError, match="features"):
            analysis.substitution_test(model, sae, HOOK, 0, tokens, features=bad)
