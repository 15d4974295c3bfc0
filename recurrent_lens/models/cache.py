"""The per-layer recurrent cache used by ``forward(..., cache=...)`` and ``generate()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from recurrent_lens.config import ModelConfig

_FIELDS = ("state", "conv", "key", "value")


@dataclass
class LayerCache:
    """What one layer carries from one call to the next.

    Attributes:
        state: the matrix state ``[batch, head, d_k, d_v]`` (recurrent layers), fp32.
        conv: the last ``conv_kernel - 1`` pre-convolution inputs ``[batch, channels, conv_kernel - 1]``.
        key, value: the attention KV cache ``[batch, kv_head, pos, d_head]`` (attention layers).
        extra: architecture-specific carried tensors (RWKV-7 token-shift inputs).

    Layers update a cache only by assigning new tensors to these fields, never by writing into the
    tensors already there; this is what lets a forward work on a :meth:`RecurrentCache.fork` and
    commit it only when it succeeds.
    """

    state: Tensor | None = None
    conv: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor held, by field name (``extra`` entries as ``extra[name]``).

        Example:
            >>> import torch
            >>> from recurrent_lens.models.cache import LayerCache
            >>> sorted(LayerCache(state=torch.zeros(1), extra={"attn_shift": torch.zeros(1)}).tensors())
            ["extra['attn_shift']", 'state']
        """
        out = {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}
        out.update({f"extra[{k!r}]": v for k, v in self.extra.items()})
        return out


