"""The analysis protocols: cache branching, substitution, closed-form logit shift, interventions,
partition, statistics. References are independent: hook-based edits through run_with_hooks, a
hand-built exactly linear model, scipy where available."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tests.support.helpers import tiny_gdn
from tests.support.tiny_arch_mamba2 import tiny_mamba2
from torch import nn

from recurrent_lens import HookedRecurrentModel, ModelConfig, analysis, toy
from recurrent_lens.analysis._common import branch_logits, kl_divergence, native_run
from recurrent_lens.models.mixer import MatrixMixer
from recurrent_lens.models.registry import Architecture, register_architecture
from recurrent_lens.models.scan import LinearRule, RecurrenceInputs
from recurrent_lens.sae import WriteSAE
from recurrent_lens.states.cells import parse_cell

HOOK = "blocks.1.mixer.hook_state"
MODELS = {"gated_deltanet": lambda: tiny_gdn(0), "mamba2": lambda: tiny_mamba2(0)}


def _tokens(model, B=3, T=12, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _sae(model, seed=0, n=24, k=3):
    torch.manual_seed(seed)
    return WriteSAE(model.cfg.d_k, model.cfg.d_v, n, k=k)


def _hook_edit_logits(model, tokens, layer, head, b, t, S_new):
    """Independent reference: replace S_t through the hook (replacement semantics) and rerun."""
    def edit(x, hook):
        x = x.clone()
        x[b, t, head] = S_new
        return x

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mixer.hook_state", edit)])


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


def test_wilson_and_wilcoxon():
    lo, hi = analysis.wilson_interval(924, 1000)
    assert abs(lo - 0.9062) < 1e-3 and abs(hi - 0.9385) < 1e-3
    assert analysis.wilson_interval(0, 10)[0] == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.randn(80, generator=torch.Generator().manual_seed(0)) + 0.3
    ref = scipy_stats.wilcoxon(x.numpy(), method="approx", correction=False).pvalue
    assert abs(analysis.wilcoxon_signed_rank(x) - ref) < 1e-6


def test_gmm_and_partition():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, generator=g) * 0.05, 0.6 + torch.randn(100, generator=g) * 0.05])
    w, mu, s, _ = analysis.fit_gmm_1d(x, 2)
    order = mu.argsort()
    assert torch.allclose(mu[order], torch.tensor([0.0, 0.6], dtype=torch.float64), atol=0.02)
    assert torch.allclose(w[order], torch.tensor([0.75, 0.25], dtype=torch.float64), atol=0.02)
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=12)
    sae = _sae(model)
    res = analysis.partition_atoms(model, sae, HOOK, 0, tokens)
    table = res.to_pandas()
    assert len(table) + res.n_dead == 24 and set(table["label"]) <= {"register", "bundle"}
    # an atom equal to the native update wherever it fires has cosine 1
    site = parse_cell(model, HOOK, 0, kinds=("state",))
    native = native_run(model, tokens, site)
    U = native["update"][0, 5]
    u, sv, vh = torch.linalg.svd(U)
    with torch.no_grad():
        sae.V_dec[0, 0], sae.W_dec[0, 0] = u[:, 0], vh[0]
    one = analysis.partition_atoms(model, sae, HOOK, 0, tokens[:1, :6])
    row = one.to_pandas().set_index("atom")
    if 0 in row.index and row.loc[0, "n"] == 1:
        assert abs(row.loc[0, "median_cos"] - float(sv[0] / U.norm())) < 1e-5


def test_partition_records_settings_shows_progress_and_mixtures_ignore_the_seed(capsys):
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=12)
    sae = _sae(model)
    kw = dict(max_firings_per_atom=None, min_firings=2, tau=0.1, skip_positions=1)
    res = analysis.partition_atoms(model, sae, HOOK, 0, tokens, seed=0, progress=True, **kw)
    assert "partition" in capsys.readouterr().err
    assert res.settings == dict(protocol="ours", hook_name=HOOK, head=0, statistic="median_cos_gmm", replace="update",
                                max_firings_per_atom=None, min_firings=2, tau=0.1, skip_positions=1, seed=0,
                                overrides=("max_firings_per_atom", "tau"))
    table = res.to_pandas()
    assert len(table) >= 4 and (table["n"] >= 2).all()
    # the seed only draws the per-atom subsample; without one, the table and both mixtures are the same
    other = analysis.partition_atoms(model, sae, HOOK, 0, tokens, seed=5, **kw)
    pd.testing.assert_frame_equal(table, other.to_pandas())
    assert res.gmm == other.gmm and res.delta_bic == other.delta_bic


class LinearAttentionMixer(MatrixMixer):
    """A hand-built mixer whose state-to-logit map is exactly linear: S_t = e^{g} S_{t-1} + k vᵀ,
    out = W_O (S_tᵀ q). No norm, no gate, no erase term."""

    rule = LinearRule()
    has_beta = False

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        H, dk, dv = cfg.n_heads, cfg.d_k, cfg.d_v
        self.qkv = nn.Linear(cfg.d_model, H * (2 * dk + dv), bias=False)
        self.gate = nn.Linear(cfg.d_model, H * dk)
        self.out_proj = nn.Linear(H * dv, cfg.d_model, bias=False)

    def project(self, x, cache, ctx):
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.d_k, self.d_v
        q, k, v = self.qkv(x).split([H * dk, H * dk, H * dv], -1)
        g = -torch.nn.functional.softplus(self.gate(x)).reshape(B, T, H, dk) * 0.3
        return RecurrenceInputs(q=q.reshape(B, T, H, dk), k=k.reshape(B, T, H, dk), v=v.reshape(B, T, H, dv),
                                decay=g), None

    def output(self, read, aux):
        return self.out_proj(read.flatten(2))


register_architecture(Architecture("test_linear_attention", LinearAttentionMixer), overwrite=True)


def _linear_model():
    cfg = ModelConfig(architecture="test_linear_attention", d_model=16, n_layers=1, d_vocab=23, n_heads=2,
                      d_k=4, d_v=5, d_mlp=0, conv_kernel=0)
    model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
    model.ln_final = nn.Identity()  # makes the state-to-logit map exactly linear
    return model


def test_logit_shift_exact_on_linear_model():
    model = _linear_model()
    tokens = _tokens(model, B=4, T=9)
    sae = _sae(model, n=6, k=2)
    res = analysis.logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 1, tokens, atoms=[0, 3, 5],
                                          eps=(0.1, 1.0, 3.0), positions_per_atom=6, readout_offset=2)
    rows = res.to_pandas()
    assert len(rows) == 3 * 3 * 6
    torch.testing.assert_close(torch.tensor(rows["predicted"].to_numpy()), torch.tensor(rows["measured"].to_numpy()),
                               atol=1e-4, rtol=1e-4)
    assert res.r2_zero_param > 0.9999 and abs(res.fit_scale - 1) < 1e-4
    # finite difference of the measured shift at small eps equals the closed-form slope
    tiny = analysis.logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 1, tokens, atoms=[3],
                                           eps=(1e-2,), positions_per_atom=6, readout_offset=1)
    r = tiny.to_pandas()
    torch.testing.assert_close(torch.tensor(r["measured"].to_numpy()) / 1e-2,
                               torch.tensor(r["predicted"].to_numpy()) / 1e-2, atol=2e-3, rtol=1e-3)


def test_logit_shift_runs_on_gdn_with_final_norm():
    model = tiny_gdn(0)
    tokens = _tokens(model)
    sae = _sae(model)
    res = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, atoms=[1, 2], eps=(0.01,),
                                          positions_per_atom=8, readout="final_norm")
    # tiny eps: the linearisation is accurate up to the delta-rule cross terms
    assert res.r2_one_param > 0.5
    with pytest.raises((ValueError, TypeError), match="readout"):  # TypeError: the type checker of the tests
        analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, readout="jacobian")
    with pytest.raises(ValueError, match="atoms"):
        analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, atoms=[99])


def test_logit_shift_default_atoms_are_the_most_often_dominant():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=2, T=8)
    sae = _sae(model)
    codes = sae.encode(native_run(model, tokens, parse_cell(model, HOOK, 0, kinds=("state",)))["state"]).detach()
    counts = torch.zeros(24, dtype=torch.long)
    for code in codes[:, 1:].flatten(0, 1):  # the BOS position is skipped below
        if (code > 0).any():
            counts[int(code.argmax())] += 1
    dominant = [a for a in range(24) if counts[a] > 0]
    assert 1 < len(dominant) <= 14  # at most one per position (14), so some of the 24 atoms are never dominant
    kw = dict(eps=(0.1,), positions_per_atom=1, skip_positions=1)
    every = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, n_atoms=24, **kw)
    atoms = every.settings["atoms"]
    assert sorted(atoms) == dominant
    assert [int(counts[a]) for a in atoms] == sorted(counts[dominant].tolist(), reverse=True)
    assert every.settings["n_atoms"] == 24 and every.settings["skip_positions"] == 1 and every.settings["seed"] == 2026
    top = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, n_atoms=2, **kw)
    assert top.settings["atoms"] == atoms[:2] and set(top.to_pandas()["atom"]) == set(atoms[:2])
    given = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, atoms=[np.int64(5), torch.tensor(2)], **kw)
    assert given.settings["atoms"] == [5, 2] and all(type(a) is int for a in given.settings["atoms"])
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="n_atoms: expected a positive integer"):
            analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, n_atoms=bad, **kw)
    for bad in ([], [True], [torch.tensor(1.5)], [24]):
        with pytest.raises(ValueError, match="atoms: expected"):
            analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, atoms=bad, **kw)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # no code fires anywhere
    with pytest.raises(ValueError, match="sae: no atom fires on tokens"):
        analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, **kw)


def test_output_jacobian_matches_finite_difference():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=2, T=6)
    site = parse_cell(model, HOOK, 2, kinds=("state",))
    J = analysis.output_jacobian(model, tokens, site)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_read")
    read = cache["blocks.1.mixer.hook_read"][:, :, 2]
    # the gated RMSNorm's Jacobian scales like 1/rms(read): step relative to each read's size
    w = torch.randn(model.cfg.d_v, generator=torch.Generator().manual_seed(1))[None, None] * read.norm(dim=-1, keepdim=True)
    h = 1e-3
    outs = []
    for sign in (1, -1):
        def bump(x, hook, sign=sign):
            x = x.clone()
            x[:, :, 2] += sign * h * w
            return x

        with model.hooks(fwd_hooks=[("blocks.1.mixer.hook_read", bump)]):
            _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_out")
        outs.append(cache["blocks.1.mixer.hook_out"].double())
    fd = (outs[0] - outs[1]) / (2 * h)
    torch.testing.assert_close(torch.einsum("btmv,btv->btm", J.double(), w.double()), fd, atol=1e-3, rtol=1e-3)


def test_erase_and_install():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=12)
    sae = _sae(model)
    native = native_run(model, tokens, parse_cell(model, HOOK, 0, kinds=("state",)))
    atom = int(sae.encode(native["state"]).argmax(-1).flatten().mode().values)
    res = analysis.erase_atom(model, sae, HOOK, 0, tokens, atom, max_positions=10)
    s = res.summary()
    assert "erase" in s and "add_x1" in s and 0 < s["erase"]["n"] <= 10
    assert set(res.to_pandas()["condition"]) == {"erase", "add_x1", "add_x2", "add_x4"}
    target = 5
    d = analysis.target_direction(model, HOOK, 0, tokens, target)
    assert d.shape == (model.cfg.d_v,) and abs(float(d.norm()) - 1) < 1e-5
    up = analysis.install(model, HOOK, 0, tokens, d, [4, 6], magnitude=0.05, target=target)
    down = analysis.install(model, HOOK, 0, tokens, -d, [4, 6], magnitude=0.05, target=target)
    # opposite directions move the target logit in opposite directions (the sign of q_{t+1}·k̂_t decides which)
    d_up, d_down = up.to_pandas()["delta_logit"], down.to_pandas()["delta_logit"]
    assert ((d_up * d_down) < 0).mean() > 0.9
    with pytest.raises(ValueError, match="direction"):
        analysis.install(model, HOOK, 0, tokens, torch.zeros(3), [4], target=target)
    with pytest.raises(ValueError, match="target"):
        analysis.install(model, HOOK, 0, tokens, d, [4], target=10_000)


def test_erase_atom_accepts_integer_scalars_records_settings_and_shows_progress(capsys):
    model = tiny_gdn(0)
    tokens = _tokens(model, B=2, T=10)
    sae = _sae(model)
    native = native_run(model, tokens, parse_cell(model, HOOK, 0, kinds=("state",)))
    atom = int(sae.encode(native["state"]).argmax(-1).flatten().mode().values)
    kw = dict(max_positions=3, control_multipliers=(1.0, 3.0), skip_positions=1, seed=4)
    res = analysis.erase_atom(model, sae, HOOK, 0, tokens, np.int64(atom), target=np.int64(7), progress=True, **kw)
    err = capsys.readouterr().err
    assert "erase:" in err and "erase controls:" in err
    assert res.target == 7 and type(res.target) is int
    settings = dict(res.settings)
    assert settings.pop("a_star") > 0
    assert settings == dict(hook_name=HOOK, head=0, atom=atom, max_positions=3, control_multipliers=[1.0, 3.0],
                            readout_offset=1, skip_positions=1, seed=4)
    assert type(settings["atom"]) is int
    same = analysis.erase_atom(model, sae, HOOK, 0, tokens, torch.tensor(atom), target=7, **kw)
    pd.testing.assert_frame_equal(res.to_pandas(), same.to_pandas())
    for bad in (True, torch.tensor(True), torch.tensor(1.0), 24, -1):
        with pytest.raises(ValueError, match=r"atom: expected an index in \[0, 24\)"):
            analysis.erase_atom(model, sae, HOOK, 0, tokens, bad)
    with pytest.raises(ValueError, match="max_positions"):
        analysis.erase_atom(model, sae, HOOK, 0, tokens, atom, max_positions=0)


def test_erase_atom_needs_firing_and_non_firing_positions():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=2, T=8)
    sae = _sae(model)
    with torch.no_grad():
        sae.b_enc[0] = 1e6  # atom 0 is in every top-k with a positive code
        sae.b_enc[1] = -1e6  # atom 1 never is
    with pytest.raises(ValueError, match=r"atom: atom 0 fires at every eligible position of tokens \(positions 1..6\), "
                                         r"so no non-firing position is left for the additive controls"):
        analysis.erase_atom(model, sae, HOOK, 0, tokens, 0, skip_positions=1)
    with pytest.raises(ValueError, match=r"atom: atom 1 never fires on tokens at the eligible positions 0..6"):
        analysis.erase_atom(model, sae, HOOK, 0, tokens, 1)


def test_install_during_generation_moves_continuation_towards_target():
    model, task = toy.load("gdn", progress=False)
    tokens, targets = task.make_batch(32, seed=5)
    sep = 1 + 2 * task.n_pairs
    target = int(task.value_ids()[0])
    prompt = tokens[~(tokens[:, : sep + 1] == target).any(-1), : sep + 1]  # the pairs, up to SEP; no pair holds T
    q = int(task.query_positions[0])
    # Hand-chosen direction: the d_v direction that head 0's read maps onto T's unembedding, installed with
    # the key k̂_t at the three positions around the first pair (k1 v1 k2), i.e. "k1 -> T" is written
    # into the state. The greedy continuation (the queries and their recalled values) then names T.
    direction = analysis.target_direction(model, HOOK, 0, prompt, target)
    res = analysis.install_during_generation(model, HOOK, 0, prompt, direction, [1, 2, 3], magnitude=3.0,
                                             target=target, max_new_tokens=16)
    s = res.summary()
    assert len(prompt) >= 10
    assert s["native_inclusion"] <= 0.2 and s["installed_inclusion"] >= 0.8, s
    prompt = tokens[:, : q + 1]
    # positions in the generated part: the hooks see absolute positions during decoding. The token at
    # q + 1 comes from the logits at q, before any install; later ones change.
    later = analysis.install_during_generation(model, HOOK, 1, prompt, direction, [q + 1, q + 2, q + 3],
                                               magnitude=10.0, target=target, max_new_tokens=6)
    native = torch.tensor(later.to_pandas()["native"].tolist())
    installed = torch.tensor(later.to_pandas()["installed"].tolist())
    assert torch.equal(native[:, :1], installed[:, :1]) and not torch.equal(native, installed)
    with pytest.raises(ValueError, match="positions"):
        analysis.install_during_generation(model, HOOK, 0, prompt, direction, [q + 50], target=target)


def test_substitution_on_toy_gdn_smoke():
    model, task = toy.load("gdn", progress=False)
    tokens, _ = task.make_batch(8, seed=3)
    res = analysis.substitution_test(model, _sae(model, n=16, k=2), HOOK, 0, tokens, skip_positions=1)
    assert res.n > 0 and 0 <= res.win_rate <= 1
    assert "atom beats delete" in repr(res) or "atom_beats_delete" in repr(res)
