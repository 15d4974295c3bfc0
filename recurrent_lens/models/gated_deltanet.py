"""Gated DeltaNet: Qwen3.5's linear-attention layers (transformers ``qwen3_5``) and fla's ``gated_deltanet``.

Recurrence per value head, with the state ``S_t`` of shape ``d_k × d_v``::

    α_t = exp(g_t),  g_t = −exp(A_log) · softplus(a_t + dt_bias)
    S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t-1} + β_t k̂_t v_tᵀ,      o_t = S_tᵀ (q̂_t / √d_k)

with ``a_t = in_proj_a x``, ``β_t = sigmoid(in_proj_b x)`` and q̂, k̂ l2-normalised per key head
(``x·rsqrt(Σx² + 1e-6)``), then repeated (``repeat_interleave``) onto the value heads: value head ``j``
reads key head ``⌊j / (n_heads / n_key_heads)⌋``. The write is ``β_t k̂_t v_tᵀ`` and the erase term
``−β_t k̂_t k̂_tᵀ α_t S_{t-1}``.

Our layout follows Qwen3.5: one fused ``in_proj_qkv`` with rows ``[q | k | v]`` and one depthwise
``conv1d`` over the same channels; fla's separate ``q/k/v_proj`` and ``q/k/v_conv1d`` load into row
blocks of those. Options: :class:`GatedDeltaNetOptions`.
"""

from __future__ import annotations

import re
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
from recurrent_lens.models.fla_format import fla_mixer_weight, fla_stack_config, refuse_hybrid
from recurrent_lens.models.mixer import ForwardContext, MatrixMixer, fire
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import DeltaRule, RecurrenceInputs


@dataclass(frozen=True)
class GatedDeltaNetOptions(ArchOptions):
    """The ``options`` of ``gated_deltanet`` configs.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4,
        ...                   d_v=4, options={"layout": "fla", "gate_act": "sigmoid"})
        >>> GatedDeltaNetOptions.from_config(cfg).gate_act
        'sigmoid'
    """

    layout: Literal["qwen3_5", "fla"] = "qwen3_5"
    """Checkpoint key layout the weights load from: transformers' Qwen3.5 or fla's ``gated_deltanet``."""
    use_gate: bool = True
    """Output gate ``rmsnorm(o)·w ⊙ act(in_proj_z x)``; False: plain RMSNorm·w."""
    gate_act: Literal["silu", "sigmoid"] = "silu"
    """Activation of the output gate."""
    allow_neg_eigval: bool = False
    """β ← 2β, so that the transition's eigenvalues may be negative."""
    use_short_conv: bool = True
    """Short convolution on q, k, v (without it they get SiLU only); ``conv_kernel=0`` also means none."""
    conv_bias: bool = False
    """Bias on the short convolution."""
    gated_norm_eps: float | None = None
    """Epsilon of the output norm (None: ``norm_eps``)."""


class GatedDeltaNetMixer(MatrixMixer):
    """Gated DeltaNet mixer.

    Hook points, in execution order::

        hook_in      [batch, pos, d_model]
        hook_conv    [batch, pos, 2·n_key_heads·d_k + n_heads·d_v]  after the short conv and SiLU
        hook_q       [batch, pos, head, d_k]      q̂ / √d_k, expanded to value heads
        hook_k       [batch, pos, head, d_k]      k̂, expanded to value heads
        hook_v       [batch, pos, head, d_v]
        hook_beta    [batch, pos, head]
        hook_decay   [batch, pos, head]           g_t = log α_t
        hook_write   [batch, pos, head, d_k, d_v] β k̂ vᵀ
        hook_erase   [batch, pos, head, d_k, d_v] −β k̂ k̂ᵀ α S_{t-1}
        hook_state   [batch, pos, head, d_k, d_v]
        hook_read    [batch, pos, head, d_v]      S_tᵀ q_t
        hook_out     [batch, pos, d_model]
    """

    rule = DeltaRule()

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        opts = GatedDeltaNetOptions.from_config(cfg)
        self.use_gate = opts.use_gate
        self.allow_neg_eigval = opts.allow_neg_eigval
        self.use_short_conv = opts.use_short_conv and cfg.conv_kernel > 0
        Hk, H = cfg.n_key_heads, cfg.n_heads
        self.key_dim, self.value_dim = Hk * cfg.d_k, H * cfg.d_v
        channels = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(cfg.d_model, channels, bias=False)
        self.in_proj_a = nn.Linear(cfg.d_model, H, bias=False)
        self.in_proj_b = nn.Linear(cfg.d_model, H, bias=False)
        if self.use_gate:
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        if self.use_short_conv:
            self.conv1d = ShortConv(channels, cfg.conv_kernel, bias=opts.conv_bias)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.rand(H))
        eps = cfg.norm_eps if opts.gated_norm_eps is None else opts.gated_norm_eps
        self.norm = GatedRMSNorm(cfg.d_v, eps, act=opts.gate_act if self.use_gate else "none")
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.hook_conv = HookPoint()  # [batch, pos, 2·n_key_heads·d_k + n_heads·d_v]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, Tensor | None]:
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = self.in_proj_qkv(x)
        qkv = self.conv1d(qkv, cache) if self.use_short_conv else qkv
        qkv = fire(self.hook_conv, F.silu(qkv))
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        groups = cfg.n_heads // cfg.n_key_heads
        q = l2_normalize(q.reshape(B, T, cfg.n_key_heads, cfg.d_k)).repeat_interleave(groups, dim=2)
        k = l2_normalize(k.reshape(B, T, cfg.n_key_heads, cfg.d_k)).repeat_interleave(groups, dim=2)
        beta = torch.sigmoid(self.in_proj_b(x).float())
        if self.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        inputs = RecurrenceInputs(q=q * cfg.d_k**-0.5, k=k, v=v.reshape(B, T, cfg.n_heads, cfg.d_v).float(),
                                  beta=beta, decay=g)
        gate = self.in_proj_z(x).reshape(B, T, cfg.n_heads, cfg.d_v) if self.use_gate else None
        return inputs, gate

    def output(self, read: Float[Tensor, "batch pos head d_v"],
               aux: Tensor | None) -> Float[Tensor, "batch pos d_model"]:
        return norm_heads_and_project(self.norm, self.out_proj, read, aux)


