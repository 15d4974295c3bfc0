"""MatrixMixer: the hook vocabulary and edit semantics shared by every recurrent architecture.

A subclass supplies three pieces of maths and nothing else:

- ``project(x, cache, ctx)``: the per-token inputs of the recurrence (:class:`RecurrenceInputs`) plus
  whatever ``output`` needs later (``aux``);
- ``read_extra(o, inputs, aux)``: an architecture's skip or bonus term added to ``S_tᵀ q_t`` (default none);
- ``output(read, aux)``: output norm, gate and projection back to ``d_model``; or, when those also use the
  recurrence inputs as the hooks left them (RWKV-7's bonus term), ``output_with_inputs(read, inputs, aux)``.

The base class fires ``hook_q/k/v/beta/decay`` on the inputs (edits carry through the recurrence),
runs the scan engine in the cheapest exact form the attached hooks allow, fires ``hook_write``,
``hook_erase`` and ``hook_state`` only when something is attached to them, and applies their edits
with replacement semantics (see :class:`MatrixMixer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.scan import (
    RecurrenceInputs, Rule, boundary_scan, recurrent_scan, replay, replay_at, scan,
)


@dataclass
class ForwardContext:
    """What every layer of one forward may read besides its input: built by the model for each forward.

    A mixer whose layers hand values on to later layers of the same forward declares a subclass with
    fields for them as its ``context_type`` (RWKV-7's ``v_first``).

    Attributes:
        positions: ``[pos]`` absolute positions of the tokens (``None``: ``0 .. pos - 1``).
        tokens: ``[batch, pos]`` the token ids fed to the model.
        harvest: ``{layer: HarvestRequest}`` of a harvesting forward (empty otherwise). The requests travel
            with the forward, not on the mixers, so concurrent forwards of one model keep their own.
        capture: ``{layer: CaptureRequest}`` of a write-attribution forward (empty otherwise); like
            ``harvest``, it travels with the forward, never on the mixers.
    """

    positions: Int[Tensor, " pos"] | None = None
    tokens: Int[Tensor, "batch pos"] | None = None
    harvest: Mapping[int, HarvestRequest] = field(default_factory=dict)
    capture: Mapping[int, CaptureRequest] = field(default_factory=dict)


@dataclass
class HarvestRequest:
    """Per-step matrices one mixer hands out during a forward, at chosen positions and heads only.

    Made by :meth:`~recurrent_lens.models.base.HookedRecurrentModel.harvest` for one forward and handed to
    the mixer in that forward's :attr:`ForwardContext.harvest`; the mixer fills ``out``.

    Attributes:
        positions: ``[batch, n]`` positions to read.
        heads: ``{"state" | "write": sorted head indices}``.
        last: the deepest layer harvested: the forward stops right after this mixer's recurrence
            (:class:`HarvestDone`), so only the requested heads are scanned.
        out: ``{"state" | "write": [batch, n, len(heads), d_k, d_v]}``, filled by the mixer.
    """

    positions: Tensor
    heads: dict[str, list[int]]
    last: bool = False
    out: dict[str, Tensor] = field(default_factory=dict)


class HarvestDone(Exception):
    """Raised by the deepest harvested mixer: nothing after it is needed."""


@dataclass
class CaptureRequest:
    """Handed to one mixer in a forward's :attr:`ForwardContext.capture`: the mixer records the inputs of
    its recurrence as the hooks left them, its initial state and the architecture's extra read term, then
    stops the forward (:class:`HarvestDone`) before its own scan, or with ``stop=False`` goes on (a harvest
    of the same forward, say). Used by write attribution (:mod:`recurrent_lens.models.attribution`).

    Attributes:
        inputs: the recurrence inputs ``[batch, pos, head, ...]``.
        initial_state: ``[batch, head, d_k, d_v]``, the state before the first token.
        extra: ``[batch, pos, head, d_v]``, what :meth:`MatrixMixer.read_extra` adds to ``S_tᵀ q_t``.
        stop: whether the forward stops once the request is filled.
    """

    inputs: RecurrenceInputs | None = None
    initial_state: Tensor | None = None
    extra: Tensor | None = None
    stop: bool = True


def hook_active(hp: HookPoint) -> bool:
    """Whether anything is attached to a hook point (a hook, a cache request, a spliced SAE)."""
    return bool(hp._forward_hooks or hp._backward_hooks or getattr(hp, "is_active", False))


def fire(hp: HookPoint, x: Tensor) -> Tensor:
    """Run a hook point and refuse edits that are not a tensor of the input's shape, dtype and device."""
    if not hook_active(hp):
        return x
    y = hp(x)
    if not isinstance(y, Tensor):
        raise TypeError(f"hook {hp.name}: an edit must return a torch.Tensor (or None to keep the input), "
                        f"got {type(y).__module__}.{type(y).__qualname__}")
    if y.device != x.device:
        raise ValueError(f"hook {hp.name}: an edit must stay on device {x.device}, got {y.device}")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(
            f"hook {hp.name}: an edit must keep shape {tuple(x.shape)} and dtype {x.dtype}, "
            f"got shape {tuple(y.shape)} and dtype {y.dtype}"
        )
    return y


MatrixEdit = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]
"""``(mask, values)`` or ``(mask, values, unedited)``, the edit format of :func:`~recurrent_lens.models.scan.replay`."""


