"""RWKV-7 ("Goose"), in fla's ``rwkv7`` layout (e.g. fla-hub/rwkv7-1.5B-world).

Time mix per head, with the state in the K×V orientation (BlinkDL stores its transpose)::

    xx   = x_{t-1} − x_t                                   (x_{-1}: zero, or the cached last token)
    x_c  = x + xx ⊙ μ_c                                    c ∈ {r, w, k, v, a, g}
    r    = W_r x_r,   k₀ = W_k x_k,   v₀ = W_v x_v
    w    = −e^{−1/2} · σ(w_lora(x_w))                      the log-decay per key channel, decay ∈ (0.545, 1)
    a    = σ(a_lora(x_a))                                  the in-context learning rate
    g    = g_lora(x_g)                                     W2 σ(W1 x_g), no outer sigmoid
    v    = v₀ in layer 0 (which hands it on as v_first); later layers: lerp(v₀, v_first, σ(v_lora(x_v)))
    κ̂    = l2norm(k₀ ⊙ k_k) per head                        the removal key
    k    = k₀ ⊙ (1 + (a − 1) ⊙ k_a)
    S_t  = diag(e^{w_t}) S_{t-1} − (κ̂_t⊙a_t)(κ̂_tᵀ S_{t-1}) + k_t v_tᵀ
    o_t  = S_tᵀ r_t                                        read scale 1 (no d_k^-1/2)
    out  = W_o [(GroupNorm(o) + ((r ⊙ k ⊙ r_k)·1) v) ⊙ g]   GroupNorm: one group per head, then the bonus

The write is ``k_t v_tᵀ`` and the erase term ``−(κ̂_t⊙a_t)(κ̂_tᵀ S_{t-1})``.

The block is fla's ``RWKV7Block``: LayerNorms with bias; layer 0 first replaces the stream by
``pre_norm(x)`` (BlinkDL's ``ln0``, our ``ln_embed``); the channel mix is :class:`TokenShiftReLU2`
(``cfg.mlp = "relu2"``). ``v_first`` travels from layer 0 to the later layers in the forward's
:class:`RWKV7Context`; it is recomputed on every call (decode steps included) and never cached, as in fla.
Options: :class:`RWKV7Options`.
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
from recurrent_lens.models.components import LayerNorm, l2_normalize
from recurrent_lens.models.fla_format import fla_block_weight, fla_mixer_key, refuse_hybrid
from recurrent_lens.models.mixer import ForwardContext, MatrixMixer, fire
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import Architecture, WeightTarget, register_architecture
from recurrent_lens.models.scan import DPLRRule, RecurrenceInputs

MIX_NAMES = ("r", "w", "k", "v", "a", "g")
"""Rows of ``x_lerp``: the token-shift interpolation coefficients μ_c, in fla's ``x_x`` order."""

MAX_DECAY = -math.exp(-0.5)
"""The most negative log-decay: ``w = MAX_DECAY · σ(...)``, BlinkDL's ``exp(−exp(−softplus(−·) − 0.5))``."""


@dataclass(frozen=True)
class RWKV7Options(ArchOptions):
    """The ``options`` of ``rwkv7`` configs.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="rwkv7", d_model=64, n_layers=1, d_vocab=10, n_heads=4, d_k=16, d_v=16,
        ...                   options={"decay_low_rank_dim": 8})
        >>> RWKV7Options.from_config(cfg).low_rank_dims(cfg)
        {'decay_low_rank_dim': 8, 'a_low_rank_dim': 32, 'v_low_rank_dim': 32, 'gate_low_rank_dim': 32}
    """

    decay_low_rank_dim: int | None = None
    """Rank of ``w_lora`` (None: fla's size-dependent formula, :func:`default_low_rank_dims`)."""
    a_low_rank_dim: int | None = None
    """Rank of ``a_lora`` (None: fla's formula)."""
    v_low_rank_dim: int | None = None
    """Rank of ``v_lora`` (None: fla's formula)."""
    gate_low_rank_dim: int | None = None
    """Rank of ``g_lora`` (None: fla's formula)."""
    fuse_norm: bool = True
    """The removal key is normalised as ``x·rsqrt(Σx² + 1e-6)`` (fla's ``l2_norm``, used when ``fuse_norm``);
    False gives ``F.normalize`` (eps 1e-12)."""
    group_norm_eps: float | None = None
    """Epsilon of the per-head GroupNorm (None: ``d_k · norm_eps``, fla's ``head_dim · norm_eps``)."""
    pre_norm: bool = True
    """The LayerNorm on the embedding, ``ln_embed`` (fla's ``norm_first``)."""

    def low_rank_dims(self, cfg: ModelConfig) -> dict[str, int]:
        """The four LoRA ranks, fla's defaults where unset."""
        defaults = default_low_rank_dims(cfg.d_model, cfg.d_k)
        return {name: defaults[name] if getattr(self, name) is None else getattr(self, name) for name in defaults}


