"""MatrixMixer: the hook vocabulary and edit semantics shared by every recurrent architecture.

A subclass supplies three pieces of maths and nothing else:

- ``project(x, cache, ctx)``: the per-token inputs of the recurrence (:class:`RecurrenceInputs`) plus
  whatever ``output`` needs later;
- ``read_extra(o, inputs, aux)``: an architecture's skip or bonus term added to ``S_tᵀ q_t`` (default none);
- ``output(read, aux)``: output norm, gate and projection back to ``d_model``.

The base class fires ``hook_q/k/v/beta/decay`` on the inputs (edits carry through the recurrence),
runs the scan engine in the cheapest exact form the attached hooks allow, fires ``hook_write``,
``hook_erase`` and ``hook_state`` only when something is attached to them, and applies their edits
with the replacement semantics of DESIGN.md §3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.scan import RecurrenceInputs, Rule, boundary_scan, replay, replay_at, scan


@dataclass
class HarvestRequest:
    """Per-step matrices one mixer hands out during a forward, at chosen positions and heads only.

    Set by :meth:`~recurrent_lens.models.base.HookedRecurrentModel.harvest` on ``mixer.harvest_request``
    for the duration of one forward; the mixer fills ``out``.

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


def hook_active(hp: HookPoint) -> bool:
    """Whether anything is attached to a hook point (a hook, a cache request, a spliced SAE)."""
    return bool(hp._forward_hooks or hp._backward_hooks or getattr(hp, "is_active", False))


def fire(hp: HookPoint, x: Tensor) -> Tensor:
    """Run a hook point and refuse edits that change the tensor's shape or dtype."""
    if not hook_active(hp):
        return x
    y = hp(x)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(
            f"hook {hp.name}: an edit must keep shape {tuple(x.shape)} and dtype {x.dtype}, "
            f"got shape {tuple(y.shape)} and dtype {y.dtype}"
        )
    return y


def fire_matrix(hp: HookPoint, x: Tensor, recompute: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
    """Fire a per-step matrix hook and locate its edits.

    Returns the (possibly edited) tensor and a ``[batch, pos, head]`` mask of the slices that differ
    from the unedited one, or ``None`` when nothing changed. In-place edits are detected through the
    tensor's version counter; the unedited tensor is then recomputed for the comparison, so the
    common no-edit case (caching) costs no copy. With a backward hook attached, every slice counts
    as replaced, so that the forward runs through the hooked tensor and gradients reach the hook.
    """
    version = x._version
    y = fire(hp, x)
    if hp._backward_hooks:
        return y, torch.ones(y.shape[:3], dtype=torch.bool, device=y.device)
    if y is x and x._version == version:
        return x, None
    reference = recompute() if y is x else x
    mask = (y != reference).flatten(3).any(-1)
    return (y, mask) if bool(mask.any()) else (reference, None)


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

    Class attributes a subclass sets: ``rule`` (the :class:`Rule`), ``has_beta``, ``has_decay``. Whether
    the decay is a scalar per head or one value per key channel follows from the shape ``project`` gives it.
    """

    rule: Rule
    has_beta: bool = True
    has_decay: bool = True
    harvest_request: HarvestRequest | None = None

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

    def project(self, x: Tensor, cache: LayerCache | None, ctx: dict[str, Any]) -> tuple[RecurrenceInputs, Any]:
        raise NotImplementedError

    def read_extra(self, o: Tensor, inputs: RecurrenceInputs, aux: Any) -> Tensor:
        return o

    def output(self, read: Tensor, aux: Any) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, cache: LayerCache | None = None, ctx: dict[str, Any] | None = None) -> Tensor:
        ctx = {} if ctx is None else ctx
        x = fire(self.hook_in, x)
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
        o, final = self._recur(inputs, S0)
        if cache is not None:
            cache.state = final
        read = fire(self.hook_read, self.read_extra(o, inputs, aux))
        return fire(self.hook_out, self.output(read, aux))

    def _recur(self, inputs: RecurrenceInputs, S0: Tensor) -> tuple[Tensor, Tensor]:
        rule, chunk = self.rule, self.cfg.chunk_size
        writes = None
        if hook_active(self.hook_write):
            writes, mask = fire_matrix(self.hook_write, inputs.write(), inputs.write)
            writes = writes if mask is not None else None
        watch_erase = self.rule.has_erase and hook_active(self.hook_erase)
        if self.harvest_request is not None:
            if watch_erase or hook_active(self.hook_state):
                raise ValueError(f"harvest: blocks.{self.layer}.mixer has hooks on hook_state or hook_erase, which "
                                 "harvesting does not fire; remove them or use run_with_cache")
            return self._harvest(self.harvest_request, inputs, S0, writes)
        if not (watch_erase or hook_active(self.hook_state)):
            res = scan(rule, inputs, S0, chunk_size=chunk, writes=writes)
            return res.o, res.final_state

        def unedited():
            return scan(rule, inputs, S0, chunk_size=chunk, keep_states=True, writes=writes)

        res = unedited()
        erase_edit = state_edit = None
        if watch_erase:
            erases, mask = fire_matrix(self.hook_erase, res.erases, lambda: unedited().erases)
            erase_edit = None if mask is None else (mask, erases)
        states, mask = fire_matrix(self.hook_state, res.states, lambda: unedited().states)
        state_edit = None if mask is None else (mask, states)
        if state_edit is None and erase_edit is None:
            return res.o, res.final_state
        states = replay(rule, inputs, S0, res.states, writes=writes, state_edit=state_edit, erase_edit=erase_edit)
        return torch.einsum("bthkv,bthk->bthv", states, inputs.q), states[:, -1]

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
        if request.last:
            # Nothing downstream reads this layer's output: scan the requested heads only.
            inputs, S0 = inputs.map(lambda t: t[:, :, heads]), S0[:, heads]
            writes = None if writes is None else writes[:, :, heads]
            heads = list(range(len(heads)))
        o, final, bounds = boundary_scan(self.rule, inputs, S0, chunk, writes=writes)
        picked = inputs.map(lambda t: t[:, :, heads])
        request.out["state"] = replay_at(self.rule, picked, bounds[:, :, heads], pos, chunk,
                                         writes=None if writes is None else writes[:, :, heads])
        if request.last:
            raise HarvestDone
        return o, final
