"""DeltaNet (fla ``delta_net``): the delta rule without decay.

Recurrence per head, with the state ``S_t`` of shape ``d_k × d_v``::

    S_t = (I − β_t k̂_t k̂_tᵀ) S_{t-1} + β_t k̂_t v_tᵀ,      o_t = S_tᵀ (q̂_t / √d_k)

with q̂, k̂ normalised per head (l2, or L1 with ``qk_norm="sum"``) and ``β_t = sigmoid(b_proj x)``
(1 without ``use_beta``; doubled with ``allow_neg_eigval``). The write is ``β_t k̂_t v_tᵀ`` and the erase
term ``−β_t k̂_t k̂_tᵀ S_{t-1}``.

Parameters follow the Gated DeltaNet layout: fla's ``q/k/v_proj`` load into row blocks of one
``in_proj_qkv`` and ``q/k/v_conv1d`` into channel blocks of one depthwise ``conv1d``, so the layer keeps a
single conv cache. Options: :class:`DeltaNetOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import GatedRMSNorm, ShortConv, l2_normalize, norm_heads_and_project
from recurrent_lens.models.fla_format import fla_head_dim, fla_mixer_weight, fla_stack_config, refuse_hybrid
from recurrent_lens.models.mixer import ForwardContext, MatrixMixer, fire
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import DeltaRule, RecurrenceInputs


@dataclass(frozen=True)
class DeltaNetOptions(ArchOptions):
    """The ``options`` of ``delta_net`` configs.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="delta_net", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4,
        ...                   d_v=4, options={"qk_norm": "sum"})
        >>> DeltaNetOptions.from_config(cfg).qk_norm, DeltaNetOptions.from_config(cfg).use_beta
        ('sum', True)
    """

    qk_activation: Literal["silu", "relu", "elu", "identity"] = "silu"
    """Activation of q and k: ``"silu"`` is applied right after the short conv, the others (``"elu"`` is
    elu + 1) after the head split. v always gets SiLU."""
    qk_norm: Literal["l2", "sum"] = "l2"
    """Normalisation of q and k per head: l2, or L1 (``"sum"``)."""
    use_beta: bool = True
    """A learned write strength ``β = sigmoid(b_proj x)``; without it β = 1, and there is no ``hook_beta``."""
    use_gate: bool = False
    """Output ``rmsnorm(o)·w ⊙ silu(g_proj x)``; otherwise plain RMSNorm·w."""
    use_short_conv: bool = True
    """Short convolution on q, k, v; ``conv_kernel=0`` also means none."""
    conv_bias: bool = False
    """Bias on the short convolution."""
    allow_neg_eigval: bool = False
    """β ← 2β, so that the transition's eigenvalues may be negative."""


def _qk_activation(x: Tensor, name: str) -> Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "elu":
        return F.elu(x) + 1.0
    return x


def _qk_normalize(x: Tensor, name: str) -> Tensor:
    if name == "l2":
        return l2_normalize(x)
    return F.normalize(x.float(), p=1, dim=-1, eps=1e-6)


