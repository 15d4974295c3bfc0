"""Building blocks shared by the architectures: norms, gated norms, short convolutions, MLPs.

Norms compute in fp32 whatever the weights' dtype (as every reference does) and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.mixer import fire, hook_active
from recurrent_lens.models.registry import get_architecture


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last axis, in fp32 (any shape; inside every norm, so the shape is
    not type-checked).

    Example:
        >>> import torch
        >>> rms_normalize(torch.tensor([2.0, -2.0]), eps=0.0)
        tensor([ 1., -1.])
    """
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(Σx² + eps)`` over the last axis in fp32, the form fla and transformers use inside the delta-rule
    kernels (any shape, not type-checked).

    Example:
        >>> import torch
        >>> l2_normalize(torch.tensor([3.0, 4.0]), eps=0.0)
        tensor([0.6000, 0.8000])
    """
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _edited_scale(hp: HookPoint, scale: Tensor) -> Tensor | None:
    """Fire a norm's ``hook_scale``; the scale the norm must divide by, or ``None`` when it is unchanged.

    ``None`` lets the caller keep its usual (bitwise reference) arithmetic. A hook that returns a new
    tensor or edits in place counts as an edit; with a backward hook attached the fired tensor is always
    used, so that gradients reach the hook.
    """
    version = scale._version
    fired = fire(hp, scale)
    if fired is scale and scale._version == version and not hp._backward_hooks:
        return None
    return fired


class RMSNorm(nn.Module):
    """RMSNorm with a plain weight (``x·w``) or Qwen3.5's zero-centred weight (``x·(1+w)``).

    Hook points, as TransformerLens' RMSNorm::

        hook_scale       [batch, pos, 1]   sqrt(mean(x²) + eps), fp32 (per-head norms: [batch, pos, head, 1])
        hook_normalized  [batch, pos, d]   x / scale · weight

    An edit to ``hook_scale`` changes what ``x`` is divided by.
    """

    def __init__(self, d: int, eps: float, one_plus: bool = False) -> None:
        super().__init__()
        self.eps, self.one_plus = eps, one_plus
        self.weight = nn.Parameter(torch.zeros(d) if one_plus else torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        w = self.weight.float()
        normed = None
        if hook_active(self.hook_scale):
            xf = x.float()
            scale = _edited_scale(self.hook_scale, (xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            normed = None if scale is None else xf / scale
        if normed is None:
            normed = rms_normalize(x, self.eps)
        y = normed * (1.0 + w if self.one_plus else w)
        return fire(self.hook_normalized, y.to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, one_plus={self.one_plus}"


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32.

    Hook points, as TransformerLens' LayerNorm::

        hook_scale       [batch, pos, 1]   sqrt(var(x) + eps) (biased variance), fp32
        hook_normalized  [batch, pos, d]   (x − mean(x)) / scale · weight + bias

    An edit to ``hook_scale`` changes what the centred ``x`` is divided by.
    """

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        y = None
        if hook_active(self.hook_scale):
            centred = x.float() - x.float().mean(-1, keepdim=True)
            scale = _edited_scale(self.hook_scale, (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            y = None if scale is None else centred / scale * self.weight.float() + self.bias.float()
        if y is None:
            y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return fire(self.hook_normalized, y.to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(cfg: ModelConfig, d: int | None = None) -> nn.Module:
    """The block norm the config names (``cfg.norm``), over ``d`` channels (default ``d_model``).

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="mamba2", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4, d_v=4,
        ...                   norm="layer")
        >>> type(make_norm(cfg)).__name__
        'LayerNorm'
    """
    d = cfg.d_model if d is None else d
    if cfg.norm == "layer":
        return LayerNorm(d, cfg.norm_eps)
    return RMSNorm(d, cfg.norm_eps, one_plus=cfg.norm == "rms_one_plus")


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm over the last axis with a plain weight, then ``⊙ act(gate)``: ``rmsnorm(x)·w ⊙ act(g)``.

    ``act`` is ``"silu"``, ``"sigmoid"`` or ``"none"`` (no gate: ``rmsnorm(x)·w``, also when ``gate`` is
    ``None``). Computed in fp32, returned in the weight's dtype.

    Example:
        >>> import torch
        >>> norm = GatedRMSNorm(2, eps=0.0, act="sigmoid")
        >>> norm(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)).detach() * 12.5 ** 0.5  # sigmoid(0) = 1/2
        tensor([[1.5000, 2.0000]])
    """

    def __init__(self, d: int, eps: float, act: str = "silu") -> None:
        super().__init__()
        if act not in ("silu", "sigmoid", "none"):
            raise ValueError(f"act: expected 'silu', 'sigmoid' or 'none', got {act!r}")
        self.eps, self.act = eps, act
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[Tensor, "*batch d"],
                gate: Float[Tensor, "*batch d"] | None = None) -> Float[Tensor, "*batch d"]:
        y = rms_normalize(x, self.eps) * self.weight.float()
        if gate is not None and self.act != "none":
            g = gate.float()
            y = y * (F.silu(g) if self.act == "silu" else torch.sigmoid(g))
        return y.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, act={self.act}"


def norm_heads_and_project(norm: GatedRMSNorm, out_proj: nn.Linear, read: Float[Tensor, "batch pos head d_v"],
                           gate: Float[Tensor, "batch pos head d_v"] | None) -> Float[Tensor, "batch pos d_model"]:
    """The usual mixer output: per-head (gated) RMSNorm of the read ``[batch, pos, head, d_v]``, heads
    flattened, then the output projection."""
    return out_proj(norm(read, gate).to(out_proj.weight.dtype).flatten(2))


class ShortConv(nn.Module):
    """Depthwise causal convolution over the position axis (no activation: callers choose it).

    With a cache, the last ``kernel - 1`` inputs are read from ``cache.conv`` and a new buffer is assigned
    back (the old tensor is never written into), so decoding one token at a time equals the
    full-sequence convolution. ``kernel`` must be at least 1; a mixer configured with
    ``conv_kernel=0`` builds no ShortConv at all.
    """

    def __init__(self, channels: int, kernel: int, bias: bool = False) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"kernel: expected >= 1 (conv_kernel=0 means no ShortConv), got {kernel}")
        self.channels, self.kernel = channels, kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: Float[Tensor, "batch pos channels"],
                cache: LayerCache | None = None) -> Float[Tensor, "batch pos channels"]:
        B, T, C = x.shape
        xt = x.transpose(1, 2)  # [B, C, T]
        prev = cache.conv if cache is not None and cache.conv is not None else xt.new_zeros(B, C, self.kernel - 1)
        full = torch.cat([prev.to(xt.dtype), xt], dim=-1)  # [B, C, kernel - 1 + T]
        if cache is not None:
            cache.conv = full[..., full.shape[-1] - (self.kernel - 1):]
        # a sum over the few taps: torch's depthwise conv1d is pathologically slow on CPU for short inputs
        w = self.weight[:, 0, :, None].to(full.dtype)  # [C, kernel, 1]
        y = sum(full[:, :, j:j + T] * w[:, j] for j in range(self.kernel))
        if self.bias is not None:
            y = y + self.bias[:, None].to(y.dtype)
        return y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel={self.kernel}, bias={self.bias is not None}"


class SwiGLU(nn.Module):
    """``down(silu(gate x) ⊙ up x)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """``[d_mlp, d_model]``: the output map as TransformerLens stores it (``hook_post @ W_out`` is the output)."""
        return self.down_proj.weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"],
                cache: LayerCache | None = None) -> Float[Tensor, "batch pos d_model"]:
        pre = fire(self.hook_pre, self.gate_proj(x))
        return self.down_proj(fire(self.hook_post, F.silu(pre) * self.up_proj(x)))


def make_mlp(cfg: ModelConfig) -> nn.Module | None:
    """The block MLP: none when ``d_mlp == 0``, SwiGLU for ``mlp="swiglu"``, otherwise the one the architecture
    builds for its own kind (``Architecture.mlp``: RWKV-7's ``"relu2"``).

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4,
        ...                   d_v=4, d_mlp=16)
        >>> type(make_mlp(cfg)).__name__
        'SwiGLU'
    """
    if cfg.d_mlp == 0:
        return None
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg)
    build = get_architecture(cfg.architecture).mlp
    if build is None:
        raise ValueError(f"mlp: architecture {cfg.architecture!r} builds only 'swiglu' MLPs, got {cfg.mlp!r}")
    return build(cfg)
