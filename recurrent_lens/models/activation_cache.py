"""The ``ActivationCache`` that ``run_with_cache`` returns: TransformerLens' names and tools on recurrent layers."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, get_act_name

from recurrent_lens.models.tl_compat import CacheStacking, HookNameError


class RecurrentActivationCache(CacheStacking, ActivationCache):
    """The ``ActivationCache`` that :meth:`~recurrent_lens.HookedRecurrentModel.run_with_cache` returns.

    TransformerLens' class, with three differences:

    - Keys may be hook names, aliases or TransformerLens' short forms: ``cache["state", 1]``
      (``blocks.1.hook_state``) gives ``blocks.1.mixer.hook_state``; ``cache["k", 1]``
      (``blocks.1.attn.hook_k``) gives the mixer's ``hook_k`` in a recurrent layer and the attention's in an
      attention layer; ``cache["attn_out", 1]`` gives ``blocks.1.hook_mixer_out``; ``..._grad`` keys likewise.
      Each activation is stored once, under its hook point's own name (``keys()`` lists those). A name the
      model does not have raises a :class:`HookNameError` (a KeyError) saying why.
    - ``decompose_resid`` counts the embedding after the embedding norm (RWKV-7's ``ln_embed``) as the
      ``embed`` component, so that the components sum to the residual stream.
    - ``stack_head_results`` stacks the softmax-attention layers' heads, and ``stack_activation`` of a
      name only some layers have (``"state"`` on a hybrid) stacks those layers and can say which (see
      :class:`~recurrent_lens.models.tl_compat.CacheStacking`). ``compute_head_results`` and
      ``get_full_resid_decomposition`` (which need a per-head result in every layer) and TransformerLens'
      SSM bridges (``compute_ssm_state``, ``compute_ssm_effective_attention``, ``ssm_layers``) raise a
      NotImplementedError that says what to use instead; neuron results raise a ValueError in models
      without MLPs.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4, d_mlp=32), seed=0).eval()
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> cache["state", -1] is cache["blocks.1.mixer.hook_state"]
        True
        >>> resid, labels = cache.decompose_resid(return_labels=True)
        >>> labels
        ['embed', '0_attn_out', '0_mlp_out', '1_attn_out', '1_mlp_out']
        >>> bool(torch.allclose(resid.sum(0), cache["resid_post", 1], atol=1e-5))
        True
    """

    def _key_name(self, key: Any) -> str:
        if isinstance(key, str):
            return get_act_name(key)
        if isinstance(key, tuple) and key:
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            return get_act_name(*key)
        raise TypeError(f"key: expected a hook name or a (name, layer[, layer_type]) tuple, got {key!r}")

    def _stored_name(self, key: Any) -> str:
        name = self._key_name(key)
        grad = name.endswith("_grad")
        stored = self.model.resolve_hook_name(name[:-5] if grad else name) + ("_grad" if grad else "")
        if stored not in self.cache_dict:
            via = "" if stored == name else f" (stored as {stored!r})"
            raise HookNameError(f"{name!r}{via} is not in this cache; run_with_cache's names_filter left it out")
        return stored

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        if not hasattr(self.model, "resolve_hook_name"):
            return super().__getitem__(key)
        return self.cache_dict[self._stored_name(key)]

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> RecurrentActivationCache:
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return RecurrentActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False, pos_slice: Any = None,
                        incl_embeds: bool = True, return_labels: bool = False) -> Any:
        """TransformerLens' ``decompose_resid`` (``attn_out`` is each layer's mixer output); in a model with
        an embedding norm the ``embed`` component is the normalised embedding (``ln_embed.hook_normalized``)."""
        ln_embed = getattr(self.model, "ln_embed", None)
        plain = ln_embed is None or isinstance(ln_embed, nn.Identity)
        if plain or not incl_embeds or "ln_embed.hook_normalized" not in self.cache_dict:
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        n = self.model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        sl = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        embed = sl.apply(self["ln_embed.hook_normalized"], dim=-2)[None]
        if apply_ln:
            embed = self.apply_ln_to_stack(embed, layer, pos_slice=sl, mlp_input=mlp_input)
        with_attn, with_mlp = mode != "mlp", mode != "attn" and not self.model.cfg.attn_only
        if (layer > 0 and (with_attn or with_mlp)) or (mlp_input and with_attn):
            rest, labels = super().decompose_resid(layer, mlp_input, mode, apply_ln, sl, False, True)
            stack, labels = torch.cat([embed, rest]), ["embed", *labels]
        else:
            stack, labels = embed, ["embed"]
        return (stack, labels) if return_labels else stack

    def _no_heads(self, what: str) -> NotImplementedError:
        cfg = self.model.cfg
        where = (f"recurrent layers {cfg.recurrent_layers} have none (their heads write through a shared output "
                 "norm and gate); stack_head_results gives the attention layers' heads" if cfg.has_attention
                 else "this model's layers are all recurrent: there are no softmax-attention heads")
        return NotImplementedError(
            f"{what} needs per-head attention results (attn.hook_result) in every layer, but {where}. "
            "Use decompose_resid (per-layer mixer and MLP outputs), stack_activation('read') or the per-head "
            "states and writes (cache['state', l], cache['write', l]) instead")

    def compute_head_results(self) -> None:
        raise self._no_heads("compute_head_results")

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_heads("get_full_resid_decomposition")

    def _no_bridge(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} reconstructs states inside TransformerLens' SSM bridges; here the states are hook points "
            f"of their own: read cache['state', layer] (blocks.{{layer}}.mixer.hook_state, "
            f"[batch, pos, head, d_k, d_v]) for layers {self.model.cfg.recurrent_layers}")

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("compute_ssm_state")

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("compute_ssm_effective_attention")

    def ssm_layers(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("ssm_layers")

    def _require_mlps(self, what: str) -> None:
        if self.model.cfg.attn_only:
            raise ValueError(f"{what}: blocks have no MLP in this model (d_mlp=0, cfg.attn_only=True), so there "
                             "are no neurons")

    def get_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        self._require_mlps("get_neuron_results")
        return super().get_neuron_results(layer, *args, **kwargs)

    def stack_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        self._require_mlps("stack_neuron_results")
        return super().stack_neuron_results(layer, *args, **kwargs)

