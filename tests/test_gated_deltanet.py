"""Gated DeltaNet against transformers' Qwen3.5 torch path and an independent token-by-token recurrence."""

import pytest
import torch
from helpers import tiny_gdn, tiny_qwen3_5

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
    got = model.generate(prompt, max_new_tokens=12)
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
