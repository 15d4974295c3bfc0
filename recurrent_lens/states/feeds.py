"""State feeds: where a trainer's batches of states come from, one :class:`StateFeed` protocol.

- :class:`HarvestFeed`: model passes over a token tensor (a new seeded order every epoch) or an iterable of
  token windows such as :func:`recurrent_lens.data.open_tokens` (read in order, restarted when exhausted),
  positions drawn by :func:`~recurrent_lens.states.cells.sample_positions` (seeded per sequence), every
  cell's states from one :func:`~recurrent_lens.states.harvest.harvest_cells` pass, each shuffled through
  its own buffer;
- :class:`StoreFeed`: a :class:`~recurrent_lens.states.store.StateStore` (no model needed), which also
  opens the reference ``layer_{L}/head_{H}.npy`` files;
- :class:`GeneratorFeed`: model passes over a token tensor in one process, where one generator draws the
  order, the positions, every shuffle and the SAE's resampling (the draw of
  :func:`recurrent_lens.sae.train`, which the demo and the reproductions are pinned to).

Why two draws from tokens: :class:`HarvestFeed` seeds everything per sequence and per cell, so a cell
trains the same whichever other cells share its passes and however the data is split across ranks or
streamed; :class:`GeneratorFeed` keeps the single-stream draw the one-SAE results were made with, bit for
bit. A feed is fully described by its ``state_dict``, so a resumed run reads on exactly where it stopped.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.integrity import (
    NonFiniteError, ResumeMismatchError, first_nonfinite, sequence_chain, source_fingerprint,
)
from recurrent_lens.states.cells import Cell, cell_generator, sample_positions, seeded_generator
from recurrent_lens.states.harvest import harvest_cells

__all__ = ["StateFeed", "HarvestFeed", "StoreFeed", "GeneratorFeed", "sampled_states", "checked_states"]


@runtime_checkable
class StateFeed(Protocol):
    """What the trainer reads: per step one batch of states per cell, and the randomness of a run.

    ``cells`` are the cells it feeds, ``cfg`` the :class:`~recurrent_lens.sae.TrainConfig` it draws with,
    ``shape`` their ``(d_k, d_v)``, and ``nonfinite`` maps a cell to where its first non-finite state came
    from, once one was seen (for the trainer's error).
    """

    cells: list[Cell]
    cfg: Any
    nonfinite: dict[Cell, str]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_k, d_v)`` of every state fed."""

    def next(self) -> dict[Cell, Float[Tensor, "batch d_k d_v"]]:
        """The next batch of states of every cell."""

    def mean(self, cell: Cell) -> Float[Tensor, "d_k d_v"]:
        """The mean state of ``cell`` over a buffer's worth of data (to centre a new SAE)."""

    def held_out(self, tokens: Int[Tensor, "n_seq pos"]) -> dict[Cell, Float[Tensor, "samples d_k d_v"]]:
        """Every cell's states of the held-out ``tokens``, drawn as the training states are (a fixed set)."""

    def generator(self, cell: Cell, role: str) -> torch.Generator:
        """The generator of ``cell``'s ``role``: ``"init"`` (its SAE's initial weights, by ``initial_seed()``)
        or ``"learner"`` (resampling)."""

    def fingerprint(self) -> dict[str, Any] | None:
        """The identity of the data read, recorded with every checkpoint and compared on resume."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue reading exactly where the feed is."""

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""


class _PerCellSeeds:
    """Generators seeded by the run's seed and each cell's name, so a cell trains the same whichever other
    cells share its data."""

    cfg: Any

    def generator(self, cell: Cell, role: str) -> torch.Generator:
        return cell_generator(self.cfg.seed, cell, role)


def checked_states(model: Any, cells: list[Cell], tokens: Int[Tensor, "batch pos"],
                   positions: Int[Tensor, "batch n"],
                   index: Int[Tensor, " batch"]) -> tuple[dict[Cell, Tensor], dict[Cell, tuple[int, int]]]:
    """Every cell's states at ``positions`` of ``tokens``, in host memory, flattened to ``[batch · n, d_k, d_v]``,
    and for each cell holding a non-finite state the sequence index (from ``index``) and position of the first.

    Example:
        >>> import torch
        >>> cell = Cell("blocks.0.mixer.hook_state", 1)
        >>> states, bad = checked_states(tiny_model, [cell], tiny_tokens, torch.tensor([[1, 5], [0, 7]]),
        ...                              torch.arange(2))
        >>> tuple(states[cell].shape), bad
        ((4, 8, 8), {})
    """
    states = {c: s.cpu() for c, s in harvest_cells(model, tokens, positions, cells).items()}
    bad = {}
    for c, s in states.items():
        row = first_nonfinite(s)
        if row is not None:
            i, j = divmod(row, positions.shape[1])
            bad[c] = (int(index[i]), int(positions[i, j]))
    return states, bad


def sampled_states(model: Any, cells: list[Cell], cfg: Any, index: Int[Tensor, " batch"],
                   tokens: Int[Tensor, "batch pos"]) -> tuple[dict[Cell, Tensor], dict[Cell, tuple[int, int]]]:
    """:func:`checked_states` at the positions ``cfg`` (a :class:`~recurrent_lens.sae.TrainConfig`:
    ``positions_per_seq``, ``skip_positions``, ``seed``) samples for the sequences ``index``
    (:func:`~recurrent_lens.states.cells.sample_positions`, seeded per sequence).

    Example:
        >>> import torch
        >>> from recurrent_lens.sae import TrainConfig
        >>> cell = Cell("blocks.0.mixer.hook_state", 1)
        >>> states, bad = sampled_states(tiny_model, [cell], TrainConfig(positions_per_seq=3), torch.arange(2),
        ...                              tiny_tokens)
        >>> tuple(states[cell].shape), bad
        ((6, 8, 8), {})
    """
    pos = sample_positions(index, tokens.shape[1], cfg.positions_per_seq, skip=cfg.skip_positions, seed=cfg.seed,
                           skip_name="TrainConfig.skip_positions")
    return checked_states(model, cells, tokens, pos, index)


def _held_out(cells: list[Cell], tokens: Tensor, batch: int, draw: Any) -> dict[Cell, Tensor]:
    """Every cell's held-out states, ``draw(index, chunk)`` giving a chunk's states and non-finite spots; a
    non-finite state is refused here, before any training."""
    out: dict[Cell, list[Tensor]] = {c: [] for c in cells}
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        states, bad = draw(torch.arange(i, i + len(chunk)), chunk)
        if bad:
            c, (seq, position) = next(iter(bad.items()))
            raise NonFiniteError(f"held-out states of {c.name}: non-finite state at sequence {seq} of the held-out "
                                 f"tokens, position {position}")
        for c, s in states.items():
            out[c].append(s)
    return {c: torch.cat(v) for c, v in out.items()}


_HELD_OUT = 2**40
"""Held-out sequence ``i`` draws its positions as sequence ``i + _HELD_OUT``, an index no training sequence
reaches, so held-out and training positions are drawn apart."""


class _Sequences:
    """Token sequences with their global indices, ``batch`` at a time, for one rank of ``world``.

    A tensor is read in a new order every epoch (the same permutation on every rank, each rank taking
    every ``world``-th row); an iterable is read in order and restarted when exhausted (it is expected to
    be this rank's shard already, e.g. ``open_tokens(..., rank=r, world_size=world)``).
    """

    def __init__(self, data: Any, batch: int, seed: int, rank: int, world: int) -> None:
        self.data, self.batch, self.seed, self.rank, self.world = data, batch, seed, rank, world
        self.is_tensor = isinstance(data, Tensor)
        self.epoch = self.cursor = self.consumed = 0
        self._iter: Any = None
        self.chain = ""  # hash chain of this epoch's windows: a resumed run checks it re-reads the same ones
        self._expected_chain: str | None = None

    def _order(self) -> Tensor:
        order = torch.randperm(len(self.data), generator=seeded_generator(self.seed, self.epoch))
        return order[self.rank :: self.world]

    def next(self) -> tuple[Tensor, Tensor]:
        """``(global indices [batch], tokens [batch, ctx])``."""
        if self.is_tensor:
            order = self._order()
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            rows = order[self.cursor : self.cursor + self.batch]
            self.cursor += len(rows)
            return rows + self.epoch * len(self.data), self.data[rows]
        windows: list[Tensor] = []
        while len(windows) < self.batch:
            if self._iter is None:
                self._iter = iter(self.data)
                if self._expected_chain is not None:  # resuming: skip what this epoch already gave
                    self._skip_read()
            try:
                window = next(self._iter)
            except StopIteration:
                if self.cursor == 0:
                    again = (" when read again: a one-shot iterator cannot be restarted, pass a re-iterable source "
                             "(a list, a tensor or open_tokens)") if self.epoch else ""
                    raise ValueError(f"data: the token source {self.data!r} yields no sequence{again}") from None
                self._iter, self.epoch, self.cursor, self.chain = None, self.epoch + 1, 0, ""
                continue
            windows.append(torch.as_tensor(window))
            self.chain = sequence_chain(self.chain, windows[-1])
            self.cursor += 1
        index = torch.arange(self.consumed, self.consumed + len(windows)) * self.world + self.rank
        self.consumed += len(windows)
        return index, torch.stack(windows)

    def _skip_read(self) -> None:
        chain = ""
        for _ in range(self.cursor):
            chain = sequence_chain(chain, torch.as_tensor(next(self._iter)))
        if chain != self._expected_chain:
            raise ResumeMismatchError(
                f"data: the token source does not yield the {self.cursor} windows already read this epoch by the "
                f"interrupted run (their hash chain: recorded {self._expected_chain!r}, current {chain!r}); resume "
                f"with the same source in the same order, or start afresh in another output directory (--out)")
        self._expected_chain = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "consumed": self.consumed, "chain": self.chain}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.consumed, self._iter = d["epoch"], d["cursor"], d["consumed"], None
        self.chain = self._expected_chain = d["chain"]


