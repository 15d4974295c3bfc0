"""The BatchTopK rule against hand-set cases."""

import torch

from recurrent_lens.sae import WriteSAE
from recurrent_lens.sae.sparsities.batchtopk import batch_topk
from recurrent_lens.sae.sparsities.topk import topk

D_K, D_V = 3, 2


def test_batchtopk_keeps_k_times_batch():
    pre = torch.randn(8, 32).abs() + 0.1
    values, feat, sample = batch_topk(pre, 3)
    assert len(values) == 24
    dense = torch.zeros_like(pre).index_put((sample, feat), values)
    assert int((dense > 0).sum()) == 24
    threshold = values.min()
    assert int((pre >= threshold).sum()) == 24
    torch.testing.assert_close(dense, torch.where(pre >= threshold, pre, torch.zeros_like(pre)))
    one = torch.randn(1, 32)
    v1, f1, _ = batch_topk(one, 4)
    v2, f2 = topk(one, 4)
    assert sorted(f1.tolist()) == sorted(f2[0].tolist())
    sae = WriteSAE(D_K, D_V, 64, k=4, sparsity="batchtopk")
    acts = sae.encode(torch.randn(16, D_K, D_V))
    assert int((acts > 0).sum()) == 64
