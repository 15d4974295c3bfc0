"""Gated Linear Attention (fla ``gla``): a linear recurrence with a decay per key channel.

Recurrence per head (ARCHITECTURES.md §5)::

    gk_t = logsigmoid(W2 (W1 x_t) + b2) / 16                 # optionally clamped from below
    S_t  = diag(exp gk_t) S_{t-1} + k_t v_tᵀ,                o_t = S_tᵀ (q_t / √d_k)

There is no β and q, k are not normalised. The low-rank width 16 and the normaliser 16 are the
``GatedLinearAttention`` defaults, which fla's ``GLABlock`` never overrides from the config, so they are
constants here too. Key, value and gate heads are shared by ``n_heads / num_kv_heads`` query heads
(repeat-interleave). q, k, v load into row blocks of one ``in_proj_qkv`` (rows ``[q: n_heads·d_k |
k: num_kv_heads·d_k | v: num_kv_heads·d_v]``) and, with ``use_short_conv``, channel blocks of one
``conv1d``. ``options`` read here:

- ``num_kv_heads`` (default ``n_heads``).
- ``use_short_conv`` (default False; SiLU after the conv; ignored when ``conv_kernel=0``), ``conv_bias``
  (default False).
- ``feature_map`` (default None): ``"relu"``, ``"sigmoid"``, ``"silu"``/``"swish"``, ``"sqrelu"`` or
  ``"logsigmoid"`` on q and k after the head split.
- ``clamp_min`` (default None): lower bound of ``gk``.
- ``use_output_gate`` (default True): output ``rmsnorm(o)·w ⊙ silu(g_proj x)``; otherwise plain RMSNorm·w.

fla names the output norm ``g_norm_swish_gate`` (``fuse_norm`` with the swish gate) or ``g_norm``; both
compute the same thing and both load into ``norm``.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import GatedRMSNorm, ShortConv, norm_heads_and_project
from recurrent_lens.models.gated_deltanet import fla_block_weight, fla_stack_config
from recurrent_lens.models.mixer import MatrixMixer, fire
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
        opts = cfg.options
        H = cfg.n_heads
        self.n_kv_heads = opts.get("num_kv_heads") or H
        if H % self.n_kv_heads:
            raise ValueError(f"options['num_kv_heads']: must divide n_heads = {H}, got {self.n_kv_heads}")
        self.feature_map = opts.get("feature_map")
        if self.feature_map is not None and self.feature_map not in _FEATURE_MAPS:
            raise ValueError(f"options['feature_map']: expected None or one of {sorted(_FEATURE_MAPS)}, "
                             f"got {self.feature_map!r}")
        self.clamp_min = opts.get("clamp_min")
        self.use_output_gate = opts.get("use_output_gate", True)
        self.use_short_conv = bool(opts.get("use_short_conv", False)) and cfg.conv_kernel > 0
        self.split = [H * cfg.d_k, self.n_kv_heads * cfg.d_k, self.n_kv_heads * cfg.d_v]
        self.value_dim = H * cfg.d_v
        self.in_proj_qkv = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        if self.use_short_conv:
            self.conv1d = ShortConv(sum(self.split), cfg.conv_kernel, bias=opts.get("conv_bias", False))
        self.gk_proj = nn.Sequential(nn.Linear(cfg.d_model, GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(GATE_LOW_RANK_DIM, self.n_kv_heads * cfg.d_k, bias=True))
        if self.use_output_gate:
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.norm = GatedRMSNorm(cfg.d_v, cfg.norm_eps, act="silu" if self.use_output_gate else "none")
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.hook_conv = HookPoint()  # [batch, pos, n_heads·d_k + num_kv_heads·(d_k + d_v)]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: dict[str, Any]) -> tuple[RecurrenceInputs, Tensor | None]:
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
    if d.get("attn"):
        raise ValueError("fla gla configs with hybrid 'attn' layers are not supported")
    if not d.get("use_gk", True) or d.get("use_gv", False):
        raise ValueError(f"config.json: only use_gk=True, use_gv=False is supported, got use_gk={d.get('use_gk')}, "
                         f"use_gv={d.get('use_gv')}")
    if d.get("elementwise_affine", True) is False:
        raise ValueError("config.json: elementwise_affine=False (output norm without weight) is not supported")
    if d.get("hidden_act", "swish") != "swish":
        raise ValueError(f"config.json: hidden_act must be 'swish' (SwiGLU MLP and output gate), got {d['hidden_act']!r}")
    hidden, n_heads = d["hidden_size"], d.get("num_heads", 4)
    key_dim, value_dim = hidden * d.get("expand_k", 0.5), hidden * d.get("expand_v", 1.0)
    for name, total in (("hidden_size * expand_k", key_dim), ("hidden_size * expand_v", value_dim)):
        if total != int(total) or int(total) % n_heads:
            raise ValueError(f"config.json: {name} = {total} must be an integer divisible by num_heads = {n_heads}")
    return ModelConfig(
        architecture="gla",
        **fla_stack_config(d),
        n_heads=n_heads,
        d_k=int(key_dim) // n_heads,
        d_v=int(value_dim) // n_heads,
        options={
            "num_kv_heads": d.get("num_kv_heads") or n_heads,
            "use_short_conv": d.get("use_short_conv", False),
            "feature_map": d.get("feature_map"),
            "clamp_min": d.get("clamp_min"),
            "use_output_gate": d.get("use_output_gate", True),
        },
    )


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    m = re.match(r"^model\.layers\.(\d+)\.attn\.(.*)$", name)
    if not m:
        return fla_block_weight(name, cfg)
    prefix, rest = f"blocks.{m.group(1)}.mixer.", m.group(2)
    kv = cfg.options.get("num_kv_heads") or cfg.n_heads
    qd, kd, vd = cfg.n_heads * cfg.d_k, kv * cfg.d_k, kv * cfg.d_v
    rows = {"q": slice(0, qd), "k": slice(qd, qd + kd), "v": slice(qd + kd, qd + kd + vd)}
    p = re.match(r"^([qkv])_(proj|conv1d)\.(weight|bias)$", rest)
    if p:
        target = "in_proj_qkv.weight" if p.group(2) == "proj" else f"conv1d.{p.group(3)}"
        return WeightTarget(prefix + target, rows[p.group(1)])
    if rest.startswith("gk_proj."):
        return WeightTarget(prefix + rest)
    renames = {"g_proj.weight": "in_proj_z.weight", "g_norm_swish_gate.weight": "norm.weight",
               "g_norm.weight": "norm.weight", "o_proj.weight": "out_proj.weight"}
    return WeightTarget(prefix + renames[rest]) if rest in renames else None


register_architecture(Architecture(
    name="gla",
    mixer=GLAMixer,
    model_types=("gla",),
    config_from_hf=config_from_fla,
    map_weight=map_fla_weight,
))