class RecurrentCache:
    """Per-layer caches plus the number of tokens already processed.

    Pass one to ``model(tokens, cache=cache)``: each layer starts from what the cache holds, and when
    the whole forward has succeeded the cache is updated in place (every layer and ``seq_len``
    together), so calling again continues the sequence. A forward that raises, e.g. in a hook, leaves
    the cache exactly as it was. Every matrix state can be read or replaced between calls
    (``cache[l].state``), which is how a state from one prompt is patched into another.

    A cache belongs to one model shape and one batch size: the model checks both before it starts
    and refuses a cache built for another number of layers, other head sizes or another batch.

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
        """A copy holding copies of every tensor, for branching a continuation without touching this cache.

        Example:
            >>> import torch
            >>> from recurrent_lens.models.cache import RecurrentCache
            >>> cache = RecurrentCache(n_layers=1)
            >>> cache[0].state = torch.zeros(1, 2, 3, 3)
            >>> copy = cache.clone()
            >>> _ = copy[0].state.add_(1)
            >>> float(cache[0].state.sum())
            0.0
        """
        return self._map(torch.clone)

    def fork(self, device: torch.device | str | None = None) -> RecurrentCache:
        """A cache with new per-layer objects that share this cache's tensors (no copy).

        Layers only ever assign new tensors to a cache, so running the model on the fork leaves this
        cache untouched until :meth:`commit` copies the fork's fields back. With ``device``, tensors are
        moved there and states converted to fp32 (what the layers expect).

        Example:
            >>> import torch
            >>> from recurrent_lens.models.cache import RecurrentCache
            >>> cache = RecurrentCache(n_layers=1)
            >>> cache[0].state = torch.zeros(1, 2, 3, 3)
            >>> work = cache.fork()
            >>> work[0].state = torch.ones(1, 2, 3, 3)
            >>> float(cache[0].state.sum()), work[0].state is not cache[0].state
            (0.0, True)
        """
        if device is None:
            return self._map(lambda t: t)
        out = self._map(lambda t: t.to(device))
        for layer in out.layers:
            if layer.state is not None:
                layer.state = layer.state.float()
        return out

    def commit(self, work: RecurrentCache) -> None:
        """Take over every field and ``seq_len`` of ``work`` (a :meth:`fork` of this cache), in place:
        the :class:`LayerCache` objects stay the same, so references to ``cache[l]`` stay valid.

        Example:
            >>> import torch
            >>> from recurrent_lens.models.cache import RecurrentCache
            >>> cache = RecurrentCache(n_layers=1)
            >>> layer = cache[0]
            >>> work = cache.fork()
            >>> work[0].state, work.seq_len = torch.ones(1, 2, 3, 3), 5
            >>> cache.commit(work)
            >>> cache.seq_len, cache[0] is layer, float(layer.state.sum())
            (5, True, 18.0)
        """
        if len(work) != len(self):
            raise ValueError(f"work: expected a cache with {len(self)} layers, got {len(work)}")
        for mine, theirs in zip(self.layers, work.layers):
            for name in _FIELDS:
                setattr(mine, name, getattr(theirs, name))
            mine.extra = dict(theirs.extra)
        self.seq_len = work.seq_len

    def _map(self, fn: Callable[[Tensor], Tensor]) -> RecurrentCache:
        out = RecurrentCache(len(self))
        out.seq_len = self.seq_len
        for src, dst in zip(self.layers, out.layers):
            for name in _FIELDS:
                t = getattr(src, name)
                setattr(dst, name, None if t is None else fn(t))
            dst.extra = {k: fn(v) for k, v in src.extra.items()}
        return out

    def check(self, cfg: ModelConfig, batch: int, conv: dict[int, tuple[int, int]] | None = None) -> None:
        """Refuse a cache that does not fit a model and a batch, with a ValueError naming what differs.

        Args:
            cfg: the model's configuration (number and kind of layers, head counts and sizes).
            batch: the batch size of the tokens about to be fed.
            conv: ``{layer: (channels, width)}`` of the layers with a short convolution, whose
                ``conv`` buffer must be ``[batch, channels, width]``; other layers must hold none.

        Example:
            >>> import torch
            >>> from recurrent_lens import ModelConfig
            >>> from recurrent_lens.models.cache import RecurrentCache
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=10,
            ...                   n_heads=2, d_k=4, d_v=4)
            >>> cache = RecurrentCache(n_layers=1)
            >>> cache[0].state = torch.zeros(1, 2, 4, 4)
            >>> cache.check(cfg, batch=3)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: cache: holds batch size 1 (...), but the tokens have batch size 3
        """
        conv = conv or {}
        if len(self) != cfg.n_layers:
            raise ValueError(f"cache: built for {len(self)} layers, but the model has {cfg.n_layers} (n_layers)")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 0:
            raise ValueError(f"cache.seq_len: expected an int >= 0, got {self.seq_len!r}")
        for l, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                if not isinstance(t, Tensor):
                    raise TypeError(f"cache[{l}].{name}: expected a tensor, got {type(t).__name__}")
                if t.dim() == 0 or t.shape[0] != batch:
                    raise ValueError(f"cache: holds batch size {t.shape[0] if t.dim() else None} "
                                     f"(cache[{l}].{name} has shape {tuple(t.shape)}), "
                                     f"but the tokens have batch size {batch}")
            self._check_layer(l, layer, cfg, batch, conv.get(l))

    def _check_layer(self, l: int, layer: LayerCache, cfg: ModelConfig, batch: int,
                     conv: tuple[int, int] | None) -> None:
        kind = cfg.layer_types[l]
        held = layer.tensors()

        def expect(name: str, shape: tuple[int, ...], what: str) -> None:
            if tuple(held[name].shape) != shape:
                raise ValueError(f"cache[{l}].{name}: expected shape {shape} {what}, got {tuple(held[name].shape)}")

        if kind == "recurrent":
            for name in ("key", "value"):
                if name in held:
                    raise ValueError(f"cache[{l}].{name}: layer {l} is recurrent and holds no attention cache, "
                                     "but the cache has one (built for another model?)")
            if "state" in held:
                if not held["state"].is_floating_point():
                    raise ValueError(f"cache[{l}].state: expected a floating-point tensor, got {held['state'].dtype}")
                expect("state", (batch, cfg.n_heads, cfg.d_k, cfg.d_v), "[batch, n_heads, d_k, d_v]")
        else:
            for name in ("state", "conv"):
                if name in held:
                    raise ValueError(f"cache[{l}].{name}: layer {l} is an attention layer and holds none, "
                                     "but the cache has one (built for another model?)")
            if ("key" in held) != ("value" in held):
                raise ValueError(f"cache[{l}]: key and value must both be set or both be None")
            if "key" in held:
                what = "[batch, n_kv_heads, seq_len, d_head_attn]"
                shape = (batch, cfg.n_kv_heads, self.seq_len, cfg.d_head_attn)
                expect("key", shape, what)
                expect("value", shape, what)
        if "conv" in held:
            if conv is None:
                raise ValueError(f"cache[{l}].conv: layer {l} has no short convolution, but the cache holds a "
                                 "convolution buffer (built for another model?)")
            expect("conv", (batch, *conv), "[batch, channels, conv_kernel - 1]")

    def states(self) -> dict[int, Tensor]:
        """The matrix state of every recurrent layer that has one, by layer index."""
        return {i: c.state for i, c in enumerate(self.layers) if c.state is not None}

    def __repr__(self) -> str:
        held = [i for i, c in enumerate(self.layers) if c.state is not None or c.key is not None]
        return f"RecurrentCache(n_layers={len(self.layers)}, seq_len={self.seq_len}, layers_with_state={held})"