def fire_matrix(hp: HookPoint, x: Float[Tensor, "batch pos head d_k d_v"],
                recompute: Callable[[], Tensor]) -> MatrixEdit | None:
    """Fire a per-step matrix hook and locate its edits.

    Returns ``None`` when the hook left the tensor as it was and nothing downstream needs a gradient
    through its output; otherwise ``(mask, values)`` with ``mask [batch, pos, head]`` marking the
    slices of ``values`` (what the hooks returned) that differ from the unedited tensor. When grad
    is enabled and ``values`` is a new tensor that requires grad (a backward hook is attached, or an
    edit such as ``x + delta`` with a trainable ``delta``), the edit is ``(mask, values, unedited)``,
    possibly with an all-False mask: ``values`` then takes part in the gradient at every slice.

    In-place edits are detected through the tensor's version counter; the unedited tensor is then
    recomputed for the comparison, so the common no-edit case (caching) costs no copy. Writes that
    bypass the version counter (through ``.data`` or ``.numpy()``) are not seen.
    """
    version = x._version
    y = fire(hp, x)
    if y is x and x._version == version:
        return None
    unedited = recompute() if y is x else x
    mask = (y != unedited).flatten(3).any(-1)
    if torch.is_grad_enabled() and y.requires_grad:
        return mask, y, unedited
    return (mask, y) if bool(mask.any()) else None


def _with_value(value: Tensor, grad: Tensor) -> Tensor:
    """``value``'s numbers with ``grad``'s gradient (the two agree up to rounding)."""
    return value.detach() + (grad - grad.detach())


