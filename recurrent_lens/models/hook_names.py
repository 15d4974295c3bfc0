"""Hook names: TransformerLens' short names as aliases of the model's hook points, and hook methods that take them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from recurrent_lens.models.tl_compat import HookNameError

_TL_ATTENTION_LEAVES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores", "hook_result",
                        "hook_rot_q", "hook_rot_k")
"""TransformerLens' names of per-head attention activations."""

_Model = TypeVar("_Model", bound="HookAliases")


class HookAliases:
    """Hook-name aliases for the model class: ``setup`` builds them, ``resolve_hook_name`` resolves a name, and
    TransformerLens' ``hooks``, ``add_hook``, ``list_hooks`` and caching hooks accept aliases."""

    cfg: Any
    blocks: Any
    hook_dict: dict[str, Any]

    def setup(self) -> None:
        """TransformerLens' ``setup`` (names every module and hook point), then the hook-name aliases.

        Aliases let TransformerLens' short names reach the hook that plays that role in each layer kind
        (``hook_aliases`` maps alias → hook name; an alias never shadows a real hook name):

        - ``blocks.{l}.hook_X`` → ``blocks.{l}.mixer.hook_X`` in a recurrent layer and ``blocks.{l}.attn.hook_X``
          in an attention layer, for every hook ``X`` of that mixer except ``hook_in``/``hook_out``;
        - ``blocks.{l}.attn.hook_X`` → ``blocks.{l}.mixer.hook_X`` in a recurrent layer (TransformerLens names
          ``q``, ``k``, ``v`` as attention hooks: ``cache["k", l]`` looks up ``blocks.{l}.attn.hook_k``);
        - ``blocks.{l}.attn.hook_z`` → ``blocks.{l}.mixer.hook_read`` in a recurrent layer: each head's read,
          what TransformerLens' per-head patching calls a head's output (see :mod:`~recurrent_lens.models.tl_compat`);
        - ``blocks.{l}.hook_attn_out`` → ``blocks.{l}.hook_mixer_out`` in every layer.

        An alias is resolved once, to one hook point: a hook added under an alias fires once, and caches hold
        each activation once, under its own name.
        """
        super().setup()
        aliases: dict[str, str] = {}
        for name in self.hook_dict:
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blocks" or parts[2] not in ("mixer", "attn"):
                continue
            layer, kind, leaf = parts[1], parts[2], parts[3]
            if kind == "mixer":
                aliases[f"blocks.{layer}.attn.{leaf}"] = name
            if leaf not in ("hook_in", "hook_out"):
                aliases[f"blocks.{layer}.{leaf}"] = name
        for layer in range(len(self.blocks)):
            aliases[f"blocks.{layer}.hook_attn_out"] = f"blocks.{layer}.hook_mixer_out"
            if f"blocks.{layer}.mixer.hook_read" in self.hook_dict:
                aliases[f"blocks.{layer}.attn.hook_z"] = f"blocks.{layer}.mixer.hook_read"
        self.hook_aliases = {alias: name for alias, name in aliases.items() if alias not in self.hook_dict}
        self._aliases_of: dict[str, list[str]] = {}
        for alias, name in self.hook_aliases.items():
            self._aliases_of.setdefault(name, []).append(alias)

    def resolve_hook_name(self, name: str) -> str:
        """The hook point's own name for a hook name or alias (see :meth:`setup` for the aliases).

        Raises a :class:`HookNameError` (a KeyError) that says why a name does not exist, e.g. a state asked of
        an attention layer or an attention pattern asked of a recurrent layer.

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> model.resolve_hook_name("blocks.1.hook_state"), model.resolve_hook_name("blocks.1.attn.hook_k")
            ('blocks.1.mixer.hook_state', 'blocks.1.mixer.hook_k')
            >>> model.resolve_hook_name("blocks.0.hook_attn_out")
            'blocks.0.hook_mixer_out'
        """
        if not isinstance(name, str):
            raise TypeError(f"hook name: expected a string, got {type(name).__name__}")
        if name in self.hook_dict:
            return name
        if name in self.hook_aliases:
            return self.hook_aliases[name]
        raise HookNameError(self._unknown_hook_message(name))

    def _unknown_hook_message(self, name: str) -> str:
        parts = name.split(".")
        cfg = self.cfg
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].lstrip("-").isdigit():
            layer, leaf = int(parts[1]), parts[-1]
            if not 0 <= layer < cfg.n_layers:
                return f"hook name {name!r}: layer {layer} does not exist (n_layers={cfg.n_layers})"
            if cfg.attn_only and (leaf == "hook_mlp_out" or parts[2] in ("mlp", "ln2")):
                return (f"hook name {name!r}: blocks have no MLP in this model (d_mlp=0, cfg.attn_only=True); "
                        "TransformerLens helpers that read MLP hooks (mlp_out patching, get_act_patch_block_every, "
                        "neuron results) do not apply")
            leaves: dict[str, set[str]] = {"mixer": set(), "attn": set(_TL_ATTENTION_LEAVES)}
            for n in self.hook_dict:
                p = n.split(".")
                if len(p) == 4 and p[0] == "blocks" and p[2] in leaves:
                    leaves[p[2]].add(p[3])
            kind = "attn" if cfg.layer_types[layer] == "attention" else "mixer"
            own = sorted(n.rsplit(".", 1)[1] for n in self.hook_dict
                         if n.startswith(f"blocks.{layer}.{kind}.") and n.count(".") == 3)
            if kind == "attn" and leaf in leaves["mixer"] and leaf not in own:
                return (f"hook name {name!r}: layer {layer} is a softmax-attention layer, which has no {leaf}; "
                        f"recurrent layers: {cfg.recurrent_layers}; its attention hooks: {own} "
                        "(TransformerLens' patching: pass an index_df over the layers that have it)")
            if kind == "mixer" and leaf in leaves["attn"] and leaf not in own:
                return (f"hook name {name!r}: layer {layer} is a recurrent layer: it has no softmax-attention heads "
                        f"and no {leaf}; its mixer hooks: {own}")
        near = difflib.get_close_matches(name, [*self.hook_dict, *self.hook_aliases], n=3)
        return f"hook name {name!r}: no such hook point or alias" + (f"; did you mean {near}?" if near else "")

    def _hook_target(self, name: Any) -> Any:
        """A hook name resolved, or a name predicate made alias-aware (for ``hooks``/``add_hook``)."""
        if isinstance(name, str):
            return self.resolve_hook_name(name)
        if callable(name):
            aliases_of = self._aliases_of

            def accepts(hook_name: str) -> bool:
                return bool(name(hook_name)) or any(name(a) for a in aliases_of.get(hook_name, ()))

            return accepts
        raise TypeError(f"hook name: expected a string or a function of the name, got {type(name).__name__}")

    def _names_filter(self, names_filter: Any) -> Any:
        """TransformerLens' ``names_filter`` (None, a name, a list of names or a predicate) over hook names and
        aliases, as a predicate over the hook points' own names; unknown names are refused."""
        if names_filter is None:
            return None
        if isinstance(names_filter, str) or callable(names_filter):
            target = self._hook_target(names_filter)
            return target if callable(target) else (lambda hook_name: hook_name == target)
        if isinstance(names_filter, Iterable):
            names = list(names_filter)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("names_filter: expected None, a hook name, a list of hook names or a function")
            wanted = {self.resolve_hook_name(n) for n in names}
            return lambda hook_name: hook_name in wanted
        raise TypeError(f"names_filter: expected None, a hook name, a list of hook names or a function, "
                        f"got {type(names_filter).__name__}")

    @contextmanager
    def hooks(self: _Model, fwd_hooks: Iterable[Any] = (), bwd_hooks: Iterable[Any] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator[_Model]:
        """TransformerLens' ``hooks()`` context manager; names may be aliases (see :meth:`setup`), and a name
        predicate is asked about each hook point's own name and its aliases (the point is hooked once if
        any is accepted). Every name is resolved before any hook is added.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> seen = []
            >>> with model.hooks([("blocks.1.hook_state", lambda x, hook: seen.append(hook.name))]):
            ...     _ = model(torch.tensor([[1, 2, 3]]))
            >>> seen
            ['blocks.1.mixer.hook_state']
        """
        fwd = [self._guarded(self._hook_target(name), fn) for name, fn in fwd_hooks]
        bwd = [self._guarded(self._hook_target(name), fn) for name, fn in bwd_hooks]
        with super().hooks(fwd, bwd, reset_hooks_end, clear_contexts) as model:
            yield model

    def _guarded(self, target: Any, fn: Any) -> tuple[Any, Any]:
        return target, (self._head_count_guard(target, fn) if isinstance(target, str) else fn)

    def add_hook(self, name: Any, hook: Any, dir: Literal["fwd", "bwd"] = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        """TransformerLens' ``add_hook``; ``name`` may be an alias or a predicate (as in :meth:`hooks`)."""
        super().add_hook(self._hook_target(name), hook, dir=dir, is_permanent=is_permanent, level=level,
                         prepend=prepend)

    def list_hooks(self, name_filter: Any = None, dir: Literal["fwd", "bwd", "both"] = "both",
                   including_permanent: bool = True) -> dict[str, list[Any]]:
        """TransformerLens' ``list_hooks``; ``name_filter`` may name aliases (as in :meth:`hooks`). Keys are the
        hook points' own names."""
        return super().list_hooks(self._names_filter(name_filter), dir, including_permanent)

    def get_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any) -> tuple[dict, list, list]:
        """TransformerLens' ``get_caching_hooks``; ``names_filter`` may name aliases (as in :meth:`hooks`)."""
        return super().get_caching_hooks(self._names_filter(names_filter), *args, **kwargs)

    def add_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any) -> dict:
        """TransformerLens' ``add_caching_hooks``; ``names_filter`` may name aliases (as in :meth:`hooks`)."""
        return super().add_caching_hooks(self._names_filter(names_filter), *args, **kwargs)
