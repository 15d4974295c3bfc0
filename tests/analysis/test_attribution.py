"""``feature_attribution`` for every SAE kind and architecture, against the SAE's own pre-activations on the
model's cached states, and against forwards with a write deleted through ``hook_write``."""

import pytest
import torch
from tests.support.analysis import FEATURES, POSITIONS, T, tokens_for
from tests.support.helpers import ARCHS, SAE_KINDS, make_sae, tiny_model

from recurrent_lens.analysis import feature_attribution
from recurrent_lens.sae import WriteSAE


@pytest.fixture(params=sorted(ARCHS), scope="module")
def model(request):
    m = tiny_model(request.param)
    m.cfg.chunk_size = 8
    return m


def sae_pre(model, sae, tokens, hooks=(), harvest=False):
    """The SAE's own pre-activations on the per-step matrices of its cell at POSITIONS: cached (materialised),
    or harvested (the chunked scan's boundary states, then each position's chunk)."""
    name, head = sae.cfg.metadata.hook_name, sae.cfg.metadata.head
    with model.hooks(fwd_hooks=list(hooks)):
        if harvest:
            layer, what = model.matrix_site(name)
            S = model.states_at(tokens, layer, POSITIONS, heads=[head], what=what)[:, :, 0]
        else:
            _, cache = model.run_with_cache(tokens, names_filter=name)
            S = cache[name][torch.arange(2)[:, None], POSITIONS][:, :, head]
    with torch.no_grad():
        return sae.autoencode(S).pre.view(2, POSITIONS.shape[1], -1)[..., FEATURES]


def assert_rel(got, want, scale):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(scale.abs().max()))


@pytest.mark.parametrize("hook", ["hook_state", "hook_write"])
@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
def test_terms_sum_to_the_sae_pre_activation(model, kind, hook):
    tokens = tokens_for(model)
    sae = make_sae(model, kind, hook)
    fa = feature_attribution(model, sae, tokens, POSITIONS, features=FEATURES)
    assert fa.writes.shape == (2, 4, 4, T) and fa.features.tolist() == FEATURES
    assert (fa.hook_name, fa.head) == (sae.cfg.metadata.hook_name, 1)
    ref = sae_pre(model, sae, tokens)
    assert_rel(fa.pre_activation, ref, ref)
    assert_rel(fa.total(), ref, ref)
    assert fa.initial.eq(0).all()
    later = torch.arange(T)[None, None, None] > POSITIONS[:, :, None, None]
    assert fa.writes.masked_select(later).eq(0).all()
    if hook == "hook_write":  # the state-dependent part is the write at t alone
        earlier = torch.arange(T)[None, None, None] < POSITIONS[:, :, None, None]
        assert fa.writes.masked_select(earlier).eq(0).all()


@pytest.mark.parametrize("mode", ["write, materialised", "value, chunked"])
@pytest.mark.parametrize("hook", ["hook_state", "hook_write"])
@pytest.mark.parametrize("kind", ["write", "flat_gated"])
def test_deleting_a_write_moves_each_feature_by_minus_its_term(model, kind, hook, mode):
    """Deleted through ``hook_write`` with states cached, or through ``hook_v`` (v_s enters the state only
    through W_s) with states harvested from the chunked scan."""
    tokens = tokens_for(model, seed=1)
    sae = make_sae(model, kind, hook, head=0, seed=2)
    fa = feature_attribution(model, sae, tokens, POSITIONS, features=FEATURES)
    chunked = mode == "value, chunked"
    clean = sae_pre(model, sae, tokens, harvest=chunked)
    layer = model.cfg.recurrent_layers[-1]
    site = f"blocks.{layer}.mixer.hook_{'v' if chunked else 'write'}"
    for s in (0, 5, 17):
        def zero(w, hook, s=s):
            w = w.clone()
            w[:, s] = 0
            return w

        deleted = sae_pre(model, sae, tokens, [(site, zero)], harvest=chunked)
        assert_rel(deleted - clean, -fa.writes[..., s], clean)


def test_initial_state_and_all_features():
    model = tiny_model("rwkv7")
    cfg = model.cfg
    tokens = tokens_for(model, seed=3)
    sae = make_sae(model, "bilinear")
    S0 = torch.randn(2, cfg.n_heads, cfg.d_k, cfg.d_v, generator=torch.Generator().manual_seed(4))
    fa = feature_attribution(model, sae, tokens, POSITIONS[0], initial_state=S0)
    assert fa.writes.shape == (2, 4, 32, T) and fa.positions.tolist() == [POSITIONS[0].tolist()] * 2
    _, cache = model.run_with_cache(tokens, names_filter=sae.cfg.metadata.hook_name, initial_states={1: S0})
    S = cache[sae.cfg.metadata.hook_name][:, POSITIONS[0], 1]
    with torch.no_grad():
        ref = sae.autoencode(S).pre.view(2, 4, 32)
    assert_rel(fa.total(), ref, ref)
    assert_rel(fa.pre_activation, ref, ref)
    assert fa.initial.abs().amax() > 1e-3 * ref.abs().amax()


def test_clear_errors():
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model)
    sae = WriteSAE(8, 8, 32)
    with pytest.raises(ValueError, match=r"sae.cfg.metadata: expected 'hook_name' and 'head'"):
        feature_attribution(model, sae, tokens, [3])
    sae.cfg.metadata.update(hook_name="blocks.1.mixer.hook_read", head=0)
    with pytest.raises(ValueError, match=r"hook_name: expected 'blocks.\{layer\}.mixer.hook_state'"):
        feature_attribution(model, sae, tokens, [3])
    sae.cfg.metadata.update(hook_name="blocks.1.mixer.hook_state", head=9)
    with pytest.raises(ValueError, match=r"metadata\['head'\]: expected an int in \[0, 4\) for .*hook_state, got 9"):
        feature_attribution(model, sae, tokens, [3])
    sae.cfg.metadata.update(head=0)
    with pytest.raises(ValueError, match=r"features: expected indices in \[0, 32\), got min 0 and max 32"):
        feature_attribution(model, sae, tokens, [3], features=[0, 32])
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 29\)"):
        feature_attribution(model, sae, tokens, [29])
    with pytest.raises(ValueError, match=r"sae: expected d_k=8, d_v=8 \(the model's state\), got d_k=4, d_v=8"):
        feature_attribution(model, WriteSAE(4, 8, 32, metadata={"hook_name": "blocks.1.mixer.hook_state", "head": 0}),
                            tokens, [3])


@pytest.mark.parametrize("hook", ["hook_state", "hook_write"])
def test_features_in_chunks_give_the_same_terms(monkeypatch, hook):
    import recurrent_lens.analysis.attribution as attribution

    model = tiny_model("delta_net")
    tokens = tokens_for(model, seed=5)
    sae = make_sae(model, "flat_gated", hook)
    whole = feature_attribution(model, sae, tokens, POSITIONS, features=FEATURES)
    monkeypatch.setattr(attribution, "FEATURE_CHUNK_ELEMENTS", 1)  # one feature per chunk
    chunked = feature_attribution(model, sae, tokens, POSITIONS, features=FEATURES)
    for name in ("writes", "initial", "bias", "pre_activation"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-6, atol=1e-7)
