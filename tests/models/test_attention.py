"""Softmax attention of the hybrids: rotary position embedding, the pattern (causal, rows summing to one) and
the hooked-pattern path against the fused kernel."""

import math

import torch
from tests.support.helpers import tiny_model

from recurrent_lens.models.attention import apply_rope


def test_rope_rotates_the_first_rotary_dims_by_position():
    x = torch.randn(2, 5, 3, 8)
    positions = torch.arange(5)
    out = apply_rope(x, positions, rotary_dim=4, theta=10000.0)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: no rotation
    assert torch.equal(out[..., 4:], x[..., 4:])  # past rotary_dim: untouched
    torch.testing.assert_close(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))
    # dims i and i + rotary_dim / 2 rotate together, by position · theta^(-2i / rotary_dim)
    angle = 3 * 10000.0 ** (-2 / 4)
    a, b = x[:, 3, :, 1], x[:, 3, :, 3]
    torch.testing.assert_close(out[:, 3, :, 1], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(out[:, 3, :, 3], b * math.cos(angle) + a * math.sin(angle))


def test_rope_scores_depend_only_on_the_distance():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(p, s):
        return float((apply_rope(q, torch.tensor([p]), 8, 100.0) * apply_rope(k, torch.tensor([s]), 8, 100.0)).sum())

    assert math.isclose(score(7, 4), score(3, 0), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(score(12, 2), score(10, 0), rel_tol=1e-4, abs_tol=1e-5)


def test_hooked_pattern_path_equals_the_fused_kernel():
    model = tiny_model("qwen3_5_hybrid")
    attn = model.blocks[1].attn
    x = torch.randn(2, 6, model.cfg.d_model)
    fused = attn(x)
    patterns = []
    attn.hook_pattern.add_hook(lambda p, hook: patterns.append(p))
    try:
        hooked = attn(x)
    finally:
        attn.hook_pattern.remove_hooks()
    torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-6)
    (pattern,) = patterns
    assert pattern.shape == (2, attn.n_heads, 6, 6)


def test_remove_batch_dim_and_attention_pattern(with_tokenizer):
    model = with_tokenizer
    tokens = torch.randint(0, 97, (1, 7))
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True, pos_slice=-1)
    assert cache["blocks.0.mixer.hook_state"].shape == (1, 4, 8, 12)
    assert cache["blocks.3.attn.hook_pattern"].shape == (4, 1, 7)
    _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.3.attn.hook_pattern"][0]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 7))
    assert (pattern.triu(1) == 0).all()
