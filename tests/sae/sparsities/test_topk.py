"""The TopK rule against hand-set cases."""

import torch

from recurrent_lens.sae import WriteSAE
from recurrent_lens.sae.sparsities.topk import topk

D_K, D_V = 3, 2


def test_topk_keeps_k_and_relu_after_selection():
    pre = torch.tensor([[3.0, -1.0, 2.0, -0.5, 1.0], [-3.0, -1.0, -2.0, -0.5, 0.25]])
    values, indices = topk(pre, 3)
    acts = torch.zeros_like(pre).scatter(1, indices, values)
    assert acts[0].tolist() == [3.0, 0.0, 2.0, 0.0, 1.0]
    # Row 2: the winners are 0.25, -0.5, -1.0; ReLU after selection leaves one active feature.
    assert acts[1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.25]
    assert topk(pre, 99)[0].shape == (2, 5)
    sae = WriteSAE(D_K, D_V, 64, k=5)
    acts = sae.encode(torch.randn(50, D_K, D_V))
    assert ((acts > 0).sum(-1) <= 5).all() and (acts >= 0).all()


def test_topk_gradient_only_to_selected():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5]], requires_grad=True)
    values, indices = topk(pre, 2)
    values.sum().backward()
    assert pre.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]
