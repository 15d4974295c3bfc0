"""Mamba-2: transformers ``mamba2`` checkpoints and original mamba_ssm ones (state-spaces/mamba2-*).

Recurrence per head h, in this library's ``d_state × head_dim`` orientation (the transpose of mamba's
``head_dim × d_state`` state)::

    Δ_t = softplus(dt_t + dt_bias_h)             (clamped to time_step_limit when that is not (0, ∞))
    S_t = exp(Δ_t A_h) S_{t-1} + Δ_t B_t x_tᵀ,   A_h = −exp(A_log_h)
    o_t = S_tᵀ C_t + D_h x_t

so k := B, v := x, q := C, β := Δ and the log-decay is Δ·A (a scalar per head); there is no
``d_k^-1/2`` scaling. B and C belong to ``n_key_heads`` groups (mamba's ``ngroups``): head h reads
group ``h // (n_heads / n_groups)``.

Layer: ``in_proj`` rows ``[z0 | x0 | z | xBC | dt]`` (``z0, x0``: mamba_ssm's optional gated-MLP slice,
empty unless ``d_inner`` exceeds ``n_heads·d_v``), depthwise causal conv with bias + SiLU over xBC
(``conv_kernel=0``: SiLU only, no conv and no conv bias), split ``[x | B | C]``, the scan, a gated
RMSNorm grouped over ``n_heads·d_v / n_groups`` channels (gate before the norm by default),
``silu(z0)·x0`` prepended when present, ``out_proj``. Blocks have no MLP and keep the residual in
fp32; the head is tied in mamba_ssm checkpoints. Options: :class:`Mamba2Options`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import ShortConv
from recurrent_lens.models.mixer import ForwardContext, MatrixMixer, fire
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import LinearRule, RecurrenceInputs

_NO_LIMIT = (0.0, math.inf)


@dataclass(frozen=True)
class Mamba2Options(ArchOptions):
    """The ``options`` of ``mamba2`` configs.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="mamba2", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4, d_v=4,
        ...                   d_mlp=0, options={"time_step_limit": [0, 1]})
        >>> Mamba2Options.from_config(cfg).time_step_limit
        (0.0, 1.0)
    """

    d_inner: int | None = None
    """Width of ``z`` plus the gated-MLP slice, i.e. the input width of ``out_proj`` (None: ``n_heads·d_v``;
    mamba_ssm's ``expand·d_model`` when its ``d_ssm`` is smaller)."""
    D_has_hdim: bool = False
    """D per channel (``[n_heads·d_v]``) instead of per head."""
    norm_before_gate: bool = False
    """``rmsnorm(y)·w·silu(z)`` instead of ``rmsnorm(y·silu(z))·w``."""
    time_step_limit: tuple[float, float] = _NO_LIMIT
    """Clamp of Δ, applied in every mode (transformers and mamba_ssm skip it when decoding one token at a time)."""
    proj_bias: bool = False
    """Biases on ``in_proj`` and ``out_proj``."""
    conv_bias: bool = True
    """Bias on the convolution."""
    gated_norm_eps: float | None = None
    """Epsilon of the gated norm (None: ``norm_eps``)."""

    def check(self, cfg: ModelConfig) -> None:
        d_ssm = cfg.n_heads * cfg.d_v
        if self.d_inner is not None and self.d_inner < d_ssm:
            raise ValueError(f"options['d_inner']: expected >= n_heads·d_v = {d_ssm}, got {self.d_inner}")
        low, high = self.time_step_limit
        if not low <= high:
            raise ValueError(f"options['time_step_limit']: expected (low, high) with low <= high, "
                             f"got {self.time_step_limit}")


class GroupedGatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm: RMS statistics over groups of ``group_size`` channels, gated by ``silu(z)``.

    With ``norm_before_gate=False`` (every released checkpoint) the gate comes first:
    ``w ⊙ rmsnorm_grouped(y ⊙ silu(z))``; otherwise ``w ⊙ rmsnorm_grouped(y) ⊙ silu(z)``. Computed in fp32.
    """

    def __init__(self, d: int, group_size: int, eps: float, norm_before_gate: bool = False) -> None:
        super().__init__()
        if d % group_size:
            raise ValueError(f"group_size: expected a divisor of the norm width {d}, got {group_size}")
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Float[Tensor, "... d"], z: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        y, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        groups = y.unflatten(-1, (-1, self.group_size))
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = y * self.weight.float()
        if self.norm_before_gate:
            y = y * gate
        return y.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}, "
                f"norm_before_gate={self.norm_before_gate}")


class Mamba2Mixer(MatrixMixer):
    """Mamba-2 mixer (state ``d_state × head_dim`` per head: k := B, v := x, q := C, β := Δ).

    Hook points, in execution order::

        hook_in      [batch, pos, d_model]
        hook_conv    [batch, pos, n_heads·d_v + 2·n_groups·d_k]  xBC after the conv, its bias and SiLU
        hook_dt      [batch, pos, head]           Δ = softplus(dt + dt_bias) (clamped); β and the decay derive from it
        hook_q       [batch, pos, head, d_k]      C, expanded from its group to every head
        hook_k       [batch, pos, head, d_k]      B, expanded from its group to every head
        hook_v       [batch, pos, head, d_v]      x
        hook_beta    [batch, pos, head]           Δ as the write strength
        hook_decay   [batch, pos, head]           Δ·A, the log of the per-head decay
        hook_write   [batch, pos, head, d_k, d_v] Δ B xᵀ (rank 1)
        hook_state   [batch, pos, head, d_k, d_v] S_t (mamba's ``ssm_state`` transposed)
        hook_read    [batch, pos, head, d_v]      S_tᵀ C_t + D ⊙ x_t (the skip term included)
        hook_out     [batch, pos, d_model]

    Editing ``hook_dt`` changes the discretisation (write strength and decay together); editing
    ``hook_beta`` or ``hook_decay`` changes one of them. The D skip in ``hook_read`` uses the value
    after ``hook_v``, so an edited x reaches the output through both the state and the skip.
    """

    rule = LinearRule()

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        opts = Mamba2Options.from_config(cfg)
        H, G, N, P = cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v
        self.n_groups = G
        self.d_ssm = H * P
        self.d_inner = self.d_ssm if opts.d_inner is None else opts.d_inner
        self.d_mlp_slice = self.d_inner - self.d_ssm
        self.conv_dim = self.d_ssm + 2 * G * N
        self.D_has_hdim = opts.D_has_hdim
        self.time_step_limit = None if opts.time_step_limit == _NO_LIMIT else opts.time_step_limit
        bias = opts.proj_bias
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner + 2 * G * N + H, bias=bias)
        self.conv1d = ShortConv(self.conv_dim, cfg.conv_kernel, bias=opts.conv_bias) if cfg.conv_kernel else None
        # mamba's init: Δ log-uniform in [1e-3, 1e-1] through softplus, A uniform in [1, 16]
        self.dt_bias = nn.Parameter(_inverse_softplus(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.d_ssm if self.D_has_hdim else H))
        eps = cfg.norm_eps if opts.gated_norm_eps is None else opts.gated_norm_eps
        self.norm = GroupedGatedRMSNorm(self.d_ssm, self.d_ssm // G, eps, norm_before_gate=opts.norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=bias)
        self.hook_conv = HookPoint()  # [batch, pos, n_heads·d_v + 2·n_groups·d_k]
        self.hook_dt = HookPoint()  # [batch, pos, head]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, tuple[Tensor, Tensor, Tensor]]:
        B, T, _ = x.shape
        cfg = self.cfg
        H, G, N, P = cfg.n_heads, self.n_groups, cfg.d_k, cfg.d_v
        m = self.d_mlp_slice
        z0, x0, z, xBC, dt = self.in_proj(x).split([m, m, self.d_ssm, self.conv_dim, H], dim=-1)
        if self.conv1d is not None:
            xBC = self.conv1d(xBC, cache)
        xBC = fire(self.hook_conv, F.silu(xBC))
        xs, Bg, Cg = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
        delta = F.softplus(dt.float() + self.dt_bias.float())
        if self.time_step_limit is not None:
            delta = delta.clamp(*self.time_step_limit)
        delta = fire(self.hook_dt, delta)
        A = -self.A_log.float().exp()
        inputs = RecurrenceInputs(
            q=Cg.reshape(B, T, G, N).float().repeat_interleave(H // G, dim=2),
            k=Bg.reshape(B, T, G, N).float().repeat_interleave(H // G, dim=2),
            v=xs.reshape(B, T, H, P).float(),
            beta=delta,
            decay=delta * A,
        )
        return inputs, (z, z0, x0)

    def read_extra(self, o: Float[Tensor, "batch pos head d_v"], inputs: RecurrenceInputs,
                   aux: tuple[Tensor, Tensor, Tensor]) -> Float[Tensor, "batch pos head d_v"]:
        D = self.D.float().reshape(self.cfg.n_heads, -1)  # [head, d_v] or [head, 1]
        return o + D * inputs.v

    def output(self, read: Float[Tensor, "batch pos head d_v"],
               aux: tuple[Tensor, Tensor, Tensor]) -> Float[Tensor, "batch pos d_model"]:
        z, z0, x0 = aux
        y = self.norm(read.flatten(2), z)
        if self.d_mlp_slice:
            y = torch.cat([(F.silu(z0.float()) * x0.float()).to(y.dtype), y], dim=-1)
        return self.out_proj(y.to(self.out_proj.weight.dtype))


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def _json_float(v: Any) -> float:
    """A float from ``config.json``; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _time_step_limit(v: Any) -> tuple[float, float]:
    return tuple(_json_float(x) for x in v)


def config_from_transformers(d: dict[str, Any]) -> ModelConfig:
    """Read a transformers ``mamba2`` ``config.json`` (missing keys take ``Mamba2Config``'s defaults)."""
    hidden, expand = d.get("hidden_size", 4096), d.get("expand", 2)
    H, P = d.get("num_heads", 128), d.get("head_dim", 64)
    if hidden * expand != H * P:
        raise ValueError(f"config.json: hidden_size·expand ({hidden * expand}) must equal "
                         f"num_heads·head_dim ({H * P})")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act: expected 'silu', got {d['hidden_act']!r}")
    eps = d.get("layer_norm_epsilon", 1e-5)
    return ModelConfig(
        architecture="mamba2",
        d_model=hidden,
        n_layers=d.get("num_hidden_layers", 64),
        d_vocab=d.get("vocab_size", 32768),
        n_heads=H,
        n_key_heads=d.get("n_groups", 8),
        d_k=d.get("state_size", 128),
        d_v=P,
        d_mlp=0,
        norm="rms",
        norm_eps=eps,
        conv_kernel=d.get("conv_kernel", 4),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        options={
            "time_step_limit": _time_step_limit(d.get("time_step_limit", _NO_LIMIT)),
            "proj_bias": bool(d.get("use_bias", False)),
            "conv_bias": bool(d.get("use_conv_bias", True)),
            "gated_norm_eps": eps,
        },
    )


_MAMBA_SSM_EPS = 1e-5  # mamba_ssm hard-codes the block, final and gated norm epsilons


def config_from_mamba_ssm(d: dict[str, Any]) -> ModelConfig:
    """Read an original mamba_ssm ``config.json`` (``MambaConfig``: ``d_model``, ``n_layer``, ``ssm_cfg``...).

    The vocabulary is padded to a multiple of ``pad_vocab_size_multiple`` as mamba_ssm does. Mamba-1
    layers, attention layers (``attn_layer_idx``), MLPs (``d_intermediate``) and mixers without the
    gated norm (``ssm_cfg.rmsnorm=False``) are refused.
    """
    ssm = dict(d.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer != "Mamba2":
        raise ValueError(f"config.json ssm_cfg.layer: expected 'Mamba2', got {layer!r} (Mamba-1 is not supported)")
    if d.get("attn_layer_idx"):
        raise ValueError(f"config.json attn_layer_idx: expected [] (hybrid attention layers are not supported), "
                         f"got {d['attn_layer_idx']}")
    if d.get("d_intermediate", 0):
        raise ValueError(f"config.json d_intermediate: expected 0 (no MLP), got {d['d_intermediate']}")
    if not ssm.get("rmsnorm", True):
        raise ValueError("config.json ssm_cfg.rmsnorm: expected true (mixers without the gated norm are not supported)")
    d_model = d["d_model"]
    d_inner = ssm.get("expand", 2) * d_model
    d_ssm = ssm.get("d_ssm") or d_inner
    P = ssm.get("headdim", 64)
    if d_ssm % P:
        raise ValueError(f"config.json ssm_cfg: d_ssm ({d_ssm}) must be a multiple of headdim ({P})")
    vocab, multiple = d.get("vocab_size", 50277), d.get("pad_vocab_size_multiple", 8)
    vocab += -vocab % multiple
    return ModelConfig(
        architecture="mamba2",
        d_model=d_model,
        n_layers=d["n_layer"],
        d_vocab=vocab,
        n_heads=d_ssm // P,
        n_key_heads=ssm.get("ngroups", 1),
        d_k=ssm.get("d_state", 128),
        d_v=P,
        d_mlp=0,
        norm="rms" if d.get("rms_norm", True) else "layer",
        norm_eps=_MAMBA_SSM_EPS,
        conv_kernel=ssm.get("d_conv", 4),
        tie_embeddings=bool(d.get("tie_embeddings", True)),
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        options={
            "d_inner": d_inner,
            "D_has_hdim": bool(ssm.get("D_has_hdim", False)),
            "norm_before_gate": bool(ssm.get("norm_before_gate", False)),
            "time_step_limit": _time_step_limit(ssm.get("dt_limit", _NO_LIMIT)),
            "proj_bias": bool(ssm.get("bias", False)),
            "conv_bias": bool(ssm.get("conv_bias", True)),
            "gated_norm_eps": _MAMBA_SSM_EPS,
        },
    )


def is_mamba_ssm_config(d: dict[str, Any]) -> bool:
    """mamba_ssm's ``config.json`` has no ``model_type`` but ``d_model``, ``n_layer`` and ``ssm_cfg``."""
    return "model_type" not in d and {"d_model", "n_layer", "ssm_cfg"} <= d.keys()


def _config_from_hf(d: dict[str, Any]) -> ModelConfig:
    return config_from_transformers(d) if d.get("model_type") == "mamba2" else config_from_mamba_ssm(d)


def map_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """transformers and mamba_ssm share every key but the embedding (``embeddings`` vs ``embedding``)."""
    if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return WeightTarget("embed.weight")
    if name.startswith("backbone.norm_f."):
        return WeightTarget("ln_final." + name.removeprefix("backbone.norm_f."))
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else WeightTarget("unembed.weight")
    m = re.match(r"^backbone\.layers\.(\d+)\.(norm|mixer)\.(.*)$", name)
    if not m:
        return None
    part = "ln1" if m.group(2) == "norm" else "mixer"
    return WeightTarget(f"blocks.{m.group(1)}.{part}.{m.group(3)}")


register_architecture(Architecture(
    name="mamba2",
    mixer=Mamba2Mixer,
    model_types=("mamba2",),
    config_from_hf=_config_from_hf,
    map_weight=map_weight,
    detect=is_mamba_ssm_config,
    options=Mamba2Options,
))