def _qwen_text_config(d: dict[str, Any]) -> dict[str, Any]:
    return d["text_config"] if "text_config" in d else d


def config_from_qwen3_5(d: dict[str, Any]) -> ModelConfig:
    """Read a transformers ``qwen3_5`` (multimodal, text part only) or ``qwen3_5_text`` config."""
    t = _qwen_text_config(d)
    layer_types = tuple("attention" if lt == "full_attention" else "recurrent" for lt in t["layer_types"])
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    partial = rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 1.0))
    tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    return ModelConfig(
        architecture="gated_deltanet",
        d_model=t["hidden_size"],
        n_layers=t["num_hidden_layers"],
        d_vocab=t["vocab_size"],
        n_heads=t["linear_num_value_heads"],
        n_key_heads=t["linear_num_key_heads"],
        d_k=t["linear_key_head_dim"],
        d_v=t["linear_value_head_dim"],
        layer_types=layer_types,
        d_mlp=t["intermediate_size"],
        norm="rms_one_plus",
        norm_eps=t["rms_norm_eps"],
        conv_kernel=t["linear_conv_kernel_dim"],
        tie_embeddings=bool(tie),
        n_attn_heads=t["num_attention_heads"],
        n_kv_heads=t["num_key_value_heads"],
        d_head_attn=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        attn_output_gate=t.get("attn_output_gate", True),
        options={"layout": "qwen3_5"},
    )


_QWEN_SKIP = re.compile(r"^(mtp\.|model\.visual\.|visual\.)")
_QWEN_RENAMES = [
    (r"linear_attn\.conv1d\.weight$", "mixer.conv1d.weight"),
    (r"linear_attn\.", "mixer."),
    (r"self_attn\.(q_norm|k_norm)\.", r"attn.\1."),
    (r"self_attn\.", "attn."),
    (r"input_layernorm\.", "ln1."),
    (r"post_attention_layernorm\.", "ln2."),
]


def map_qwen3_5_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    if _QWEN_SKIP.match(name):
        return None
    name = re.sub(r"^model\.language_model\.", "model.", name)
    if name == "model.embed_tokens.weight":
        return WeightTarget("embed.weight")
    if name == "model.norm.weight":
        return WeightTarget("ln_final.weight")
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else WeightTarget("unembed.weight")
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return None
    rest = m.group(2)
    for pattern, repl in _QWEN_RENAMES:
        rest = re.sub(pattern, repl, rest)
    return WeightTarget(f"blocks.{m.group(1)}.{rest}")


def config_from_fla(d: dict[str, Any]) -> ModelConfig:
    """Read an fla ``gated_deltanet`` config (pure GDN stacks; fla's hybrid ``attn`` layers are not supported)."""
    refuse_hybrid(d, "gated_deltanet")
    head_dim, expand_v = d.get("head_dim", 256), d.get("expand_v", 2)
    n_heads, n_v_heads = d.get("num_heads", 6), d.get("num_v_heads") or d.get("num_heads", 6)
    return ModelConfig(
        architecture="gated_deltanet",
        **fla_stack_config(d),
        n_heads=n_v_heads,
        n_key_heads=n_heads,
        d_k=head_dim,
        d_v=int(head_dim * expand_v),
        options={
            "layout": "fla",
            "use_gate": d.get("use_gate", True),
            "gate_act": "sigmoid" if d.get("output_gate_activation") == "sigmoid" else "silu",
            "allow_neg_eigval": d.get("allow_neg_eigval", False),
            "use_short_conv": d.get("use_short_conv", True),
            "conv_bias": d.get("conv_bias", False),
        },
    )


FLA_RENAMES = {"a_proj.weight": "in_proj_a.weight", "b_proj.weight": "in_proj_b.weight",
               "g_proj.weight": "in_proj_z.weight", "o_norm.weight": "norm.weight",
               "o_proj.weight": "out_proj.weight", "A_log": "A_log", "dt_bias": "dt_bias"}
"""fla's names of the Gated DeltaNet parameters outside q, k, v, and ours."""


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Map an fla ``gated_deltanet`` checkpoint key onto our parameters."""
    kd, vd = cfg.n_key_heads * cfg.d_k, cfg.n_heads * cfg.d_v
    return fla_mixer_weight(name, cfg, (kd, kd, vd), FLA_RENAMES)


def _map_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    layout = GatedDeltaNetOptions.from_config(cfg).layout
    return map_fla_weight(name, cfg) if layout == "fla" else map_qwen3_5_weight(name, cfg)


def _config_from_hf(d: dict[str, Any]) -> ModelConfig:
    return config_from_fla(d) if d.get("model_type") == "gated_deltanet" else config_from_qwen3_5(d)


register_architecture(Architecture(
    name="gated_deltanet",
    mixer=GatedDeltaNetMixer,
    model_types=("qwen3_5", "qwen3_5_text", "gated_deltanet"),
    config_from_hf=_config_from_hf,
    map_weight=_map_weight,
    options=GatedDeltaNetOptions,
))
