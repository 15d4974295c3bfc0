"""The JumpReLU rule and its straight-through gradients, by hand."""

import torch

from recurrent_lens.sae.sparsities.jumprelu import jumprelu, jumprelu_l0

def test_jumprelu_ste_gradients_by_hand():
    h = 0.1
    theta = torch.tensor([0.5, 1.0])
    log_t = theta.log().clone().requires_grad_(True)
    z = torch.tensor([[0.52, 0.2], [0.9, 1.04], [0.3, 2.0]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    a = jumprelu(z, log_t, h)
    torch.testing.assert_close(a.detach(), torch.tensor([[0.52, 0.0], [0.9, 1.04], [0.0, 2.0]]))
    (a * g).sum().backward()
    assert z.grad.tolist() == [[1.0, 0.0], [3.0, 4.0], [0.0, 6.0]]  # g * 1[z > theta]
    # Only (0.52 vs 0.5) and (1.04 vs 1.0) fall inside the kernel |z - theta| <= h/2.
    expected = torch.tensor([-(0.5 / h) * 1.0 * 0.5, -(1.0 / h) * 4.0 * 1.0])
    torch.testing.assert_close(log_t.grad, expected)

    log_t.grad = None
    z.grad = None
    l0 = jumprelu_l0(z, log_t, h)
    assert l0.tolist() == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    (l0 * g).sum().backward()
    assert z.grad is None
    torch.testing.assert_close(log_t.grad, torch.tensor([-(1 / h) * 1.0 * 0.5, -(1 / h) * 4.0 * 1.0]))
