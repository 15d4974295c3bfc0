"""The chunked DPLR form against DPLRRule's token-by-token scan: outputs, states, gradients, a whole model."""

import math

import pytest
import torch
import torch.nn.functional as F

from recurrent_lens.models.scan import (DPLRRule, RecurrenceInputs, chunked_scan, dplr_chunked, materialized_scan,
                                        recurrent_scan)


def rwkv_like_inputs(B, T, H, dk, dv, seed=0, requires_grad=False):
    """Inputs in RWKV-7's ranges: w ∈ (−e^{−1/2}, 0), unit κ, a ∈ (0, 1), r and k of either sign."""
    g = torch.Generator().manual_seed(seed)
    x = RecurrenceInputs(
        q=torch.randn(B, T, H, dk, generator=g), k=torch.randn(B, T, H, dk, generator=g) * 0.5,
        v=torch.randn(B, T, H, dv, generator=g),
        decay=-math.exp(-0.5) * torch.rand(B, T, H, dk, generator=g),
        extra={"erase_key": F.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1),
               "a": torch.rand(B, T, H, dk, generator=g)})
    if requires_grad:
        x = x.map(lambda t: t.clone().requires_grad_(True))
    return x, torch.randn(B, H, dk, dv, generator=g)


@pytest.mark.parametrize("T,chunk", [(64, 16), (50, 16), (130, 64), (7, 8)], ids=lambda p: str(p))
def test_chunked_matches_recurrent(T, chunk):
    x, S0 = rwkv_like_inputs(2, T, 3, 8, 6)
    ref = recurrent_scan(DPLRRule(), x, S0, keep_states=True)
    fast = chunked_scan(DPLRRule(), x, S0, chunk)
    torch.testing.assert_close(fast.o, ref.o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.final_state, ref.final_state, atol=1e-5, rtol=1e-5)
    full = materialized_scan(DPLRRule(), x, S0, chunk)
    torch.testing.assert_close(full.states, ref.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.erases, ref.erases, atol=1e-5, rtol=1e-5)


def test_boundary_states_are_the_states_before_each_chunk():
    x, S0 = rwkv_like_inputs(1, 48, 2, 8, 8, seed=1)
    ref = recurrent_scan(DPLRRule(), x, S0, keep_states=True)
    _, _, bounds = dplr_chunked(x, S0, 16)
    torch.testing.assert_close(bounds[:, 0], S0)
    torch.testing.assert_close(bounds[:, 1:], ref.states[:, [15, 31]], atol=1e-5, rtol=1e-5)


def test_gradients_match_recurrent():
    x, S0 = rwkv_like_inputs(1, 40, 2, 8, 8, seed=2, requires_grad=True)
    S0.requires_grad_(True)
    leaves = [*x.tensors().values(), S0]
    ref = recurrent_scan(DPLRRule(), x, S0)
    expected = torch.autograd.grad((ref.o.square().sum() + ref.final_state.sum()), leaves)
    fast = chunked_scan(DPLRRule(), x, S0, 16)
    got = torch.autograd.grad((fast.o.square().sum() + fast.final_state.sum()), leaves)
    for name, e, g in zip([*x.tensors(), "S0"], expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=name)


def test_refuses_decay_beyond_fp32_range():
    x, S0 = rwkv_like_inputs(1, 32, 1, 4, 4)
    x.decay = torch.full_like(x.decay, -3.0)
    with pytest.raises(ValueError, match="cumulative log-decay"):
        dplr_chunked(x, S0, 32)