def default_low_rank_dims(d_model: int, d_k: int) -> dict[str, int]:
    """fla's LoRA ranks when a config leaves them unset (``RWKV7Attention.__init__``)."""
    factor = d_k / 64

    def rank(mult: float, scale: float) -> int:
        return max(32, int(round(mult * d_model**0.5 * scale / 32) * 32))

    return {"decay_low_rank_dim": rank(2.5, factor), "a_low_rank_dim": rank(2.5, factor),
            "v_low_rank_dim": rank(1.7, factor), "gate_low_rank_dim": rank(5.0, 1.0)}


class LoRA(nn.Module):
    """``up(act(down x))``: RWKV-7's low-rank maps (fla ``LoRA``: ``lora.0`` = down, ``lora.2`` = up)."""

    def __init__(self, d_in: int, d_out: int, rank: int, act: str | None, bias: bool = True) -> None:
        super().__init__()
        if act not in (None, "tanh", "sigmoid"):
            raise ValueError(f"act: expected None, 'tanh' or 'sigmoid', got {act!r}")
        self.act = act
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        h = self.down(x)
        if self.act == "tanh":
            h = torch.tanh(h)
        elif self.act == "sigmoid":
            h = torch.sigmoid(h)
        return self.up(h)

    def extra_repr(self) -> str:
        return f"act={self.act}"


@dataclass
class RWKV7Context(ForwardContext):
    """The forward context of RWKV-7 layers: layer 0 sets ``v_first``, later layers read it.

    Attributes:
        v_first: ``[batch, pos, head, d_v]`` layer 0's value v₀ (after ``hook_v_first``), or ``None`` before
            layer 0 has run.
    """

    v_first: Float[Tensor, "batch pos head d_v"] | None = None


