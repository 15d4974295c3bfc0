"""The SAE trainer: one SAE per cell ``(hook_name, head)`` from one model pass per batch, streamed text,
state stores, torchrun; :class:`SAETrainer` and :func:`train` are its one-cell case.

Each model batch is run once, up to the deepest layer asked for, and :meth:`harvest
<recurrent_lens.models.base.HookedRecurrentModel.harvest>` returns every cell's states at the sampled
positions (never the full ``[batch, pos, head, d_k, d_v]`` tensor). Each cell then has its own shuffling
buffer, SAE, Adam optimizer, checkpoint and log, so memory is bounded by ``n_cells · buffer_size · d_k · d_v``
and not by sequence length or head count. One optimisation step is a
:class:`~recurrent_lens.sae.training.Learner`'s.

Data: a ``[n_seq, ctx]`` token tensor (``cfg.val_sequences`` holds out its last sequences), any iterable of
``[ctx]`` token windows such as :func:`recurrent_lens.data.open_tokens` (read in order, restarted when
exhausted), or a :class:`~recurrent_lens.states.store.StateStore` of harvested states (no model needed). The
trainer reads them through a :class:`~recurrent_lens.states.feeds.StateFeed`: by default positions seeded per
sequence and generators per cell (:class:`~recurrent_lens.states.feeds.HarvestFeed`,
:class:`~recurrent_lens.states.feeds.StoreFeed`); ``draw="generator"`` reads a token tensor with one
generator for everything (:class:`~recurrent_lens.states.feeds.GeneratorFeed`, the draw of :func:`train`); a
feed of one's own, passed as ``data``, is read as it is.

Beyond one process (``torch.distributed`` initialised, e.g. under ``torchrun``):

- ``distributed="data"`` (the default then): every rank harvests its own share of the data;
  ``cfg.batch_size`` is the global batch, each rank trains on ``batch_size / world_size`` states per step;
  gradients are averaged with ``all_reduce``, dead-feature counters reduced with ``MIN`` (a feature is
  alive if it fired on any rank), dead features are resampled from the gathered global batch and rank 0's
  SAE is then broadcast, so every rank holds the same SAE — the one a single process would train on the
  same global batches (exactly so with a state store, whose batches are rank slices of one global order).
  Rank 0 writes the SAEs, logs and checkpoints; each rank writes its own data position.
- ``distributed="cells"``: rank ``r`` trains cells ``r, r + world_size, …`` on all of the data, alone.

A collective that does not complete within the process group's timeout (a peer stopped or died) raises
:class:`~recurrent_lens.sae.distributed.CollectiveError` naming the operation and the rank; the checkpoint
last named in ``checkpoint.json`` stays whole (each file is renamed into place, the manifest last).

Checkpoints (``out_dir`` set, every ``cfg.checkpoint_every`` steps and when a run stops):
``{out_dir}/{cell.name}/checkpoint-{step}.pt`` per cell, ``{out_dir}/data-{step}.rank{r}.pt`` per rank
(generators, data position, buffers) and, written last and atomically, ``{out_dir}/checkpoint.json`` naming
the step and the weights and data the run was made from (see :mod:`recurrent_lens.integrity`); a run started
on an ``out_dir`` with a checkpoint checks that they and the settings are the same (else
:class:`~recurrent_lens.integrity.ResumeMismatchError`; a checkpoint without them is refused) and continues
from it bit for bit, ``train_log.json`` included (a finished run keeps only the per-cell files, no data
position or buffers). A run that meets a NaN or an infinity in a cell's states, loss, gradients or weights
stops with :class:`~recurrent_lens.integrity.NonFiniteError` naming the cell, the step and where the state
came from (store row, or sequence and position), and writes nothing more (see
:mod:`recurrent_lens.sae.training`): the last checkpoint stays. At the end each
cell's SAE is saved in ``{out_dir}/{cell.name}/`` (loadable with :func:`recurrent_lens.sae.load`) with its
``train_log.json``. One run at a time writes an ``out_dir``: rank 0 locks it
(:class:`~recurrent_lens.states.files.DirectoryLock`) from construction until :meth:`MultiCellTrainer.train`
returns, and a second run on it fails at construction, on every rank, naming the process that holds it.

Example:
    >>> import torch, tempfile
    >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
    >>> from recurrent_lens.sae import TrainConfig, load
    >>> from recurrent_lens.sae.trainer import train_cells
    >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
    ...     n_layers=2, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
    >>> cfg = TrainConfig(n_steps=10, batch_size=32, n_features=64, k=4, buffer_size=128, progress=False)
    >>> cells = [("blocks.0.mixer.hook_state", 0), ("blocks.1.mixer.hook_state", 1)]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     saes = train_cells(model, cells, torch.randint(0, 50, (32, 16)), cfg, out_dir=d)
    ...     sorted(os.listdir(d))[:2], type(load(f"{d}/blocks.1.mixer.hook_state.h1")).__name__
    (['blocks.0.mixer.hook_state.h0', 'blocks.1.mixer.hook_state.h1'], 'WriteSAE')
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.data import TokenSource
from recurrent_lens.integrity import (
    ResumeMismatchError, check_same, refuse_unchecked, source_fingerprint, weights_fingerprint,
)
from recurrent_lens.sae import wandb_log
from recurrent_lens.sae.base import SAE
from recurrent_lens.sae.distributed import DataParallelSync, collective
from recurrent_lens.sae.io import save_sae
from recurrent_lens.sae.training import (
    REPORTING_FIELDS, Learner, TrainConfig, TrainLog, build_sae, check_tokens, check_train_config, evaluate,
    sae_from_payload, write_json,
)
from recurrent_lens.states.cells import Cell, parse_cell, parse_cells
from recurrent_lens.states.feeds import GeneratorFeed, HarvestFeed, StateFeed, StoreFeed
from recurrent_lens.states.files import (
    DirectoryLock, DirectoryLockedError, atomic_write, check_writable, remove_stale_temporaries,
)

__all__ = ["MultiCellTrainer", "SAETrainer", "train", "train_cells"]

MANIFEST = "checkpoint.json"


class MultiCellTrainer:
    """Trains one SAE per cell from one model pass per batch (see the module docstring).

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel` (``None`` when ``data`` is a state store).
        cells: ``(hook_name, head)`` pairs or :class:`~recurrent_lens.states.cells.Cell` s.
        data: a ``[n_seq, ctx]`` token tensor, an iterable of ``[ctx]`` token windows, a
            :class:`~recurrent_lens.states.store.StateStore`, or any :class:`~recurrent_lens.states.feeds.StateFeed`
            (read as it is, in one process: built for these ``cells`` with this ``cfg``).
        cfg: the settings shared by every cell (``batch_size`` is the global batch across ranks).
        out_dir: where SAEs, logs and checkpoints go; an existing checkpoint there is resumed.
        saes: ``{cell: SAE}`` to continue training instead of new ``cfg.architecture`` SAEs.
        val_tokens: held-out ``[n_seq, ctx]`` tokens; each cell is evaluated on their states every
            ``cfg.val_every`` steps (``log.val``).
        distributed: ``"data"``, ``"cells"`` or ``None`` (one process); ``"auto"``: ``"data"`` when
            ``torch.distributed`` is initialised with more than one rank.
        device: where the SAEs train (default: the model's device); buffers stay in host memory.
        draw: how states are drawn from tokens: ``"per_sequence"`` (:class:`~recurrent_lens.states.feeds.
            HarvestFeed`) or ``"generator"`` (:class:`~recurrent_lens.states.feeds.GeneratorFeed`, one process,
            a token tensor: the draw of :func:`train`).
    """

    def __init__(self, model: Any, cells: Iterable[Cell | tuple[str, int]], data: Any, cfg: TrainConfig | None = None,
                 *, out_dir: str | None = None, saes: dict[Cell, SAE] | None = None, val_tokens: Tensor | None = None,
                 distributed: str | None = "auto", device: str | torch.device | None = None,
                 draw: str = "per_sequence") -> None:
        cfg = cfg or TrainConfig()
        check_train_config(cfg)
        given = data if isinstance(data, StateFeed) else None
        store = data if hasattr(data, "iter_batches") else None
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if distributed == "auto":
            distributed = "data" if self.world > 1 else None
        if distributed not in (None, "data", "cells"):
            raise ValueError(f"distributed: expected 'data', 'cells', 'auto' or None, got {distributed!r}")
        if distributed is not None and not dist.is_initialized():
            raise ValueError(f"distributed={distributed!r} needs torch.distributed to be initialised (e.g. torchrun)")
        self.mode = distributed
        if given is not None:
            all_cells = [c if isinstance(c, Cell) else Cell(*c) for c in cells]
            if all_cells != list(given.cells):
                raise ValueError(f"cells: expected the cells the feed reads, {[c.name for c in given.cells]}, got "
                                 f"{[c.name for c in all_cells]}")
            if given.cfg != cfg:
                raise ValueError("cfg: the feed draws with other settings; pass the TrainConfig it was built with")
            if self.mode is not None:
                raise ValueError(f"distributed={self.mode!r}: a feed given as data is read as it is, in one process; "
                                 "pass tokens, a token source or a state store to split the data across ranks")
        elif store is not None:
            all_cells = [c if isinstance(c, Cell) else Cell(*c) for c in cells]
            missing = [c.name for c in all_cells if c not in store.cells]
            if missing or not all_cells:
                raise ValueError(f"cells: expected cells of the state store {[c.name for c in store.cells]}, "
                                 f"got {missing or 'none'}")
            for c in all_cells:
                if store.count(c) < cfg.batch_size:
                    raise ValueError(f"TrainConfig.batch_size: expected at most the {store.count(c)} states stored "
                                     f"for {c.name} in {store.path}, got {cfg.batch_size}")
            if not store.complete:
                warnings.warn(f"data: the state store {store.path!r} is INCOMPLETE: its harvest stopped after "
                              f"{store.sequences_done} sequences ({store.count(all_cells[0])} states per cell) and "
                              "never finished; training on what it holds. Run the same harvest again to complete "
                              "it first", RuntimeWarning, stacklevel=2)
        else:
            if model is None:
                raise ValueError("model: expected a model to harvest states from (data is not a state store)")
            all_cells = parse_cells(model, cells)
        self.all_cells = all_cells
        self.cells = all_cells[self.rank :: self.world] if self.mode == "cells" else all_cells
        split_data = self.mode == "data"
        world = self.world if split_data else 1
        if cfg.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size: expected a multiple of the {world} ranks, got {cfg.batch_size}")
        self.local_batch = cfg.batch_size // world
        self.sync = DataParallelSync() if split_data else None
        self.writer = self.rank == 0 or self.mode == "cells"
        self.model, self.cfg, self.out_dir = model, cfg, out_dir
        if device is None:
            device = next(model.parameters()).device if model is not None else "cpu"
        self.device = torch.device(device)
        self._lock = DirectoryLock(out_dir, "out_dir") if out_dir is not None and self.rank == 0 else None
        self._locked = False
        if out_dir is not None:
            if os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
                # the one-SAE trainer of earlier versions wrote this single file; starting afresh beside it would
                # look like resuming it
                raise ResumeMismatchError(
                    f"out_dir: {out_dir!r} holds a checkpoint.pt of an earlier recurrent_lens's one-SAE trainer, "
                    "which this version cannot resume. Start afresh: use another output directory (--out) or delete "
                    f"{os.path.join(out_dir, 'checkpoint.pt')!r}")
            check_writable(out_dir, "out_dir")
            for cell in self.cells:
                check_writable(os.path.join(out_dir, cell.name), "out_dir")
            self._lock_out_dir()
        try:  # a refusal below must not leave the directory locked
            if out_dir is not None:
                if self.writer:  # the process that writes a directory clears what a killed run left there
                    for cell in self.cells:
                        remove_stale_temporaries(os.path.join(out_dir, cell.name))
                    if self.rank == 0:
                        remove_stale_temporaries(out_dir)
                if self.sync is not None:
                    with collective("barrier after clearing out_dir"):
                        dist.barrier()
            rank, data_world = (self.rank, self.world) if split_data else (0, 1)
            if store is None and given is None:
                if isinstance(data, Tensor) or not isinstance(data, Iterable):
                    data = check_tokens(model, data)
                    if data.shape[1] - cfg.skip_positions < 1:
                        raise ValueError(f"TrainConfig.skip_positions: sequences of length {data.shape[1]} leave no "
                                         f"position after skip_positions={cfg.skip_positions}")
                elif isinstance(data, TokenSource):
                    data.check(d_vocab=model.cfg.d_vocab)
            if cfg.val_sequences:
                data, val_tokens = self._hold_out(data, val_tokens)
            if given is not None:
                if draw != "per_sequence":
                    raise ValueError(f"draw: a feed given as data draws its own way, got draw={draw!r}")
                self.feed: StateFeed = given
            elif draw == "generator":
                if not isinstance(data, Tensor) or self.mode is not None:
                    raise ValueError("draw: 'generator' reads a token tensor in one process; use 'per_sequence' "
                                     f"for {'a distributed run' if self.mode else type(data).__name__}")
                self.feed = GeneratorFeed(model, self.cells, data, cfg)
            elif draw != "per_sequence":
                raise ValueError(f"draw: expected 'per_sequence' or 'generator', got {draw!r}")
            elif store is not None:
                self.feed = StoreFeed(store, self.cells, cfg, rank, data_world)
            else:
                self.feed = HarvestFeed(model, self.cells, data, cfg, rank, data_world)
            if out_dir is not None:  # recorded with every checkpoint, compared on resume
                val = None if val_tokens is None else source_fingerprint(torch.as_tensor(val_tokens))
                weights = weights_fingerprint(model) if model is not None and store is None else None
                self.identity = {"weights": weights, "data": self.feed.fingerprint(), "val_data": val}
            self.val_states: dict[Cell, Tensor] | None = None
            if val_tokens is not None:
                held = check_tokens(model, val_tokens) if model is not None else val_tokens
                self.val_states = self.feed.held_out(held)
            self.learners = {c: Learner(self._new_sae(c, saes), cfg, self.feed.generator(c, "learner"), self.sync,
                                        label=c.name)
                             for c in self.cells}
            if out_dir is not None and os.path.exists(self._manifest_path()):
                self._resume()
        except BaseException:
            if out_dir is not None:
                self._unlock_out_dir()
            raise
        if self._lock is not None:
            weakref.finalize(self, self._lock.release)

    def __repr__(self) -> str:
        return (f"MultiCellTrainer({len(self.cells)} cells, step {self.step}/{self.cfg.n_steps}, batch "
                f"{self.cfg.batch_size}, mode={self.mode or 'single process'}, rank {self.rank}/{self.world})")

    @property
    def step(self) -> int:
        return next(iter(self.learners.values())).step if self.learners else self.cfg.n_steps

    @property
    def saes(self) -> dict[Cell, SAE]:
        return {c: learner.sae for c, learner in self.learners.items()}

    @property
    def logs(self) -> dict[Cell, TrainLog]:
        return {c: learner.log for c, learner in self.learners.items()}

    def _new_sae(self, cell: Cell, saes: dict[Cell, SAE] | None) -> SAE:
        given = None if saes is None else saes.get(cell, saes.get((cell.hook_name, cell.head)))
        d_k, d_v = self.feed.shape
        if given is not None and (given.cfg.d_k, given.cfg.d_v) != (d_k, d_v):
            raise ValueError(f"saes[{cell.name}]: reads {given.cfg.d_k}x{given.cfg.d_v} states, the cell has "
                             f"{d_k}x{d_v}")
        sae = given
        if sae is None:
            sae = build_sae(self.cfg, d_k, d_v, seed=int(self.feed.generator(cell, "init").initial_seed()))
        sae.cfg.metadata.setdefault("hook_name", cell.hook_name)
        sae.cfg.metadata.setdefault("head", cell.head)
        return sae.to(self.device)

    def _hold_out(self, data: Any, val_tokens: Any) -> tuple[Tensor, Tensor]:
        """``cfg.val_sequences``: the last sequences of a token tensor, held out for validation."""
        n = self.cfg.val_sequences
        if val_tokens is not None:
            raise ValueError(f"val_tokens: given together with TrainConfig.val_sequences={n}; hold out one way")
        if not isinstance(data, Tensor):
            raise ValueError(f"TrainConfig.val_sequences: holds out the last sequences of a token tensor, got "
                             f"{type(data).__name__} data; pass val_tokens instead")
        if n >= len(data):
            raise ValueError(f"TrainConfig.val_sequences: expected fewer than the {len(data)} sequences of the tokens "
                             f"(at least one must train), got {n}")
        return data[: len(data) - n], data[len(data) - n :]

    # ------------------------------------------------------------------ checkpoints
    def _lock_out_dir(self) -> None:
        """Take ``out_dir``'s lock on rank 0; every rank of a distributed run fails if rank 0 could not (the
        others would otherwise wait for it at the next collective)."""
        error = None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except ValueError as e:
                error = e
        if self.mode is not None:
            message = [None if error is None else str(error)]
            with collective("broadcast of rank 0's out_dir lock"):
                dist.broadcast_object_list(message, src=0)
            if error is None and message[0] is not None:
                error = DirectoryLockedError(f"{message[0]} (rank 0 could not lock it)")
        if error is not None:
            raise error
        self._locked = True

    def _unlock_out_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
        self._locked = False

    def _manifest_path(self) -> str:
        suffix = f".rank{self.rank}" if self.mode == "cells" else ""
        return os.path.join(self.out_dir, MANIFEST.replace(".json", f"{suffix}.json"))

    def _data_path(self, step: int) -> str:
        return os.path.join(self.out_dir, f"data-{step:08d}.rank{self.rank}.pt")

    def _cell_path(self, cell: Cell, step: int) -> str:
        return os.path.join(self.out_dir, cell.name, f"checkpoint-{step:08d}.pt")

    def save_checkpoint(self) -> None:
        """Write every cell's and every rank's state for this step, then the manifest naming the step."""
        if self.out_dir is None:
            raise ValueError("save_checkpoint: out_dir is None")
        for learner in self.learners.values():  # a diverged run keeps its last good checkpoint
            learner.check_finite()
        step = self.step
        complete = step >= self.cfg.n_steps
        if not complete:  # a finished run needs no data position or buffers to continue
            payload = {"feed": self.feed.state_dict(), "torch_rng": torch.get_rng_state()}
            atomic_write(self._data_path(step), lambda tmp: torch.save(payload, tmp))
        if self.sync is not None:
            with collective(f"barrier before writing the step {step} checkpoint"):
                dist.barrier()
        if self.writer:
            for cell, learner in self.learners.items():
                state = learner.state_dict()
                atomic_write(self._cell_path(cell, step), lambda tmp, state=state: torch.save(state, tmp))
            previous = self._read_manifest() if os.path.exists(self._manifest_path()) else None
            write_json(self._manifest_path(), {"step": step, "complete": complete,
                                               "cells": [c.name for c in self.cells],
                                               "world_size": self.world, "mode": self.mode,
                                               "train_config": asdict(self.cfg), **self.identity})
            if previous is not None and previous["step"] != step:
                self._remove_step(previous["step"])
        if self.sync is not None:
            with collective(f"barrier after writing the step {step} checkpoint"):
                dist.barrier()

    def _remove_step(self, step: int) -> None:
        paths = [self._cell_path(c, step) for c in self.cells]
        paths += [os.path.join(self.out_dir, f"data-{step:08d}.rank{r}.pt")
                  for r in (range(self.world) if self.mode == "data" else [self.rank])]
        for path in paths:
            if os.path.exists(path):
                os.remove(path)

    def _read_manifest(self) -> dict[str, Any]:
        path = self._manifest_path()
        try:
            with open(path) as f:
                manifest = json.load(f)
            manifest["step"], manifest["cells"]  # noqa: B018 - both fields must exist
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the training manifest {path} ({type(e).__name__}: {e})") from e
        return manifest

    def _resume(self) -> None:
        manifest = self._read_manifest()
        if manifest["cells"] != [c.name for c in self.cells]:
            raise ValueError(f"out_dir: {self.out_dir!r} holds a run of cells {manifest['cells']}, not "
                             f"{[c.name for c in self.cells]}; use another out_dir")
        if manifest.get("world_size", 1) != self.world or manifest.get("mode") != self.mode:
            raise ValueError(f"out_dir: the run in {self.out_dir!r} used {manifest.get('world_size')} "
                             f"process(es) in mode {manifest.get('mode')!r}; resume it the same way "
                             f"(got {self.world}, {self.mode!r})")
        if "weights" not in manifest or "data" not in manifest:
            raise refuse_unchecked(self.out_dir, "a training run")
        step = manifest["step"]
        payloads = {c: torch.load(self._cell_path(c, step), map_location="cpu", weights_only=True) for c in self.cells}
        for cell, payload in payloads.items():
            sae_cfg = payload["sae_config"]
            if (sae_cfg["d_k"], sae_cfg["d_v"]) != self.feed.shape:
                raise ValueError(f"out_dir: the checkpoint's SAE of {cell.name} reads "
                                 f"{sae_cfg['d_k']}x{sae_cfg['d_v']} states, the cell has "
                                 f"{self.feed.shape[0]}x{self.feed.shape[1]}")
        check_same("weights", manifest["weights"], self.identity["weights"], self.out_dir, "a training run")
        check_same("data", manifest["data"], self.identity["data"], self.out_dir, "a training run")
        check_same("validation data", manifest.get("val_data"), self.identity["val_data"], self.out_dir,
                   "a training run")
        recorded = manifest.get("train_config", {})
        changed = sorted(k for k, v in asdict(self.cfg).items()
                         if k not in REPORTING_FIELDS and (k not in recorded or recorded[k] != v))
        if changed:
            raise ValueError(f"cfg: the run in {self.out_dir!r} used other settings ({', '.join(changed)} differ)")
        for cell, learner in self.learners.items():
            payload = payloads[cell]
            learner.sae.load_state_dict(sae_from_payload(payload).state_dict())
            learner.load_state_dict(payload)
        if not manifest.get("complete"):
            data = torch.load(self._data_path(step), map_location="cpu", weights_only=True)
            self.feed.load_state_dict(data["feed"])
            torch.set_rng_state(data["torch_rng"])

    # ------------------------------------------------------------------ training
    def train(self, until_step: int | None = None) -> dict[Cell, SAE]:
        """Train every cell to ``cfg.n_steps`` (or stop at ``until_step``, writing a checkpoint).

        ``out_dir``'s lock (taken when the trainer was built) is released when this returns or raises, and
        taken again by a later call.
        """
        if self.out_dir is not None and not self._locked:
            self._lock_out_dir()
        try:
            with torch.enable_grad():
                return self._train(until_step)
        finally:
            if self.out_dir is not None:
                self._unlock_out_dir()

    def _train(self, until_step: int | None) -> dict[Cell, SAE]:
        cfg = self.cfg
        stop = cfg.n_steps if until_step is None else min(until_step, cfg.n_steps)
        if self.step == 0:
            with torch.no_grad():
                for cell, learner in self.learners.items():
                    if learner.sae.cfg.center and not bool(learner.sae.mean.any()):
                        mean = self.feed.mean(cell).to(self.device)
                        learner.sae.mean.copy_(mean if self.sync is None else self.sync.mean(mean))
        for learner in self.learners.values():
            learner.sae.train()
        per_step = self.local_batch * len(self.cells) * (self.world if self.mode else 1)
        bar = tqdm(total=stop * per_step, initial=self.step * per_step, unit="state", unit_scale=True,
                   disable=not (cfg.progress and self.rank == 0), desc=f"{len(self.all_cells)} SAEs")
        # one run per process that writes cells: rank 0, or every rank when each trains its own cells
        run = wandb_log.open_run(cfg, {**asdict(cfg), "cells": [c.name for c in self.cells]}) if self.writer else None
        while self.step < stop:
            batches = self.feed.next()
            for c, note in self.feed.nonfinite.items():
                self.learners[c].states_note = note
            rows = {c: learner.update(batches[c].to(self.device)) for c, learner in self.learners.items()}
            if rows[self.cells[0]] is not None:
                first = rows[self.cells[0]]
                bar.set_postfix(step=self.step, mse=f"{first['mse']:.3g}", l0=f"{first['l0']:.1f}")
                for c, row in rows.items():
                    if row is not None:
                        wandb_log.log_row(run, row, self.step, prefix=c.name)
            if self.val_states is not None and (self.step % cfg.val_every == 0 or self.step == cfg.n_steps):
                for c, learner in self.learners.items():
                    states = self.val_states[c].to(self.device)
                    learner.log.val.append({"step": self.step, **evaluate(learner.sae, states, cfg.batch_size)})
                    wandb_log.log_row(run, learner.log.val[-1], self.step, prefix=c.name)
            if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(per_step)
        bar.close()
        if run is not None:
            run.finish()
        for learner in self.learners.values():
            learner.check_finite()
            learner.sae.eval()
            if self.step >= cfg.n_steps:
                learner.sae.cfg.metadata.update(train_steps=self.step)
        if self.out_dir is not None:
            self.save_checkpoint()
            if self.step >= cfg.n_steps and self.writer:
                for cell, learner in self.learners.items():
                    save_sae(learner.sae, os.path.join(self.out_dir, cell.name))
                    write_json(os.path.join(self.out_dir, cell.name, "train_log.json"), asdict(learner.log))
        return self.saes


class SAETrainer(MultiCellTrainer):
    """Trains one SAE on one head of one matrix hook: :class:`MultiCellTrainer` with one cell, a ``[n_seq, pos]``
    token tensor whose last ``cfg.val_sequences`` sequences are held out for validation, and the one-stream
    draw (``draw="generator"``, :class:`~recurrent_lens.states.feeds.GeneratorFeed`). Checkpoints, resume,
    the saved SAE and ``train_log.json`` are those of :class:`MultiCellTrainer` under ``out_dir``.

    Example:
        >>> from recurrent_lens.sae import SAETrainer, TrainConfig
        >>> cfg = TrainConfig(n_steps=20, batch_size=8, n_features=64, k=4, buffer_size=16, progress=False)
        >>> sae, log = SAETrainer(tiny_model, "blocks.0.mixer.hook_state", 0, tiny_tokens, cfg).train()
        >>> len(log.train) > 0
        True
    """

    def __init__(self, model: Any, hook_name: str, head: int, tokens: Int[Tensor, "n_seq pos"],
                 cfg: TrainConfig | None = None, sae: SAE | None = None, *, out_dir: str | None = None) -> None:
        self.cell = parse_cell(model, hook_name, head)
        super().__init__(model, [self.cell], tokens, cfg, out_dir=out_dir,
                         saes=None if sae is None else {self.cell: sae}, distributed=None, draw="generator")

    @property
    def learner(self) -> Learner:
        return self.learners[self.cell]

    @property
    def sae(self) -> SAE:
        return self.learner.sae

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def log(self) -> TrainLog:
        return self.learner.log

    def train(self, until_step: int | None = None) -> tuple[SAE, TrainLog]:
        """Run (or continue) training up to ``cfg.n_steps``, or stop early at ``until_step`` (see
        :meth:`MultiCellTrainer.train`); returns the SAE and its log."""
        super().train(until_step)
        return self.sae, self.log

    @classmethod
    def from_checkpoint(cls, model: Any, tokens: Int[Tensor, "n_seq pos"], path: str,
                        cfg: TrainConfig | None = None) -> SAETrainer:
        """The trainer whose checkpoints lie in the directory ``path``, continuing where it stopped.

        The model must be the one the run started from, and ``tokens`` the sequences it started with; anything
        else is refused. ``cfg`` defaults to the run's own settings.

        Example:
            >>> import tempfile
            >>> from recurrent_lens.sae import SAETrainer, TrainConfig
            >>> cfg = TrainConfig(n_steps=10, batch_size=8, n_features=32, k=4, buffer_size=16, progress=False)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     _ = SAETrainer(tiny_model, "blocks.0.mixer.hook_state", 0, tiny_tokens, cfg, out_dir=d).train(5)
            ...     SAETrainer.from_checkpoint(tiny_model, tiny_tokens, d).step
            5
        """
        file = os.path.join(path, MANIFEST)
        try:
            with open(file) as f:
                manifest = json.load(f)
            (cell_name,) = manifest["cells"]
            known = {f.name for f in fields(TrainConfig)}  # a setting an earlier version had and dropped is no setting
            recorded = TrainConfig(**{k: v for k, v in manifest["train_config"].items() if k in known})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"path: expected a directory holding one SAE's training checkpoint ({MANIFEST}), "
                             f"cannot read {file} ({type(e).__name__}: {e})") from e
        cell = Cell.from_name(cell_name)
        return cls(model, cell.hook_name, cell.head, tokens, cfg or recorded, out_dir=path)


def train(model: Any, hook_name: str, head: int, tokens: Int[Tensor, "n_seq pos"], cfg: TrainConfig | None = None,
          sae: SAE | None = None, *, out_dir: str | None = None) -> tuple[SAE, TrainLog]:
    """Train an SAE on head ``head`` of ``hook_name`` (see :class:`SAETrainer`); builds ``cfg.architecture``
    unless ``sae`` is given, and writes checkpoints, the SAE and its log under ``out_dir`` if given.

    Example:
        >>> from recurrent_lens.sae import train, TrainConfig
        >>> sae, log = train(tiny_model, "blocks.0.mixer.hook_state", 1, tiny_tokens,
        ...                  TrainConfig(n_steps=10, batch_size=8, n_features=64, k=4, buffer_size=16, progress=False))
        >>> sae
        WriteSAE(d_k=8, d_v=8, n_features=64, encoder=bilinear, decoder=rank-1, sparsity=topk(k=4), centred, hook_name='blocks.0.mixer.hook_state', head=1)
    """
    return SAETrainer(model, hook_name, head, tokens, cfg, sae=sae, out_dir=out_dir).train()


def train_cells(model: Any, cells: Iterable[Cell | tuple[str, int]], data: Any, cfg: TrainConfig | None = None,
                **kwargs: Any) -> dict[Cell, SAE]:
    """Train one SAE per cell from shared model passes; see :class:`MultiCellTrainer` for the arguments.

    Example:
        >>> from recurrent_lens.sae import TrainConfig
        >>> saes = train_cells(tiny_model, [("blocks.0.mixer.hook_state", h) for h in range(2)], tiny_tokens,
        ...                    TrainConfig(n_steps=5, batch_size=8, n_features=16, k=2, buffer_size=16, progress=False))
        >>> sorted(c.name for c in saes)
        ['blocks.0.mixer.hook_state.h0', 'blocks.0.mixer.hook_state.h1']
    """
    return MultiCellTrainer(model, cells, data, cfg, **kwargs).train()
