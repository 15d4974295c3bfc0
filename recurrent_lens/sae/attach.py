"""Splicing SAEs into a model's matrix hook points (with SAELens-style ``use_error_term``).

:func:`add_sae` binds an SAE to one head of a ``[batch, pos, head, d_k, d_v]`` hook point
(``blocks.{l}.mixer.hook_state``, ``hook_write`` or ``hook_erase``). The HookPoint module at that
name is swapped for an :class:`SAEHookPoint` (still a ``HookPoint``, still under the same name)
that holds the attached SAEs in an ``nn.ModuleDict`` keyed ``"h{head}"``, and ``model.setup()``
runs again, so the SAEs' own hook points are ordinary model hooks::

    blocks.1.mixer.hook_state                                (the spliced tensor)
    blocks.1.mixer.hook_state.saes.h0.hook_sae_input         [batch, pos, d_k, d_v]
    blocks.1.mixer.hook_state.saes.h0.hook_sae_acts_pre      [batch, pos, n_features]
    blocks.1.mixer.hook_state.saes.h0.hook_sae_acts_post     [batch, pos, n_features]
    blocks.1.mixer.hook_state.saes.h0.hook_sae_recons        [batch, pos, d_k, d_v]
    blocks.1.mixer.hook_state.saes.h0.hook_sae_error         [batch, pos, d_k, d_v]  (error term only)

SAELens's ``HookedSAETransformer`` names an SAE's hooks directly under the hook it replaces
(``<hook>.hook_sae_acts_post``); ours add ``saes.h{head}`` because one hook point holds an SAE per
head, and SAELens's ``hook_sae_output`` is the hook point itself (``blocks.1.mixer.hook_state``).

Order inside the hook point: hooks that were on the original HookPoint run first, on the raw
tensor; then each attached head's slice is replaced by its SAE's reconstruction; then hooks added
to ``blocks.1.mixer.hook_state`` while attached see the spliced tensor. The model treats a changed
slice of ``hook_state`` as a state replacement that carries forward through the recurrence.

Each head's slice becomes :meth:`SAE.splice` of it. With ``use_error_term=True`` that is
``x + (recon - recon_clean)``, where ``recon_clean`` is the reconstruction computed with the SAE's
hooks off and without gradient: with no latent edit the model's output is bitwise unchanged, and an
edit of ``hook_sae_acts_post`` shifts the state by exactly the decoded difference. Editing
``hook_sae_error`` replaces the error term (the slice becomes ``recon + error``).

Gradients: with grad enabled, the spliced tensor is a new tensor that requires grad (through the SAE's
or the model's parameters), so the model gives it the total derivative at every step, even where its
value equals the model's (see
:class:`~recurrent_lens.models.mixer.MatrixMixer`). With ``use_error_term=True`` the model's output is
unchanged and a backward hook on ``hook_sae_acts_post`` (``run_with_cache(..., incl_bwd=True)``) receives
the gradient of splicing the reconstruction with the error term held fixed: at ``(batch, pos)`` feature
``i`` gets ``<dL/dS_pos, A_i>`` for its atom ``A_i`` and the head's state gradient ``dL/dS_pos``, ready
for gradient × activation attribution.

Attached SAEs never touch their dead-feature counters (only training does).
:func:`reset_saes` puts the original HookPoint (with its hooks) back.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.sae.base import SAE
from recurrent_lens.states.cells import check_head

__all__ = ["SAEHookPoint", "add_sae", "reset_saes", "saes"]

MATRIX_HOOKS = ("hook_state", "hook_write", "hook_erase")


class SAEHookPoint(HookPoint):
    """A ``HookPoint`` that splices attached SAEs' reconstructions into their heads' slices.

    ``saes`` maps ``"h{head}"`` to the SAE; ``original`` is the replaced HookPoint (kept out of the
    module tree so that its hooks are not listed twice).
    """

    def __init__(self, original: HookPoint, n_heads: int) -> None:
        super().__init__()
        self.saes = nn.ModuleDict()
        self.use_error_term: dict[str, bool] = {}
        self.n_heads = n_heads
        # The model's engine materialises per-step matrices only for hooks it sees as active.
        self.is_active = True
        object.__setattr__(self, "original", original)

    def forward(self, x: Float[torch.Tensor, "batch pos head d_k d_v"]) -> Float[torch.Tensor, "batch pos head d_k d_v"]:
        x = self.original(x)
        if x.dim() != 5:
            raise ValueError(f"{self.name}: SAEs need a [batch, pos, head, d_k, d_v] tensor, got shape {tuple(x.shape)}")
        out = x
        for key, sae in self.saes.items():
            head = int(key[1:])
            spliced = sae.splice(x[:, :, head], self.use_error_term[key])
            if out is x:
                out = x.clone()
            out[:, :, head] = spliced
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, heads={sorted(int(k[1:]) for k in self.saes)}"


def _matrix_hook(model: nn.Module, hook_name: str) -> HookPoint:
    hook_dict = getattr(model, "hook_dict", {})
    if hook_name not in hook_dict:
        candidates = sorted(n for n in hook_dict if n.split(".")[-1] in MATRIX_HOOKS)
        raise ValueError(f"hook_name: unknown hook {hook_name!r}; matrix hooks of this model: {candidates}")
    if hook_name.split(".")[-1] not in MATRIX_HOOKS:
        raise ValueError(
            f"hook_name: {hook_name!r} is not a matrix hook; expected a name ending in one of {MATRIX_HOOKS} "
            "(a [batch, pos, head, d_k, d_v] tensor)"
        )
    return hook_dict[hook_name]


def _mixer_dims(model: nn.Module, hook_name: str) -> tuple[int, int, int]:
    parent = model.get_submodule(hook_name.rsplit(".", 1)[0])
    cfg = getattr(model, "cfg", None)
    dims = []
    for attr in ("n_heads", "d_k", "d_v"):
        value = getattr(parent, attr, None)
        if value is None:
            value = getattr(cfg, attr, None)
        if value is None:
            raise ValueError(f"cannot find {attr} for {hook_name!r} on its parent module or model.cfg")
        dims.append(int(value))
    return dims[0], dims[1], dims[2]


def add_sae(model: nn.Module, sae: SAE, hook_name: str, head: int, use_error_term: bool | None = None) -> None:
    """Splice ``sae`` into head ``head`` of the matrix hook ``hook_name`` until :func:`reset_saes`.

    Raises ``ValueError`` naming the argument, the expected and the actual value for an unknown
    hook, a non-matrix hook, a head out of range or an SAE whose ``d_k``/``d_v`` do not match the
    hook. Attaching a second SAE to the same head replaces the first. ``use_error_term=None`` takes
    ``sae.use_error_term`` (SAELens semantics). ``sae.cfg.metadata`` gets
    ``hook_name`` and ``head`` when they are not already set.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import WriteSAE, add_sae, reset_saes
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> add_sae(model, WriteSAE(8, 4, 32, k=4), "blocks.0.mixer.hook_state", head=1, use_error_term=True)
        >>> "blocks.0.mixer.hook_state.saes.h1.hook_sae_acts_post" in model.hook_dict
        True
        >>> reset_saes(model)
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a recurrent_lens.sae.SAE, got {type(sae).__name__}")
    hp = _matrix_hook(model, hook_name)
    n_heads, d_k, d_v = _mixer_dims(model, hook_name)
    head = check_head(head, n_heads, where=hook_name)
    if (sae.cfg.d_k, sae.cfg.d_v) != (d_k, d_v):
        raise ValueError(
            f"sae: {hook_name!r} has per-head matrices of shape (d_k={d_k}, d_v={d_v}), "
            f"but the SAE expects (d_k={sae.cfg.d_k}, d_v={sae.cfg.d_v})"
        )
    if not isinstance(hp, SAEHookPoint):
        parent_name, leaf = hook_name.rsplit(".", 1)
        wrapper = SAEHookPoint(hp, n_heads)
        setattr(model.get_submodule(parent_name), leaf, wrapper)
        hp = wrapper
    hp.saes[f"h{head}"] = sae
    hp.use_error_term[f"h{head}"] = sae.use_error_term if use_error_term is None else use_error_term
    sae.cfg.metadata.setdefault("hook_name", hook_name)
    sae.cfg.metadata.setdefault("head", head)
    model.setup()


