"""Cells — one head of one per-step matrix hook — and where their states are sampled.

A *cell* is what one SAE reads: ``(hook_name, head)`` with ``hook_name`` a recurrent layer's
``blocks.{l}.mixer.hook_state`` (``S_t``) or ``blocks.{l}.mixer.hook_write`` (``W_t``). Many cells are
harvested from one model pass with :func:`recurrent_lens.states.harvest.harvest`.

:class:`Cell` is the one (hook, head) type of the package; hook names are parsed by
:func:`split_hook_name` and checked against a model by :func:`matrix_site`, and heads by
:func:`check_head` / :func:`check_heads`: everything that names a cell goes through them.

Positions are drawn per sequence from a generator seeded by ``(seed, sequence index)``, so the states of
sequence ``i`` do not depend on batching, sharding across ranks, or where a run was interrupted.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["Cell", "STATE_HOOKS", "as_index", "split_hook_name", "matrix_site", "check_head", "check_heads",
           "check_layer", "check_positions", "parse_cell", "parse_cells", "sample_positions", "seeded_generator",
           "cell_generator"]

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant: distinct (seed, index) pairs give distinct seeds

STATE_HOOKS = {"hook_state": "state", "hook_write": "write"}
"""The per-step matrix hooks a cell reads, and the kind (``what``) each holds."""


def seeded_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by the pair ``(seed, index)`` (a sequence, an epoch, a cell's hash):
    distinct pairs give distinct streams, and the same pair always the same one.

    Example:
        >>> a, b = (torch.rand(2, generator=seeded_generator(0, 5)) for _ in range(2))
        >>> bool(torch.equal(a, b))
        True
    """
    return torch.Generator().manual_seed((seed * _MIX + index) % 2**63)


def cell_generator(seed: int, cell: Cell, role: str) -> torch.Generator:
    """A generator seeded by a run's ``seed``, the cell's name and a ``role`` (``"buffer"``, ``"init"``, ...),
    so a cell trains the same whichever other cells share its model passes.

    Example:
        >>> cell = Cell("blocks.0.mixer.hook_state", 1)
        >>> bool(torch.equal(torch.rand(2, generator=cell_generator(0, cell, "buffer")),
        ...                  torch.rand(2, generator=cell_generator(0, cell, "buffer"))))
        True
    """
    return seeded_generator(seed, zlib.crc32(f"{role}:{cell.name}".encode()))


def split_hook_name(hook_name: str) -> tuple[int, str]:
    """``(layer, "state" | "write")`` of ``blocks.{layer}.mixer.hook_state|hook_write``, by its form alone.

    Example:
        >>> split_hook_name("blocks.3.mixer.hook_write")
        (3, 'write')
    """
    parts = hook_name.split(".") if isinstance(hook_name, str) else []
    if not (len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "mixer"
            and parts[3] in STATE_HOOKS):
        raise ValueError(f"hook_name: expected 'blocks.{{layer}}.mixer.hook_state' or '...hook_write', "
                         f"got {hook_name!r}")
    return int(parts[1]), STATE_HOOKS[parts[3]]


def matrix_site(cfg: Any, hook_name: str, kinds: Sequence[str] = ("state", "write")) -> tuple[int, str]:
    """:func:`split_hook_name`, refusing a layer that is not one of ``cfg.recurrent_layers`` and a kind
    outside ``kinds``.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> cfg = ModelConfig(architecture="gla", d_model=16, n_layers=2, d_vocab=20, n_heads=2, d_k=4, d_v=4)
        >>> matrix_site(cfg, "blocks.1.mixer.hook_state")
        (1, 'state')
    """
    layer, what = split_hook_name(hook_name)
    if what not in kinds:
        raise ValueError(f"hook_name: expected a {' or '.join(f'hook_{k}' for k in kinds)} hook "
                         f"'blocks.{{layer}}.mixer.hook_{kinds[0]}', got {hook_name!r}")
    if layer not in cfg.recurrent_layers:
        raise ValueError(f"hook_name: {hook_name!r} names layer {layer}, which is not a recurrent layer; "
                         f"recurrent layers: {cfg.recurrent_layers}")
    return layer, what


def as_index(value: Any, n: int | None) -> int | None:
    """``value`` as an ``int`` if it is an integer in ``[0, n)`` (``n=None``: any ``int >= 0``), else ``None``.

    Integers are whatever :func:`operator.index` accepts (Python, NumPy and integer torch scalars),
    except bools.

    Example:
        >>> import numpy as np
        >>> as_index(np.int64(3), 5), as_index(True, 5), as_index(2.0, 5), as_index(5, 5)
        (3, None, None, None)
    """
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        index = operator.index(value)
    except TypeError:
        return None
    return index if index >= 0 and (n is None or index < n) else None


def check_head(head: Any, n_heads: int | None, name: str = "head", where: str = "") -> int:
    """``head`` as an ``int`` in ``[0, n_heads)`` (any integer :func:`operator.index` takes, bools
    excepted; ``n_heads=None``: any ``int >= 0``), else a ``ValueError`` naming ``name`` (and ``where``,
    the hook it is a head of).

    Example:
        >>> import numpy as np
        >>> check_head(np.int64(1), 2)
        1
        >>> check_head(2, 2, where="blocks.0.mixer.hook_state")
        Traceback (most recent call last):
        ...
        ValueError: head: expected an int in [0, 2) for blocks.0.mixer.hook_state, got 2
    """
    checked = as_index(head, n_heads)
    if checked is None:
        bound = f"[0, {n_heads})" if n_heads is not None else ">= 0"
        raise ValueError(f"{name}: expected an int in {bound}{f' for {where}' if where else ''}, got {head!r}")
    return checked


