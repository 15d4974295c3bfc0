"""Gated Linear Attention (fla ``gla``): a linear recurrence with a decay per key channel.

Recurrence per head, with the state ``S_t`` of shape ``d_k × d_v``::

    gk_t = logsigmoid(W2 (W1 x_t) + b2) / 16                 # optionally clamped from below
    S_t  = diag(exp gk_t) S_{t-1} + k_t v_tᵀ,                o_t = S_tᵀ (q_t / √d_k)

There is no β and q, k are not normalised; the write is ``k_t v_tᵀ``. The low-rank width 16 and the
normaliser 16 are the ``GatedLinearAttention`` defaults, which fla's ``GLABlock`` never overrides from the
config, so they are constants here too. Key, value and gate heads are shared by ``n_heads / num_kv_heads``
query heads (repeat-interleave). q, k, v load into row blocks of one ``in_proj_qkv`` (rows ``[q:
n_heads·d_k | k: num_kv_heads·d_k | v: num_kv_heads·d_v]``) and, with ``use_short_conv``, channel blocks of
one ``conv1d``. Options: :class:`GLAOptions`.

fla names the output norm ``g_norm_swish_gate`` (``fuse_norm`` with the swish gate) or ``g_norm``; both
compute the same thing and both load into ``norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import GatedRMSNorm, ShortConv, norm_heads_and_project
from recurrent_lens.models.fla_format import fla_head_dim, fla_mixer_weight, fla_stack_config, refuse_hybrid
from recurrent_lens.models.mixer import ForwardContext, MatrixMixer, fire
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import LinearRule, RecurrenceInputs

GATE_LOW_RANK_DIM = 16
GATE_LOGIT_NORMALIZER = 16

_FEATURE_MAPS = {
    "relu": F.relu,
    "sigmoid": lambda x: x.sigmoid(),
    "silu": F.silu,
    "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
    "logsigmoid": F.logsigmoid,
}


@dataclass(frozen=True)
class GLAOptions(ArchOptions):
    """The ``options`` of ``gla`` configs.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gla", d_model=8, n_layers=1, d_vocab=10, n_heads=4, d_k=2, d_v=2,
        ...                   options={"num_kv_heads": 3})
        Traceback (most recent call last):
        ...
        ValueError: options['num_kv_heads']: must divide n_heads = 4, got 3
    """

    num_kv_heads: int | None = None
    """Key/value (and gate) heads, each shared by ``n_heads / num_kv_heads`` query heads (None: ``n_heads``)."""
    use_short_conv: bool = False
    """Short convolution on q, k, v, followed by SiLU; ignored when ``conv_kernel=0``."""
    conv_bias: bool = False
    """Bias on the short convolution."""
    feature_map: Literal["relu", "sigmoid", "silu", "swish", "sqrelu", "logsigmoid"] | None = None
    """A feature map applied to q and k after the head split."""
    clamp_min: float | None = None
    """Lower bound of ``gk``."""
    use_output_gate: bool = True
    """Output ``rmsnorm(o)·w ⊙ silu(g_proj x)``; otherwise plain RMSNorm·w."""

    def kv_heads(self, cfg: ModelConfig) -> int:
        """The number of key/value heads of ``cfg``."""
        return self.num_kv_heads or cfg.n_heads

    def check(self, cfg: ModelConfig) -> None:
        if cfg.n_heads % self.kv_heads(cfg):
            raise ValueError(f"options['num_kv_heads']: must divide n_heads = {cfg.n_heads}, got {self.num_kv_heads}")


class GLAMixer(MatrixMixer):
    """GLA mixer.

    Hook points, in execution order::

        hook_in      [batch, pos, d_model]
        hook_conv    [batch, pos, n_heads·d_k + num_kv_heads·(d_k + d_v)]  after the projections (and short conv)
        hook_q       [batch, pos, head, d_k]      q / √d_k (after the feature map)
        hook_k       [batch, pos, head, d_k]      expanded to the query heads
        hook_v       [batch, pos, head, d_v]      expanded to the query heads
        hook_decay   [batch, pos, head, d_k]      gk_t, the log of the per-key-channel decay
        hook_write   [batch, pos, head, d_k, d_v] k vᵀ
        hook_state   [batch, pos, head, d_k, d_v]
        hook_read    [batch, pos, head, d_v]      S_tᵀ q_t
        hook_out     [batch, pos, d_model]
    """

    rule = LinearRule()
    has_beta = False

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        opts = GLAOptions.from_config(cfg)
        H = cfg.n_heads
        self.n_kv_heads = opts.kv_heads(cfg)
        self.feature_map = opts.feature_map
        self.clamp_min = opts.clamp_min
        self.use_output_gate = opts.use_output_gate
        self.use_short_conv = opts.use_short_conv and cfg.conv_kernel > 0
        self.split = [H * cfg.d_k, self.n_kv_heads * cfg.d_k, self.n_kv_heads * cfg.d_v]
        self.value_dim = H * cfg.d_v
        self.in_proj_qkv = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        if self.use_short_conv:
            self.conv1d = ShortConv(sum(self.split), cfg.conv_kernel, bias=opts.conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(cfg.d_model, GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(GATE_LOW_RANK_DIM, self.n_kv_heads * cfg.d_k, bias=True))
        if self.use_output_gate:
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.norm = GatedRMSNorm(cfg.d_v, cfg.norm_eps, act="silu" if self.use_output_gate else "none")
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.hook_conv = HookPoint()  # [batch, pos, n_heads·d_k + num_kv_heads·(d_k + d_v)]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, Tensor | None]:
        B, T, _ = x.shape
        cfg, H, G = self.cfg, self.cfg.n_heads, self.cfg.n_heads // self.n_kv_heads
        qkv = self.in_proj_qkv(x)
        if self.use_short_conv:
            qkv = F.silu(self.conv1d(qkv, cache))
        qkv = fire(self.hook_conv, qkv)
        q, k, v = qkv.float().split(self.split, dim=-1)
        q = q.reshape(B, T, H, cfg.d_k)
        k = k.reshape(B, T, self.n_kv_heads, cfg.d_k).repeat_interleave(G, dim=2)
        v = v.reshape(B, T, self.n_kv_heads, cfg.d_v).repeat_interleave(G, dim=2)
        gk = self.gk_proj(x).float().reshape(B, T, self.n_kv_heads, cfg.d_k).repeat_interleave(G, dim=2)
        gk = F.logsigmoid(gk) / GATE_LOGIT_NORMALIZER
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        if self.feature_map is not None:
            q, k = _FEATURE_MAPS[self.feature_map](q), _FEATURE_MAPS[self.feature_map](k)
        inputs = RecurrenceInputs(q=q * cfg.d_k**-0.5, k=k, v=v, decay=gk)
        gate = self.in_proj_z(x).reshape(B, T, H, cfg.d_v) if self.use_output_gate else None
        return inputs, gate

    def output(self, read: Float[Tensor, "batch pos head d_v"], aux: Tensor | None) -> Float[Tensor, "batch pos d_model"]:
        return norm_heads_and_project(self.norm, self.out_proj, read, aux)


def config_from_fla(d: dict[str, Any]) -> ModelConfig:
    """Read an fla ``gla`` config. Any ``attn_mode`` (``chunk``, ``fused_recurrent``, ``fused_chunk``) loads:
    they name GPU kernels, not different maths."""
    refuse_hybrid(d, "gla")
    if not d.get("use_gk", True) or d.get("use_gv", False):
        raise ValueError(f"config.json: only use_gk=True, use_gv=False is supported, got use_gk={d.get('use_gk')}, "
                         f"use_gv={d.get('use_gv')}")
    if d.get("elementwise_affine", True) is False:
        raise ValueError("config.json: elementwise_affine=False (output norm without weight) is not supported")
    if d.get("hidden_act", "swish") != "swish":
        raise ValueError(f"config.json: hidden_act must be 'swish' (SwiGLU MLP and output gate), got {d['hidden_act']!r}")
    hidden, n_heads = d["hidden_size"], d.get("num_heads", 4)
    return ModelConfig(
        architecture="gla",
        **fla_stack_config(d),
        n_heads=n_heads,
        d_k=fla_head_dim(hidden * d.get("expand_k", 0.5), n_heads, "hidden_size * expand_k"),
        d_v=fla_head_dim(hidden * d.get("expand_v", 1.0), n_heads, "hidden_size * expand_v"),
        options={
            "num_kv_heads": d.get("num_kv_heads") or n_heads,
            "use_short_conv": d.get("use_short_conv", False),
            "feature_map": d.get("feature_map"),
            "clamp_min": d.get("clamp_min"),
            "use_output_gate": d.get("use_output_gate", True),
        },
    )


FLA_RENAMES = {"g_proj.weight": "in_proj_z.weight", "g_norm_swish_gate.weight": "norm.weight",
               "g_norm.weight": "norm.weight", "o_proj.weight": "out_proj.weight"}
"""fla's names of the GLA parameters outside q, k, v and ``gk_proj`` (named alike), and ours."""


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Map an fla ``gla`` checkpoint key onto our parameters."""
    kv = GLAOptions.from_config(cfg).kv_heads(cfg)
    widths = (cfg.n_heads * cfg.d_k, kv * cfg.d_k, kv * cfg.d_v)
    return fla_mixer_weight(name, cfg, widths, FLA_RENAMES, keep_prefixes=("gk_proj.",))


register_architecture(Architecture(
    name="gla",
    mixer=GLAMixer,
    model_types=("gla",),
    config_from_hf=config_from_fla,
    map_weight=map_fla_weight,
    options=GLAOptions,
))
