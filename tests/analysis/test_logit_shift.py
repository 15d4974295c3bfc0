"""``logit_shift_prediction`` and ``output_jacobian``: the closed form is exact on a hand-built linear model, the
fitted forms, the default atoms, and the Jacobian against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.support.analysis import HOOK, _linear_model, _sae, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis, toy
from recurrent_lens.analysis._common import native_run
from recurrent_lens.states.cells import parse_cell


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


def test_fitted_closed_form_is_exact_on_a_linear_model():
    model = _linear_model()
    tokens = _tokens(model, B=4, T=9)
    sae = _sae(model, n=6, k=2)
    for formula, eps in (("closed_form", (0.1, 1.0, 3.0)), ("table9", (0.25, 0.5, 0.75, 1.0))):
        res = analysis.logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 1, tokens, atoms=[0, 3],
                                              eps=eps, positions_per_atom=6, readout_offset=2, protocol="paper",
                                              formula=formula)
        rows = res.to_pandas()
        torch.testing.assert_close(torch.tensor(rows["measured"].to_numpy()),
                                   torch.tensor(rows["predicted"].to_numpy()), atol=1e-4, rtol=1e-4)
        for fit in ("none", "cell", "context"):
            assert res.per_cell(fit)["r2"].min() > 0.9999, (formula, fit)
        assert res.summary()["fit"] == "context" and res.summary()["median_cell_r2"] > 0.9999
    with pytest.raises(ValueError, match="eps: fit='context'"):
        analysis.logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 1, tokens, eps=(1.0,), fit="context")


def test_fitted_closed_form_improves_on_the_toy():
    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(32, seed=10_000)[0]
    res = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, protocol="paper", n_atoms=4,
                                          positions_per_atom=40, skip_positions=1)
    by_fit = res.summary()["median_cell_r2_by_fit"]
    # measured on this setup: none -1581, cell 0.67, context 0.77 (paper, Qwen3.5: context 0.983)
    assert by_fit["none"] < 0 < by_fit["cell"] < by_fit["context"] and by_fit["context"] > 0.6
