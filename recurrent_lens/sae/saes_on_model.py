"""SAELens' SAE-on-model habits: ``add_sae``, ``run_with_saes``, ``run_with_cache_with_saes``, ``reset_saes``.

Two kinds of SAE attach to a :class:`~recurrent_lens.models.base.HookedRecurrentModel`:

- **ours** (:class:`recurrent_lens.sae.SAE`) on one head of a matrix hook (``hook_state``, ``hook_write``,
  ``hook_erase``), through :mod:`recurrent_lens.sae.attach`;
- **SAELens'** (``sae_lens.SAE`` or any module with ``encode``, ``decode``, ``use_error_term`` and
  ``cfg.d_in``) on a vector hook: the residual stream (``blocks.{l}.hook_resid_pre|mid|post``), a mixer or
  MLP output (``hook_mixer_out``, ``hook_mlp_out``) or any ``[batch, pos, d]`` hook, with ``d_in == d``;
  or a per-head hook ``[batch, pos, head, d]`` (``blocks.{l}.mixer.hook_read``, ``hook_q/k/v``, the
  attention's ``hook_z``) either on one head (``head=``, or ``cfg.metadata.hook_head_index``, ``d_in == d``)
  or on all heads flattened head-major (``x.flatten(-2)``, index ``h * d + i``, ``d_in == head * d``), which
  is SAELens' own flattening of ``hook_z``.

As in SAELens' ``HookedSAETransformer``, a SAELens SAE replaces the hook point it is attached to, and its
hook points appear directly under that name (``blocks.1.hook_resid_post.hook_sae_acts_post``); the hook
name defaults to ``sae.cfg.metadata.hook_name``; ``use_error_term`` (default: the SAE's own) makes the
output ``x + (recons - recons_clean)``, the model's own activation unless a latent is edited. Hooks on the
original hook point keep running first, on the unspliced activation.

``saes=`` of :func:`run_with_saes` and friends takes SAE objects (their hook names, and for ours the head,
from ``sae.cfg.metadata``) or ``(sae, hook_name)`` / ``(sae, hook_name, head)`` tuples. On leaving,
SAEs attached before the call at the same hooks are put back.

The examples of :func:`run_with_saes` and :func:`run_with_cache_with_saes` use ``tiny_model``, ``tiny_sae`` and
``tiny_tokens`` (a random one-layer Gated DeltaNet, a random WriteSAE on its ``[8, 8]`` states and two random
sequences; built as :mod:`recurrent_lens.analysis` shows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

from recurrent_lens.sae import attach
from recurrent_lens.sae.base import SAE
from recurrent_lens.states.cells import as_index

__all__ = ["HookedSAEMethods", "SAELensHookPoint", "add_sae", "reset_saes", "saes", "run_with_saes",
           "run_with_cache_with_saes"]


def _is_saelens_like(sae: Any) -> bool:
    return (isinstance(sae, nn.Module) and all(hasattr(sae, a) for a in ("encode", "decode", "use_error_term"))
            and isinstance(getattr(getattr(sae, "cfg", None), "d_in", None), int))


class SAELensHookPoint(HookPoint):
    """A hook point that splices a SAELens SAE's output into the activation (see the module docstring).

    The SAE is held outside the module tree (so its parameters are not the model's) and its hook points
    are registered here, under SAELens' names. ``original`` is the replaced HookPoint, whose hooks run
    first.
    """

    def __init__(self, original: HookPoint, sae: nn.Module, head: int | None, use_error_term: bool) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        self.__dict__["sae"] = sae
        self.head = head
        self.use_error_term = use_error_term
        # the model's engine skips hook points with nothing attached
        self.is_active = True
        for name, module in sae.named_modules():
            if isinstance(module, HookPoint) and name and "." not in name:
                self.add_module(name, module)

    def forward(self, x: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, "batch pos *rest"]:
        x = self.original(x)
        d_in = self.sae.cfg.d_in
        if self.head is not None:
            view = x[:, :, self.head]
        elif x.shape[-1] == d_in:
            view = x
        else:
            view = x.flatten(-2)
        if view.shape[-1] != d_in:
            raise ValueError(f"{self.name}: the SAE reads d_in={d_in}, but this hook's activation "
                             f"{tuple(x.shape)} gives {view.shape[-1]} (head={self.head})")
        own = self.sae.use_error_term
        self.sae.use_error_term = self.use_error_term
        try:
            out = self.sae(view).to(x.dtype)
        finally:
            self.sae.use_error_term = own
        if self.head is None:
            return out.view(x.shape)
        x = x.clone()
        x[:, :, self.head] = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sae={type(self.sae).__name__}(d_in={self.sae.cfg.d_in}), head={self.head}"


def _target(sae: Any, hook_name: str | None, head: int | None) -> tuple[str, int | None]:
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    if hook_name is None:
        hook_name = getattr(meta, "hook_name", None)
        if hook_name is None:
            raise ValueError(f"hook_name: not given, and the SAE's cfg.metadata has none ({type(sae).__name__})")
    if head is None:
        head = getattr(meta, "head", None) if isinstance(sae, SAE) else getattr(meta, "hook_head_index", None)
    return hook_name, head


def add_sae(model: nn.Module, sae: nn.Module, hook_name: str | None = None, head: int | None = None,
            use_error_term: bool | None = None) -> None:
    """Attach ``sae`` at ``hook_name`` (default ``sae.cfg.metadata.hook_name``) until :func:`reset_saes`.

    Ours go to one head of a matrix hook (:func:`recurrent_lens.sae.attach.add_sae`; the head defaults to
    ``cfg.metadata.head``); SAELens' to a vector or per-head hook (see the module docstring). A second SAE at
    the same hook (and head) replaces the first.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> class Tiny(torch.nn.Module):  # the interface a SAELens SAE offers
        ...     use_error_term = False
        ...     cfg = type("Cfg", (), {"d_in": 16, "metadata": None})()
        ...     def encode(self, x): return x
        ...     def decode(self, a): return a
        ...     def forward(self, x): return self.decode(self.encode(x)) * 0
        >>> add_sae(model, Tiny(), "blocks.0.hook_resid_post")
        >>> bool(model(torch.tensor([[1, 2]])).std(-1).max() < 1e-5)  # a zero residual: constant logits
        True
        >>> reset_saes(model)
    """
    if isinstance(sae, SAE):
        hook_name, head = _target(sae, hook_name, head)
        if head is None:
            raise ValueError(f"head: our SAEs attach to one head of {hook_name!r}; pass head= "
                             "(or set sae.cfg.metadata.head)")
        attach.add_sae(model, sae, model.resolve_hook_name(hook_name), head, use_error_term=use_error_term)
        return
    if not _is_saelens_like(sae):
        raise TypeError(f"sae: expected a recurrent_lens.sae.SAE or a SAELens SAE (encode, decode, use_error_term, "
                        f"cfg.d_in), got {type(sae).__name__}")
    hook_name, head = _target(sae, hook_name, head)
    name = model.resolve_hook_name(hook_name)
    hp = model.hook_dict[name]
    if isinstance(hp, SAELensHookPoint):
        hp = hp.original
    elif type(hp) is not HookPoint:
        raise ValueError(f"hook_name: {name!r} already holds our matrix SAEs; a SAELens SAE goes on a vector hook")
    if name.rsplit(".", 1)[1] in attach.MATRIX_HOOKS:
        raise ValueError(f"hook_name: {name!r} is a matrix hook [batch, pos, head, d_k, d_v]; SAELens SAEs read "
                         "vectors: use a residual, mixer_out or per-head vector hook (hook_read), or our SAEs here")
    if head is not None:
        heads = _head_count(model, name)
        if heads is None or as_index(head, heads) is None:
            raise ValueError(f"head: {name!r} has " + (f"heads [0, {heads})" if heads else "no head axis")
                             + f", got {head!r}")
    wrapper = SAELensHookPoint(hp, sae, head, sae.use_error_term if use_error_term is None else use_error_term)
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, wrapper)
    model.setup()


def _head_count(model: nn.Module, name: str) -> int | None:
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks":
        return None
    if parts[2] == "attn":
        return model.cfg.n_kv_heads if parts[3] in ("hook_k", "hook_v") else model.cfg.n_attn_heads
    return model.cfg.n_heads


def attached(model: nn.Module) -> dict[tuple[str, int | None], tuple[nn.Module, bool]]:
    """Every attached SAE: ``{(hook_name, head): (sae, use_error_term)}`` (head ``None``: the whole hook)."""
    out: dict[tuple[str, int | None], tuple[nn.Module, bool]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SAELensHookPoint):
            out[name, m.head] = (m.sae, m.use_error_term)
        elif isinstance(m, attach.SAEHookPoint):
            for key, sae in m.saes.items():
                out[name, int(key[1:])] = (sae, m.use_error_term[key])
    return out


def reset_saes(model: nn.Module, act_names: str | Sequence[str] | None = None) -> None:
    """Detach the SAEs at ``act_names`` (default: all) and put the original hook points back.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> reset_saes(model)  # nothing attached: a no-op
    """
    names = None if act_names is None else [model.resolve_hook_name(n) for n in
                                            ([act_names] if isinstance(act_names, str) else act_names)]
    detached = []
    for name, m in list(model.named_modules()):
        if isinstance(m, SAELensHookPoint) and (names is None or name in names):
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, m.original)
            detached.append(m.sae)
    attach.reset_saes(model, names)
    for sae in detached:
        if hasattr(sae, "setup"):
            sae.setup()  # its own short hook names back (model.setup() renamed them)


def _entries(items: Sequence[Any]) -> list[tuple[nn.Module, str | None, int | None]]:
    if isinstance(items, (nn.Module, tuple)):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, tuple):
            if not 2 <= len(item) <= 3:
                raise ValueError(f"saes: expected SAEs or (sae, hook_name[, head]) tuples, got a tuple of {len(item)}")
            out.append((item[0], item[1], item[2] if len(item) == 3 else None))
        else:
            out.append((item, None, None))
    return out


@contextmanager
def saes(model: nn.Module, saes: Sequence[Any] = (), reset_saes_end: bool = True,
         use_error_term: bool | None = None) -> Iterator[nn.Module]:
    """Attach SAEs for a ``with`` block; on leaving (with ``reset_saes_end``), detach them and put back any
    SAE that was attached at the same hook (and head) before.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import WriteSAE
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> with saes(model, [(WriteSAE(8, 4, 32, k=4), "blocks.0.mixer.hook_state", 0)]):
        ...     "blocks.0.mixer.hook_state.saes.h0.hook_sae_acts_post" in model.hook_dict
        True
    """
    before = attached(model)
    added: list[tuple[str, int | None]] = []
    try:
        for sae, hook_name, head in _entries(saes):
            hook_name, head = _target(sae, hook_name, head)
            add_sae(model, sae, hook_name, head, use_error_term=use_error_term)
            added.append((model.resolve_hook_name(hook_name), head))
        yield model
    finally:
        if reset_saes_end and added:
            reset_saes(model, sorted({name for name, _ in added}))
            for (name, head), (sae, error) in before.items():
                if any(name == n for n, _ in added):
                    add_sae(model, sae, name, head, use_error_term=error)


_saes_context = saes  # run_with_saes' argument ``saes`` (SAELens' name) shadows the function


def run_with_saes(model: nn.Module, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
                  use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
    """The model's forward with ``saes`` attached for the call (SAELens' ``run_with_saes``).

    Example:
        >>> tiny_model.run_with_saes(tiny_tokens, saes=[(tiny_sae, "blocks.0.mixer.hook_state", 1)]).shape
        torch.Size([2, 8, 50])
    """
    with _saes_context(model, saes, reset_saes_end, use_error_term):
        return model(*model_args, **model_kwargs)


def run_with_cache_with_saes(model: nn.Module, *model_args: Any, saes: Sequence[Any] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             **kwargs: Any) -> tuple[Any, Any]:
    """``run_with_cache`` with ``saes`` attached for the call; the cache holds the SAEs' activations under
    their hook names (SAELens' ``run_with_cache_with_saes``).

    Example:
        >>> _, cache = tiny_model.run_with_cache_with_saes(tiny_tokens,
        ...                                                saes=[(tiny_sae, "blocks.0.mixer.hook_state", 1)])
        >>> tuple(cache["blocks.0.mixer.hook_state.saes.h1.hook_sae_acts_post"].shape)
        (2, 8, 16)
    """
    with _saes_context(model, saes, reset_saes_end, use_error_term):
        return model.run_with_cache(*model_args, **kwargs)


_Model = TypeVar("_Model", bound="HookedSAEMethods")


class HookedSAEMethods:
    """SAELens' ``HookedSAETransformer`` methods for the model class, each one of the functions above."""

    def add_sae(self, sae: nn.Module, hook_name: str | None = None, head: int | None = None, *,
                use_error_term: bool | None = None) -> None:
        """Attach one of our SAEs (to a head of a matrix hook) or a SAELens SAE (to a vector hook) until
        :meth:`reset_saes`; the hook name defaults to ``sae.cfg.metadata.hook_name`` (see
        :mod:`recurrent_lens.sae.saes_on_model`)."""
        add_sae(self, sae, hook_name, head, use_error_term=use_error_term)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Detach the SAEs at ``act_names`` (default: every SAE added with :meth:`add_sae`)."""
        reset_saes(self, act_names)

    @contextmanager
    def saes(self: _Model, saes: Sequence[Any] = (), reset_saes_end: bool = True, *,
             use_error_term: bool | None = None) -> Iterator[_Model]:
        """Attach SAEs (objects, or ``(sae, hook_name[, head])`` tuples) for the duration of a ``with`` block."""
        with _saes_context(self, saes, reset_saes_end, use_error_term):
            yield self

    def run_with_saes(self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
        """SAELens' ``run_with_saes``: the forward with ``saes`` attached (see :meth:`saes`).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(8, 8, 16, k=4, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
            >>> clean = tiny_model(tiny_tokens)
            >>> spliced = tiny_model.run_with_saes(tiny_tokens, saes=[sae], use_error_term=True)
            >>> bool(torch.allclose(spliced, clean, atol=1e-4)), "saes" in str(list(tiny_model.hook_dict))
            (True, False)
        """
        return run_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                             use_error_term=use_error_term, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None,
                                 **kwargs: Any) -> tuple[Any, ActivationCache]:
        """SAELens' ``run_with_cache_with_saes``: :meth:`run_with_cache` with ``saes`` attached."""
        return run_with_cache_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                                        use_error_term=use_error_term, **kwargs)
