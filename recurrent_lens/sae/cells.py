"""Cells — one head of one per-step matrix hook — and where their states are sampled.

A *cell* is what one SAE reads: ``(hook_name, head)`` with ``hook_name`` a recurrent layer's
``blocks.{l}.mixer.hook_state`` (``S_t``) or ``blocks.{l}.mixer.hook_write`` (``W_t``). Many cells are
harvested from one model pass with :meth:`~recurrent_lens.models.base.HookedRecurrentModel.harvest`.

Positions are drawn per sequence from a generator seeded by ``(seed, sequence index)``, so the states of
sequence ``i`` do not depend on batching, sharding across ranks, or where a run was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Cell", "parse_cells", "sample_positions", "harvest_cells", "seeded_generator"]

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant: distinct (seed, index) pairs give distinct seeds


def seeded_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by the pair ``(seed, index)`` (a sequence, an epoch, a cell's hash):
    distinct pairs give distinct streams, and the same pair always the same one.

    Example:
        >>> a, b = (torch.rand(2, generator=seeded_generator(0, 5)) for _ in range(2))
        >>> bool(torch.equal(a, b))
        True
    """
    return torch.Generator().manual_seed((seed * _MIX + index) % 2**63)


@dataclass(frozen=True, order=True)
class Cell:
    """One head of one per-step matrix hook.

    Example:
        >>> Cell("blocks.9.mixer.hook_state", 4).name
        'blocks.9.mixer.hook_state.h4'
    """

    hook_name: str
    head: int

    def __post_init__(self) -> None:
        # a cell is a directory name and a dict key: a head of 'two' or 1.0 would only fail far from here
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise ValueError(f"Cell hook_name: expected a non-empty str, got {self.hook_name!r}")
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"Cell head: expected an int >= 0 for {self.hook_name}, got {self.head!r}")

    @property
    def name(self) -> str:
        """``{hook_name}.h{head}``: the cell's directory name in outputs and stores."""
        return f"{self.hook_name}.h{self.head}"

    @classmethod
    def from_name(cls, name: str) -> Cell:
        """The inverse of :attr:`name`.

        Example:
            >>> Cell.from_name("blocks.1.mixer.hook_write.h0")
            Cell(hook_name='blocks.1.mixer.hook_write', head=0)
        """
        hook, sep, head = name.rpartition(".h")
        if not sep or not head.isdigit():
            raise ValueError(f"cell name: expected '{{hook_name}}.h{{head}}', got {name!r}")
        return cls(hook, int(head))


def parse_cells(model, cells: Iterable[Cell | tuple[str, int]]) -> list[Cell]:
    """Validated, de-duplicated cells of ``model`` in the given order.

    Raises a ``ValueError`` naming the cell for an unknown hook, a non-recurrent layer or a head out of range.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> [c.name for c in parse_cells(model, [("blocks.1.mixer.hook_state", 1)])]
        ['blocks.1.mixer.hook_state.h1']
    """
    out: list[Cell] = []
    n = model.cfg.n_heads
    for cell in cells:
        if not isinstance(cell, Cell) and not (isinstance(cell, (tuple, list)) and len(cell) == 2):
            raise ValueError(f"cells: expected (hook_name, head) pairs, got {cell!r}")
        hook_name, head = (cell.hook_name, cell.head) if isinstance(cell, Cell) else cell
        model.matrix_site(hook_name)
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n:
            raise ValueError(f"head: expected an int in [0, {n}) for {hook_name}, got {head!r}")
        cell = Cell(hook_name, head)
        if cell not in out:
            out.append(cell)
    if not out:
        raise ValueError("cells: expected at least one (hook_name, head) cell, got none")
    return out


def sample_positions(seq_index: Int[Tensor, " batch"] | Sequence[int], length: int, n: int, *, skip: int = 0,
                     seed: int = 0, skip_name: str = "skip") -> Int[Tensor, "batch n"]:
    """``n`` distinct positions in ``[skip, length)`` per sequence, sorted, drawn from a generator seeded
    by ``(seed, seq_index)``: the same sequence always gets the same positions.

    ``n`` larger than the ``length - skip`` usable positions takes them all. ``skip_name`` is how an error
    names ``skip`` to the caller's own user (a config field or a CLI option).

    Example:
        >>> sample_positions([0, 1], 10, 3, skip=1).shape
        torch.Size([2, 3])
        >>> bool((sample_positions([5], 10, 3) == sample_positions([7, 5], 10, 3)[1]).all())
        True
    """
    usable = length - skip
    if skip < 0 or usable < 1:
        raise ValueError(f"{skip_name}: sequences of length {length} leave no position after {skip_name}={skip}")
    if n < 1:
        raise ValueError(f"n: expected a positive number of positions per sequence, got {n}")
    n = min(n, usable)
    rows = []
    for index in torch.as_tensor(seq_index).tolist():
        rows.append(torch.randperm(usable, generator=seeded_generator(seed, index))[:n].sort().values + skip)
    return torch.stack(rows)


def harvest_cells(model, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch n"],
                  cells: Sequence[Cell]) -> dict[Cell, Float[Tensor, "samples d_k d_v"]]:
    """Each cell's matrices at ``positions`` of ``tokens``, flattened to ``[batch · n, d_k, d_v]`` fp32.

    Uses one :meth:`~recurrent_lens.models.base.HookedRecurrentModel.harvest` pass (no full state tensor).

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> tokens = torch.randint(0, 20, (2, 9))
        >>> out = harvest_cells(model, tokens, sample_positions([0, 1], 9, 3), [Cell("blocks.1.mixer.hook_state", 0)])
        >>> tuple(out[Cell("blocks.1.mixer.hook_state", 0)].shape)
        (6, 4, 4)
    """
    got = model.harvest(tokens, positions, [(c.hook_name, c.head) for c in cells])
    return {c: got[c.hook_name, c.head].reshape(-1, *got[c.hook_name, c.head].shape[-2:]).float() for c in cells}