class MatrixMixer(nn.Module):
    """Base class of every recurrent mixer.

    Shared hook points, in execution order (subclasses add their own between ``hook_in`` and ``hook_q``)::

        hook_in      [batch, pos, d_model]
        hook_q       [batch, pos, head, d_k]      query the read uses (normalised, scaled, expanded)
        hook_k       [batch, pos, head, d_k]      key the recurrence uses
        hook_v       [batch, pos, head, d_v]
        hook_beta    [batch, pos, head]           write strength (only where the architecture has one)
        hook_decay   [batch, pos, head(, d_k)]    log of the multiplicative decay (only where it decays)
        hook_write   [batch, pos, head, d_k, d_v] W_t = β k vᵀ
        hook_erase   [batch, pos, head, d_k, d_v] the state-dependent erase term (delta rules, RWKV-7)
        hook_state   [batch, pos, head, d_k, d_v] S_t after the update at t
        hook_read    [batch, pos, head, d_v]      S_tᵀ q_t plus the architecture's skip/bonus term
        hook_out     [batch, pos, d_model]

    Edits. ``hook_q/k/v/beta/decay/write`` are edited before the scan, so their edits carry forward.
    ``hook_erase`` and ``hook_state`` fire once with every position of the unedited recurrence; wherever
    the returned tensor differs at a ``(batch, pos, head)``, that slice replaces the quantity at that
    step and every later step is recomputed from it. Edits may be returned or made in place
    (``S[:, t] = X``, seen through the version counter). Writes through ``.data`` or ``.numpy()`` bypass
    the version counter and are not supported: they are not detected, so with no backward hook
    attached the model runs as if unedited (a cached reference to the tensor still shows them).

    Caching in the same run as an edit. A cache of ``hook_state`` (or ``hook_erase``) holds what the hook
    point returned: the edited slices, and the unedited recurrence everywhere else, including the later
    steps that the model recomputes from the edit. ``hook_read`` and everything downstream show the
    states actually used.

    Gradients. When grad is enabled and a per-step matrix hook hands back a new tensor that requires
    grad (a backward hook such as ``run_with_cache(..., incl_bwd=True)`` attaches, or an edit such as
    ``S + delta`` with a trainable ``delta``), that tensor takes part in the gradient at every step, edited
    or not. Its gradient at ``(batch, t, head)`` is the total derivative for adding ``εD`` to the quantity
    that step actually used, every later step recomputed. With no earlier state or erase edit that is
    what a hook edit ``x + εD`` of step ``t`` alone measures; after one, such a hook edit would replace
    the slice by the unedited value plus ``εD`` instead. All of ``hook_write``, ``hook_erase`` and
    ``hook_state`` add to the state at ``t``, so their gradients agree there, except where ``S_t`` itself
    is replaced (a write or erase at that step then has no effect). An edit of several steps replaces
    each of them, so its derivative is not the sum of the per-step ones. Such runs replay the recurrence
    token by token; when nothing is edited, their forward values are bitwise those of the same run with
    a forward cache hook in place of the gradient hook.

    Class attributes a subclass sets: ``rule`` (the :class:`Rule`), ``has_beta``, ``has_decay`` and, when its
    layers hand values to later layers, ``context_type`` (a :class:`ForwardContext` subclass with fields for
    them). Whether the decay is a scalar per head or one value per key channel follows from the shape
    ``project`` gives it.
    """

    rule: Rule
    has_beta: bool = True
    has_decay: bool = True
    context_type: type[ForwardContext] = ForwardContext

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_heads, self.d_k, self.d_v = cfg.n_heads, cfg.d_k, cfg.d_v
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_q = HookPoint()  # [batch, pos, head, d_k]
        self.hook_k = HookPoint()  # [batch, pos, head, d_k]
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]
        if self.has_beta:
            self.hook_beta = HookPoint()  # [batch, pos, head]
        if self.has_decay:
            self.hook_decay = HookPoint()  # [batch, pos, head] or [batch, pos, head, d_k]
        self.hook_write = HookPoint()  # [batch, pos, head, d_k, d_v]
        if self.rule.has_erase:
            self.hook_erase = HookPoint()  # [batch, pos, head, d_k, d_v]
        self.hook_state = HookPoint()  # [batch, pos, head, d_k, d_v]
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]
        self.hook_out = HookPoint()  # [batch, pos, d_model]

    def project(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None,
                ctx: ForwardContext) -> tuple[RecurrenceInputs, Any]:
        """The inputs of the recurrence for ``x``, and whatever :meth:`output` needs besides the read."""
        raise NotImplementedError

    def read_extra(self, o: Float[Tensor, "batch pos head d_v"], inputs: RecurrenceInputs,
                   aux: Any) -> Float[Tensor, "batch pos head d_v"]:
        """``S_tᵀ q_t`` plus the architecture's skip or bonus term (part of ``hook_read``); none by default."""
        return o

    def output(self, read: Float[Tensor, "batch pos head d_v"], aux: Any) -> Float[Tensor, "batch pos d_model"]:
        """The mixer output from the (hooked) read: output norm, gate, projection."""
        raise NotImplementedError

    def output_with_inputs(self, read: Float[Tensor, "batch pos head d_v"], inputs: RecurrenceInputs,
                           aux: Any) -> Float[Tensor, "batch pos d_model"]:
        """The mixer output when it also uses the recurrence inputs as the hooks left them; override this
        instead of :meth:`output` then. By default ``output(read, aux)``."""
        return self.output(read, aux)

    def _as_context(self, ctx: ForwardContext | Mapping[str, Any] | None) -> ForwardContext:
        """``ctx`` as this mixer's ``context_type``: a new one for ``None``, built from the fields of a dict."""
        if ctx is None:
            return self.context_type()
        if isinstance(ctx, Mapping):
            names = sorted(f.name for f in dataclasses.fields(self.context_type))
            unknown = sorted(set(ctx) - set(names))
            if unknown:
                raise ValueError(f"ctx: expected fields of {self.context_type.__name__} {names}, got {unknown}")
            return self.context_type(**ctx)
        if not isinstance(ctx, self.context_type):
            raise TypeError(f"ctx: {type(self).__name__} needs a {self.context_type.__name__}, "
                            f"got {type(ctx).__name__}")
        return ctx

    def forward(self, x: Float[Tensor, "batch pos d_model"], cache: LayerCache | None = None,
                ctx: ForwardContext | Mapping[str, Any] | None = None) -> Float[Tensor, "batch pos d_model"]:
        """The mixer output for ``x``; ``cache`` carries state between calls, ``ctx`` is the forward's
        :class:`ForwardContext` (or a dict of its fields)."""
        x = fire(self.hook_in, x)
        ctx = self._as_context(ctx)
        inputs, aux = self.project(x, cache, ctx)
        inputs = RecurrenceInputs(
            q=fire(self.hook_q, inputs.q),
            k=fire(self.hook_k, inputs.k),
            v=fire(self.hook_v, inputs.v),
            beta=fire(self.hook_beta, inputs.beta) if self.has_beta else inputs.beta,
            decay=fire(self.hook_decay, inputs.decay) if self.has_decay else inputs.decay,
            extra=inputs.extra,
        )
        B, _, H, dk, dv = inputs.shape
        S0 = cache.state if cache is not None and cache.state is not None else inputs.q.new_zeros(B, H, dk, dv)
        capture = ctx.capture.get(self.layer)
        if capture is not None:
            self._capture(capture, inputs, S0, aux)
        o, final = self._recur(inputs, S0, ctx.harvest.get(self.layer))
        if cache is not None:
            cache.state = final
        read = fire(self.hook_read, self.read_extra(o, inputs, aux))
        return fire(self.hook_out, self.output_with_inputs(read, inputs, aux))

    def _capture(self, request: CaptureRequest, inputs: RecurrenceInputs, S0: Tensor, aux: Any) -> None:
        """Fill ``request`` and stop the forward (unless ``request.stop`` is False). Per-step matrix hooks would change the writes or the
        transitions that attribution holds fixed, so they are refused rather than silently ignored."""
        watched = [name for name in ("hook_write", "hook_erase", "hook_state")
                   if hasattr(self, name) and hook_active(getattr(self, name))]
        if watched:
            raise ValueError(f"write attribution: blocks.{self.layer}.mixer has hooks on {', '.join(watched)}, "
                             "which attribution does not apply; remove them")
        request.inputs, request.initial_state = inputs, S0
        # read_extra adds its term to the state's read; given zeros it returns the term alone
        request.extra = self.read_extra(torch.zeros_like(inputs.v), inputs, aux)
        if request.stop:
            raise HarvestDone

    def _recur(self, inputs: RecurrenceInputs, S0: Tensor,
               request: HarvestRequest | None) -> tuple[Tensor, Tensor]:
        rule, chunk = self.rule, self.cfg.chunk_size
        # ``writes``: edited writes, used everywhere. ``grad_writes``: the hooked writes when their values
        # are unchanged but a gradient must reach them; the numbers then come from the unedited paths and
        # the writes enter a differentiable replay (a write adds to the state, so that gives the total derivative).
        writes = grad_writes = None
        if hook_active(self.hook_write):
            edit = fire_matrix(self.hook_write, inputs.write(), inputs.write)
            if edit is not None and bool(edit[0].any()):
                writes = edit[1]
            elif edit is not None:
                grad_writes = edit[1]
        watch_erase = self.rule.has_erase and hook_active(self.hook_erase)
        if request is not None:
            if watch_erase or hook_active(self.hook_state):
                raise ValueError(f"harvest: blocks.{self.layer}.mixer has hooks on hook_state or hook_erase, which "
                                 "harvesting does not fire; remove them or use run_with_cache")
            return self._harvest(request, inputs, S0, writes)
        if not (watch_erase or hook_active(self.hook_state)):
            res = scan(rule, inputs, S0, chunk_size=chunk, writes=writes)
            if grad_writes is None:
                return res.o, res.final_state
            grad = recurrent_scan(rule, inputs, S0, writes=grad_writes)
            return _with_value(res.o, grad.o), _with_value(res.final_state, grad.final_state)

        def unedited():
            return scan(rule, inputs, S0, chunk_size=chunk, keep_states=True, writes=writes)

        res = unedited()
        erase_edit = fire_matrix(self.hook_erase, res.erases, lambda: unedited().erases) if watch_erase else None
        state_edit = fire_matrix(self.hook_state, res.states, lambda: unedited().states)
        edits = [e for e in (erase_edit, state_edit) if e is not None]
        if not edits and grad_writes is None:
            return res.o, res.final_state
        states = replay(rule, inputs, S0, res.states, writes=writes if grad_writes is None else grad_writes,
                        state_edit=state_edit, erase_edit=erase_edit, differentiable=grad_writes is not None)
        o, final = torch.einsum("bthkv,bthk->bthv", states, inputs.q), states[:, -1]
        if not any(bool(e[0].any()) for e in edits):
            # Only gradient paths (a backward hook, a differentiable no-op edit): the forward keeps the
            # unedited run's numbers bitwise.
            o, final = _with_value(res.o, o), _with_value(res.final_state, final)
        return o, final

    def _harvest(self, request: HarvestRequest, inputs: RecurrenceInputs, S0: Tensor,
                 writes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Fill ``request`` and run the layer's recurrence (all heads, unless the forward stops here).

        Writes need no scan: they are gathered at the positions. States come from the chunk-boundary
        states of the scan the layer runs anyway, each position replayed from its own chunk's boundary.
        """
        pos = request.positions
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        if "write" in request.heads:
            heads = request.heads["write"]
            if writes is None:
                at = inputs.map(lambda t: t[rows, pos][:, :, heads])
                request.out["write"] = at.write()
            else:
                request.out["write"] = writes[rows, pos][:, :, heads]
        chunk = self.cfg.chunk_size
        if "state" not in request.heads:
            if request.last:
                raise HarvestDone
            res = scan(self.rule, inputs, S0, chunk_size=chunk, writes=writes)
            return res.o, res.final_state
        heads = request.heads["state"]
        pick = inputs.map(lambda t: t[:, :, heads])
        picked_writes = None if writes is None else writes[:, :, heads]
        if request.last:
            # Nothing downstream reads this layer's output: scan the requested heads only.
            _, _, bounds, u = boundary_scan(self.rule, pick, S0[:, heads], chunk, writes=picked_writes, updates=True)
            request.out["state"] = replay_at(self.rule, pick, bounds, pos, chunk, writes=picked_writes, updates=u)
            raise HarvestDone
        o, final, bounds, u = boundary_scan(self.rule, inputs, S0, chunk, writes=writes, updates=True)
        request.out["state"] = replay_at(self.rule, pick, bounds[:, :, heads], pos, chunk, writes=picked_writes,
                                         updates=None if u is None else u[:, :, heads])
        return o, final
