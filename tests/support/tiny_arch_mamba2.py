"""A tiny random recurrent_lens Mamba-2, for tests parametrised over architectures."""

from __future__ import annotations

import torch
from tests.support.helpers import perturb_

from recurrent_lens import HookedRecurrentModel, ModelConfig


def tiny_mamba2(seed: int = 0, n_layers: int = 2, **overrides) -> HookedRecurrentModel:
    """A perturbed tiny Mamba-2: 4 heads in 2 groups, d_state 6 × head_dim 8, tied head, fp32 residual.

    Δ is initialised in [0.1, 1] (instead of mamba's [0.001, 0.1]) so that writes and decays are large
    enough for edits to move the logits visibly.
    """
    kw = dict(architecture="mamba2", d_model=32, n_layers=n_layers, d_vocab=61, n_heads=4, n_key_heads=2,
              d_k=6, d_v=8, d_mlp=0, norm_eps=1e-5, tie_embeddings=True, residual_in_fp32=True, chunk_size=16)
    kw.update(overrides)
    model = HookedRecurrentModel.from_config(ModelConfig(**kw), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            dt = torch.empty(block.mixer.dt_bias.shape).uniform_(0.1, 1.0, generator=g)
            block.mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return perturb_(model, 0.1, seed).eval()
