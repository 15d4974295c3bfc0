"""The building blocks the architectures share: the short convolution (and ``conv_kernel=0``, no convolution at
all) and the gated RMS norm."""

import pytest
import torch
import torch.nn.functional as F
from tests.support.helpers import build, tiny_gdn
from tests.support.tiny_arch_mamba2 import tiny_mamba2

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models.components import GatedRMSNorm, ShortConv


def _no_conv(arch: str) -> HookedRecurrentModel:
    if arch == "gated_deltanet":
        return tiny_gdn(conv_kernel=0)
    if arch == "mamba2":
        return tiny_mamba2(conv_kernel=0)
    cfg = build(arch).cfg
    cfg.conv_kernel = 0
    if arch == "gla":
        cfg.options = {**cfg.options, "use_short_conv": True}
    return HookedRecurrentModel.from_config(cfg, seed=0).eval()


def _pre_conv(arch: str, mixer, x: torch.Tensor) -> torch.Tensor:
    """What the short conv would have convolved: the hooked channels must be exactly its activation."""
    if arch == "mamba2":
        m = mixer.d_mlp_slice
        return mixer.in_proj(x).split([m, m, mixer.d_ssm, mixer.conv_dim, mixer.cfg.n_heads], dim=-1)[3]
    return mixer.in_proj_qkv(x)


@pytest.mark.parametrize("arch", ["gated_deltanet", "delta_net", "mamba2", "gla"])
def test_conv_kernel_zero_means_no_short_convolution(arch):
    model = _no_conv(arch)
    assert not any(isinstance(m, ShortConv) for m in model.modules())
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    full, acts = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.mixer.hook_"))
    mixer = model.blocks[0].mixer
    pre = _pre_conv(arch, mixer, acts["blocks.0.mixer.hook_in"])
    expected = pre if arch == "gla" else F.silu(pre)  # GLA applies SiLU only with its conv
    torch.testing.assert_close(acts["blocks.0.mixer.hook_conv"], expected, rtol=0, atol=0)
    # prefill + one token at a time through the cache equals the full forward
    cache = model.make_cache()
    steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert all(layer.conv is None for layer in cache.layers)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    out = model.generate(tokens[:, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(model(out[:, :-1])[:, 3:].argmax(-1), out[:, 4:])


def test_conv_kernel_must_not_be_negative():
    with pytest.raises(ValueError, match="conv_kernel: expected >= 0 .* got -1"):
        ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4, d_v=4,
                    conv_kernel=-1)
    with pytest.raises(ValueError, match="kernel: expected >= 1"):
        ShortConv(8, 0)


def test_gated_rms_norm_is_norm_then_gate():
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm = GatedRMSNorm(8, 1e-6, act="silu")
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * torch.nn.functional.silu(g)
    torch.testing.assert_close(norm(x, g), expected)
    with pytest.raises(TypeError):
        GatedRMSNorm(8, 1e-6, norm_before_gate=False)
