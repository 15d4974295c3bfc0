"""The dashboard's batched top writers against :func:`~recurrent_lens.analysis.feature_attribution` run on each
top example alone, for every SAE kind, both matrix hooks and every architecture."""

import pytest
import torch
from tests.support.helpers import ARCHS, SAE_KINDS, make_sae, tiny_model

from recurrent_lens.analysis import feature_attribution
from recurrent_lens.dashboard import build_dashboard

T = 14


def assert_writers_equal_feature_attribution(model, sae):
    tokens = torch.randint(0, model.cfg.d_vocab, (5, T), generator=torch.Generator().manual_seed(1))
    # as many writers as positions: every term is listed
    dash = build_dashboard(model, sae, tokens, n_examples=3, context=1, n_samples=1, n_writers=T, batch_size=2,
                           progress=False)
    checked = 0
    for f in dash:
        for e in f.top_examples:
            fa = feature_attribution(model, sae, tokens[e.sequence: e.sequence + 1], [[e.position]], [f.feature])
            want = fa.writes[0, 0, 0, : e.position + 1]
            w = e.writers
            got = torch.zeros_like(want)
            got[[x["position"] for x in w["top"]]] = torch.tensor([x["contribution"] for x in w["top"]])
            assert len(w["top"]) == e.position + 1 and w["other_writes"] == 0
            scale = 1e-5 * max(1.0, float(want.abs().max()), abs(float(fa.pre_activation)))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=scale)
            for name, value in (("bias", fa.bias), ("initial", fa.initial), ("pre_activation", fa.pre_activation)):
                assert w[name] == pytest.approx(float(value), rel=1e-5, abs=scale), name
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("hook", ["hook_state", "hook_write"])
@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
def test_every_sae_kind_on_both_hooks(kind, hook):
    model = tiny_model("gated_deltanet")
    assert_writers_equal_feature_attribution(model, make_sae(model, kind, hook))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture(arch):
    model = tiny_model(arch)
    assert_writers_equal_feature_attribution(model, make_sae(model, "write"))


def test_chunked_features_give_the_same_terms(monkeypatch):
    import recurrent_lens.dashboard.writers as writers

    model = tiny_model("gated_deltanet")
    monkeypatch.setattr(writers, "CALL_ELEMENTS", 1)  # one feature per chunk
    assert_writers_equal_feature_attribution(model, make_sae(model, "flat_gated"))
