"""What the analysis tests share: tiny models and SAEs, random tokens, the hook-based reference edit of a state,
a hand-built model whose state-to-logit map is exactly linear, and the feature-attribution sites."""

from __future__ import annotations

import torch
from tests.support.helpers import tiny_gdn
from tests.support.tiny_arch_mamba2 import tiny_mamba2
from torch import nn

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models.mixer import MatrixMixer
from recurrent_lens.models.registry import Architecture, register_architecture
from recurrent_lens.models.scan import LinearRule, RecurrenceInputs
from recurrent_lens.sae import WriteSAE

HOOK = "blocks.1.mixer.hook_state"
MODELS = {"gated_deltanet": lambda: tiny_gdn(0), "mamba2": lambda: tiny_mamba2(0)}


def _tokens(model, B=3, T=12, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _sae(model, seed=0, n=24, k=3):
    torch.manual_seed(seed)
    return WriteSAE(model.cfg.d_k, model.cfg.d_v, n, k=k)


def _hook_edit_logits(model, tokens, layer, head, b, t, S_new):
    """Independent reference: replace S_t through the hook (replacement semantics) and rerun."""
    def edit(x, hook):
        x = x.clone()
        x[b, t, head] = S_new
        return x

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mixer.hook_state", edit)])


class LinearAttentionMixer(MatrixMixer):
    """A hand-built mixer whose state-to-logit map is exactly linear: S_t = e^{g} S_{t-1} + k vᵀ,
    out = W_O (S_tᵀ q). No norm, no gate, no erase term."""

    rule = LinearRule()
    has_beta = False

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        H, dk, dv = cfg.n_heads, cfg.d_k, cfg.d_v
        self.qkv = nn.Linear(cfg.d_model, H * (2 * dk + dv), bias=False)
        self.gate = nn.Linear(cfg.d_model, H * dk)
        self.out_proj = nn.Linear(H * dv, cfg.d_model, bias=False)

    def project(self, x, cache, ctx):
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.d_k, self.d_v
        q, k, v = self.qkv(x).split([H * dk, H * dk, H * dv], -1)
        g = -torch.nn.functional.softplus(self.gate(x)).reshape(B, T, H, dk) * 0.3
        return RecurrenceInputs(q=q.reshape(B, T, H, dk), k=k.reshape(B, T, H, dk), v=v.reshape(B, T, H, dv),
                                decay=g), None

    def output(self, read, aux):
        return self.out_proj(read.flatten(2))


register_architecture(Architecture("test_linear_attention", LinearAttentionMixer), overwrite=True)


def _linear_model():
    cfg = ModelConfig(architecture="test_linear_attention", d_model=16, n_layers=1, d_vocab=23, n_heads=2,
                      d_k=4, d_v=5, d_mlp=0, conv_kernel=0)
    model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
    model.ln_final = nn.Identity()  # makes the state-to-logit map exactly linear
    return model


# The sequences, positions and features of the feature-attribution tests.
T = 29
POSITIONS = torch.tensor([[0, 8, 17, T - 1], [12, 5, 5, 28]])
FEATURES = [7, 0, 31, 12]


def tokens_for(model, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (2, T), generator=torch.Generator().manual_seed(seed))