class DeltaNetMixer(MatrixMixer):
    """DeltaNet mixer.

    Hook points, in execution order::

        hook_in      [batch, pos, d_model]
        hook_conv    [batch, pos, 2·n_heads·d_k + n_heads·d_v]  after the short conv and its activations
        hook_q       [batch, pos, head, d_k]      q̂ / √d_k
        hook_k       [batch, pos, head, d_k]      k̂
        hook_v       [batch, pos, head, d_v]
        hook_beta    [batch, pos, head]           only with ``use_beta``
        hook_write   [batch, pos, head, d_k, d_v] β k̂ vᵀ
        hook_erase   [batch, pos, head, d_k, d_v] −β k̂ k̂ᵀ S_{t-1}
        hook_state   [batch, pos, head, d_k, d_v]
        hook_read    [batch, pos, head, d_v]      S_tᵀ q_t
        hook_out     [batch, pos, d_model]

    ``has_beta`` is set per instance from the ``use_beta`` option (before the base class creates the
    hooks), because whether β exists is a property of the checkpoint, not of the class.
    """

    rule = DeltaRule()
    has_decay = False

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        opts = DeltaNetOptions.from_config(cfg)
        self.has_beta = opts.use_beta
        super().__init__(cfg, layer)
        self.qk_activation = opts.qk_activation
        self.qk_norm = opts.qk_norm
        self.use_gate = opts.use_gate
        self.use_short_conv = opts.use_short_conv and cfg.conv_kernel > 0
        self.allow_neg_eigval = opts.allow_neg_eigval
        H = cfg.n_heads
        self.key_dim, self.value_dim = H * cfg.d_k, H * cfg.d_v
        channels = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(cfg.d_model, channels, bias=False)
        if self.has_beta:
            self.in_proj_b = nn.Linear(cfg.d_model, H, bias=False)
        if self.use_gate:
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        if self.use_short_conv:
            self.conv1d = ShortConv(channels, cfg.conv_kernel, bias=opts.conv_bias)
        self.norm = GatedRMSNorm(cfg.d_v, cfg.norm_eps, act="silu" if self.use_gate else "none")
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.hook_conv = HookPoint()  # [batch, pos, 2·n_heads·d_k + n_heads·d_v]

    def _activate(self, qkv: Tensor) -> Tensor:
        """SiLU on v always, on q and k only when ``qk_activation == "silu"`` (where fla puts it in the conv)."""
        if self.qk_activation == "silu":
            return F.silu(qkv)
        qk, v = qkv.split([2 * self.key_dim, self.value_dim], dim=-1)
        return torch.cat([qk, F.silu(v)], dim=-1)

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, Tensor | None]:
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = self.in_proj_qkv(x)
        qkv = self.conv1d(qkv, cache) if self.use_short_conv else qkv
        qkv = fire(self.hook_conv, self._activate(qkv))
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = _qk_activation(q.reshape(B, T, cfg.n_heads, cfg.d_k), self.qk_activation)
        k = _qk_activation(k.reshape(B, T, cfg.n_heads, cfg.d_k), self.qk_activation)
        q, k = _qk_normalize(q, self.qk_norm), _qk_normalize(k, self.qk_norm)
        beta = torch.sigmoid(self.in_proj_b(x).float()) if self.has_beta else None
        if self.allow_neg_eigval:
            beta = 2 * (beta if beta is not None else q.new_ones(B, T, cfg.n_heads))
        inputs = RecurrenceInputs(q=q * cfg.d_k**-0.5, k=k, v=v.reshape(B, T, cfg.n_heads, cfg.d_v).float(),
                                  beta=beta)
        gate = self.in_proj_z(x).reshape(B, T, cfg.n_heads, cfg.d_v) if self.use_gate else None
        return inputs, gate

    def output(self, read: Float[Tensor, "batch pos head d_v"], aux: Tensor | None) -> Float[Tensor, "batch pos d_model"]:
        return norm_heads_and_project(self.norm, self.out_proj, read, aux)


def config_from_fla(d: dict[str, Any]) -> ModelConfig:
    """Read an fla ``delta_net`` config (pure DeltaNet stacks; hybrid ``attn`` layers are not supported)."""
    refuse_hybrid(d, "delta_net")
    hidden, n_heads = d["hidden_size"], d.get("num_heads", 16)
    if d.get("hidden_act", "swish") != "swish":
        raise ValueError(f"config.json: hidden_act must be 'swish' (SwiGLU MLP), got {d['hidden_act']!r}")
    return ModelConfig(
        architecture="delta_net",
        **fla_stack_config(d),
        n_heads=n_heads,
        d_k=fla_head_dim(hidden * d.get("expand_k", 1.0), n_heads, "hidden_size * expand_k"),
        d_v=fla_head_dim(hidden * d.get("expand_v", 1.0), n_heads, "hidden_size * expand_v"),
        options={
            "qk_activation": d.get("qk_activation", "silu"),
            "qk_norm": d.get("qk_norm", "l2"),
            "use_beta": d.get("use_beta", True),
            "use_gate": d.get("use_gate", False),
            "use_short_conv": d.get("use_short_conv", True),
            "allow_neg_eigval": d.get("allow_neg_eigval", False),
        },
    )


FLA_RENAMES = {"b_proj.weight": "in_proj_b.weight", "g_proj.weight": "in_proj_z.weight",
               "o_norm.weight": "norm.weight", "o_proj.weight": "out_proj.weight"}
"""fla's names of the DeltaNet parameters outside q, k, v, and ours."""


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Map an fla ``delta_net`` checkpoint key onto our parameters."""
    kd, vd = cfg.n_heads * cfg.d_k, cfg.n_heads * cfg.d_v
    return fla_mixer_weight(name, cfg, (kd, kd, vd), FLA_RENAMES)


register_architecture(Architecture(
    name="delta_net",
    mixer=DeltaNetMixer,
    model_types=("delta_net",),
    config_from_hf=config_from_fla,
    map_weight=map_fla_weight,
    options=DeltaNetOptions,
))
