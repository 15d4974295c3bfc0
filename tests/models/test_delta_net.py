"""DeltaNet against fla's DeltaNetForCausalLM (CPU torch patch), an independent recurrence and the
reference parameter count."""

import pytest
import torch
from tests.support.fla_cpu import patch_fla_for_cpu
from tests.support.tiny_arch_fla import (  # noqa: F401 (single_thread: autouse fixture)
    VOCAB, assert_greedy_generate_matches, assert_logits_match,
    fla_delta_net, reference_and_loaded, single_thread, tiny_delta_net,
)

from recurrent_lens import HookedRecurrentModel
from recurrent_lens.models.delta_net import config_from_fla

COMBOS = {
    "silu-l2-beta": {},
    "gate-nobeta-elu-sum-negeig": dict(use_gate=True, use_beta=False, qk_activation="elu", qk_norm="sum",
                                       allow_neg_eigval=True),
    "noconv-relu-expandv": dict(use_short_conv=False, qk_activation="relu", expand_v=2),
    "identity-beta-negeig": dict(qk_activation="identity", allow_neg_eigval=True),
}


@pytest.fixture(scope="module", params=list(COMBOS), ids=list(COMBOS))
def models(request, tmp_path_factory):
    yield from reference_and_loaded(fla_delta_net, tmp_path_factory, "delta_net", seed=2,
                                    **COMBOS[request.param])


def test_logits_match_fla(models):
    assert_logits_match(*models, 77)


def test_greedy_generate_matches_fla(models):
    assert_greedy_generate_matches(*models, 9, 10)


def test_hook_state_equals_independent_recurrence(models):
    _, model = models
    mixer = model.blocks[1].mixer
    tokens = torch.randint(0, VOCAB, (2, 40))
    names = ["q", "k", "v", "write", "state", "read"] + (["beta"] if mixer.has_beta else [])
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.1.mixer.hook_{n}" for n in names])
    c = {n: cache[f"blocks.1.mixer.hook_{n}"] for n in names}
    q, k, v = c["q"], c["k"], c["v"]
    B, T, H, dk = k.shape
    if mixer.has_beta:
        beta = c["beta"]
    else:
        beta = torch.full((B, T, H), 2.0 if model.cfg.options["allow_neg_eigval"] else 1.0)
    S = torch.zeros(B, H, dk, v.shape[-1])
    for t in range(T):
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        torch.testing.assert_close(c["state"][:, t], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c["read"][:, t], torch.einsum("bhkv,bhk->bhv", S, q[:, t]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["write"], beta[..., None, None] * k[..., :, None] * v[..., None, :])
    sv = torch.linalg.svdvals(c["write"])  # [B, T, H, min(dk, dv)]
    assert (sv[..., 1] <= 1e-5 * sv[..., 0].clamp_min(1e-12)).all(), "each head's write must be rank 1"
    assert not hasattr(mixer, "hook_decay")
    assert hasattr(mixer, "hook_beta") == (model.cfg.options["use_beta"])


def test_has_beta_is_per_instance():
    with_beta, without = tiny_delta_net(n_layers=1), tiny_delta_net(n_layers=1, use_beta=False)
    assert with_beta.blocks[0].mixer.has_beta and hasattr(with_beta.blocks[0].mixer, "hook_beta")
    assert not without.blocks[0].mixer.has_beta and not hasattr(without.blocks[0].mixer, "hook_beta")
    assert "in_proj_b" not in dict(without.blocks[0].mixer.named_children())


def test_tiny_builder_prefill_decode_matches_forward():
    model = tiny_delta_net()
    tokens = torch.randint(0, VOCAB, (2, 30))
    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, :20], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_bad_option_is_named():
    with pytest.raises(ValueError, match="qk_activation"):
        tiny_delta_net(qk_activation="tanh")


def test_delta_net_1_3b_parameter_count_on_meta():
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    hf = DeltaNetConfig(hidden_size=2048, num_hidden_layers=24, num_heads=16, expand_k=1, expand_v=1, conv_size=4,
                        use_gate=False, use_beta=True, qk_activation="silu", qk_norm="l2", vocab_size=32000,
                        norm_eps=1e-6, hidden_ratio=4, tie_word_embeddings=False)
    with torch.device("meta"):
        ours = HookedRecurrentModel(config_from_fla(hf.to_dict()))
        with patch_fla_for_cpu():
            ref = DeltaNetForCausalLM(hf)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref
    assert round(n_ref / 1e6) == 1366
