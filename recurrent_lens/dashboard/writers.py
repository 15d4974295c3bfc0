"""The top writers of each top example: its feature's pre-activation at the firing split over the past writes.

Every SAE kind's pre-activation is affine in the state it reads, ``pre_i(S) = scale_i <E_i, S>_F + pre_i(0)``,
and the state at ``t`` is an exact sum of the carried writes ``(Φ_{s→t} k̃_s) v_sᵀ``
(:mod:`recurrent_lens.models.attribution`), so the term of the write at ``s`` is
``scale_i (Φ_{s→t} k̃_s)ᵀ E_i v_s`` (:func:`~recurrent_lens.analysis.feature_attribution` computes the same
terms for chosen features at chosen positions). Gated SAEs split their magnitude path, the one
``hook_sae_acts_pre`` shows; the gate path is not attributed.

The pass computes them as examples get in: the harvesting forward also records the layer's recurrence
inputs (a :class:`~recurrent_lens.models.mixer.CaptureRequest` that does not stop it), and
:meth:`TopWriters.update` carries the batch's write keys position by position; at each position where
firings entered the top examples, every such firing's terms come at once as products of the encoder's factors
with the carried keys and the values (``scale_i E_i = Σ_r a_ir b_irᵀ``: a bilinear encoder's factors, or a
linear encoder's rows with ``a_ir`` the unit vectors), for those firings' own features only. No forward runs
again, and a slot's writers are overwritten with its example.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F_
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.models.attribution import carried_writes
from recurrent_lens.models.mixer import CaptureRequest
from recurrent_lens.models.scan import RecurrenceInputs
from recurrent_lens.sae.parts import BilinearEncoder

CALL_ELEMENTS = 1 << 20
"""One chunk of a position's examples holds ``[row, write_pos, feature × rank]`` terms of at most this many
elements (4 MiB in fp32): features beyond it are taken in further chunks."""


def unavailable(sae: Any, hook_name: str, head: int) -> str | None:
    """Why exact write attribution cannot split this SAE's pre-activations at the dashboard's cell, or ``None``.

    Example:
        >>> from recurrent_lens.sae import WriteSAE
        >>> sae = WriteSAE(8, 8, 4, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
        >>> unavailable(sae, "blocks.0.mixer.hook_state", 1) is None
        True
        >>> unavailable(sae, "blocks.0.mixer.hook_state", 0)  # doctest: +ELLIPSIS
        'sae.cfg.metadata names blocks.0.mixer.hook_state head 1, the dashboard reads ... head 0'
    """
    meta = sae.cfg.metadata
    named = (meta.get("hook_name"), meta.get("head"))
    if named != (hook_name, head):
        # The writers split the SAE's own cell: on another cell their terms would split a state other than the
        # one the examples were ranked on.
        return f"sae.cfg.metadata names {named[0]} head {named[1]}, the dashboard reads {hook_name} head {head}"
    if not (hasattr(sae, "pre_activation_affine") and hasattr(sae, "encoder_atoms") and hasattr(sae, "autoencode")):
        return f"{type(sae).__name__} has no pre_activation_affine/encoder_atoms/autoencode (its pre-activation " \
               f"as an affine function of the state)"
    return None


@dataclass
class Writers:
    """The top writers of every top example, by ``[feature slot, example slot]`` of the top buffer.

    ``position``, ``token`` and ``contribution`` hold the ``k`` writes with the largest ``|contribution|``
    (``-1`` and ``0`` past the example's own position); ``other`` is the sum of the remaining writes;
    ``pre_activation`` is ``contribution.sum(-1) + other + initial + bias``, the SAE's pre-activation
    (``hook_sae_acts_pre``) at the firing, ``bias`` the pre-activation of the zero state and ``initial``
    the initial state's term (zero: the dashboard's forwards start from a zero state).
    """

    position: Int[Tensor, "n_feat size k"]
    token: Int[Tensor, "n_feat size k"]
    contribution: Float[Tensor, "n_feat size k"]
    other: Float[Tensor, "n_feat size"]
    initial: Float[Tensor, "n_feat size"]
    bias: Float[Tensor, "n_feat size"]
    pre_activation: Float[Tensor, "n_feat size"]

    def record(self, j: int, slot: int, name) -> dict[str, Any]:
        """The example's ``writers`` field, token ids turned into strings by ``name``."""
        listed = [{"position": p, "token": name(t), "contribution": c}
                  for p, t, c in zip(self.position[j, slot].tolist(), self.token[j, slot].tolist(),
                                     self.contribution[j, slot].tolist()) if p >= 0]
        return {"top": listed, "other_writes": float(self.other[j, slot]), "initial": float(self.initial[j, slot]),
                "bias": float(self.bias[j, slot]), "pre_activation": float(self.pre_activation[j, slot])}


class _EncoderFactors:
    """``scale_i E_i = Σ_r a_ir b_irᵀ`` for chosen features: a bilinear encoder's ``(V, W)`` factors, or
    (``a`` is ``None``) a linear encoder's rows ``b_ir = scale_i E_i[r]`` against the unit vectors ``a_ir``."""

    def __init__(self, sae: Any, device: torch.device) -> None:
        self.sae, self.device = sae, device
        self.scale = sae.pre_activation_affine()[0]
        encoder = getattr(sae, "encoder", None)
        self.factors = encoder.factors if isinstance(encoder, BilinearEncoder) else None
        self.rank = sae.cfg.d_k if self.factors is None else self.factors[0].shape[1]

    def __call__(self, f: Int[Tensor, "n c"]) -> tuple[Tensor | None, Tensor]:
        """``(a, b)``, ``[n, c, rank, d_k]`` (or ``None``) and ``[n, c, rank, d_v]``, fp32 on the device."""
        f = f.to(self.sae.mean.device)
        if self.factors is None:
            a, b = None, self.sae.encoder_atoms(f.reshape(-1)).reshape(*f.shape, self.rank, -1)
        else:
            a, b = self.factors[0][f], self.factors[1][f]
        if self.scale is not None:  # Gated's magnitude path: its scale folds into the value side
            b = b * self.scale[f][..., None, None]
        return (None if a is None else a.float().to(self.device)), b.float().to(self.device)


def _terms(keys: Float[Tensor, "B s d_k"], values: Float[Tensor, "B s d_v"], row: Int[Tensor, " m"],
           feature: Int[Tensor, " m"], factors: _EncoderFactors) -> Float[Tensor, "m s"]:
    """Each example's terms ``Σ_r (a_r · keys[row, s]) (b_r · values[row, s])`` of its ``feature``: per row of
    the examples, its features side by side (padded to the row with the most), in chunks of features."""
    rows, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(row), device=row.device) - (counts.cumsum(0) - counts)[inverse[order]]
    padded = feature.new_full((len(rows), int(counts.max())), int(feature[0]))
    padded[inverse, rank] = feature
    keys, values = keys[rows], values[rows]
    n, s = keys.shape[:2]
    width = factors.rank * max(s, keys.shape[-1], values.shape[-1])
    step = max(1, CALL_ELEMENTS // (n * width))
    out = keys.new_empty(len(row), s)
    for lo in range(0, padded.shape[1], step):
        a, b = factors(padded[:, lo: lo + step])
        c = b.shape[1]
        p = (values @ b.flatten(1, 2).transpose(1, 2)).view(n, s, c, factors.rank)  # b_r · v_s
        if a is None:
            term = torch.einsum("nsk,nsck->ncs", keys, p)
        else:
            q = (keys @ a.flatten(1, 2).transpose(1, 2)).view(n, s, c, factors.rank)  # a_r · carried key
            term = (q * p).sum(-1).transpose(1, 2)
        here = (rank >= lo) & (rank < lo + c)
        out[here] = term[inverse[here], rank[here] - lo]
    return out


class TopWriters:
    """The :class:`Writers` of the top buffer (``n_features × size`` slots, SAE features ``feats``), kept up
    to date batch by batch (:meth:`update`); memory ``O(n_features × size × k)``."""

    def __init__(self, model: Any, sae: Any, feats: Int[Tensor, " n_feat"], size: int, k: int) -> None:
        self.layer, self.what = model.matrix_site(sae.cfg.metadata["hook_name"])
        self.head, self.k, self.feats = sae.cfg.metadata["head"], k, feats
        self.rule = model.blocks[self.layer].mixer.rule
        device = model.embed.weight.device
        self.factors = _EncoderFactors(sae, device)
        with torch.no_grad():
            zero = sae.autoencode(sae.mean.new_zeros(1, sae.cfg.d_k, sae.cfg.d_v)).pre[0].float().cpu()
        F = len(feats)
        none = torch.full((F, size, k), -1, dtype=torch.int32)
        self.writers = Writers(position=none, token=none.clone(), contribution=torch.zeros(F, size, k),
                               other=torch.zeros(F, size), initial=torch.zeros(F, size),
                               bias=zero[feats][:, None].expand(F, size).contiguous(),
                               pre_activation=torch.zeros(F, size))

    def update(self, request: CaptureRequest, tokens: Int[Tensor, "batch T"], row: Int[Tensor, " m"],
               position: Int[Tensor, " m"], j: Int[Tensor, " m"], slot: Int[Tensor, " m"]) -> None:
        """The writers of the firings at ``(row, position)`` of the batch ``tokens`` that entered slot ``slot``
        of feature index ``j``, from the batch's captured recurrence inputs ``request``."""
        if len(row) == 0:
            return
        x = request.inputs.map(lambda t: t[:, :, [self.head]])
        device = x.v.device
        order = torch.argsort(position, stable=True)
        row, position, j, slot = row[order], position[order], j[order], slot[order]
        stops, counts = torch.unique_consecutive(position, return_counts=True)
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        values, feature, out, k = x.v[:, :, 0], self.feats[j], self.writers, self.k
        with torch.no_grad():
            for i, (t, keys) in enumerate(self._carried_keys(x, stops.tolist())):
                at = slice(bounds[i], bounds[i + 1])
                r = row[at]
                terms = _terms(keys, values[:, : t + 1], r.to(device), feature[at].to(device), self.factors).cpu()
                ranked = terms.abs().argsort(dim=-1, descending=True, stable=True)[:, :k]
                width = (0, k - ranked.shape[1])  # positions fewer than k: the missing writers are padding
                dest = (j[at], slot[at])
                out.position[dest] = F_.pad(ranked, width, value=-1).int()
                out.token[dest] = F_.pad(tokens[r[:, None], ranked], width, value=-1).int()
                out.contribution[dest] = F_.pad(terms.gather(1, ranked), width)
                # In float64: the remaining writes can cancel, and their sum must close the identity to fp32
                # rounding.
                out.other[dest] = terms.scatter(1, ranked, 0.0).double().sum(-1).float()
                out.pre_activation[dest] = (terms.double().sum(-1) + out.bias[dest].double()).float()

    def _carried_keys(self, x: RecurrenceInputs, stops: list[int]) -> Iterator[tuple[int, Float[Tensor, "B s d_k"]]]:
        """``(t, keys)`` at each position of ``stops``: row ``s ≤ t`` of ``keys`` is the key side of the write at
        ``s`` as the SAE's read at ``t`` sees it (one head in ``x``). On ``hook_write`` the SAE reads write
        ``t`` alone: every other row is zero."""
        if self.what == "state":
            for t, keys, _ in carried_writes(self.rule, x, None, stops, progress=False):
                yield t, keys[:, 0]
            return
        key = x.write_key()[:, :, 0]
        for t in stops:
            alone = torch.zeros_like(key[:, : t + 1])
            alone[:, t] = key[:, t]
            yield t, alone
