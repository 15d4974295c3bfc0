"""BatchTopK: the ``k * n`` largest ReLU'd pre-activations over a batch of ``n`` samples (the same rule
at inference), with TopK's config fields and auxiliary loss.

Codes depend on the batch composition, so SAELens (whose inference SAEs code each sample alone) has no
equivalent: exporting one is refused.

Example:
    >>> import torch
    >>> from recurrent_lens.sae import WriteSAE
    >>> acts = WriteSAE(4, 3, 8, k=2, sparsity="batchtopk").encode(torch.randn(5, 4, 3))
    >>> int((acts > 0).sum()) <= 2 * 5
    True
"""

import torch
from jaxtyping import Float, Int

from recurrent_lens.sae.parts import Code, SegmentCode
from recurrent_lens.sae.sparsities.registry import register_sparsity
from recurrent_lens.sae.sparsities.topk import TopK

__all__ = ["batch_topk", "BatchTopK"]


def batch_topk(
    pre: Float[torch.Tensor, "n n_features"], k: int
) -> tuple[Float[torch.Tensor, " m"], Int[torch.Tensor, " m"], Int[torch.Tensor, " m"]]:
    """Keep the ``k * n`` largest ReLU'd pre-activations over the whole batch.

    Returns ``(values, feature_index, sample_index)`` of the ``m = min(k * n, n * n_features)``
    kept entries, sorted by sample so that downstream segment sums stay cache friendly. Codes
    depend on batch composition; with ``n == 1`` this equals :func:`~recurrent_lens.sae.sparsities.topk.topk`.

    Example:
        >>> import torch
        >>> values, feat, sample = batch_topk(torch.tensor([[3.0, 0.0], [2.0, 1.0]]), k=1)
        >>> values.tolist(), feat.tolist(), sample.tolist()
        ([3.0, 2.0], [0, 0], [0, 1])
    """
    n, n_features = pre.shape
    flat = pre.relu().reshape(-1)
    values, flat_index = flat.topk(min(k * n, flat.numel()), sorted=False)
    flat_index, order = flat_index.sort()
    return values[order], flat_index % n_features, flat_index // n_features


class BatchTopK(TopK):
    """The ``k * n`` largest ReLU'd pre-activations over the batch (the same rule at inference)."""

    kind = "batchtopk"
    saelens_architecture = None
    saelens_reads = ()
    saelens_refusal = ("BatchTopK codes depend on the whole batch (SAELens saves its BatchTopK SAEs as JumpReLU "
                       "with a threshold learned in training, which this SAE does not have)")

    def _select(self, pre: torch.Tensor) -> Code:
        values, indices, sample = batch_topk(pre, self.cfg.k)
        return SegmentCode(pre.new_zeros(pre.shape).index_put((sample, indices), values), values, indices, sample)


register_sparsity(BatchTopK)