class RWKV7Mixer(MatrixMixer):
    """RWKV-7 time mix: a diagonal-plus-low-rank (DPLR) recurrence with a post-norm bonus term.

    Hook points, in execution order::

        hook_in           [batch, pos, d_model]
        hook_v_first      [batch, pos, head, d_v]       layer 0: the v₀ handed to later layers;
                                                        later layers: the v_first this layer mixes toward
        hook_a            [batch, pos, head, d_k]       in-context learning rate σ(a_lora(x_a))
        hook_g            [batch, pos, head, d_v]       output gate g_lora(x_g)
        hook_removal_key  [batch, pos, head, d_k]       κ̂ = l2norm(k₀ ⊙ k_k)
        hook_q            [batch, pos, head, d_k]       r (read scale 1)
        hook_k            [batch, pos, head, d_k]       k₀ ⊙ (1 + (a − 1) ⊙ k_a)
        hook_v            [batch, pos, head, d_v]       v after the v_first mixing
        hook_decay        [batch, pos, head, d_k]       w, the log-decay per key channel
        hook_write        [batch, pos, head, d_k, d_v]  k vᵀ
        hook_erase        [batch, pos, head, d_k, d_v]  −(κ̂ ⊙ a)(κ̂ᵀ S_{t-1})
        hook_state        [batch, pos, head, d_k, d_v]  S_t
        hook_read         [batch, pos, head, d_v]       S_tᵀ r (no bonus: it is added after the GroupNorm)
        hook_bonus        [batch, pos, head, d_v]       ((r ⊙ k ⊙ r_k)·1) v, added to GroupNorm(read)
        hook_out          [batch, pos, d_model]

    An edit of ``hook_a`` reaches both the key and the erase term, one of ``hook_removal_key`` the erase
    term; edits of ``hook_q``/``hook_k``/``hook_v`` reach both the recurrence and the bonus, as in the
    reference, which feeds the same tensors to both. There is no ``hook_beta``: RWKV-7 has no write
    strength. With a cache, the last input token of the time mix is carried in
    ``cache.extra["attn_shift"]`` (the channel mix keeps its own in ``"ffn_shift"``).
    """

    rule = DPLRRule()
    has_beta = False
    has_decay = True
    context_type = RWKV7Context

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        opts = RWKV7Options.from_config(cfg)
        ranks = opts.low_rank_dims(cfg)
        H, dk, dv = cfg.n_heads, cfg.d_k, cfg.d_v
        self.key_dim, self.value_dim = H * dk, H * dv
        self.fuse_norm = opts.fuse_norm
        self.group_norm_eps = dk * cfg.norm_eps if opts.group_norm_eps is None else opts.group_norm_eps
        self.x_lerp = nn.Parameter(torch.full((len(MIX_NAMES), cfg.d_model), 0.5))
        self.k_k = nn.Parameter(torch.ones(self.key_dim))
        self.k_a = nn.Parameter(torch.ones(self.key_dim))
        self.r_k = nn.Parameter(torch.zeros(H, dk))
        self.r_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.w_lora = LoRA(cfg.d_model, self.key_dim, ranks["decay_low_rank_dim"], "tanh")
        self.a_lora = LoRA(cfg.d_model, self.key_dim, ranks["a_low_rank_dim"], None)
        if layer > 0:
            self.v_lora = LoRA(cfg.d_model, self.value_dim, ranks["v_low_rank_dim"], None)
        self.g_lora = LoRA(cfg.d_model, self.value_dim, ranks["gate_low_rank_dim"], "sigmoid", bias=False)
        self.g_norm = GroupNormPerHead(H, self.value_dim, self.group_norm_eps)
        self.hook_v_first = HookPoint()  # [batch, pos, head, d_v]
        self.hook_a = HookPoint()  # [batch, pos, head, d_k]
        self.hook_g = HookPoint()  # [batch, pos, head, d_v]
        self.hook_removal_key = HookPoint()  # [batch, pos, head, d_k]
        self.hook_bonus = HookPoint()  # [batch, pos, head, d_v]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, Tensor]:
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.d_k, self.d_v
        xx = token_shift(x, cache, "attn_shift")
        x_r, x_w, x_k, x_v, x_a, x_g = (x + xx * mu for mu in self.x_lerp.to(x.dtype))

        def heads(t: Tensor, d: int) -> Tensor:
            return t.float().reshape(B, T, H, d)

        r = heads(self.r_proj(x_r), dk)
        w = MAX_DECAY * torch.sigmoid(heads(self.w_lora(x_w), dk))
        k0 = heads(self.k_proj(x_k), dk)
        v0 = heads(self.v_proj(x_v), dv)
        if self.layer == 0:
            ctx.v_first = fire(self.hook_v_first, v0)
            v = v0
        else:
            if ctx.v_first is None:
                raise ValueError(f"blocks.{self.layer}.mixer: the context holds no v_first; RWKV-7 layers after "
                                 "the first need layer 0 to run earlier in the same forward")
            v_first = fire(self.hook_v_first, ctx.v_first)
            v = torch.lerp(v0, v_first, torch.sigmoid(heads(self.v_lora(x_v), dv)))
        a = fire(self.hook_a, torch.sigmoid(heads(self.a_lora(x_a), dk)))
        g = fire(self.hook_g, heads(self.g_lora(x_g), dv))
        kk = k0 * self.k_k.float().reshape(H, dk)
        kappa = l2_normalize(kk, 1e-6) if self.fuse_norm else F.normalize(kk, dim=-1, eps=1e-12)
        kappa = fire(self.hook_removal_key, kappa)
        k = k0 + k0 * (a - 1) * self.k_a.float().reshape(H, dk)
        inputs = RecurrenceInputs(q=r, k=k, v=v, decay=w, extra={"erase_key": kappa, "a": a})
        return inputs, g

    def output_with_inputs(self, read: Float[Tensor, "batch pos head d_v"], inputs: RecurrenceInputs,
                           aux: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """``W_o [(GroupNorm(read) + bonus) ⊙ g]``, the bonus from the recurrence's r, k, v as hooked."""
        B, T = read.shape[:2]
        bonus = (inputs.q * inputs.k * self.r_k.float()).sum(-1, keepdim=True) * inputs.v
        bonus = fire(self.hook_bonus, bonus)
        o = (self.g_norm(read) + bonus) * aux
        return self.o_proj(o.reshape(B, T, self.value_dim).to(self.o_proj.weight.dtype))


def token_shift(x: Float[Tensor, "batch pos d"], cache: LayerCache | None, key: str) -> Float[Tensor, "batch pos d"]:
    """``x_{t-1} − x_t`` (``x_{-1}``: zero, or the last token of the previous call, kept in ``cache.extra[key]``).

    Example:
        >>> import torch
        >>> from recurrent_lens.models.cache import LayerCache
        >>> cache = LayerCache()
        >>> token_shift(torch.tensor([[[1.0], [3.0]]]), cache, "shift").flatten().tolist()
        [-1.0, -2.0]
        >>> token_shift(torch.tensor([[[4.0]]]), cache, "shift").flatten().tolist()
        [-1.0]
    """
    prev = x.new_zeros(x.shape[0], 1, x.shape[-1])
    if cache is not None and key in cache.extra:
        prev = cache.extra[key].to(x.dtype)
    if cache is not None:
        cache.extra[key] = x[:, -1:]
    return torch.cat([prev, x[:, :-1]], dim=1) - x


class TokenShiftReLU2(nn.Module):
    """RWKV-7's channel mix: ``value(relu(key(x + (x_{t-1} − x)⊙μ))²)`` with its own token shift, carried in
    ``cache.extra["ffn_shift"]``.

    Hook points::

        hook_pre   [batch, pos, d_mlp]   key(x + (x_{t-1} − x)⊙μ)
        hook_post  [batch, pos, d_mlp]   relu(hook_pre)²
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(cfg.d_model))
        self.key = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.value = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """``[d_mlp, d_model]``: the output map as TransformerLens stores it (``hook_post @ W_out`` is the output)."""
        return self.value.weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"],
                cache: LayerCache | None = None) -> Float[Tensor, "batch pos d_model"]:
        pre = fire(self.hook_pre, self.key(x + token_shift(x, cache, "ffn_shift") * self.x_k))
        return self.value(fire(self.hook_post, F.relu(pre).square()))


class GroupNormPerHead(nn.Module):
    """GroupNorm with one group per head over ``[..., head, d_v]``, affine with bias, in fp32 (fla ``g_norm``)."""

    def __init__(self, n_heads: int, d: int, eps: float) -> None:
        super().__init__()
        self.n_heads, self.eps = n_heads, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Float[Tensor, "*batch head d_v"]) -> Float[Tensor, "*batch head d_v"]:
        shape = x.shape
        y = F.group_norm(x.float().reshape(-1, shape[-2] * shape[-1]), self.n_heads,
                         self.weight.float(), self.bias.float(), self.eps)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"groups={self.n_heads}, {self.weight.shape[0]}, eps={self.eps}"


def _embed_norm(cfg: ModelConfig) -> nn.Module:
    return LayerNorm(cfg.d_model, cfg.norm_eps) if RWKV7Options.from_config(cfg).pre_norm else nn.Identity()


def config_from_fla(d: dict[str, Any]) -> ModelConfig:
    """Read an fla ``rwkv7`` ``config.json``."""
    refuse_hybrid(d, "rwkv7")
    if d.get("hidden_act", "sqrelu") != "sqrelu":
        raise ValueError(f"hidden_act: expected 'sqrelu', got {d['hidden_act']!r}")
    if not d.get("norm_bias", True):
        raise ValueError("norm_bias: expected True (LayerNorms with bias), got False")
    hidden, n_layers = d["hidden_size"], d["num_hidden_layers"]
    head_dim, num_heads = d.get("head_dim"), d.get("num_heads")
    if head_dim is None and num_heads is None:
        head_dim = 64
    if head_dim is None:
        head_dim = hidden // num_heads
    num_heads = hidden // head_dim
    value_dim = d.get("value_dim") or hidden
    value_dims = set(value_dim) if isinstance(value_dim, list) else {value_dim}
    if len(value_dims) != 1:
        raise ValueError(f"value_dim: expected the same value for every layer, got {value_dim}")
    value_dim = value_dims.pop()
    d_mlp = d.get("intermediate_size")
    if d_mlp is None:
        d_mlp = 32 * -(-int(hidden * (d.get("hidden_ratio") or 4)) // 32)
    norm_eps = d.get("norm_eps", 1e-5)
    options: dict[str, Any] = {
        "fuse_norm": d.get("fuse_norm", True),
        "group_norm_eps": head_dim * norm_eps,
        "pre_norm": d.get("norm_first", True),
    }
    defaults = default_low_rank_dims(hidden, head_dim)
    for name in defaults:
        options[name] = d.get(name) or defaults[name]
    return ModelConfig(
        architecture="rwkv7",
        d_model=hidden,
        n_layers=n_layers,
        d_vocab=d["vocab_size"],
        n_heads=num_heads,
        d_k=head_dim,
        d_v=value_dim // num_heads,
        d_mlp=d_mlp,
        mlp="relu2",
        norm="layer",
        norm_eps=norm_eps,
        conv_kernel=0,
        tie_embeddings=d.get("tie_word_embeddings", False),
        options=options,
    )


_ATTN_RENAMES = {
    "k_k": "k_k", "k_a": "k_a", "r_k": "r_k",
    "r_proj.weight": "r_proj.weight", "k_proj.weight": "k_proj.weight",
    "v_proj.weight": "v_proj.weight", "o_proj.weight": "o_proj.weight",
    "g_norm.weight": "g_norm.weight", "g_norm.bias": "g_norm.bias",
}


def map_fla_weight(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Map an fla ``rwkv7`` checkpoint key onto our parameters (``x_x`` of older fla included)."""
    if name.startswith("model.layers.0.pre_norm."):
        return WeightTarget("ln_embed." + name.rsplit(".", 1)[1])
    m = re.match(r"^model\.layers\.(\d+)\.(ffn_norm|ffn)\.(.*)$", name)
    if m:
        part = "ln2" if m.group(2) == "ffn_norm" else "mlp"
        return WeightTarget(f"blocks.{m.group(1)}.{part}.{m.group(3)}")
    key = fla_mixer_key(name)
    if key is None:
        return fla_block_weight(name, cfg)
    prefix, rest = key
    C = cfg.d_model
    if rest == "x_x":
        return WeightTarget(prefix + "x_lerp", transform=lambda t: t.reshape(len(MIX_NAMES), C))
    p = re.match(r"^x_([rwkvag])$", rest)
    if p:
        row = MIX_NAMES.index(p.group(1))
        return WeightTarget(prefix + "x_lerp", rows=slice(row, row + 1), transform=lambda t: t.reshape(1, C))
    p = re.match(r"^([wavg])_lora\.lora\.([02])\.(weight|bias)$", rest)
    if p:
        return WeightTarget(f"{prefix}{p.group(1)}_lora.{'down' if p.group(2) == '0' else 'up'}.{p.group(3)}")
    return WeightTarget(prefix + _ATTN_RENAMES[rest]) if rest in _ATTN_RENAMES else None


register_architecture(Architecture(
    name="rwkv7",
    mixer=RWKV7Mixer,
    model_types=("rwkv7",),
    config_from_hf=config_from_fla,
    map_weight=map_fla_weight,
    embed_norm=_embed_norm,
    options=RWKV7Options,
    mlp=TokenShiftReLU2,
))