def reset_saes(model: nn.Module, hook_names: Sequence[str] | None = None) -> None:
    """Detach the SAEs at ``hook_names`` (default: all) and restore the original HookPoints.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import reset_saes
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> reset_saes(model)  # nothing attached: a no-op
    """
    attached = [(name, m) for name, m in model.named_modules() if isinstance(m, SAEHookPoint)]
    detached: list[SAE] = []
    for name, wrapper in attached:
        if hook_names is not None and name not in hook_names:
            continue
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, wrapper.original)
        detached.extend(wrapper.saes.values())
    model.setup()
    for sae in detached:
        # Give the SAE its own short hook names back (model.setup() renamed them).
        sae.setup()


@contextmanager
def saes(
    model: nn.Module, saes: Sequence[tuple[SAE, str, int]], use_error_term: bool | None = None
) -> Iterator[Any]:
    """Attach ``(sae, hook_name, head)`` triples for the duration of a ``with`` block.

    ``use_error_term=None`` uses each SAE's own ``use_error_term``.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import WriteSAE, saes
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> with saes(model, [(WriteSAE(8, 4, 32, k=4), "blocks.0.mixer.hook_state", 0)], use_error_term=True):
        ...     spliced = model(tokens)
        >>> bool((spliced - model(tokens)).abs().max() < 1e-5)  # the state path vs the fast scan: fp32 rounding
        True
    """
    names = []
    try:
        for sae, hook_name, head in saes:
            add_sae(model, sae, hook_name, head, use_error_term=use_error_term)
            names.append(hook_name)
        yield model
    finally:
        if names:
            reset_saes(model, names)
