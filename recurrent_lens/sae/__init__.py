"""Sparse autoencoders for matrix-valued recurrent states: WriteSAE and its Flat, Matrix and Bilinear variants.

Importing this package does not import the model package: SAEs work on any ``[..., d_k, d_v]``
tensor and attach to any transformer_lens ``HookedRootModule`` whose hook gives
``[batch, pos, head, d_k, d_v]``.

Example:
    >>> import torch
    >>> from recurrent_lens.sae import WriteSAE
    >>> sae = WriteSAE(d_k=4, d_v=4, n_features=32, k=4)
    >>> out = sae(torch.randn(8, 4, 4))
    >>> out.reconstruction.shape
    torch.Size([8, 4, 4])
"""

from recurrent_lens.sae.attach import add_sae, reset_saes, saes
from recurrent_lens.sae.base import SAE, SAEOutput
from recurrent_lens.sae.config import SAEConfig
from recurrent_lens.sae.io import from_reference_checkpoint, load
from recurrent_lens.sae.presets import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE
from recurrent_lens.sae.registry import SAE_REGISTRY, register_sae_class
from recurrent_lens.sae.sparsities import register_sparsity
from recurrent_lens.sae.trainer import MultiCellTrainer, SAETrainer, train, train_cells
from recurrent_lens.sae.training import TrainConfig, TrainLog

__all__ = [
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "SAE_REGISTRY",
    "register_sae_class",
    "register_sparsity",
    "WriteSAE",
    "FlatSAE",
    "MatrixSAE",
    "BilinearSAE",
    "load",
    "from_reference_checkpoint",
    "add_sae",
    "reset_saes",
    "saes",
    "train",
    "train_cells",
    "SAETrainer",
    "MultiCellTrainer",
    "TrainConfig",
    "TrainLog",
]
