"""One streaming pass over a dataset: what each SAE feature fires on and what its atom reads and writes.

Memory is independent of the dataset's length: per feature, a few counters, a histogram and two
fixed-size example buffers (the ``n_examples`` largest activations and a uniform reservoir of
``n_samples`` firings), each merged with the current batch's candidates (:class:`_Buffer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

LOG10_LOW, LOG10_HIGH, BINS_PER_DECADE = -6.0, 4.0, 10
"""Fixed histogram bins of ``log10(activation)``: one pass cannot know the range first, so the bins span
ten decades (values outside land in the end bins) and a view shows only the occupied ones."""
N_BINS = int((LOG10_HIGH - LOG10_LOW) * BINS_PER_DECADE)
_WINDOW_CHUNK = 1 << 14


@dataclass
class Firings:
    """The positive codes of one batch in sparse form: ``value[j]`` of feature ``feature[j]`` (an index into
    the collected features) at ``(row[j], position[j])`` of the batch."""

    row: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    feature: Int[Tensor, " n"]
    value: Float[Tensor, " n"]


class _Buffer:
    """For each feature, the ``size`` firings with the largest ``score`` seen so far, with their context windows.

    Merging a batch sorts its firings by (feature, score) and keeps each feature's best ``size``; those that
    beat a stored firing replace it in its slot. Slots are unordered (:meth:`order` sorts them), so a merge
    touches only the scores of the features that fired and the windows of the firings that got in: its cost
    follows the batch's firings, not ``n_features × size × window``.
    """

    def __init__(self, n_features: int, size: int, window: int) -> None:
        self.size = size
        self.score = torch.full((n_features, size), -math.inf)
        self.value = torch.zeros(n_features, size)
        self.sequence = torch.full((n_features, size), -1, dtype=torch.long)
        self.position = torch.full((n_features, size), -1, dtype=torch.long)
        self.tokens = torch.full((n_features, size, window), -1, dtype=torch.int32)
        self.token_acts = torch.full((n_features, size, window), math.nan)

    def merge(self, f: Firings, score: Tensor, seq0: int, tokens: Tensor, acts_full: Tensor,
              context: int) -> tuple[Tensor, Tensor, Tensor]:
        """Merge the batch's firings; returns ``(feature, slot, firing)`` of those that got in (indices into
        the features, the slots and ``f``)."""
        if f.value.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(f.feature[order], stable=True)]
        feat = f.feature[order]
        counts = torch.bincount(feat, minlength=self.score.shape[0])
        rank = torch.arange(len(feat)) - (counts.cumsum(0) - counts)[feat]
        keep = order[rank < self.size]
        rank = rank[rank < self.size]
        rows, inverse = torch.unique(f.feature[keep], return_inverse=True)
        cand_score = torch.full((len(rows), self.size), -math.inf)
        cand_score[inverse, rank] = score[keep]
        cand_firing = torch.full((len(rows), self.size), -1, dtype=torch.long)
        cand_firing[inverse, rank] = keep
        best = torch.cat([self.score[rows], cand_score], 1).topk(self.size, dim=1).indices
        chosen = torch.zeros(len(rows), 2 * self.size, dtype=torch.bool).scatter_(1, best, True)
        # Per row, as many stored slots drop out as candidates get in: row-major order pairs them up.
        evicted_row, evicted_slot = (~chosen[:, : self.size]).nonzero(as_tuple=True)
        _, chosen_cand = chosen[:, self.size:].nonzero(as_tuple=True)
        firing = cand_firing[evicted_row, chosen_cand]
        # Empty stored slots and padding candidates tie at -inf: a pair that takes in padding changes nothing.
        real = firing >= 0
        feature, evicted_slot, firing = rows[evicted_row[real]], evicted_slot[real], firing[real]
        self.score[feature, evicted_slot] = score[firing]
        self.value[feature, evicted_slot] = f.value[firing]
        self.sequence[feature, evicted_slot] = f.row[firing] + seq0
        self.position[feature, evicted_slot] = f.position[firing]
        # In chunks: the windows' int64 index tensors would otherwise peak at several times the buffers' size.
        for part in torch.arange(len(firing)).split(_WINDOW_CHUNK):
            fi = firing[part]
            win_tokens, win_acts = _windows(tokens, acts_full, f.row[fi], f.position[fi], f.feature[fi], context)
            self.tokens[feature[part], evicted_slot[part]] = win_tokens
            self.token_acts[feature[part], evicted_slot[part]] = win_acts
        return feature, evicted_slot, firing

    def order(self, i: int) -> list[int]:
        """The slots of feature ``i`` that hold a firing, by score descending."""
        slots = self.score[i].argsort(descending=True, stable=True)
        return [j for j in slots.tolist() if self.sequence[i, j] >= 0]


def _windows(tokens: Tensor, acts_full: Tensor, row: Tensor, position: Tensor, feature: Tensor,
             context: int) -> tuple[Tensor, Tensor]:
    """Token ids (``-1`` outside the sequence) and the feature's activations (NaN where not computed) at
    ``position ± context`` of each firing."""
    T = tokens.shape[1]
    at = position[:, None] + torch.arange(-context, context + 1)
    inside = (at >= 0) & (at < T)
    safe = at.clamp(0, T - 1)
    win_tokens = torch.where(inside, tokens[row[:, None], safe], -1).to(torch.int32)
    win_acts = torch.where(inside, acts_full[row[:, None], safe, feature[:, None]], math.nan)
    return win_tokens, win_acts


class FeatureStats:
    """Streaming per-feature statistics of SAE codes: firing count, sum, max, a log10 histogram, the top
    ``n_examples`` firings and a uniform reservoir of ``n_samples`` firings (for the quantile samples).

    Example:
        >>> stats = FeatureStats(n_features=2, n_examples=2, n_samples=2, context=1)
        >>> acts = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [2.0, 0.5]]])  # one sequence, 3 positions, 2 features
        >>> _ = stats.update(acts, torch.arange(3), torch.tensor([[7, 8, 9]]), seq0=0)
        >>> stats.count.tolist(), stats.max.tolist(), stats.top.value[0].tolist()
        ([2, 2], [3.0, 1.0], [3.0, 2.0])
        >>> stats.top.tokens[0, 0].tolist(), stats.top.token_acts[0, 0].tolist()  # window of the firing at 1
        ([7, 8, 9], [0.0, 3.0, 2.0])
    """

    def __init__(self, n_features: int, n_examples: int, n_samples: int, context: int, seed: int = 0) -> None:
        self.context = context
        window = 2 * context + 1
        self.n_positions = 0
        self.count = torch.zeros(n_features, dtype=torch.long)
        self.total = torch.zeros(n_features, dtype=torch.float64)
        self.max = torch.zeros(n_features)
        self.hist = torch.zeros(n_features, N_BINS, dtype=torch.long)
        self.top = _Buffer(n_features, n_examples, window)
        self.reservoir = _Buffer(n_features, n_samples, window)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, acts: Float[Tensor, "batch n n_feat"], positions: Int[Tensor, " n"],
               tokens: Int[Tensor, "batch T"], seq0: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add one batch: ``acts`` are the codes at ``positions`` of every row of ``tokens``, whose first row is
        sequence ``seq0`` of the dataset. Returns ``(row, position, feature, slot)`` of the firings that got
        into the top examples (``feature`` an index into the features)."""
        B, T = tokens.shape
        self.n_positions += B * acts.shape[1]
        if acts.shape[1] == T:
            acts_full = acts
        else:
            acts_full = torch.full((B, T, acts.shape[2]), math.nan)
            acts_full[:, positions] = acts
        row, j, feat = (acts > 0).nonzero(as_tuple=True)
        f = Firings(row, positions[j], feat, acts[row, j, feat])
        self.count += torch.bincount(feat, minlength=len(self.count))
        self.total.index_add_(0, feat, f.value.double())
        self.max.scatter_reduce_(0, feat, f.value, reduce="amax")
        bins = ((f.value.log10() - LOG10_LOW) * BINS_PER_DECADE).floor().long().clamp(0, N_BINS - 1)
        self.hist.view(-1).index_add_(0, feat * N_BINS + bins, torch.ones_like(bins))
        feature, slot, firing = self.top.merge(f, f.value, seq0, tokens, acts_full, self.context)
        # A uniform sample without replacement: the firings with the largest independent uniform keys.
        self.reservoir.merge(f, torch.rand(len(f.value), generator=self.generator), seq0, tokens, acts_full,
                             self.context)
        return f.row[firing], f.position[firing], feature, slot


