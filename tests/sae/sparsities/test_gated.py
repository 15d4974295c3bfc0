"""The gated activation and its gradients, by hand."""

import pytest
import torch

from recurrent_lens.sae.sparsities.gated import gated

@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gated_gradients_by_hand(mode):
    T = 0.1
    gate = torch.tensor([[0.05, -0.2]], requires_grad=True)
    mag = torch.tensor([[2.0, 3.0]], requires_grad=True)
    acts, g = gated(gate, mag, T, mode)
    acts.sum().backward()
    s = torch.sigmoid(gate.detach() / T)
    expected_g = s if mode == "soft" else (gate.detach() > 0).float()
    torch.testing.assert_close(acts.detach(), expected_g * mag.detach())
    torch.testing.assert_close(gate.grad, s * (1 - s) / T * mag.detach())
    torch.testing.assert_close(mag.grad, expected_g)
