"""What every flash-linear-attention (fla) checkpoint shares: config fields and weight names.

fla's models (``gated_deltanet``, ``delta_net``, ``gla``, ``rwkv7``) store their blocks the same way:
``model.embeddings`` (or ``model.embed_tokens``), per layer ``attn_norm``, the mixer under ``attn``,
``mlp_norm`` and a SwiGLU ``mlp`` (``GatedMLP``), then ``model.norm`` and an untied ``lm_head`` unless
``tie_word_embeddings``. Their mixers keep separate ``q_proj``/``k_proj``/``v_proj`` and
``q_conv1d``/``k_conv1d``/``v_conv1d``; ours fuse them into one ``in_proj_qkv`` and one depthwise
``conv1d``, so each of fla's tensors loads into a row block of ours, in the order ``[q | k | v]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.registry import WeightTarget

_FLA_MIXER_KEY = re.compile(r"^model\.layers\.(\d+)\.attn\.(.*)$")
_FLA_QKV_KEY = re.compile(r"^([qkv])_(proj|conv1d)\.(weight|bias)$")


def refuse_hybrid(d: dict[str, Any], model_type: str) -> None:
    """fla configs can interleave softmax-attention layers (an ``attn`` entry); the loaders support pure stacks."""
    if d.get("attn"):
        raise ValueError(f"fla {model_type} configs with hybrid 'attn' layers are not supported")


def fla_mlp_width(d: dict[str, Any]) -> int:
    """fla ``GatedMLP`` width: ``intermediate_size``, else 2/3·hidden_ratio·hidden rounded up to 256.

    Example:
        >>> fla_mlp_width({"hidden_size": 2048, "hidden_ratio": 4})
        5632
    """
    if d.get("intermediate_size"):
        return d["intermediate_size"]
    ratio = d.get("hidden_ratio") or 4
    return 256 * -(-int(d["hidden_size"] * ratio * 2 / 3) // 256)


def fla_stack_config(d: dict[str, Any]) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every fla SwiGLU stack (GDN, DeltaNet, GLA) reads the same way."""
    return dict(d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], d_vocab=d["vocab_size"],
                d_mlp=fla_mlp_width(d), norm="rms", norm_eps=d.get("norm_eps", 1e-6),
                conv_kernel=d.get("conv_size", 4), tie_embeddings=d.get("tie_word_embeddings", False))


def fla_head_dim(total: float | int, n_heads: int, what: str) -> int:
    """A per-head width from fla's ``hidden_size · expand_*``, which must split evenly over the heads.

    Example:
        >>> fla_head_dim(2048 * 0.5, 4, "hidden_size * expand_k")
        256
        >>> fla_head_dim(100 * 0.5, 4, "hidden_size * expand_k")
        Traceback (most recent call last):
        ...
        ValueError: config.json: hidden_size * expand_k = 50.0 must be an integer divisible by num_heads = 4
    """
    if total != int(total) or int(total) % n_heads:
        raise ValueError(f"config.json: {what} = {total} must be an integer divisible by num_heads = {n_heads}")
    return int(total) // n_heads


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


def fla_mixer_key(name: str) -> tuple[str, str] | None:
    """``(our mixer's prefix, the rest of the key)`` for fla's ``model.layers.{i}.attn.*`` keys, else ``None``.

    Example:
        >>> fla_mixer_key("model.layers.3.attn.o_proj.weight")
        ('blocks.3.mixer.', 'o_proj.weight')
    """
    m = _FLA_MIXER_KEY.match(name)
    return (f"blocks.{m.group(1)}.mixer.", m.group(2)) if m else None


def fla_mixer_weight(name: str, cfg: ModelConfig, qkv_widths: tuple[int, int, int], renames: Mapping[str, str],
                     keep_prefixes: tuple[str, ...] = ()) -> WeightTarget | None:
    """Map an fla checkpoint key of a mixer whose q, k, v are fused into ``in_proj_qkv`` (and ``conv1d``).

    Args:
        name: the checkpoint key; keys outside ``attn`` go to :func:`fla_block_weight`.
        cfg: the model's configuration.
        qkv_widths: the rows of q, k and v in ``in_proj_qkv`` (and channels in ``conv1d``).
        renames: the mixer's other fla parameter names (after ``attn.``) and ours.
        keep_prefixes: parameter name prefixes that are the same in fla and here.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="delta_net", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4, d_v=4)
        >>> fla_mixer_weight("model.layers.0.attn.k_conv1d.weight", cfg, (8, 8, 8), {})
        WeightTarget(name='blocks.0.mixer.conv1d.weight', rows=slice(8, 16, None), transform=None)
    """
    key = fla_mixer_key(name)
    if key is None:
        return fla_block_weight(name, cfg)
    prefix, rest = key
    p = _FLA_QKV_KEY.match(rest)
    if p:
        q, k, v = qkv_widths
        rows = {"q": slice(0, q), "k": slice(q, q + k), "v": slice(q + k, q + k + v)}[p.group(1)]
        target = "in_proj_qkv.weight" if p.group(2) == "proj" else f"conv1d.{p.group(3)}"
        return WeightTarget(prefix + target, rows)
    if rest.startswith(keep_prefixes):
        return WeightTarget(prefix + rest)
    return WeightTarget(prefix + renames[rest]) if rest in renames else None
