"""Multi-query associative recall (MQAR), the task the toy models are trained on.

Vocabulary (``d_vocab = 2 + n_keys + n_values``)::

    0                      BOS
    1                      SEP (separates the pairs from the queries)
    2 .. 2+n_keys-1        keys
    2+n_keys .. d_vocab-1  values

Sequence (length ``2 + 2·n_pairs + 2·n_queries``)::

    BOS  k1 v1  k2 v2 ... kn vn  SEP  q1 a1  q2 a2 ... qm am

Keys in one sequence are distinct; values are drawn with replacement. Each query ``q_j`` is one of the
sequence's keys (distinct queries) and ``a_j`` is its value. The recall targets are the ``a_j``: the model
must predict ``a_j`` from the logits at the position of ``q_j``.

Query order (``ToyTask.query_order``):

- ``"pairs"`` (default): ``q_j = k_j`` — the first ``n_queries`` pairs are queried in the order they were
  written. The association ``k_i → v_i`` is written into the state at the position of ``v_i`` (``2i``) and
  is first needed at ``q_i`` (``2·n_pairs + 2i``), a constant :attr:`ToyTask.recall_offset` ``= 2·n_pairs``
  later. This makes "the first read that needs this write" a fixed, known position, which is what the
  single-write substitution test (:func:`recurrent_lens.analysis.substitution_test`) reads at.
- ``"random"``: distinct queries drawn from all pairs, in random order (the classic MQAR layout; the
  distance from a write to its read varies per query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

BOS, SEP = 0, 1


@dataclass(frozen=True)
class ToyTask:
    """An MQAR task: vocabulary sizes and sequence layout.

    Example:
        >>> task = ToyTask(n_keys=8, n_values=8, n_pairs=4, n_queries=2)
        >>> tokens, targets = task.make_batch(3, seed=0)
        >>> tokens.shape, task.seq_len, task.d_vocab
        (torch.Size([3, 14]), 14, 18)
        >>> bool((targets >= 0).sum() == 3 * 2)
        True
    """

    n_keys: int = 32
    """Distinct key tokens."""
    n_values: int = 32
    """Distinct value tokens."""
    n_pairs: int = 8
    """Key-value pairs per sequence."""
    n_queries: int = 8
    """Queries per sequence (at most ``n_pairs``)."""
    query_order: str = "pairs"
    """``"pairs"``: query the first ``n_queries`` pairs in written order (constant write-to-read distance
    :attr:`recall_offset`); ``"random"``: distinct random pairs in random order."""

    def __post_init__(self) -> None:
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs: expected <= n_keys ({self.n_keys}) so that keys are distinct, got {self.n_pairs}")
        if not 1 <= self.n_queries <= self.n_pairs:
            raise ValueError(f"n_queries: expected an int in [1, n_pairs={self.n_pairs}], got {self.n_queries}")
        if self.query_order not in ("pairs", "random"):
            raise ValueError(f"query_order: expected 'pairs' or 'random', got {self.query_order!r}")

    @property
    def d_vocab(self) -> int:
        return 2 + self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 2 + 2 * self.n_pairs + 2 * self.n_queries

    @property
    def query_positions(self) -> Int[Tensor, " n_queries"]:
        """Positions of the query keys ``q_j`` (whose logits must predict ``a_j``)."""
        return 2 + 2 * self.n_pairs + 2 * torch.arange(self.n_queries)

    @property
    def value_positions(self) -> Int[Tensor, " n_queries"]:
        """Positions of the values ``v_i`` of the queried pairs (where ``k_i → v_i`` is written), in query order.

        Only defined for ``query_order="pairs"``, where query ``j`` asks pair ``j``.
        """
        self._require_pairs_order("value_positions")
        return 2 + 2 * torch.arange(self.n_queries)

    @property
    def recall_offset(self) -> int:
        """Distance from the write of pair ``i`` (at ``v_i``) to its first read (at ``q_i``): ``2·n_pairs``.

        Only defined for ``query_order="pairs"``; ``value_positions + recall_offset == query_positions``.
        """
        self._require_pairs_order("recall_offset")
        return 2 * self.n_pairs

    def _require_pairs_order(self, what: str) -> None:
        if self.query_order != "pairs":
            raise ValueError(f"{what}: needs query_order='pairs' (a fixed write-to-read distance), "
                             f"got query_order={self.query_order!r}")

    def key_ids(self) -> Int[Tensor, " n_keys"]:
        return torch.arange(2, 2 + self.n_keys)

    def value_ids(self) -> Int[Tensor, " n_values"]:
        return torch.arange(2 + self.n_keys, self.d_vocab)

    def token_strings(self) -> list[str]:
        """A readable name per token id (the toys have no tokenizer): ``<bos>``, ``<sep>``, ``k0``..., ``v0``....

        Example:
            >>> ToyTask(n_keys=2, n_values=2, n_pairs=1, n_queries=1).token_strings()
            ['<bos>', '<sep>', 'k0', 'k1', 'v0', 'v1']
        """
        return ["<bos>", "<sep>"] + [f"k{i}" for i in range(self.n_keys)] + [f"v{i}" for i in range(self.n_values)]

    def make_batch(self, batch_size: int, *, seed: int | None = None,
                   generator: torch.Generator | None = None) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """A batch of MQAR sequences and their recall targets.

        Args:
            batch_size: sequences to draw.
            seed: seed for a fresh generator (ignored when ``generator`` is given).
            generator: a torch generator to draw from (advanced in place).

        Returns:
            ``(tokens, targets)``, both ``[batch, seq_len]``; ``targets[b, p]`` is the value token that
            the logits at position ``p`` must predict, or -1 where there is nothing to recall.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        B, n, m = batch_size, self.n_pairs, self.n_queries
        keys = torch.rand(B, self.n_keys, generator=generator).argsort(-1)[:, :n] + 2
        values = torch.randint(0, self.n_values, (B, n), generator=generator) + 2 + self.n_keys
        if self.query_order == "pairs":
            which = torch.arange(m).expand(B, m)
        else:
            which = torch.rand(B, n, generator=generator).argsort(-1)[:, :m]
        q, a = keys.gather(1, which), values.gather(1, which)
        tokens = torch.empty(B, self.seq_len, dtype=torch.long)
        tokens[:, 0] = BOS
        tokens[:, 1 : 1 + 2 * n : 2] = keys
        tokens[:, 2 : 2 + 2 * n : 2] = values
        tokens[:, 1 + 2 * n] = SEP
        tokens[:, 2 + 2 * n :: 2] = q
        tokens[:, 3 + 2 * n :: 2] = a
        targets = torch.full_like(tokens, -1)
        targets[:, self.query_positions] = a
        return tokens, targets

    def recall_mask(self, targets: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        return targets >= 0


def accuracy(logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"]) -> float:
    """Fraction of recall targets (``targets >= 0``) whose argmax prediction is right.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 5); logits[0, 1, 4] = 1.0
        >>> accuracy(logits, torch.tensor([[-1, 4, -1]]))
        1.0
    """
    mask = targets >= 0
    if not bool(mask.any()):
        raise ValueError("targets: no position has a recall target (all are -1)")
    return float((logits.argmax(-1)[mask] == targets[mask]).float().mean())
