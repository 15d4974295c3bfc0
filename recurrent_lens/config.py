"""The one configuration dataclass shared by every architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

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

    One dataclass serves every architecture. Fields that only one architecture reads live in
    ``options`` and are documented in that architecture's module docstring.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=64, n_layers=2, d_vocab=100,
        ...                   n_heads=2, d_k=16, d_v=16, d_mlp=128)
        >>> cfg.layer_types
        ('recurrent', 'recurrent')
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
    """MLP kind: ``"swiglu"`` (down(silu(gate x) * up x)) or ``"relu2"`` (RWKV-7's token-shifted ReLU²)."""
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
    """Architecture-specific settings, documented in each architecture's module."""
    dtype: str = "float32"
    """Dtype of the weights; recurrences, gates and norms always compute in fp32."""
    device: str = "cpu"
    """Device the weights live on."""
    source: str | None = None
    """Where the weights came from (directory or hub id), for ``repr`` and tokenizer loading."""

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
        if "attention" in self.layer_types and not (self.n_attn_heads and self.n_kv_heads and self.d_head_attn):
            raise ValueError("attention layers need n_attn_heads, n_kv_heads and d_head_attn")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the layers whose mixer is a matrix recurrence."""
        return [i for i, t in enumerate(self.layer_types) if t == "recurrent"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}")
        return cls(**d)
