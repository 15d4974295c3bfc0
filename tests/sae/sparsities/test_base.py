"""What every sparsity inherits from ``Sparsity`` and ``SparsityOptions``: the plain ``b_enc`` bias (its affine
map, its folding, its SAELens tensor), the options it reads, bounded counts, and the methods a new sparsity must
write."""

import dataclasses

import pytest
import torch

from recurrent_lens.sae import SAEConfig, WriteSAE
from recurrent_lens.sae.sparsities import Sparsity, SparsityOptions, TopK
from recurrent_lens.sae.sparsities.topk import TopKOptions


def test_options_resolve_to_themselves_and_refuse_nothing():
    options = SparsityOptions()
    assert options.resolved(n_features=8) is options and options.check(None) is None
    assert Sparsity.option_names() == () and TopK.option_names() == ("k", "k_aux", "aux_coef")
    assert TopK.option_names() == tuple(f.name for f in dataclasses.fields(TopKOptions))


def test_the_plain_bias_is_the_affine_map_the_fold_and_the_saelens_tensor():
    torch.manual_seed(0)
    sae = WriteSAE(4, 3, 8, k=2)
    with torch.no_grad():
        sae.b_enc.normal_()
    b_enc = sae.b_enc.detach().clone()
    scale, bias = sae.sparsity.pre_affine()
    assert scale is None and bias is sae.b_enc
    S = torch.randn(5, 4, 3)
    torch.testing.assert_close(sae.autoencode(S).pre, sae._project((S - sae.mean).reshape(5, -1)) + b_enc)
    norms = torch.arange(1.0, 9.0)
    sae.sparsity.fold(norms)
    torch.testing.assert_close(sae.b_enc.detach(), b_enc * norms)
    assert TopK.saelens_tensors("topk") == ("b_enc",)


def test_bounded_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        SAEConfig(d_k=4, d_v=3, n_features=8, k=0)
    with pytest.raises(ValueError, match="k_aux must be >= 0, got -1"):
        SAEConfig(d_k=4, d_v=3, n_features=8, k_aux=-1)


def test_a_sparsity_must_write_its_rule_loss_and_conversions():
    part = Sparsity(WriteSAE(4, 3, 8, k=2))
    shared = torch.zeros(2, 8)
    for call in (lambda: part.activate(shared, (2,)), lambda: part.aux_loss(None, torch.zeros(8, dtype=torch.bool)),
                 lambda: part.to_saelens(torch.zeros(8)),
                 lambda: Sparsity.from_saelens("topk", {}, {}, "cfg.json")):
        with pytest.raises(NotImplementedError):
            call()
