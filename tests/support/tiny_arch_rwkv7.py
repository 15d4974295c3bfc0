"""A tiny random recurrent_lens RWKV-7 for tests that need one (SAEs, analysis, tutorials), and a tiny fla one."""

from __future__ import annotations

from unittest import mock

import torch

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


FLA_VOCAB = 97


def tiny_fla_rwkv7(seed: int = 0, fuse_norm: bool = True, value_dim: int | None = None):
    """A tiny perturbed fla RWKV-7: 3 layers (v_first reaches two), 4 heads of d_k 16.

    fla's own initialiser cannot build ``value_dim`` ≠ ``hidden_size`` (it writes a ``hidden_size``-long
    bias into the ``value_dim``-wide ``v_lora``), so that variant starts from the plain init instead;
    the perturbation makes every weight random either way."""
    from fla.layers.rwkv7 import RWKV7Attention
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    cfg = RWKV7Config(hidden_size=64, num_hidden_layers=3, head_dim=16, value_dim=value_dim, hidden_ratio=1.5,
                      decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=16,
                      vocab_size=FLA_VOCAB, fuse_norm=fuse_norm, norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if value_dim is None:
        ref = RWKV7ForCausalLM(cfg)
    else:
        with mock.patch.object(RWKV7Attention, "_initialize_weights", lambda self, module: None):
            ref = RWKV7ForCausalLM(cfg)
    return perturb_(ref, 0.1, seed).eval()
