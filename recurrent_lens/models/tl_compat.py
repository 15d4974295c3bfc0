"""TransformerLens habits on hybrid and recurrent stacks: attention weights, per-head sweeps, stacking.

:class:`TLWeights` gives :class:`~recurrent_lens.models.base.HookedRecurrentModel` TransformerLens'
embedding, unembedding, model-level attention weights and the per-layer head counts that a head sweep needs;
:class:`CacheStacking` gives :class:`~recurrent_lens.models.activation_cache.RecurrentActivationCache`
``stack_head_results`` and a ``stack_activation`` that works on hybrids.

What a "head" is, per layer kind, for TransformerLens' per-head tools (``patching``'s
``get_act_patch_attn_head_*`` and ``generic_activation_patch`` over ``"z"``):

- in a softmax-attention layer, one of its ``n_attn_heads`` query heads; ``blocks.{l}.attn.hook_z``
  is the attention output per head ``[batch, pos, n_attn_heads, d_head_attn]``;
- in a recurrent layer, one of its ``n_heads`` value heads; ``blocks.{l}.attn.hook_z`` is an alias of
  ``blocks.{l}.mixer.hook_read`` (``S_tᵀ q_t`` per head, ``[batch, pos, n_heads, d_v]``), the head's
  read of its state before the output norm, gate and projection. Patching it replaces what the
  head hands to the output projection at that position, without changing the state it carries on.

TransformerLens' default sweeps range over ``cfg.n_heads`` heads in every layer (the recurrent
layers' count). Where the attention layers have another count (Qwen3.5-0.8B: 8 attention heads,
16 Gated DeltaNet value heads), pass ``index_df=model.head_index_df(...)``, which lists each layer's
own heads: the result then has one entry per row of that frame, which says the layer, position and
head of each entry. A default sweep that reaches past an attention layer's heads stops with an
IndexError saying this; where an attention layer has more heads than ``cfg.n_heads``, a default sweep
covers only the first ``cfg.n_heads`` of them, so use ``head_index_df`` there too.
"""

from __future__ import annotations

import numbers
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Integer
from torch import Tensor
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import Slice, get_act_name

from recurrent_lens.models.tokens import ID_DTYPES