class TokenMeans:
    """The mean of a per-token vector (a key, a query) for every token id seen, in ``O(distinct ids × d)``.

    Example:
        >>> means = TokenMeans(d_vocab=10, d=2)
        >>> means.update(torch.tensor([[4, 2, 4]]), torch.tensor([[[1.0, 0.0], [0.0, 5.0], [3.0, 0.0]]]))
        >>> means.ids.tolist(), means.counts.tolist(), means.unit_means().tolist()
        ([2, 4], [1, 2], [[0.0, 1.0], [1.0, 0.0]])
    """

    def __init__(self, d_vocab: int, d: int) -> None:
        self.slot = torch.full((d_vocab,), -1, dtype=torch.long)
        self.ids = torch.zeros(0, dtype=torch.long)
        self.sums = torch.zeros(0, d, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.long)

    def update(self, tokens: Int[Tensor, "batch T"], vectors: Float[Tensor, "batch T d"]) -> None:
        ids = tokens.reshape(-1).cpu()
        new = torch.unique(ids[self.slot[ids] < 0])
        if len(new):
            self.slot[new] = torch.arange(len(self.ids), len(self.ids) + len(new))
            self.ids = torch.cat([self.ids, new])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new), self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(len(new))])
        slots = self.slot[ids]
        self.sums.index_add_(0, slots, vectors.reshape(len(ids), -1).double().cpu())
        self.counts += torch.bincount(slots, minlength=len(self.counts))

    def unit_means(self) -> Float[Tensor, "n_ids d"]:
        mean = (self.sums / self.counts[:, None]).float()
        return mean / mean.norm(dim=1, keepdim=True).clamp(min=1e-12)
