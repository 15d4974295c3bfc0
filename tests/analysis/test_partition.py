"""``partition_atoms`` and ``fit_gmm_1d``: the 1-D mixture, the per-atom statistics against hand-computed cosines,
settings and progress."""

from __future__ import annotations

import math

import pandas as pd
import torch
from tests.support.analysis import HOOK, _sae, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis
from recurrent_lens.analysis._common import native_run
from recurrent_lens.states.cells import parse_cell


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


def test_partition_top50_statistic_against_hand_computed_cosines():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=4, T=12)
    sae = _sae(model, n=8, k=3)
    res = analysis.partition_atoms(model, sae, HOOK, 0, tokens, statistic="mean_abs_cos_top50")
    table = res.to_pandas().set_index("atom")
    native = native_run(model, tokens, parse_cell(model, HOOK, 0, kinds=("state",)))
    codes = sae.encode(native["state"]).detach()
    k_hat = native["k"] / native["k"].norm(dim=-1, keepdim=True)
    delta = torch.einsum("btkv,btk->btv", native["update"], k_hat)  # U = k̂ δᵀ for the delta rule
    V, Wd = sae.V_dec.detach()[:, 0], sae.W_dec.detach()[:, 0]
    for i, row in table.iterrows():
        b, t = (codes[..., i] > 0).nonzero(as_tuple=True)
        top = codes[b, t, i].argsort(descending=True, stable=True)[:50]
        b, t = b[top], t[top]
        kc = (torch.nn.functional.cosine_similarity(k_hat[b, t], V[i][None], dim=-1)).abs().mean()
        vc = (torch.nn.functional.cosine_similarity(delta[b, t], Wd[i][None], dim=-1)).abs().mean()
        assert abs(row.mean_abs_key_cos - float(kc)) < 1e-5 and abs(row.mean_abs_value_cos - float(vc)) < 1e-5
        assert abs(row.score - math.sqrt(float(kc) * float(vc))) < 1e-5
    assert res.settings.statistic == "mean_abs_cos_top50" and res.settings.overrides == ("statistic",)
