"""Adding an architecture touches no library file: a RetNet-style mixer defined entirely here gets the hook
vocabulary, edit semantics, caching and generation for free."""

import math

import pytest
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens import Architecture, HookedRecurrentModel, ModelConfig, register_architecture
from recurrent_lens.models.mixer import MatrixMixer, fire
from recurrent_lens.models.registry import WeightTarget
from recurrent_lens.models.scan import LinearRule, RecurrenceInputs


class RetentionMixer(MatrixMixer):
    """Multi-scale retention: S_t = γ_h S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √d_k, with a fixed decay per head.

    Hook points, in execution order::

        hook_in      [batch, pos, d_model]
        hook_q       [batch, pos, head, d_k]
        hook_k       [batch, pos, head, d_k]
        hook_v       [batch, pos, head, d_v]
        hook_decay   [batch, pos, head]
        hook_write   [batch, pos, head, d_k, d_v]
        hook_state   [batch, pos, head, d_k, d_v]
        hook_read    [batch, pos, head, d_v]
        hook_gate    [batch, pos, d_model]
        hook_out     [batch, pos, d_model]
    """

    rule = LinearRule()
    has_beta = False

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        H, dk, dv = cfg.n_heads, cfg.d_k, cfg.d_v
        self.qkv = nn.Linear(cfg.d_model, H * (2 * dk + dv), bias=False)
        self.gate = nn.Linear(cfg.d_model, H * dv, bias=False)
        self.out = nn.Linear(H * dv, cfg.d_model, bias=False)
        self.register_buffer("log_gamma", torch.log1p(-(2.0 ** (-2.0 - torch.arange(H, dtype=torch.float32)))))
        self.hook_gate = HookPoint()  # [batch, pos, d_model]

    def project(self, x, cache, ctx):
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.d_k, self.d_v
        q, k, v = self.qkv(x).view(B, T, H, 2 * dk + dv).split([dk, dk, dv], dim=-1)
        decay = self.log_gamma.expand(B, T, H)
        return RecurrenceInputs(q=q / math.sqrt(dk), k=k, v=v, decay=decay), x

    def output(self, read, x):
        B, T = read.shape[:2]
        gate = fire(self.hook_gate, torch.nn.functional.silu(self.gate(x)))
        return self.out(read.reshape(B, T, -1) * gate)


@pytest.fixture(scope="module")
def model():
    register_architecture(Architecture("test_retnet", RetentionMixer), overwrite=True)
    cfg = ModelConfig(architecture="test_retnet", d_model=24, n_layers=2, d_vocab=40, n_heads=3, d_k=4, d_v=5,
                      d_mlp=48, chunk_size=8)
    return HookedRecurrentModel.from_config(cfg, seed=0).eval()


def test_vocabulary_and_recurrence(model):
    tokens = torch.randint(0, 40, (2, 21))
    _, cache = model.run_with_cache(tokens)
    for name in ["hook_in", "hook_q", "hook_k", "hook_v", "hook_decay", "hook_write", "hook_state", "hook_read",
                 "hook_out", "hook_gate"]:
        assert f"blocks.1.mixer.{name}" in cache
    assert "blocks.1.mixer.hook_beta" not in model.hook_dict and "blocks.1.mixer.hook_erase" not in model.hook_dict
    q, k, v = (cache[f"blocks.0.mixer.hook_{n}"] for n in "qkv")
    gamma = 1 - 2.0 ** (-2.0 - torch.arange(3.0))
    S = torch.zeros(2, 3, 4, 5)
    for t in range(21):
        S = gamma[:, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        torch.testing.assert_close(cache["blocks.0.mixer.hook_state"][:, t], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache["blocks.0.mixer.hook_read"][:, t], torch.einsum("bhkv,bhk->bhv", S, q[:, t]))


def test_edits_and_generation_for_free(model):
    tokens = torch.randint(0, 40, (1, 15))
    base = model(tokens)

    def zero_write(w, hook):
        w = w.clone()
        w[:, 6] = 0
        return w

    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_write", zero_write)])
    diff = (out - base).abs().amax(-1)[0]
    assert diff[:6].max() < 1e-5 and diff[6:].min() > 1e-5
    cache = model.make_cache()
    steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), base, atol=1e-5, rtol=1e-5)
    assert model.generate(tokens, max_new_tokens=3, do_sample=False).shape == (1, 18)


def test_loading_never_leaves_a_buffer_uninitialised(model, tmp_path):
    """Built on ``meta``, a buffer has no value: unless the checkpoint provides it, loading must refuse."""
    import json

    from safetensors.torch import save_file

    from recurrent_lens.models.loading import CheckpointError

    arch = Architecture("test_retnet_loadable", RetentionMixer, model_types=("test_retnet",),
                        config_from_hf=lambda d: ModelConfig(**{**model.cfg.to_dict(), "architecture": "test_retnet_loadable"}),
                        map_weight=lambda name, cfg: WeightTarget(name))
    register_architecture(arch, overwrite=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "test_retnet"}))
    with pytest.raises(CheckpointError, match="unset.*log_gamma"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    weights.update({n: b.clone() for n, b in model.named_buffers()})
    save_file(weights, tmp_path / "model.safetensors")
    loaded = HookedRecurrentModel.from_pretrained(tmp_path)
    tokens = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens))
