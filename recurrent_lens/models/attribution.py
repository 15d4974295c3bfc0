"""Exact write attribution: which past writes built a state and its read.

With the run's transitions held fixed, every recurrence is ``S_t = A_t S_{t-1} + W_t`` with ``A_t`` a
``d_k × d_k`` matrix built from token ``t``'s inputs alone (decay; for delta rules and RWKV-7 also the
erase, :meth:`~recurrent_lens.models.scan.Rule.transition`) and ``W_s = k̃_s v_sᵀ`` the rank-1 write
(``k̃_s = β_s k_s``). Unrolled::

    S_t = Φ_{0→t} S_0 + Σ_{s≤t} (Φ_{s→t} k̃_s) v_sᵀ,      Φ_{s→t} = A_t ⋯ A_{s+1}

so the read ``o_t = S_tᵀ q_t`` is one term per past write, ``v_s · (q_tᵀ Φ_{s→t} k̃_s)``, plus an initial
term, and so is every linear functional of the state. Zeroing ``W_s`` through ``hook_write`` moves each of
them by exactly minus that write's term, because nothing in ``A_t`` depends on the state.

The carried keys ``Φ_{s→t} k̃_s`` are computed token by token, all past writes at once: ``[batch, head,
t + 1, d_k]`` at step ``t``, ``O(pos² · d_k)`` work per head and nothing of size ``[pos, pos, d_k, d_v]``.
A new architecture gets attribution from its rule's ``transition``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.models.mixer import CaptureRequest, HarvestDone
from recurrent_lens.models.scan import RecurrenceInputs, Rule
from recurrent_lens.states.cells import check_heads, check_layer, check_positions

if TYPE_CHECKING:
    from recurrent_lens.models.base import HookedRecurrentModel

PROGRESS_FROM = 2048
"""With ``progress=None``, a progress bar is shown for sequences at least this long."""


@dataclass
class WriteContributions:
    """The read ``hook_read`` of one layer split into one term per past write.

    ``writes.sum(-2) + initial + extra`` equals ``hook_read`` at ``read_positions`` (fp32 rounding apart).

    Attributes:
        writes: ``[batch, read, head, write_pos, d_v]``, the contribution of the write at ``write_pos`` to
            ``S_tᵀ q_t`` at each read position ``t`` (zero for ``write_pos > t``).
        initial: ``[batch, read, head, d_v]``, the contribution of the initial state.
        extra: ``[batch, read, head, d_v]``, the architecture's term outside the state (Mamba-2's ``D·x``;
            zeros elsewhere).
        read_positions: ``[batch, read]``, the positions read.
        heads: the heads, in the order of the head axis.
    """

    writes: Float[Tensor, "batch read head write_pos d_v"]
    initial: Float[Tensor, "batch read head d_v"]
    extra: Float[Tensor, "batch read head d_v"]
    read_positions: Int[Tensor, "batch read"]
    heads: list[int]

    def total(self) -> Float[Tensor, "batch read head d_v"]:
        """``writes.sum(-2) + initial + extra``: the read itself."""
        return self.writes.sum(-2) + self.initial + self.extra


def capture(model: HookedRecurrentModel, tokens: Tensor, layer: int,
            initial_state: Float[Tensor, "batch head d_k d_v"] | None = None) -> CaptureRequest:
    """Run ``model`` up to ``layer``'s recurrence and return that layer's inputs, initial state and extra
    read term (:class:`~recurrent_lens.models.mixer.CaptureRequest`); the layer's scan is not run."""
    request = CaptureRequest()
    # the request rides in this forward's context: nothing is left on the (shared) mixer, so concurrent
    # calls on one model keep their own
    try:
        model._forward(tokens, None, stop_at_layer=layer + 1,
                       initial_states=None if initial_state is None else {layer: initial_state},
                       capture={layer: request})
    except HarvestDone:
        pass
    return request