class HookNameError(KeyError):
    """A hook name (or alias, or TransformerLens short name) that names no hook point of this model.

    A KeyError, so that code expecting a missing cache key keeps working; its message says why the name does
    not exist (the layer's kind, a missing MLP, close matches).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")

PER_HEAD_LEAVES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_read", "hook_pattern")
"""Hooks whose third axis (the second for ``hook_pattern``) is a head index."""


class TLWeights:
    """TransformerLens' weights and per-layer head counts, for the model class.

    ``W_E``, ``W_U``, ``b_U`` and :meth:`tokens_to_residual_directions` are TransformerLens' embedding and
    unembedding.

    The model-level ``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``b_Q``, ``b_K``, ``b_V``, ``b_O`` stack the
    attention layers' own (see :class:`~recurrent_lens.models.attention.Attention`) along a first axis
    that runs over :attr:`attention_layers`, not over every layer as in a transformer: in a hybrid
    ``model.W_Q[i]`` is ``model.blocks[model.attention_layers[i]].attn.W_Q``. A model without
    attention layers raises a NotImplementedError.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=2, d_vocab=50, n_heads=4, d_k=8, d_v=8, layer_types=("recurrent", "attention"),
        ...     n_attn_heads=2, n_kv_heads=1, d_head_attn=16), seed=0)
        >>> model.attention_layers, tuple(model.W_K.shape), model.heads_per_layer
        ([1], (1, 2, 32, 16), [4, 2])
    """

    cfg: Any
    blocks: Any
    embed: Any
    unembed: Any
    ln_final: Any

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The embedding matrix ``[d_vocab, d_model]``."""
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding ``[d_model, d_vocab]`` as TransformerLens lays it out (a view of ``unembed.weight``,
        which is ``embed.weight`` in tied models). The final norm's weight is not folded in: the logits are
        ``ln_final(resid) @ W_U``."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias: zeros (no supported architecture has one)."""
        return torch.zeros(self.cfg.d_vocab, dtype=self.unembed.weight.dtype, device=self.unembed.weight.device)

    def tokens_to_residual_directions(self, tokens: str | int | Integer[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The residual direction whose dot product with the final-norm-scaled residual is each token's logit.

        As TransformerLens defines it for models whose norms are folded: a token (a single-token string, an
        int or a one-element tensor) gives ``[d_model]``, a tensor of ids ``[..., d_model]``. The final norm's
        weight is folded in (``W_U[:, t] · w``, ``· (1 + w)`` for Qwen3.5's norm), because
        ``ActivationCache.apply_ln_to_stack`` divides by the cached ``ln_final.hook_scale`` without applying
        the weight; ``logit_attrs`` of a stack that sums to the final residual then sums to the logit
        (LayerNorm models: minus the constant ``ln_final.bias @ W_U[:, t]``).

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> to_dirs = model.tokens_to_residual_directions
            >>> to_dirs(3).shape, to_dirs(torch.tensor([[1, 2]])).shape
            (torch.Size([16]), torch.Size([1, 2, 16]))
        """
        if isinstance(tokens, str):
            ids: Any = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            if tokens.dtype not in ID_DTYPES:
                raise TypeError(f"tokens: expected integer token ids, got a tensor of dtype {tokens.dtype}")
            ids = int(tokens.item()) if tokens.numel() == 1 else tokens.to(self.unembed.weight.device, torch.long)
        elif isinstance(tokens, numbers.Integral) and not isinstance(tokens, bool):
            ids = int(tokens)
        else:
            raise TypeError(f"tokens: expected a string, an int or a tensor of ids, got {type(tokens).__name__}")
        bad = torch.as_tensor(ids)
        if bad.numel() == 0 or bad.min() < 0 or bad.max() >= self.cfg.d_vocab:
            raise ValueError(f"tokens: ids must lie in [0, {self.cfg.d_vocab}) (d_vocab), got {tokens!r}")
        weight = self.unembed.weight  # [d_vocab, d_model]
        w = self.ln_final.weight.float()
        fold = (1.0 + w) if getattr(self.ln_final, "one_plus", False) else w
        return weight[ids] * fold.to(weight.dtype)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the softmax-attention layers."""
        return [i for i, t in enumerate(self.cfg.layer_types) if t == "attention"]

    @property
    def heads_per_layer(self) -> list[int]:
        """The number of heads of each layer: ``n_attn_heads`` in attention layers, ``n_heads`` elsewhere."""
        return [self.cfg.n_attn_heads if t == "attention" else self.cfg.n_heads for t in self.cfg.layer_types]

    def _attention_modules(self, name: str) -> list[Any]:
        if not self.attention_layers:
            raise NotImplementedError(
                f"{name}: this model has no softmax-attention layer (layer_types={list(self.cfg.layer_types)}); "
                "recurrent mixers' weights are their projections (model.blocks[l].mixer)")
        return [self.blocks[l].attn for l in self.attention_layers]

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([getattr(attn, name) for attn in self._attention_modules(name)])

    @property
    def QK(self) -> FactoredMatrix:
        """``blocks[l].attn.QK`` stacked over :attr:`attention_layers` (``[layer, head, d_model, d_model]``)."""
        parts = [attn.QK for attn in self._attention_modules("QK")]
        return FactoredMatrix(torch.stack([p.A for p in parts]), torch.stack([p.B for p in parts]))

    @property
    def OV(self) -> FactoredMatrix:
        """``blocks[l].attn.OV`` stacked over :attr:`attention_layers` (``[layer, head, d_model, d_model]``)."""
        parts = [attn.OV for attn in self._attention_modules("OV")]
        return FactoredMatrix(torch.stack([p.A for p in parts]), torch.stack([p.B for p in parts]))

    def head_index_df(self, pos: int | None = None, layers: list[int] | None = None) -> pd.DataFrame:
        """Every ``(layer, head)`` (with ``pos``: every ``(layer, pos, head_index)``) of this model, each layer
        with its own heads, as the ``index_df`` of TransformerLens' ``generic_activation_patch``.

        Args:
            pos: the sequence length for a per-position sweep; ``None`` for an all-positions sweep.
            layers: the layers to cover (default: all).

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
            ...     n_layers=2, d_vocab=50, n_heads=4, d_k=8, d_v=8, layer_types=("recurrent", "attention"),
            ...     n_attn_heads=2, n_kv_heads=1, d_head_attn=16), seed=0)
            >>> model.head_index_df().groupby("layer").size().to_dict()
            {0: 4, 1: 2}
        """
        n = self.cfg.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n]
        if bad:
            raise ValueError(f"layers: expected layer indices in [0, {n}), got {bad}")
        if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int) or pos < 1):
            raise ValueError(f"pos: expected None or a sequence length >= 1, got {pos!r}")
        counts = self.heads_per_layer
        if pos is None:
            rows = [(l, h) for l in layers for h in range(counts[l])]
            return pd.DataFrame(rows, columns=["layer", "head"])
        rows3 = [(l, p, h) for l in layers for p in range(pos) for h in range(counts[l])]
        return pd.DataFrame(rows3, columns=["layer", "pos", "head_index"])

    def _head_count_guard(self, hook_name: str, fn: Any) -> Any:
        """``fn`` itself, or, on a per-head hook whose layer has fewer heads than ``cfg.n_heads``, ``fn``
        with an IndexError that says why a TransformerLens default sweep reached past the layer's heads."""
        parts = hook_name.split(".")
        if len(parts) != 4 or parts[0] != "blocks" or parts[3] not in PER_HEAD_LEAVES:
            return fn
        layer = int(parts[1])
        own = self.heads_per_layer[layer]
        if parts[3] in ("hook_k", "hook_v") and parts[2] == "attn":
            own = self.cfg.n_kv_heads
        if own >= self.cfg.n_heads:
            return fn

        def guarded(x: Tensor, hook: Any) -> Any:
            try:
                return fn(x, hook=hook)
            except IndexError as e:
                raise IndexError(
                    f"{hook_name}: layer {layer} has {own} heads, but this hook function indexed past them "
                    f"({e}); TransformerLens' default head sweeps range over cfg.n_heads={self.cfg.n_heads} "
                    "heads in every layer. Pass index_df=model.head_index_df(...) (each layer's own heads)") from e

        return guarded


