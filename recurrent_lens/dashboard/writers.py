"""The top writers of each top example: its feature's pre-activation at the firing split over the past writes.

The pass keeps the token rows of the sequences that hold a top example (:class:`KeptRows`); once the top
examples are final, :func:`top_writers` runs :func:`~recurrent_lens.analysis.feature_attribution` once per
group of those sequences, on the features whose examples the group holds: only those sequences (at most
``n_features × n_examples`` of them) are run again, never the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F_
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.analysis import feature_attribution

CALL_ELEMENTS = 1 << 24
"""A group's attribution call holds ``[batch, n, pos, feature + d_k]`` elements at most (the result's
``[batch, n, feature, pos]`` terms and its ``[batch, n, pos, d_k]`` carried keys): 64 MiB in fp32."""


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
        # feature_attribution reads its cell from the metadata: on another cell its terms would split a state
        # other than the one the examples were ranked on.
        return f"sae.cfg.metadata names {named[0]} head {named[1]}, the dashboard reads {hook_name} head {head}"
    if not (hasattr(sae, "pre_activation_affine") and hasattr(sae, "encoder_atoms")):
        return f"{type(sae).__name__} has no pre_activation_affine/encoder_atoms (its pre-activation as an affine " \
               f"function of the state)"
    return None


class KeptRows:
    """The token rows of the sequences that hold a top example, kept through the pass: at most
    ``min(n_sequences, n_features × n_examples)`` rows, dropped as soon as their last example is displaced.

    Example:
        >>> kept = KeptRows()
        >>> kept.update(torch.tensor([[1, 2], [3, 4]]), seq0=0, held=torch.tensor([[1, -1]]))
        >>> kept.update(torch.tensor([[5, 6]]), seq0=2, held=torch.tensor([[2, 2]]))
        >>> {s: r.tolist() for s, r in kept.rows.items()}
        {2: [5, 6]}
    """

    def __init__(self) -> None:
        self.rows: dict[int, Tensor] = {}

    def update(self, tokens: Int[Tensor, "batch T"], seq0: int, held: Int[Tensor, "..."]) -> None:
        """Add the rows of ``tokens`` (sequences ``seq0, seq0 + 1, ...``) that ``held`` names and drop those it
        no longer names."""
        held = held.reshape(-1)
        ids = torch.tensor(list(self.rows) + list(range(seq0, seq0 + tokens.shape[0])), dtype=torch.long)
        live = set(ids[torch.isin(ids, held)].tolist())
        self.rows = {s: r for s, r in self.rows.items() if s in live}
        for b in range(tokens.shape[0]):
            if seq0 + b in live:
                self.rows[seq0 + b] = tokens[b].to(torch.int32, copy=True)


@dataclass
class Writers:
    """The top writers of every top example, by ``[feature slot, example slot]`` of the top buffer.

    ``position``, ``token`` and ``contribution`` hold the ``k`` writes with the largest ``|contribution|``
    (``-1`` and ``0`` past the example's own position); ``other`` is the sum of the remaining writes, so that
    ``contribution.sum(-1) + other + initial + bias == pre_activation``.
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


def _groups(seq: list[int], pos: list[int], feat: list[int], T: int, d_k: int, batch_size: int) -> list[list[int]]:
    """Items (sorted by sequence) packed greedily into calls of at most ``batch_size`` sequences and
    :data:`CALL_ELEMENTS` elements; a call computes every (position, feature) pair of its sequences."""
    groups: list[list[int]] = []
    items: list[int] = []
    positions: dict[int, set[int]] = {}
    features: set[int] = set()
    n = 0
    for i, (s, p, f) in enumerate(zip(seq, pos, feat)):
        grown_n = max(n, len(positions.get(s, ())) + (p not in positions.get(s, ())))
        grown_b = len(positions) + (s not in positions)
        grown_f = len(features) + (f not in features)
        if items and (grown_b > batch_size or grown_b * grown_n * T * (grown_f + d_k) > CALL_ELEMENTS):
            groups.append(items)
            items, positions, features = [], {}, set()
            grown_n = 1
        items.append(i)
        positions.setdefault(s, set()).add(p)
        features.add(f)
        n = grown_n
    if items:
        groups.append(items)
    return groups


def top_writers(model: Any, sae: Any, top: Any, feats: Tensor, rows: dict[int, Tensor], k: int, batch_size: int,
                progress: bool) -> Writers:
    """The ``k`` top writers of every example held in ``top`` (the dashboard's top buffer over features
    ``feats``), from :func:`~recurrent_lens.analysis.feature_attribution` on the sequences in ``rows``."""
    F, N = top.sequence.shape
    T = len(next(iter(rows.values()))) if rows else 1
    none = torch.full((F, N, k), -1, dtype=torch.int32)
    out = Writers(position=none, token=none.clone(), contribution=torch.zeros(F, N, k), other=torch.zeros(F, N),
                  initial=torch.zeros(F, N), bias=torch.zeros(F, N), pre_activation=torch.zeros(F, N))
    j, slot = (top.sequence >= 0).nonzero(as_tuple=True)
    if len(j) == 0:
        return out
    seq, pos = top.sequence[j, slot], top.position[j, slot]
    order = torch.argsort(seq * F + j, stable=True)
    j, slot, seq, pos = j[order], slot[order], seq[order], pos[order]
    groups = _groups(seq.tolist(), pos.tolist(), j.tolist(), T, model.cfg.d_k, batch_size)
    for items in tqdm(groups, desc="top writers", unit="call", disable=not progress or len(groups) < 2):
        items = torch.tensor(items)
        g_seq, g_pos, g_j = seq[items], pos[items], j[items]
        seqs, b = torch.unique(g_seq, return_inverse=True)
        fs, f = torch.unique(g_j, return_inverse=True)
        per_row = [torch.unique(g_pos[b == r]) for r in range(len(seqs))]
        n = max(len(p) for p in per_row)
        # Rows with fewer positions repeat their last one: [batch, n] must be rectangular.
        positions = torch.stack([torch.cat([p, p[-1:].expand(n - len(p))]) for p in per_row])
        p = (positions[b] == g_pos[:, None]).int().argmax(1)
        tokens = torch.stack([rows[s] for s in seqs.tolist()]).long()
        fa = feature_attribution(model, sae, tokens, positions, feats[fs].tolist(), progress=False)
        writes = fa.writes[b, p, f].float().cpu()  # [m, T]
        later = torch.arange(T) > g_pos[:, None]
        ranked = writes.abs().masked_fill(later, -1).argsort(dim=-1, descending=True, stable=True)[:, :k]
        chosen = writes.gather(1, ranked)
        real = ranked <= g_pos[:, None]
        at = (g_j, slot[items])
        width = (0, k - ranked.shape[1])  # sequences shorter than k: the missing writers are padding
        out.position[at] = F_.pad(torch.where(real, ranked, -1), width, value=-1).int()
        out.token[at] = F_.pad(torch.where(real, tokens[b[:, None], ranked], -1), width, value=-1).int()
        out.contribution[at] = F_.pad(torch.where(real, chosen, 0.0), width)
        # In float64: the remaining writes can cancel, and their sum must close the identity to fp32 rounding.
        out.other[at] = writes.scatter(1, ranked, 0.0).double().sum(-1).float()
        out.initial[at] = fa.initial[b, p, f].float().cpu()
        out.bias[at] = fa.bias[b, p, f].float().cpu()
        out.pre_activation[at] = fa.pre_activation[b, p, f].float().cpu()
    return out