def carried_writes(rule: Rule, x: RecurrenceInputs, S0: Float[Tensor, "batch head d_k d_v"] | None,
                   stops: Sequence[int], progress: bool | None = None
                   ) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Carry every write's key forward through the transitions, yielding at each position in ``stops``.

    Yields ``(t, keys, initial)``: ``keys`` ``[batch, head, t + 1, d_k]`` holds ``Φ_{s→t} k̃_s`` for ``s ≤ t``
    (a view, valid until the next step), ``initial`` ``[batch, head, d_v, d_k]`` is ``(Φ_{0→t} S_0)ᵀ`` (``None``
    when ``S0`` is ``None``, a zero state). ``S_t = initial_tᵀ + Σ_s keys[..., s, :] ⊗ v_s``.

    Args:
        rule: the layer's recurrence.
        x: its inputs ``[batch, pos, head, ...]``, restricted to the heads wanted.
        S0: the state before the first token, or ``None`` for zero.
        stops: the positions to yield at; the loop ends at the last of them.
        progress: show a progress bar (``None``: for at least :data:`PROGRESS_FROM` steps).
    """
    wanted = set(int(t) for t in stops)
    if not wanted:
        return
    last = max(wanted)
    B, _, H, dk, _ = x.shape
    keys = x.write_key().transpose(1, 2)  # [B, H, pos, d_k]
    carried = keys.new_zeros(B, H, last + 1, dk)
    initial = None if S0 is None else S0.transpose(-1, -2)
    show = last + 1 >= PROGRESS_FROM if progress is None else progress
    for t in tqdm(range(last + 1), desc="attribution", disable=not show):
        step = x.at(t)
        if t:
            carried[:, :, :t] = rule.transition(carried[:, :, :t], step)
        carried[:, :, t] = keys[:, :, t]
        if initial is not None:
            initial = rule.transition(initial, step)
        if t in wanted:
            yield t, carried[:, :, : t + 1], initial


def positions_by_step(pos: Int[Tensor, "batch n"]) -> dict[int, tuple[Tensor, Tensor]]:
    """``{t: (rows, slots)}``: where each position occurs in ``pos`` (row and column indices)."""
    rows, slots = torch.nonzero(pos >= 0, as_tuple=True)
    values = pos[rows, slots]
    return {int(t): (rows[values == t], slots[values == t]) for t in values.unique().tolist()}


def write_contributions(model: HookedRecurrentModel, tokens: Any, layer: int,
                        read_positions: Tensor | Sequence[Any] | None = None,
                        heads: int | Sequence[int] | None = None, *,
                        initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
                        progress: bool | None = None) -> WriteContributions:
    """Split ``blocks.{layer}.mixer.hook_read`` into one term per past write (see the module docstring).

    Exact for every rule: ``writes.sum(-2) + initial + extra`` is the read, and zeroing the write at ``s``
    through ``hook_write`` moves the read at ``t`` by ``-writes[:, t, :, s]``. Runs under ``torch.no_grad``;
    the forward stops before this layer's own scan. Memory beyond the forward: ``[batch, head, pos, d_k]``
    carried keys plus the result.

    Args:
        model: the model.
        tokens: ``[batch, pos]`` token ids (or anything the forward takes).
        layer: a recurrent layer.
        read_positions: ``[batch, read]`` or ``[read]`` positions (``None``: every position).
        heads: a head, a list of heads or ``None`` for all.
        initial_state: ``[batch, head, d_k, d_v]``, the layer's state before the first token (as the
            forward's ``initial_states={layer: ...}``); its term is ``initial``.
        progress: show a progress bar (``None``: for long sequences).

    Returns:
        A :class:`WriteContributions` with ``write_pos`` spanning the whole sequence.

    Example:
        >>> import torch
        >>> c = tiny_model.write_contributions(tiny_tokens, 0, read_positions=[3, 7], heads=[1])
        >>> tuple(c.writes.shape)
        (2, 2, 1, 8, 8)
        >>> _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter="blocks.0.mixer.hook_read")
        >>> read = cache["blocks.0.mixer.hook_read"][:, [3, 7]][:, :, [1]]
        >>> bool(torch.allclose(c.total(), read, atol=1e-6)), bool(c.writes[:, 0, :, 4:].eq(0).all())
        (True, True)
    """
    layer = check_layer(model.cfg, layer)
    heads = check_heads(heads, model.cfg.n_heads, f"layer {layer}")
    with torch.no_grad():
        tokens = model._tokens(tokens)
        B, T = tokens.shape
        pos = check_positions(torch.arange(T) if read_positions is None else read_positions, B, T,
                              model.embed.weight.device)
        got = capture(model, tokens, layer, initial_state)
        x = got.inputs.map(lambda t: t[:, :, heads])
        S0 = None if initial_state is None else got.initial_state[:, heads]
        q, v = x.q, x.v.transpose(1, 2)  # [B, pos, H, d_k], [B, H, pos, d_v]
        n, H, dv = pos.shape[1], len(heads), x.v.shape[-1]
        writes = v.new_zeros(B, n, H, T, dv)
        initial = v.new_zeros(B, n, H, dv)
        hits = positions_by_step(pos)
        for t, keys, init in carried_writes(model.blocks[layer].mixer.rule, x, S0, list(hits), progress):
            rows, slots = hits[t]
            q_t = q[rows, t]  # [r, H, d_k]
            weight = torch.einsum("rhsk,rhk->rhs", keys[rows], q_t)
            writes[rows, slots, :, : t + 1] = weight[..., None] * v[rows, :, : t + 1]
            if init is not None:
                initial[rows, slots] = torch.einsum("rhvk,rhk->rhv", init[rows], q_t)
        rows = torch.arange(B, device=pos.device)[:, None]
        extra = got.extra[:, :, heads][rows, pos]
    return WriteContributions(writes, initial, extra, pos, heads)


def implicit_attention(model: HookedRecurrentModel, tokens: Any, layer: int,
                       heads: int | Sequence[int] | None = None, *,
                       progress: bool | None = None) -> Float[Tensor, "batch head t s"]:
    """How much of each read ``o_t = S_tᵀ q_t`` each past write supplies, as an attention pattern.

    ``α[b, h, t, s] = ⟨c_{t,s}, o_t⟩ / ‖o_t‖²`` with ``c_{t,s}`` the contribution of the write at ``s`` to
    ``o_t`` (:func:`write_contributions`; the state part of the read only, no architecture extra), from a
    zero initial state, so every row sums to 1 (rows with ``o_t = 0`` are 0). Causal, exact for every rule;
    unlike softmax attention, entries may be negative or exceed 1. Costs ``O(pos² · d_k)`` per head and
    ``[batch, head, pos, pos]`` memory, never the per-write contributions themselves:
    ``⟨c_{t,s}, o_t⟩ = w_{t,s} ⟨v_s, o_t⟩`` with the scalar weight ``w_{t,s} = q_tᵀ Φ_{s→t} k̃_s``.

    Args:
        model: the model.
        tokens: ``[batch, pos]`` token ids.
        layer: a recurrent layer.
        heads: a head, a list of heads or ``None`` for all.
        progress: show a progress bar (``None``: for long sequences).

    Returns:
        ``[batch, head, t, s]`` fp32.

    Example:
        >>> import torch
        >>> a = tiny_model.implicit_attention(tiny_tokens, 0, heads=1)
        >>> tuple(a.shape), bool(torch.allclose(a.sum(-1), torch.ones(2, 1, 8), atol=1e-5))
        ((2, 1, 8, 8), True)
        >>> bool(a.triu(1).eq(0).all())
        True
    """
    layer = check_layer(model.cfg, layer)
    heads = check_heads(heads, model.cfg.n_heads, f"layer {layer}")
    with torch.no_grad():
        tokens = model._tokens(tokens)
        T = tokens.shape[1]
        x = capture(model, tokens, layer).inputs.map(lambda t: t[:, :, heads])
        q = x.q.transpose(1, 2)  # [B, H, pos, d_k]
        v = x.v.transpose(1, 2)  # [B, H, pos, d_v]
        weight = q.new_zeros(*q.shape[:2], T, T)
        for t, keys, _ in carried_writes(model.blocks[layer].mixer.rule, x, None, range(T), progress):
            weight[:, :, t, : t + 1] = (keys @ q[:, :, t, :, None])[..., 0]
        o = weight @ v
        norm = o.pow(2).sum(-1, keepdim=True)
        alpha = weight * (o @ v.transpose(-1, -2))
        return torch.where(norm > 0, alpha / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)


__all__ = ["WriteContributions", "write_contributions", "implicit_attention", "carried_writes"]
