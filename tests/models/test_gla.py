"""GLA against fla's GLAForCausalLM (CPU torch patch), an independent recurrence and the reference
parameter count."""

import pytest
import torch
from tests.support.fla_cpu import patch_fla_for_cpu
from tests.support.tiny_arch_fla import (  # noqa: F401 (single_thread: autouse fixture)
    VOCAB, assert_greedy_generate_matches, assert_logits_match,
    fla_gla, reference_and_loaded, single_thread, tiny_gla,
)

from recurrent_lens import HookedRecurrentModel
from recurrent_lens.models.gla import config_from_fla

COMBOS = {
    # gla-1.3B's settings: no conv, no feature map, fused norm+gate, attn_mode fused_chunk; plus GQA
    "gqa-fused_chunk": dict(num_kv_heads=2, attn_mode="fused_chunk"),
    "conv-unfused-relu-clamp": dict(use_short_conv=True, fuse_norm=False, feature_map="relu", clamp_min=-0.05,
                                    expand_k=1.0, expand_v=2.0),
    "nogate": dict(use_output_gate=False, num_kv_heads=1),
}


@pytest.fixture(scope="module", params=list(COMBOS), ids=list(COMBOS))
def models(request, tmp_path_factory):
    yield from reference_and_loaded(fla_gla, tmp_path_factory, "gla", seed=3,
                                    **COMBOS[request.param])


def test_logits_match_fla(models):
    assert_logits_match(*models, 77)


def test_greedy_generate_matches_fla(models):
    # prompts stay <= 64 tokens: fla prefills them with fused_recurrent_gla, whose cache layout (V×K) its
    # decode step expects; a longer prompt under attn_mode="fused_chunk" would cache K×V (an fla quirk)
    assert_greedy_generate_matches(*models, 9, 10)


def test_hook_state_equals_independent_recurrence(models):
    _, model = models
    tokens = torch.randint(0, VOCAB, (2, 40))
    names = ["q", "k", "v", "decay", "write", "state", "read"]
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.1.mixer.hook_{n}" for n in names])
    c = {n: cache[f"blocks.1.mixer.hook_{n}"] for n in names}
    q, k, v, gk = c["q"], c["k"], c["v"], c["decay"]
    B, T, H, dk = k.shape
    assert gk.shape == (B, T, H, dk) and (gk <= 0).all()
    S = torch.zeros(B, H, dk, v.shape[-1])
    for t in range(T):
        S = S * gk[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        torch.testing.assert_close(c["state"][:, t], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c["read"][:, t], torch.einsum("bhkv,bhk->bhv", S, q[:, t]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["write"], k[..., :, None] * v[..., None, :])
    sv = torch.linalg.svdvals(c["write"])
    assert (sv[..., 1] <= 1e-5 * sv[..., 0].clamp_min(1e-12)).all(), "each head's write must be rank 1"
    mixer = model.blocks[1].mixer
    assert not hasattr(mixer, "hook_beta") and not hasattr(mixer, "hook_erase")


def test_gqa_heads_share_keys_values_and_decay():
    model = tiny_gla(n_layers=1)
    names = ["k", "v", "decay"]
    _, cache = model.run_with_cache(torch.randint(0, VOCAB, (1, 12)),
                                    names_filter=[f"blocks.0.mixer.hook_{n}" for n in names])
    for n in names:
        x = cache[f"blocks.0.mixer.hook_{n}"]  # 4 heads from 2 kv heads: (0, 1) and (2, 3) are equal
        assert torch.equal(x[:, :, 0], x[:, :, 1]) and torch.equal(x[:, :, 2], x[:, :, 3])
        assert not torch.equal(x[:, :, 1], x[:, :, 2])


def test_tiny_builder_prefill_decode_matches_forward():
    model = tiny_gla()
    tokens = torch.randint(0, VOCAB, (2, 30))
    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, :20], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_gla_1_3b_parameter_count_on_meta():
    from fla.models import GLAConfig, GLAForCausalLM

    hf = GLAConfig(hidden_size=2048, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1, attn_mode="fused_chunk",
                   use_short_conv=False, feature_map=None, use_output_gate=True, vocab_size=32000, norm_eps=1e-6,
                   hidden_ratio=4, tie_word_embeddings=False)
    with torch.device("meta"):
        ours = HookedRecurrentModel(config_from_fla(hf.to_dict()))
        with patch_fla_for_cpu():
            ref = GLAForCausalLM(hf)
    assert (ours.cfg.d_k, ours.cfg.d_v) == (256, 512)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref
    assert round(n_ref / 1e6) == 1366
