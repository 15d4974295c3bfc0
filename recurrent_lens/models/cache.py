"""The per-layer recurrent cache used by ``forward(..., cache=...)`` and ``generate()``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LayerCache:
    """What one layer carries from one call to the next.

    Attributes:
        state: the matrix state ``[batch, head, d_k, d_v]`` (recurrent layers), fp32.
        conv: the last ``conv_kernel - 1`` pre-convolution inputs ``[batch, channels, conv_kernel - 1]``.
        key, value: the attention KV cache ``[batch, kv_head, pos, d_head]`` (attention layers).
        extra: architecture-specific carried tensors (RWKV-7 token-shift inputs).
    """

    state: Tensor | None = None
    conv: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


class RecurrentCache:
    """Per-layer caches plus the number of tokens already processed.

    Pass one to ``model(tokens, cache=cache)``: each layer starts from what the cache holds and the
    cache is updated in place, so calling again continues the sequence. Every matrix state can be read
    or replaced between calls (``cache[l].state``), which is how a state from one prompt is patched
    into another.

    Example:
        >>> from recurrent_lens.models.cache import RecurrentCache
        >>> cache = RecurrentCache(n_layers=2)
        >>> cache.seq_len, len(cache.layers)
        (0, 2)
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.seq_len = 0

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def clone(self) -> RecurrentCache:
        """A deep copy, for branching a continuation without touching this cache."""
        return copy.deepcopy(self)

    def states(self) -> dict[int, Tensor]:
        """The matrix state of every recurrent layer that has one, by layer index."""
        return {i: c.state for i, c in enumerate(self.layers) if c.state is not None}

    def __repr__(self) -> str:
        held = [i for i, c in enumerate(self.layers) if c.state is not None or c.key is not None]
        return f"RecurrentCache(n_layers={len(self.layers)}, seq_len={self.seq_len}, layers_with_state={held})"
