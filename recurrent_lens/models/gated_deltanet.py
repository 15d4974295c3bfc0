"""Gated DeltaNet: Qwen3.5's linear-attention layers (transformers ``qwen3_5``) and fla's ``gated_deltanet``.

Recurrence per value head (ARCHITECTURES.md §1)::

    α_t = exp(g_t),  g_t = −exp(A_log) · softplus(a_t + dt_bias)
    S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t-1} + β_t k̂_t v_tᵀ,      o_t = S_tᵀ (q̂_t / √d_k)

with q̂, k̂ l2-normalised per key head, then repeated (``repeat_interleave``) onto the value heads.

Our layout follows Qwen3.5: one fused ``in_proj_qkv`` with rows ``[q | k | v]`` and one depthwise
``conv1d`` over the same channels; fla's separate ``q/k/v_proj`` and ``q/k/v_conv1d`` load into row
blocks of those. ``options`` read here:

- ``use_gate`` (default True): output gate ``rmsnorm(o)·w ⊙ act(g_proj x)``; False: plain RMSNorm.
- ``gate_act`` (``"silu"`` default, or ``"sigmoid"``).
- ``allow_neg_eigval`` (default False): β ← 2β.
- ``use_short_conv`` (default True; without it q, k, v get SiLU only). ``conv_kernel=0`` also means
  no short convolution, whatever this option says.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import GatedRMSNorm, ShortConv, l2_normalize, norm_heads_and_project
from recurrent_lens.models.mixer import MatrixMixer, fire
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import DeltaRule, RecurrenceInputs


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
        opts = cfg.options
        self.use_gate = opts.get("use_gate", True)
        self.allow_neg_eigval = opts.get("allow_neg_eigval", False)
        self.use_short_conv = bool(opts.get("use_short_conv", True)) and cfg.conv_kernel > 0
        Hk, H = cfg.n_key_heads, cfg.n_heads
        self.key_dim, self.value_dim = Hk * cfg.d_k, H * cfg.d_v
        channels = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(cfg.d_model, channels, bias=False)
        self.in_proj_a = nn.Linear(cfg.d_model, H, bias=False)
        self.in_proj_b = nn.Linear(cfg.d_model, H, bias=False)
        if self.use_gate:
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        if self.use_short_conv:
            self.conv1d = ShortConv(channels, cfg.conv_kernel, bias=opts.get("conv_bias", False))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.rand(H))
        self.norm = GatedRMSNorm(cfg.d_v, opts.get("gated_norm_eps", cfg.norm_eps),
                                 act=opts.get("gate_act", "silu") if self.use_gate else "none")
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.hook_conv = HookPoint()  # [batch, pos, 2·n_key_heads·d_k + n_heads·d_v]

    def project(self, x: Tensor, cache: LayerCache | None, ctx: dict[str, Any]) -> tuple[RecurrenceInputs, Any]:
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

    def output(self, read: Tensor, aux: Any) -> Tensor:
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
    if d.get("attn"):
        raise ValueError("fla gated_deltanet configs with hybrid 'attn' layers are not supported")
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


def fla_mlp_width(d: dict[str, Any]) -> int:
    """fla ``GatedMLP`` width: ``intermediate_size``, else 2/3·hidden_ratio·hidden rounded up to 256."""
    if d.get("intermediate_size"):
        return d["intermediate_size"]
    ratio = d.get("hidden_ratio") or 4
    return 256 * -(-int(d["hidden_size"] * ratio * 2 / 3) // 256)


def fla_stack_config(d: dict[str, Any]) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every fla SwiGLU stack (GDN, DeltaNet, GLA) reads the same way."""
    return dict(d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], d_vocab=d["vocab_size"],
                d_mlp=fla_mlp_width(d), norm="rms", norm_eps=d.get("norm_eps", 1e-6),
                conv_kernel=d.get("conv_size", 4), tie_embeddings=d.get("tie_word_embeddings", False))


def fla_block_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """The block, embedding and head keys every fla model shares (``attn_norm``, ``mlp``, ``lm_head``)."""
    if name in ("model.embeddings.weight", "model.embed_tokens.weight"):
        return WeightTarget("embed.weight")
    if name.startswith("model.norm."):
        return WeightTarget("ln_final." + name.split(".", 2)[2])
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else WeightTarget("unembed.weight")
    m = re.match(r"^model\.layers\.(\d+)\.(attn_norm|mlp_norm|mlp)\.(.*)$", name)
    if m:
        part = {"attn_norm": "ln1", "mlp_norm": "ln2", "mlp": "mlp"}[m.group(2)]
        return WeightTarget(f"blocks.{m.group(1)}.{part}.{m.group(3)}")
    return None


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    m = re.match(r"^model\.layers\.(\d+)\.attn\.(.*)$", name)
    if not m:
        return fla_block_weight(name, cfg)
    prefix, rest = f"blocks.{m.group(1)}.mixer.", m.group(2)
    kd, vd = cfg.n_key_heads * cfg.d_k, cfg.n_heads * cfg.d_v
    rows = {"q": slice(0, kd), "k": slice(kd, 2 * kd), "v": slice(2 * kd, 2 * kd + vd)}
    p = re.match(r"^([qkv])_(proj|conv1d)\.(weight|bias)$", rest)
    if p:
        target = "in_proj_qkv.weight" if p.group(2) == "proj" else f"conv1d.{p.group(3)}"
        return WeightTarget(prefix + target, rows[p.group(1)])
    renames = {"a_proj.weight": "in_proj_a.weight", "b_proj.weight": "in_proj_b.weight",
               "g_proj.weight": "in_proj_z.weight", "o_norm.weight": "norm.weight",
               "o_proj.weight": "out_proj.weight", "A_log": "A_log", "dt_bias": "dt_bias"}
    return WeightTarget(prefix + renames[rest]) if rest in renames else None


def _map_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    layout = cfg.options.get("layout", "qwen3_5")
    return map_fla_weight(name, cfg) if layout == "fla" else map_qwen3_5_weight(name, cfg)


def _config_from_hf(d: dict[str, Any]) -> ModelConfig:
    return config_from_fla(d) if d.get("model_type") == "gated_deltanet" else config_from_qwen3_5(d)


register_architecture(Architecture(
    name="gated_deltanet",
    mixer=GatedDeltaNetMixer,
    model_types=("qwen3_5", "qwen3_5_text", "gated_deltanet"),
    config_from_hf=_config_from_hf,
    map_weight=_map_weight,
))
