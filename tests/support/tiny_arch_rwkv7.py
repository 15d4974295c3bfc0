"""A tiny random recurrent_lens RWKV-7 for tests that need one (SAEs, analysis, tutorials)."""

from __future__ import annotations

from tests.support.helpers import perturb_

from recurrent_lens import HookedRecurrentModel, ModelConfig


def tiny_rwkv7(seed: int = 0, n_layers: int = 3, **overrides) -> HookedRecurrentModel:
    """A perturbed random RWKV-7: 2 heads × (d_k 16, d_v 16), LoRA ranks 8, ReLU² MLP, v_first from layer 0."""
    kw = dict(architecture="rwkv7", d_model=32, n_layers=n_layers, d_vocab=61, n_heads=2, d_k=16, d_v=16,
              d_mlp=64, mlp="relu2", norm="layer", norm_eps=1e-5, conv_kernel=0, chunk_size=16,
              options={"decay_low_rank_dim": 8, "a_low_rank_dim": 8, "v_low_rank_dim": 8, "gate_low_rank_dim": 8})
    kw.update(overrides)
    model = HookedRecurrentModel.from_config(ModelConfig(**kw), seed=seed)
    return perturb_(model, 0.1, seed).eval()
