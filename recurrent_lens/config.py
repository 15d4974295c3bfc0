"""The one configuration dataclass shared by every architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from recurrent_lens.models.registry import get_architecture

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a dtype name (``"bfloat16"``) or a ``torch.dtype`` to a ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    """Configuration of a :class:`~recurrent_lens.HookedRecurrentModel`.

    One dataclass serves every architecture. Settings that only one architecture reads live in
    ``options``, a dict validated against that architecture's
    :class:`~recurrent_lens.models.options.ArchOptions` when the config is built (the fields are documented there).

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=64, n_layers=2, d_vocab=100,
        ...                   n_heads=2, d_k=16, d_v=16, d_mlp=128)
        >>> cfg.layer_types
        ('recurrent', 'recurrent')
        >>> ModelConfig(architecture="gated_deltanet", d_model=64, n_layers=2, d_vocab=100, n_heads=2, d_k=16,
        ...             d_v=16, options={"use_gat": False})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: options: architecture 'gated_deltanet' has no option 'use_gat'; valid options: [...]
    """

    architecture: str
    """Registry name of the recurrent mixer (``gated_deltanet``, ``mamba2``, ``rwkv7``, ``delta_net``, ``gla``...)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of blocks."""
    d_vocab: int
    """Vocabulary size (rows of the embedding, including padding rows)."""
    n_heads: int
    """Heads of the recurrence, i.e. the number of ``d_k x d_v`` state matrices per layer (value heads)."""
    d_k: int
    """Key (state row) dimension per head."""
    d_v: int
    """Value (state column) dimension per head."""
    n_key_heads: int | None = None
    """Query/key heads before expansion to ``n_heads`` (grouped value attention); ``None`` means ``n_heads``."""
    layer_types: tuple[str, ...] | None = None
    """Per layer ``"recurrent"`` or ``"attention"`` (hybrids such as Qwen3.5); ``None`` means all recurrent."""
    d_mlp: int = 0
    """Hidden width of the MLP; 0 means the block has no MLP (Mamba-2)."""
    mlp: str = "swiglu"
    """MLP kind: ``"swiglu"`` (down(silu(gate x) * up x)), shared by every architecture, or ``"relu2"``, a ReLU²
    MLP that an architecture builds itself (RWKV-7's token-shifted channel mix; see ``Architecture.mlp``)."""
    norm: str = "rms"
    """Block norm: ``"rms"`` (x·w), ``"rms_one_plus"`` (Qwen3.5's x·(1+w)) or ``"layer"`` (LayerNorm with bias)."""
    norm_eps: float = 1e-6
    """Epsilon of the block and final norms."""
    conv_kernel: int = 4
    """Width of the depthwise causal short convolution (0: none, in every architecture that has one)."""
    tie_embeddings: bool = False
    """Whether the unembedding reuses the embedding matrix."""
    residual_in_fp32: bool = False
    """Keep the residual stream in fp32 whatever the weights' dtype (Mamba-2)."""
    n_attn_heads: int = 0
    """Query heads of the softmax-attention layers of a hybrid."""
    n_kv_heads: int = 0
    """Key/value heads of the attention layers (GQA)."""
    d_head_attn: int = 0
    """Head dimension of the attention layers."""
    rotary_dim: int = 0
    """Leading dimensions of each attention head that receive RoPE (partial rotary)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    attn_output_gate: bool = False
    """Qwen3.5's per-head sigmoid output gate packed into ``q_proj``."""
    chunk_size: int = 64
    """Chunk length of the chunked scans (fast path and chunk-parallel state materialisation)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Architecture-specific settings by name: fields of the architecture's
    :class:`~recurrent_lens.models.options.ArchOptions` (missing ones take their defaults). Unknown names and values
    of the wrong type are refused when the config is built."""
    dtype: str = "float32"
    """Dtype of the weights; recurrences, gates and norms always compute in fp32."""
    device: str = "cpu"
    """Device the weights live on."""
    source: str | None = None
    """Where the weights came from (directory or hub id), for ``repr`` and tokenizer loading."""
    default_prepend_bos: bool | None = None
    """What ``to_tokens`` does about a BOS token when ``prepend_bos`` is not given (TransformerLens'
    ``cfg.default_prepend_bos``): ``True`` puts the tokenizer's BOS in front of every text, ``False`` adds
    no special token at all, ``None`` keeps the tokenizer's own convention (what ``tokenizer(text)``
    gives, as the checkpoint was trained)."""
    n_ctx: int | None = None
    """Context length the checkpoint was trained with, when known (TransformerLens' ``cfg.n_ctx``).
    ``None``: no limit is recorded; recurrent layers have no position limit."""

    def __post_init__(self) -> None:
        if self.n_key_heads is None:
            self.n_key_heads = self.n_heads
        if self.layer_types is None:
            self.layer_types = ("recurrent",) * self.n_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(
                f"layer_types: expected {self.n_layers} entries (n_layers), got {len(self.layer_types)}"
            )
        bad = sorted(set(self.layer_types) - {"recurrent", "attention"})
        if bad:
            raise ValueError(f"layer_types: expected 'recurrent' or 'attention', got {bad}")
        if self.n_heads % self.n_key_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_heads ({self.n_key_heads})"
            )
        if self.norm not in ("rms", "rms_one_plus", "layer"):
            raise ValueError(f"norm: expected 'rms', 'rms_one_plus' or 'layer', got {self.norm!r}")
        if self.mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp: expected 'swiglu' or 'relu2', got {self.mlp!r}")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel: expected >= 0 (0: no short convolution), got {self.conv_kernel}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {self.chunk_size}")
        resolve_dtype(self.dtype)
        if self.default_prepend_bos not in (None, True, False):
            raise ValueError(f"default_prepend_bos: expected True, False or None, got {self.default_prepend_bos!r}")
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int)
                                       or self.n_ctx < 1):
            raise ValueError(f"n_ctx: expected None or a positive int, got {self.n_ctx!r}")
        if "attention" in self.layer_types and not (self.n_attn_heads and self.n_kv_heads and self.d_head_attn):
            raise ValueError("attention layers need n_attn_heads, n_kv_heads and d_head_attn")
        get_architecture(self.architecture).options.from_config(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the layers whose mixer is a matrix recurrence."""
        return [i for i, t in enumerate(self.layer_types) if t == "recurrent"]

    # ------------------------------------------------------------------ TransformerLens' cfg fields
    # Read-only views, derived from the fields above, of the configuration fields TransformerLens'
    # helpers (ActivationCache, patching, logit lens, utilities) read from ``model.cfg``.

    @property
    def has_attention(self) -> bool:
        """Whether any layer is softmax attention (a hybrid such as Qwen3.5)."""
        return "attention" in self.layer_types

    @property
    def normalization_type(self) -> str:
        """``"RMS"`` (``norm`` ``"rms"`` or ``"rms_one_plus"``) or ``"LN"`` (``"layer"``). The norms are not
        folded into the next weights, so ``ln_final`` applies its own weight (and bias)."""
        return "LN" if self.norm == "layer" else "RMS"

    @property
    def attn_only(self) -> bool:
        """``True`` when blocks have no MLP (``d_mlp == 0``, Mamba-2): there is no ``hook_mlp_out``."""
        return self.d_mlp == 0

    @property
    def act_fn(self) -> str | None:
        """The MLP's activation by TransformerLens' name: ``"silu"`` (SwiGLU), ``"relu2"`` (RWKV-7), or
        ``None`` without an MLP."""
        if self.d_mlp == 0:
            return None
        return "silu" if self.mlp == "swiglu" else "relu2"

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (SwiGLU)."""
        return self.d_mlp > 0 and self.mlp == "swiglu"

    @property
    def d_head(self) -> int:
        """Per-head width in TransformerLens' sense: the attention head size ``d_head_attn`` when the model
        has attention layers, otherwise the width ``d_v`` each recurrent head reads out."""
        return self.d_head_attn if self.has_attention else self.d_v

    @property
    def n_key_value_heads(self) -> int | None:
        """Heads of ``hook_k``/``hook_v`` when they differ from ``n_heads``, as TransformerLens defines it.

        ``None`` in all-recurrent models (keys and values are expanded to ``n_heads``). In a hybrid it is
        the attention layers' ``n_kv_heads`` if the recurrent layers' keys have as many heads; otherwise no
        single number is right for every layer, and reading it raises an AttributeError that says so (so
        that TransformerLens' head sweeps over ``k``/``v`` stop instead of covering some heads only; give
        them an ``index_df`` per layer kind instead).
        """
        if not self.has_attention:
            return None
        if self.recurrent_layers and self.n_kv_heads != self.n_heads:
            raise AttributeError(
                f"n_key_value_heads: this hybrid's hook_k/hook_v have {self.n_heads} heads in recurrent layers "
                f"{self.recurrent_layers} and {self.n_kv_heads} (n_kv_heads) in attention layers "
                f"{[i for i, t in enumerate(self.layer_types) if t == 'attention']}; no single count fits every "
                "layer: sweep each layer kind separately (TransformerLens' patching: pass index_df)")
        return self.n_kv_heads

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits (``d_vocab``)."""
        return self.d_vocab

    @property
    def model_name(self) -> str:
        """The checkpoint's name (last part of ``source``), or the architecture for a model built from a config."""
        if self.source:
            return str(self.source).rstrip("/").rsplit("/", 1)[-1]
        return self.architecture

    @property
    def original_architecture(self) -> str:
        """The registry name of the recurrent architecture (``gated_deltanet``, ``mamba2``, ...)."""
        return self.architecture

    @property
    def positional_embedding_type(self) -> str:
        """``"rotary"`` when attention layers use RoPE, else ``"none"``: there is never a positional embedding
        added to the residual stream (no ``hook_pos_embed``; recurrences know order by construction)."""
        return "rotary" if self.has_attention and self.rotary_dim else "none"

    @property
    def use_attn_result(self) -> bool:
        """Always ``False``: per-head results (``attn.hook_result``) are never computed."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}")
        return cls(**d)