def _stack_weight(name: str) -> property:
    def get(self: TLWeights) -> Tensor:
        return self._stacked(name)

    get.__doc__ = (f"``blocks[l].attn.{name}`` stacked over :attr:`attention_layers` "
                   "(NotImplementedError without attention layers).")
    return property(get)


for _name in _WEIGHTS:
    setattr(TLWeights, _name, _stack_weight(_name))


class CacheStacking:
    """``stack_head_results`` and ``stack_activation`` for the model's ``ActivationCache``."""

    model: Any
    cache_dict: dict[str, Tensor]

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False) -> Any:
        """TransformerLens' ``stack_head_results`` over the softmax-attention layers before ``layer``.

        Each attention head's result is ``(z * gate)[h] @ W_O[h]`` from the cached ``hook_z`` and
        ``hook_gate``; labels are ``L{layer}H{head}`` with each layer's own head count. Recurrent layers
        contribute no per-head results here (their heads write through a shared output norm and gate);
        with ``incl_remainder`` their writes are in the ``remainder`` (``resid_post`` of ``layer - 1``
        minus the heads). A model without attention layers raises a NotImplementedError.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
            ...     n_layers=2, d_vocab=50, n_heads=4, d_k=8, d_v=8, layer_types=("recurrent", "attention"),
            ...     n_attn_heads=2, n_kv_heads=1, d_head_attn=16), seed=0)
            >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
            >>> stack, labels = cache.stack_head_results(return_labels=True)
            >>> labels, bool(torch.allclose(stack.sum(0), cache["attn_out", 1], atol=1e-5))
            (['L1H0', 'L1H1'], True)
        """
        model = self.model
        attn_layers = model.attention_layers
        if not attn_layers:
            raise NotImplementedError(
                "stack_head_results needs softmax-attention heads, but this model's layers are all recurrent. Use "
                "decompose_resid (per-layer mixer and MLP outputs), stack_activation('read') (each head's read) or "
                "the per-head states and writes (cache['state', l], cache['write', l]) instead")
        n = model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        sl = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        parts, labels = [], []
        for l in (l for l in attn_layers if l < layer):
            attn = model.blocks[l].attn
            gate_name = f"blocks.{l}.attn.hook_gate"
            if gate_name in model.hook_dict and gate_name not in self.cache_dict:
                raise KeyError(f"stack_head_results: layer {l} has an output gate, and its head results need "
                               f"{gate_name!r}, which run_with_cache's names_filter left out")
            z = sl.apply(self[f"blocks.{l}.attn.hook_z"], dim=-3)
            gate = sl.apply(self.cache_dict[gate_name], dim=-3) if gate_name in self.cache_dict else None
            parts.append(attn.head_results(z, gate))
            labels.extend(f"L{l}H{h}" for h in range(attn.n_heads))
        if parts:
            heads = torch.cat(parts, dim=-2).movedim(-2, 0)
        else:
            ref = sl.apply(self["hook_embed"], dim=-2)
            heads = ref.new_zeros(0, *ref.shape)
        if incl_remainder:
            resid = sl.apply(self[get_act_name("resid_post", layer - 1)], dim=-2)
            heads = torch.cat([heads, (resid - heads.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            heads = self.apply_ln_to_stack(heads, layer, pos_slice=sl)
        return (heads, labels) if return_labels else heads

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, *,
                         layers: list[int] | None = None,
                         return_layers: bool = False) -> Float[Tensor, "layers_covered ..."] | Any:
        """TransformerLens' ``stack_activation``, over the layers before ``layer`` that have the activation.

        On a hybrid, a recurrent-only name (``"state"``, ``"write"``, ``"read"``, ...) stacks the recurrent
        layers and an attention-only one (``"pattern"``) the attention layers; ``return_layers=True`` also
        returns which layers, in stacking order. ``layers=`` picks them explicitly (each must have the
        activation). A name that no layer has raises a HookNameError (a KeyError) saying why.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
            ...     n_layers=3, d_vocab=50, n_heads=2, d_k=8, d_v=8, layer_types=("recurrent", "attention",
            ...     "recurrent"), n_attn_heads=2, n_kv_heads=1, d_head_attn=16), seed=0)
            >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
            >>> states, layers = cache.stack_activation("state", return_layers=True)
            >>> tuple(states.shape), layers
            ((2, 1, 3, 2, 8, 8), [0, 2])
        """

        n = self.model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        if layers is None:
            layers, why = [], None
            for l in range(layer):
                try:
                    self.model.resolve_hook_name(get_act_name(activation_name, l, sublayer_type))
                except HookNameError as e:
                    why = why or e
                    continue
                layers.append(l)
            if not layers:
                raise HookNameError(f"stack_activation: no layer before {layer} has {activation_name!r}; "
                                    f"layer kinds {list(self.model.cfg.layer_types)}; e.g. {why}")
        stack = torch.stack([self[(activation_name, l, sublayer_type)] for l in layers])
        return (stack, list(layers)) if return_layers else stack