def check_layer(cfg: Any, layer: Any) -> int:
    """``layer`` if it is one of ``cfg.recurrent_layers``, else a ``ValueError`` naming them.

    Example:
        >>> from recurrent_lens import ModelConfig
        >>> check_layer(ModelConfig(architecture="gla", d_model=16, n_layers=2, d_vocab=20, n_heads=2, d_k=4, d_v=4), 1)
        1
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in cfg.recurrent_layers:
        raise ValueError(f"layer: expected a recurrent layer {list(cfg.recurrent_layers)}, got {layer!r}")
    return layer


def check_heads(heads: int | Sequence[int] | None, n_heads: int, what: str) -> list[int]:
    """A head, a list of heads, or ``None`` (all ``n_heads``) as a list of heads in ``[0, n_heads)``.

    Example:
        >>> check_heads(None, 3, "state"), check_heads(1, 3, "state")
        ([0, 1, 2], [1])
    """
    if heads is None:
        return list(range(n_heads))
    one = as_index(heads, None) is not None
    listed = [heads] if one else list(heads) if isinstance(heads, Sequence) and not isinstance(heads, str) else []
    checked = [as_index(h, n_heads) for h in listed]
    if not listed or None in checked:
        raise ValueError(f"heads ({what}): expected a head index or a list of head indices in [0, {n_heads}), "
                         f"got {heads!r}")
    return checked


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
    def layer(self) -> int:
        """The layer of ``blocks.{layer}.mixer.hook_state|hook_write``."""
        return split_hook_name(self.hook_name)[0]

    @property
    def kind(self) -> str:
        """``"state"`` (``S_t``) or ``"write"`` (``W_t``)."""
        return split_hook_name(self.hook_name)[1]

    def hook(self, name: str) -> str:
        """The full name of another hook of this cell's mixer, e.g. ``hook_q``.

        Example:
            >>> Cell("blocks.2.mixer.hook_state", 0).hook("hook_q")
            'blocks.2.mixer.hook_q'
        """
        return f"blocks.{self.layer}.mixer.{name}"

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


def parse_cell(model: Any, hook_name: str, head: Any, *, kinds: Sequence[str] = ("state", "write"),
               head_name: str = "head") -> Cell:
    """The cell ``(hook_name, head)`` of ``model``, checked: a recurrent layer's hook of one of ``kinds``
    and a head in ``[0, n_heads)`` (a ``ValueError`` naming ``hook_name`` or ``head_name`` otherwise).

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> parse_cell(model, "blocks.1.mixer.hook_write", 1)
        Cell(hook_name='blocks.1.mixer.hook_write', head=1)
    """
    matrix_site(model.cfg, hook_name, kinds)
    return Cell(hook_name, check_head(head, model.cfg.n_heads, head_name, hook_name))


def parse_cells(model: Any, cells: Iterable[Cell | tuple[str, int]]) -> list[Cell]:
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
    for cell in cells:
        if not isinstance(cell, Cell) and not (isinstance(cell, (tuple, list)) and len(cell) == 2):
            raise ValueError(f"cells: expected (hook_name, head) pairs, got {cell!r}")
        cell = parse_cell(model, *((cell.hook_name, cell.head) if isinstance(cell, Cell) else cell))
        if cell not in out:
            out.append(cell)
    if not out:
        raise ValueError("cells: expected at least one (hook_name, head) cell, got none")
    return out


def check_positions(positions: Any, batch: int, length: int,
                    device: torch.device | str = "cpu") -> Int[Tensor, "batch n"]:
    """``positions`` (``[batch, n]``, or ``[n]`` for every sequence) as a long tensor on ``device``, each in
    ``[0, length)``; anything else is refused naming ``positions``.

    Example:
        >>> check_positions([1, 4], 2, 5).tolist()
        [[1, 4], [1, 4]]
    """
    try:
        pos = torch.as_tensor(positions, device=device)
    except (TypeError, ValueError, RuntimeError):
        rows = list(positions) if isinstance(positions, Sequence) else []
        if rows and all(isinstance(r, Sequence) and not isinstance(r, str) for r in rows):
            lengths = [len(r) for r in rows]
            if len(set(lengths)) > 1:
                raise ValueError(f"positions: expected one list of positions per sequence, all of one length, "
                                 f"got rows of lengths {lengths}") from None
        raise TypeError(f"positions: expected integer positions, [batch, n] or [n], got {positions!r}") from None
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"positions: expected integer positions, got dtype {pos.dtype}")
    if pos.dim() == 1:
        pos = pos[None].expand(batch, -1)
    if pos.dim() != 2 or pos.shape[0] != batch:
        raise ValueError(f"positions: expected shape [batch={batch}, n] (or [n] for every sequence), "
                         f"got {tuple(pos.shape)}")
    if pos.numel() and (pos.min() < 0 or pos.max() >= length):
        raise ValueError(f"positions: expected values in [0, {length}) (the sequence length), "
                         f"got min {int(pos.min())} and max {int(pos.max())}")
    return pos.long()


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
