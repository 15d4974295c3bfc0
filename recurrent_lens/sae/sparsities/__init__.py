"""The sparsities of the SAE family, one module each, registered by name.

=====================  ===========  ===============================  ====================================
module                 ``kind``     config fields                    SAELens architecture (export / read)
=====================  ===========  ===============================  ====================================
:mod:`.topk`           topk         ``k``, ``k_aux``, ``aux_coef``   ``topk`` / ``topk``
:mod:`.batchtopk`      batchtopk    as topk                          none (codes depend on the batch)
:mod:`.jumprelu`       jumprelu     ``jumprelu_init_threshold``,     ``jumprelu`` / ``jumprelu``,
                                    ``jumprelu_bandwidth``,          ``standard`` (threshold 0)
                                    ``l0_coef``
:mod:`.gated`          gated        ``gate_temperature``,            ``gated`` (``gate_mode="hard"``)
                                    ``gate_mode``,                   / ``gated``
                                    ``gated_sparsity_coef``,
                                    ``gated_aux_coef``
=====================  ===========  ===============================  ====================================

A new sparsity is one module: a :class:`~recurrent_lens.sae.sparsities.base.Sparsity` subclass with its
``kind``, its :class:`~recurrent_lens.sae.sparsities.base.SparsityOptions` and (optionally) its SAELens
conversion, registered with :func:`register_sparsity`; importing this package imports the built-in ones.

Example:
    >>> from recurrent_lens.sae.sparsities import get_sparsity, sparsities
    >>> sorted(sparsities()), get_sparsity("topk").Options().resolved(n_features=8).k
    (['batchtopk', 'gated', 'jumprelu', 'topk'], 8)
"""

# Registration order is the order of the sparsities' fields in a config's to_dict().
from recurrent_lens.sae.sparsities import topk, batchtopk, jumprelu, gated  # noqa: F401
from recurrent_lens.sae.sparsities.base import Sparsity, SparsityOptions
from recurrent_lens.sae.sparsities.batchtopk import BatchTopK
from recurrent_lens.sae.sparsities.gated import Gated
from recurrent_lens.sae.sparsities.jumprelu import JumpReLU
from recurrent_lens.sae.sparsities.registry import get_sparsity, register_sparsity, sparsities
from recurrent_lens.sae.sparsities.topk import TopK

__all__ = ["Sparsity", "SparsityOptions", "TopK", "BatchTopK", "JumpReLU", "Gated", "register_sparsity",
           "get_sparsity", "sparsities"]
