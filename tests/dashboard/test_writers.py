"""The dashboard's top writers: they sum to the pre-activation stored, deleting the top writer's write moves it by
minus its contribution, they do not depend on how the calls are grouped, they are left out where attribution does
not apply, and they equal :func:`~recurrent_lens.analysis.feature_attribution` run on each top example alone, for
every SAE kind, both matrix hooks and every architecture."""

import pytest
import torch
from tests.support.dashboard import HOOK
from tests.support.helpers import ARCHS, SAE_KINDS, make_sae, tiny_model

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.analysis import feature_attribution
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.sae import FlatSAE, WriteSAE

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


def _pre_at(model, sae, tokens, sequence, position, feature, hooks=()):
    """The SAE's own pre-activation of ``feature`` on the cached state of its cell at one position."""
    name, head = sae.cfg.metadata["hook_name"], sae.cfg.metadata["head"]
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens[sequence: sequence + 1], names_filter=name)
        return float(sae.autoencode(cache[name][0, position, head][None]).pre[0, feature])


def test_writers_sum_to_the_pre_activation_stored(dash, toy_setup):
    model, sae, tokens = toy_setup
    assert dash.meta["writers"] == "top 5 by |contribution| per top example"
    checked = 0
    for f in [f for f in dash if f.top_examples][::9]:
        for e in f.top_examples:
            w = e.writers
            contributions = [x["contribution"] for x in w["top"]]
            total = sum(contributions) + w["other_writes"] + w["initial"] + w["bias"]
            assert total == pytest.approx(w["pre_activation"], rel=1e-5, abs=1e-6)
            assert w["pre_activation"] == pytest.approx(_pre_at(model, sae, tokens, e.sequence, e.position,
                                                                f.feature), rel=1e-5, abs=1e-6)
            # top-k of the pre-activations: the activation is the pre-activation where the feature is kept
            assert e.activation == pytest.approx(w["pre_activation"], rel=1e-5)
            assert [abs(c) for c in contributions] == sorted(map(abs, contributions), reverse=True)
            assert len(w["top"]) == min(5, e.position + 1) and w["initial"] == 0
            for x in w["top"]:
                assert 0 <= x["position"] <= e.position
                assert x["token"] == f"<{int(tokens[e.sequence, x['position']])}>"
            checked += 1
    assert checked > 50
    record = dash[dash.features[0]].to_dict()
    assert all("writers" in e for e in record["top_examples"])
    assert all("writers" not in e for band in record["quantile_samples"] for e in band["examples"])


def test_top_writer_equals_deleting_its_write():
    """A random model: zeroing the top writer's write through ``hook_write`` moves the pre-activation at the
    firing by exactly minus its contribution; with as many writers as positions nothing is left over."""
    cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=2, d_vocab=40, n_heads=2, d_k=8, d_v=6,
                      d_mlp=48)
    model = HookedRecurrentModel.from_config(cfg, seed=3).eval()
    tokens = torch.randint(0, 40, (6, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    hook, head = "blocks.1.mixer.hook_state", 1
    sae = FlatSAE(8, 6, 24, k=4, metadata={"hook_name": hook, "head": head})
    with torch.no_grad():
        sae.mean.normal_()
        sae.b_enc.normal_(0, 0.3)
    d = build_dashboard(model, sae, tokens, n_examples=3, n_writers=16, batch_size=4, progress=False)
    checked = 0
    for f in d:
        for e in f.top_examples:
            w = e.writers
            assert len(w["top"]) == e.position + 1 and w["other_writes"] == 0
            total = sum(x["contribution"] for x in w["top"]) + w["initial"] + w["bias"]
            assert total == pytest.approx(w["pre_activation"], rel=1e-5, abs=1e-6)
            s = w["top"][0]["position"]

            def zero(x, hook, s=s):
                x = x.clone()
                x[:, s, head] = 0
                return x

            clean = _pre_at(model, sae, tokens, e.sequence, e.position, f.feature)
            deleted = _pre_at(model, sae, tokens, e.sequence, e.position, f.feature,
                              [("blocks.1.mixer.hook_write", zero)])
            assert deleted - clean == pytest.approx(-w["top"][0]["contribution"], abs=1e-5 * max(1.0, abs(clean)))
            checked += 1
    assert checked >= 10


def test_writers_do_not_depend_on_how_the_calls_are_grouped(toy_setup, dash, monkeypatch):
    import recurrent_lens.dashboard.writers as writers

    model, sae, tokens = toy_setup
    firing = [f.feature for f in dash if f.top_examples][:6]
    args = dict(features=firing, n_examples=4, context=2, progress=False)
    one = build_dashboard(model, sae, tokens, batch_size=12, **args)
    monkeypatch.setattr(writers, "CALL_ELEMENTS", 1)  # one (sequence, position, feature) per call
    many = build_dashboard(model, sae, tokens, batch_size=3, **args)
    for a, b in zip(one, many):
        assert len(a.top_examples) == len(b.top_examples) > 0
        for x, y in zip(a.top_examples, b.top_examples):
            assert [t["position"] for t in x.writers["top"]] == [t["position"] for t in y.writers["top"]]
            assert [t["contribution"] for t in x.writers["top"]] == pytest.approx(
                [t["contribution"] for t in y.writers["top"]], rel=1e-5, abs=1e-6)
            assert x.writers["pre_activation"] == pytest.approx(y.writers["pre_activation"], rel=1e-5)


def test_writers_left_out_where_attribution_does_not_apply(toy_setup, dash):
    model, sae, tokens = toy_setup
    busiest = int(dash.to_frame()["density"].idxmax())
    other = WriteSAE(16, 16, 8, k=2, metadata={"hook_name": HOOK, "head": 1})
    d = build_dashboard(model, other, tokens[:4], head=0, progress=False)
    assert d.meta["writers"] == f"sae.cfg.metadata names {HOOK} head 1, the dashboard reads {HOOK} head 0"
    off = build_dashboard(model, sae, tokens[:4], features=[busiest], n_writers=0, progress=False)
    assert off.meta["writers"] == "n_writers=0"
    for dash_ in (d, off):
        f = next(f for f in dash_ if f.top_examples)
        assert all(e.writers is None for e in f.top_examples)
        assert all("writers" not in e for e in f.to_dict()["top_examples"])
        assert 'class="writer' not in dash_.html(f.feature)
    with pytest.raises(ValueError, match="n_writers: expected an int >= 0, got -1"):
        build_dashboard(model, sae, tokens, n_writers=-1, progress=False)