class _Buffers:
    """One shuffling buffer per cell, refilled from ``_draw()`` (every cell's states of one model batch) when
    half empty, each shuffled by ``_shuffler(cell)``, non-finite states located by ``_where(sequence, position)``;
    the common part of the model-pass feeds."""

    cells: list[Cell]
    cfg: Any
    model: Any
    local_batch: int

    def _init_buffers(self) -> None:
        self.buffers: dict[Cell, Tensor] = {}
        self.fill = 0
        self.nonfinite: dict[Cell, str] = {}  # per cell, where its first non-finite state came from

    @property
    def shape(self) -> tuple[int, int]:
        return self.model.cfg.d_k, self.model.cfg.d_v

    @torch.no_grad()
    def _refill(self) -> None:
        parts = {c: [self.buffers[c][: self.fill]] if c in self.buffers else [] for c in self.cells}
        have = self.fill
        while have < self.cfg.buffer_size:
            states, bad = self._draw()
            self.nonfinite = {**{c: self._where(i, p) for c, (i, p) in bad.items()}, **self.nonfinite}
            for c in self.cells:
                parts[c].append(states[c])
            have += len(states[self.cells[0]])
        for c in self.cells:
            merged = torch.cat(parts[c])
            self.buffers[c] = merged[torch.randperm(len(merged), generator=self._shuffler(c))]
        self.fill = have

    def next(self) -> dict[Cell, Tensor]:
        if not self.buffers or self.fill < max(self.local_batch, self.cfg.buffer_size // 2):
            self._refill()
        lo = self.fill - self.local_batch
        self.fill = lo
        return {c: self.buffers[c][lo : lo + self.local_batch] for c in self.cells}

    def mean(self, cell: Cell) -> Tensor:
        if not self.buffers:
            self._refill()
        return self.buffers[cell][: self.fill].mean(0)

    def _buffer_state(self) -> dict[str, Any]:
        return {"fill": self.fill, "buffers": {c.name: b[: self.fill].clone() for c, b in self.buffers.items()}}

    def _load_buffer_state(self, d: dict[str, Any]) -> None:
        self.fill = d["fill"]
        self.buffers = {c: d["buffers"][c.name] for c in self.cells if c.name in d["buffers"]}


class HarvestFeed(_PerCellSeeds, _Buffers):
    """A :class:`StateFeed` of every cell's states harvested from ``model`` over ``data`` (a token tensor
    or an iterable of windows, see :class:`_Sequences`), positions seeded per sequence, through one shuffling
    buffer of ``cfg.buffer_size`` states per cell; ``rank`` of ``world`` reads its share, ``cfg.batch_size /
    world`` states per cell per step.

    Example:
        >>> from recurrent_lens.sae import TrainConfig
        >>> cell = Cell("blocks.0.mixer.hook_state", 0)
        >>> feed = HarvestFeed(tiny_model, [cell], tiny_tokens, TrainConfig(batch_size=16, buffer_size=32))
        >>> tuple(feed.next()[cell].shape), feed.shape
        ((16, 8, 8), (8, 8))
    """

    def __init__(self, model: Any, cells: list[Cell], data: Any, cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.model, self.cells, self.data, self.cfg = model, cells, data, cfg
        self.local_batch = cfg.batch_size // world
        self.sequences = _Sequences(data, cfg.model_batch_size, cfg.seed, rank, world)
        self.gens = {c: self.generator(c, "buffer") for c in cells}
        self._init_buffers()

    def _draw(self) -> tuple[dict[Cell, Tensor], dict[Cell, tuple[int, int]]]:
        return sampled_states(self.model, self.cells, self.cfg, *self.sequences.next())

    def _shuffler(self, cell: Cell) -> torch.Generator:
        return self.gens[cell]

    @staticmethod
    def _where(seq: int, pos: int) -> str:
        return f"the first non-finite state harvested: sequence {seq}, position {pos}"

    def held_out(self, tokens: Tensor) -> dict[Cell, Tensor]:
        def draw(index: Tensor, chunk: Tensor) -> tuple[dict[Cell, Tensor], dict[Cell, tuple[int, int]]]:
            states, bad = sampled_states(self.model, self.cells, self.cfg, index + _HELD_OUT, chunk)
            return states, {c: (i - _HELD_OUT, p) for c, (i, p) in bad.items()}

        return _held_out(self.cells, tokens, self.cfg.model_batch_size, draw)

    def fingerprint(self) -> dict[str, Any] | None:
        return source_fingerprint(self.data)

    def state_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences.state_dict(), "gens": {c.name: g.get_state() for c, g in self.gens.items()},
                **self._buffer_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.sequences.load_state_dict(d["sequences"])
        for c in self.cells:
            self.gens[c].set_state(d["gens"][c.name])
        self._load_buffer_state(d)


class StoreFeed(_PerCellSeeds):
    """A :class:`StateFeed` of stored states (a :class:`~recurrent_lens.states.store.StateStore`, reference
    ``layer_{L}/head_{H}.npy`` files included): one seeded global order of ``cfg.batch_size`` batches per
    cell, ``rank`` of ``world`` reading its slice of every batch.
    """

    def __init__(self, store: Any, cells: list[Cell], cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.store, self.cells, self.cfg, self.rank, self.world = store, cells, cfg, rank, world
        self.step = 0
        self._iters: dict[Cell, Any] = {}
        self.nonfinite: dict[Cell, str] = {}  # per cell, where its first non-finite state lies

    @property
    def shape(self) -> tuple[int, int]:
        return self.store.d_k, self.store.d_v

    def next(self) -> dict[Cell, Tensor]:
        if not self._iters:
            self._iters = {c: iter(self.store.batch_indices(c, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed,
                                                            rank=self.rank, world_size=self.world, start=self.step))
                           for c in self.cells}
        self.step += 1
        batches = {}
        for c, it in self._iters.items():
            index = next(it)
            batches[c] = self.store.read(c, index)
            row = first_nonfinite(batches[c]) if c not in self.nonfinite else None
            if row is not None:
                self.nonfinite[c] = (f"the first non-finite state read: store row {int(index[row])}"
                                     + self._origin(c, index[row]))
        return batches

    def _origin(self, cell: Cell, row: Tensor) -> str:
        if self.store.manifest is None:
            return ""
        seq, pos = self.store.provenance(cell, row.reshape(1))
        return f" (sequence {int(seq[0])}, position {int(pos[0])})"

    def mean(self, cell: Cell) -> Tensor:
        n = min(self.store.count(cell), self.cfg.buffer_size)
        return self.store.read(cell, torch.arange(n)).mean(0)

    def held_out(self, tokens: Tensor) -> dict[Cell, Tensor]:
        raise ValueError("val_tokens: a state store holds no model to harvest the held-out states from")

    def fingerprint(self) -> dict[str, Any] | None:
        return source_fingerprint(self.store)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self._iters = d["step"], {}


class GeneratorFeed(_Buffers):
    """A :class:`StateFeed` of every cell's states harvested from ``model`` over a ``[n_seq, pos]`` token
    tensor in one process, one generator seeded by ``cfg.seed`` drawing everything in turn: a new order of
    the sequences every epoch, ``cfg.positions_per_seq`` positions per sequence, each cell's buffer shuffle,
    and (as the ``"learner"`` generator) the SAE's resampling; the SAEs start from ``cfg.seed``.

    Cells share that stream, so a cell's SAE depends on the other cells trained with it; see the module
    docstring for when to prefer :class:`HarvestFeed`.

    Example:
        >>> from recurrent_lens.sae import TrainConfig
        >>> cell = Cell("blocks.0.mixer.hook_state", 0)
        >>> feed = GeneratorFeed(tiny_model, [cell], tiny_tokens, TrainConfig(batch_size=16, buffer_size=32))
        >>> feed.next()[cell].shape == feed.next()[cell].shape == (16, 8, 8)
        True
    """

    def __init__(self, model: Any, cells: list[Cell], tokens: Int[Tensor, "n_seq pos"], cfg: Any) -> None:
        self.model, self.cells, self.tokens, self.cfg = model, cells, tokens, cfg
        self.local_batch = cfg.batch_size
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(len(tokens), generator=self.gen)
        self.cursor = self.epoch = 0
        self._init_buffers()

    def _positions(self, n_seq: int, length: int, gen: torch.Generator) -> Tensor:
        usable = length - self.cfg.skip_positions
        if usable < 1:
            raise ValueError(f"TrainConfig.skip_positions: sequences of length {length} leave no position after "
                             f"skip_positions={self.cfg.skip_positions}")
        n = min(self.cfg.positions_per_seq, usable)
        return torch.rand(n_seq, usable, generator=gen).argsort(-1)[:, :n] + self.cfg.skip_positions

    def _draw(self) -> tuple[dict[Cell, Tensor], dict[Cell, tuple[int, int]]]:
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.tokens), generator=self.gen)
            self.cursor, self.epoch = 0, self.epoch + 1
        index = self.order[self.cursor : self.cursor + self.cfg.model_batch_size]
        self.cursor += len(index)
        toks = self.tokens[index]
        return checked_states(self.model, self.cells, toks, self._positions(*toks.shape, self.gen), index)

    def _shuffler(self, cell: Cell) -> torch.Generator:
        return self.gen

    @staticmethod
    def _where(seq: int, pos: int) -> str:
        return f"the first non-finite state harvested: sequence {seq} of the training tokens, position {pos}"

    def held_out(self, tokens: Tensor) -> dict[Cell, Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # its own: the training stream is left untouched
        torch.randperm(len(tokens), generator=gen)  # drawn as the training stream starts, an order it never reads
        return _held_out(self.cells, tokens, self.cfg.model_batch_size,
                         lambda index, chunk: checked_states(self.model, self.cells, chunk,
                                                             self._positions(*chunk.shape, gen), index))

    def generator(self, cell: Cell, role: str) -> torch.Generator:
        return self.gen if role == "learner" else torch.Generator().manual_seed(self.cfg.seed)

    def fingerprint(self) -> dict[str, Any] | None:
        return source_fingerprint(self.tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor, "epoch": self.epoch, "gen": self.gen.get_state(),
                **self._buffer_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.order, self.cursor, self.epoch = d["order"], d["cursor"], d["epoch"]
        self.gen.set_state(d["gen"])
        self._load_buffer_state(d)
