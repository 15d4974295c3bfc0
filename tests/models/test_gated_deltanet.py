"""Gated DeltaNet against transformers' Qwen3.5 torch path and an independent token-by-token recurrence."""

import pytest
import torch
from tests.support.helpers import tiny_gdn, tiny_qwen3_5

from recurrent_lens import HookedRecurrentModel


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    ref = tiny_qwen3_5()
    path = tmp_path_factory.mktemp("qwen")
    ref.save_pretrained(path)
    return ref, HookedRecurrentModel.from_pretrained(path)


def test_qwen3_5_logits_match_transformers(qwen):
    ref, model = qwen
    tokens = torch.randint(0, 97, (2, 107))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens)
    assert (got - expected).abs().max() < 1e-4


def test_qwen3_5_greedy_generate_matches_transformers(qwen):
    ref, model = qwen
    prompt = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_hook_state_equals_independent_recurrence():
    model = tiny_gdn(n_layers=1)
    tokens = torch.randint(0, 61, (2, 37))
    names = ["q", "k", "v", "beta", "decay", "write", "state", "read"]
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.0.mixer.hook_{n}" for n in names])
    c = {n: cache[f"blocks.0.mixer.hook_{n}"] for n in names}
    q, k, v, beta, g = c["q"], c["k"], c["v"], c["beta"], c["decay"]
    S = torch.zeros(2, 4, 8, 8)
    for t in range(37):
        S = S * g[:, t].exp()[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        torch.testing.assert_close(c["state"][:, t], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c["read"][:, t], torch.einsum("bhkv,bhk->bhv", S, q[:, t]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["write"], beta[..., None, None] * k[..., :, None] * v[..., None, :])
    # keys and queries are unit-norm (queries scaled by d_k^-1/2) as the recurrence uses them
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 37, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(q.norm(dim=-1), torch.full((2, 37, 4), 8**-0.5), atol=1e-3, rtol=0)


def test_qwen3_5_0_8b_instantiates_on_meta_with_reference_parameter_count():
    """Qwen3.5-0.8B's text model (its reference config, tied head) has 752 M parameters."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from recurrent_lens.models.gated_deltanet import config_from_qwen3_5

    ref_cfg = Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, tie_word_embeddings=True,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    )
    with torch.device("meta"):
        ref = Qwen3_5ForCausalLM(ref_cfg)
        ours = HookedRecurrentModel(config_from_qwen3_5(ref_cfg.to_dict()))
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref and round(n_ours / 1e6) == 752
    assert ours.cfg.layer_types.count("attention") == 6 and ours.cfg.rotary_dim == 64
