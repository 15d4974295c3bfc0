"""A state store on disk: harvest a model's per-step matrices once, train many SAEs on them.

:func:`harvest_to_store` runs token sequences through a model and writes each cell's ``d_k x d_v``
matrices at sampled positions to a directory; :class:`StateStore` reads them back by index or as
deterministic, rank-sliced training batches.

Layout (``version`` 1)::

    out_dir/manifest.json
    out_dir/{cell.name}/shard_00000.safetensors   # states [N, d_k, d_v], seq_index [N], position [N]
    out_dir/{cell.name}/shard_00001.safetensors
    ...

Every cell holds the same states' provenance: row ``j`` of every cell's shard ``k`` comes from the same
``(seq_index, position)``. Sequence ``i`` of the source gets the positions
``sample_positions([i], context_length, positions_per_seq, skip=skip_positions, seed=seed)``, whatever the
batching and wherever a run was interrupted.

A batch whose states hold a NaN or an infinity (in the storage dtype: a float16 store refuses states that
overflow it) is never stored: :class:`~recurrent_lens.integrity.NonFiniteError` names the layer, head,
sequence and position of the first.

Crash safety: states of sequences harvested since the last flush live in memory; a flush (at a batch
boundary, once ``shard_size`` states have accumulated, and at the end) writes every cell's shard file,
then rewrites the manifest; both are written to a temporary name and renamed. The manifest only names
complete files and records ``sequences_done``, the number of leading source sequences stored, with
``sequences_sha256``, a hash chain over those sequences' token ids. Calling :func:`harvest_to_store` again on
the same ``out_dir`` checks that the weights, the data source and the settings match (see
:mod:`recurrent_lens.integrity`; the manifest records all three) and that the source's first
``sequences_done`` sequences hash to ``sequences_sha256``, deletes shard and
temporary files that the manifest does not name, skips ``sequences_done`` sequences of the source and
continues, so every sequence is stored exactly once. One process writes a store at a time: a harvest
locks ``out_dir`` (:class:`~recurrent_lens.states.files.DirectoryLock`) and a second harvest on it is
refused at once, naming the process that holds it. A store written before the weights and data were
recorded cannot be checked: resuming it is refused (it still opens for reading). Every shard's safetensors
header is validated when the store opens (byte ranges inside the file, neither overlapping nor leaving gaps,
sized dtype x shape), so a corrupt shard is refused rather than read as states or provenance.

:class:`StateStore` also opens the reference WriteSAE layout, ``layer_{L}/head_{H}.npy`` arrays of shape
``(N, d_k, d_v)`` (float16 or float32, no manifest). The reference stores recurrent states ``S_t`` (one
end-of-sequence state per sequence), so these files map to the cells ``blocks.{L}.mixer.hook_state``
head ``H``; their provenance is unknown.

Example:
    >>> import tempfile, torch
    >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
    >>> from recurrent_lens.states.store import StateStore, harvest_to_store
    >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
    ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
    >>> tokens = torch.randint(0, 20, (6, 12))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = harvest_to_store(model, [("blocks.1.mixer.hook_state", 0)], tokens, d,
    ...                              positions_per_seq=3, batch_size=4, progress=False)
    ...     cell = store.cells[0]
    ...     print(store.count(cell), tuple(store.read(cell, torch.tensor([0, 17])).shape))
    ...     print([tuple(b.shape) for b in store.iter_batches(cell, 8, epochs=1)])
    18 (2, 4, 4)
    [(8, 4, 4), (8, 4, 4)]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.data import TokenSource
from recurrent_lens.integrity import (
    NonFiniteError, check_same, first_nonfinite, path_digest, refuse_unchecked, sequence_chain, source_fingerprint,
    weights_fingerprint,
)
from recurrent_lens.states.cells import Cell, parse_cells, sample_positions, seeded_generator
from recurrent_lens.states.harvest import harvest_cells
from recurrent_lens.states.files import (
    LOCK_NAME, SAFETENSORS_DTYPES, DirectoryLock, SafetensorsFormatError, atomic_write, read_safetensors_header,
)

__all__ = ["StateStore", "harvest_to_store", "FORMAT_VERSION", "MANIFEST_NAME"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_FORMAT = "recurrent_lens.state_store"
_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype code -> (numpy dtype of the raw bytes, torch dtype they are viewed as)
_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64)}
_ST_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SHARD_RE = re.compile(r"shard_\d{5}\.safetensors")


# ---------------------------------------------------------------------------------------------- harvesting
def harvest_to_store(model, cells: Iterable[Cell | tuple[str, int]],
                     tokens: Int[Tensor, "n_seq ctx"] | Iterable[Tensor], out_dir: str | os.PathLike, *,
                     positions_per_seq: int = 16, skip_positions: int = 0, batch_size: int = 8,
                     shard_size: int = 65536, dtype: str = "float32", seed: int = 0,
                     max_sequences: int | None = None, progress: bool = True,
                     model_name: str | None = None) -> StateStore:
    """Harvest ``cells`` of ``model`` over ``tokens`` into a resumable store at ``out_dir``.

    Batches of ``batch_size`` sequences go through one :func:`~recurrent_lens.states.cells.harvest_cells` pass
    each (under ``torch.no_grad``); sequence ``i`` of the source contributes its states at
    ``sample_positions([i], ctx, positions_per_seq, skip=skip_positions, seed=seed)``. Once ``shard_size``
    states per cell have accumulated (checked at batch boundaries, so a shard holds between ``shard_size``
    and ``shard_size + batch_size·positions_per_seq - 1`` states), every cell's shard is written, then the
    manifest. Host memory holds up to that many states for every cell at once: lower ``shard_size`` when
    harvesting many cells of large states. If ``out_dir`` already holds a store, the settings must match
    it and harvesting resumes after its ``sequences_done`` sequences (see the module docstring).

    Everything is checked before any model work: ``dtype``, the cells, the first sequence of the source
    (none at all is an error), the position policy, ``out_dir`` (created if missing; it must be writable,
    not locked by another live harvest, and either empty or a store made with the same settings). The lock
    is released when this returns or raises.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        cells: ``Cell`` or ``(hook_name, head)`` pairs of recurrent layers' ``hook_state``/``hook_write``.
        tokens: a ``[n_seq, ctx]`` integer tensor, or any iterable of 1-D integer tensors of one length ``ctx``.
        out_dir: the store's directory.
        positions_per_seq: positions sampled per sequence (all ``ctx - skip_positions`` if fewer).
        skip_positions: positions ``[0, skip_positions)`` are never sampled.
        batch_size: sequences per model pass.
        shard_size: states per shard file and cell, roughly (see above).
        dtype: storage dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: seeds the positions of every sequence.
        max_sequences: stop after this many source sequences (counted from the start of the source).
        progress: show a progress bar.
        model_name: recorded in the manifest (a path made absolute); defaults to ``model.cfg.source``. It is
            a label: a resume compares the weights themselves.

    Returns:
        The finished store, opened as a :class:`StateStore`.

    Raises:
        NonFiniteError: a harvested state holds a NaN or an infinity, or overflows ``dtype`` (nothing of its
            batch is stored; :class:`~recurrent_lens.integrity.NonFiniteError`).
        ResumeMismatchError: ``out_dir`` holds a store of other weights, data or settings
            (:class:`~recurrent_lens.integrity.ResumeMismatchError`, a ``ValueError``).

    Example:
        >>> import tempfile, torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> windows = (torch.randint(0, 20, (12,)) for _ in range(5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     store = harvest_to_store(model, [("blocks.0.mixer.hook_write", 1)], windows, d,
        ...                              positions_per_seq=2, shard_size=4, dtype="bfloat16", progress=False)
        ...     store.sequences_done, store.count("blocks.0.mixer.hook_write.h1"), store.dtype
        (5, 10, 'bfloat16')
    """
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
    _check_int("positions_per_seq", positions_per_seq, 1)
    _check_int("skip_positions", skip_positions, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("shard_size", shard_size, 1)
    _check_int("seed", seed, None)
    if max_sequences is not None:
        _check_int("max_sequences", max_sequences, 1)
    cells = parse_cells(model, cells)
    if isinstance(tokens, TokenSource):
        tokens.check(d_vocab=model.cfg.d_vocab)
    first, source, n_source = _open_source(tokens)
    ctx = int(first.shape[0])
    if skip_positions >= ctx:
        raise ValueError(f"skip_positions: sequences of length {ctx} leave no position after "
                         f"skip_positions={skip_positions}")
    per_seq = sample_positions([0], ctx, positions_per_seq, skip=skip_positions, seed=seed).shape[1]
    cfg = model.cfg
    name = model_name if model_name is not None else cfg.source
    settings = {
        "model": {"name": _resolved(name), "architecture": cfg.architecture,
                  "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_k": cfg.d_k, "d_v": cfg.d_v,
                  "dtype": str(cfg.dtype), "config_sha256": _config_hash(cfg)},
        "positions": {"positions_per_seq": positions_per_seq, "skip_positions": skip_positions, "seed": seed,
                      "per_sequence": per_seq},
        "context_length": ctx,
        "dtype": dtype,
        "shard_size": shard_size,
        "weights": weights_fingerprint(model),
        # an in-memory source is identified by the chain of its stored sequences alone (sequences_sha256)
        "data": {"source": None if isinstance(tokens, Tensor) else source_fingerprint(tokens)},
    }
    out_dir = os.fspath(out_dir)
    with DirectoryLock(out_dir, "out_dir"):  # one writer at a time; released on any exit
        manifest = _prepare_out_dir(out_dir, settings, cells)

        done = manifest["sequences_done"]
        stop = math.inf if max_sequences is None else max_sequences
        source, chain = _skip(source, done, manifest["sequences_sha256"], out_dir)
        store_dtype = _STORE_DTYPES[dtype]
        pending: dict[Cell, list[Tensor]] = {c: [] for c in cells}
        pending_seq: list[Tensor] = []
        pending_pos: list[Tensor] = []
        n_pending = 0
        total = None if n_source is None else min(n_source, stop)
        index = done
        with torch.no_grad(), tqdm(total=total, initial=done, disable=not progress, desc="harvest", unit="seq") as bar:
            while index < stop:
                batch = list(itertools.islice(source, int(min(batch_size, stop - index))))
                if not batch:
                    break
                for j, seq in enumerate(batch):
                    _check_sequence(seq, index + j, ctx)
                    chain = sequence_chain(chain, seq)
                seq_index = torch.arange(index, index + len(batch))
                positions = sample_positions(seq_index, ctx, positions_per_seq, skip=skip_positions, seed=seed)
                got = harvest_cells(model, torch.stack([s.long() for s in batch]), positions, cells)
                expected = (len(batch) * per_seq, cfg.d_k, cfg.d_v)
                for c in cells:
                    if tuple(got[c].shape) != expected:
                        raise RuntimeError(f"{c.name}: harvested states of shape {tuple(got[c].shape)}, "
                                           f"expected {expected} from the model's d_k and d_v")
                    stored = got[c].to(dtype=store_dtype).cpu()
                    _check_finite(c, stored, got[c], seq_index, positions, dtype)
                    pending[c].append(stored)
                pending_seq.append(seq_index.repeat_interleave(per_seq))
                pending_pos.append(positions.reshape(-1).cpu())
                n_pending += len(batch) * per_seq
                index += len(batch)
                bar.update(len(batch))
                if n_pending >= shard_size:
                    manifest = _flush(out_dir, manifest, pending, pending_seq, pending_pos, index, chain)
                    n_pending = 0
            if n_pending:
                manifest = _flush(out_dir, manifest, pending, pending_seq, pending_pos, index, chain)
        manifest = dict(manifest, complete=True)
        _write_manifest(out_dir, manifest)
        return StateStore(out_dir)


def _check_finite(cell: Cell, stored: Tensor, harvested: Tensor, seq_index: Tensor, positions: Tensor,
                  dtype: str) -> None:
    """Refuse a batch holding a NaN or an infinity (in the storage dtype), naming the first one's origin."""
    row = first_nonfinite(stored)
    if row is None:
        return
    i, j = divmod(row, positions.shape[1])
    where = f"layer {cell.layer} ({cell.hook_name})"
    why = ("" if first_nonfinite(harvested[row : row + 1]) is not None else
           f" (finite as harvested, max |value| {float(harvested[row].abs().max()):.3g}, but it overflows {dtype})")
    raise NonFiniteError(f"{where}, head {cell.head}: non-finite state at sequence {int(seq_index[i])}, position "
                         f"{int(positions[i, j])}{why}; nothing of its batch was stored (the store holds only the "
                         f"sequences flushed before it)")


def _check_int(name: str, value: Any, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        expected = "an int" if low is None else f"an int >= {low}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _resolved(name: str | None) -> str | None:
    """A checkpoint path made absolute (``./ck`` and ``/abs/ck`` are one checkpoint); a hub id as is."""
    return os.path.realpath(name) if name is not None and os.path.exists(name) else name


def _config_hash(cfg: Any) -> str:
    # Device and source do not change the numbers; everything else in the config might.
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "source")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _open_source(tokens: Any) -> tuple[Tensor, Iterator[Tensor], int | None]:
    """The first sequence (checked), an iterator over the whole source from sequence 0, and its length if known."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected a [n_seq, ctx] integer tensor, got shape {tuple(tokens.shape)} "
                             f"and dtype {tokens.dtype}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens: expected at least one sequence of at least one token, got shape "
                             f"{tuple(tokens.shape)}")
        _check_sequence(tokens[0], 0, tokens.shape[1])
        return tokens[0], iter(tokens), tokens.shape[0]
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise ValueError(f"tokens: expected a [n_seq, ctx] tensor or an iterable of 1-D token tensors, "
                         f"got {type(tokens).__name__}")
    it = iter(tokens)
    first = next(it, None)
    if first is None:
        raise ValueError("tokens: the source yields no sequence; expected at least one")
    _check_sequence(first, 0, None)
    n = len(tokens) if hasattr(tokens, "__len__") else None
    return first, itertools.chain([first], it), n


def _check_sequence(seq: Any, index: int, ctx: int | None) -> None:
    """``ctx=None`` accepts any non-empty length (the first sequence sets the context length)."""
    ok = (isinstance(seq, Tensor) and seq.dim() == 1 and not seq.dtype.is_floating_point
          and not seq.dtype.is_complex and seq.dtype != torch.bool
          and (seq.shape[0] == ctx if ctx is not None else seq.shape[0] > 0))
    if not ok:
        got = (f"shape {tuple(seq.shape)} and dtype {seq.dtype}" if isinstance(seq, Tensor)
               else type(seq).__name__)
        want = "a non-empty" if ctx is None else f"a length-{ctx}"
        raise ValueError(f"tokens: sequence {index}: expected {want} 1-D integer tensor, got {got}")


def _skip(source: Iterator[Tensor], n: int, recorded: str, out_dir: str) -> tuple[Iterator[Tensor], str]:
    """The source after the ``n`` sequences already stored, and their hash chain, checked against ``recorded``."""
    chain, skipped = "", 0
    for seq in itertools.islice(source, n):
        chain = sequence_chain(chain, seq)
        skipped += 1
    if skipped < n:
        raise ValueError(f"tokens: the store already holds the first {n} sequences, but the source yields "
                         f"only {skipped}; expected the same source as the interrupted run")
    check_same("data", {"sequences_sha256": recorded}, {"sequences_sha256": chain}, out_dir,
               f"a state store whose first {n} sequences are not the source's first {n} (other data or order)")
    return source, chain


def _flat_settings(settings: dict[str, Any], cells: list[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    flat["cells"] = cells
    return flat


def _fingerprint(settings: dict[str, Any], cells: list[str]) -> str:
    return hashlib.sha256(json.dumps(_flat_settings(settings, cells), sort_keys=True).encode()).hexdigest()


def _settings_of(manifest: dict[str, Any]) -> dict[str, Any]:
    # stores written before weights and data were recorded have neither, and still open for reading
    keys = ("model", "positions", "context_length", "dtype", "shard_size", "weights", "data")
    return {key: manifest[key] for key in keys if key in manifest}


def _prepare_out_dir(out_dir: str, settings: dict[str, Any], cells: list[Cell]) -> dict[str, Any]:
    """Create or validate ``out_dir``; return the manifest to continue from (written already if new)."""
    names = [c.name for c in cells]
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        existing = StateStore(out_dir)
        manifest = existing.manifest
        if "weights" not in manifest or "data" not in manifest or "sequences_sha256" not in manifest:
            raise refuse_unchecked(out_dir, "a state store")
        check_same("weights", manifest["weights"], settings["weights"], out_dir, "a state store")
        check_same("data", manifest["data"]["source"], settings["data"]["source"], out_dir, "a state store")
        old = _flat_settings(_settings_of(manifest), [c["name"] for c in manifest["cells"]])
        new = _flat_settings(settings, names)
        # the name is a label: the weights, compared above, say whether it is the same checkpoint
        diffs = [f"{k}: the store has {old.get(k)!r}, this call {new[k]!r}" for k in new
                 if old.get(k) != new[k] and k != "model.name" and k.split(".")[0] not in ("weights", "data")]
        if diffs:
            raise ValueError(f"out_dir: {out_dir!r} holds a store made with other settings ("
                             + "; ".join(diffs) + "); resume with the same settings or use another out_dir")
        _remove_orphans(out_dir, manifest)
        return manifest
    try:
        os.makedirs(out_dir, exist_ok=True)
        leftovers = [f for f in os.listdir(out_dir) if not f.startswith(".tmp-") and f != LOCK_NAME]
    except OSError as e:
        raise ValueError(f"out_dir: cannot create {out_dir!r} as a directory ({e})") from e
    if leftovers:
        raise ValueError(f"out_dir: {out_dir!r} is not empty and holds no {MANIFEST_NAME}; expected an empty "
                         f"or new directory, or a store to resume (found {sorted(leftovers)[:5]})")
    manifest = dict(format=_FORMAT, version=FORMAT_VERSION, **settings,
                    cells=[{"name": c.name, "hook_name": c.hook_name, "head": c.head, "count": 0, "shards": []}
                           for c in cells],
                    sequences_done=0, sequences_sha256="", complete=False, fingerprint=_fingerprint(settings, names))
    try:
        _remove_orphans(out_dir, manifest)
        _write_manifest(out_dir, manifest)
        for c in cells:
            os.makedirs(os.path.join(out_dir, c.name), exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir: cannot write into {out_dir!r} ({e})") from e
    return manifest


def _remove_orphans(out_dir: str, manifest: dict[str, Any]) -> None:
    """Delete temporary files and shard files that the manifest does not name (left by an interrupted flush)."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(out_dir, name))
    for entry in manifest["cells"]:
        directory = os.path.join(out_dir, entry["name"])
        if not os.path.isdir(directory):
            continue
        named = {s["file"] for s in entry["shards"]}
        for name in os.listdir(directory):
            if name.startswith(".tmp-") or (_SHARD_RE.fullmatch(name) and name not in named):
                os.remove(os.path.join(directory, name))


def _write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)

    atomic_write(os.path.join(out_dir, MANIFEST_NAME), write)


def _flush(out_dir: str, manifest: dict[str, Any], pending: dict[Cell, list[Tensor]], pending_seq: list[Tensor],
           pending_pos: list[Tensor], sequences_done: int, chain: str) -> dict[str, Any]:
    """Write one shard per cell from the pending states, then the manifest naming them; empty the buffers."""
    seq_index = torch.cat(pending_seq).contiguous()
    position = torch.cat(pending_pos).contiguous()
    n = seq_index.shape[0]
    cells = []
    for entry in manifest["cells"]:
        cell = Cell(entry["hook_name"], entry["head"])
        file = f"shard_{len(entry['shards']):05d}.safetensors"
        tensors = {"states": torch.cat(pending[cell]).contiguous(), "seq_index": seq_index, "position": position}
        atomic_write(os.path.join(out_dir, cell.name, file),
                     lambda tmp, t=tensors, c=cell: save_file(t, tmp, metadata={"cell": c.name}))
        cells.append(dict(entry, count=entry["count"] + n, shards=[*entry["shards"], {"file": file, "count": n}]))
    new = dict(manifest, cells=cells, sequences_done=sequences_done, sequences_sha256=chain, complete=False)
    _write_manifest(out_dir, new)
    for states in pending.values():
        states.clear()
    pending_seq.clear()
    pending_pos.clear()
    return new


# ---------------------------------------------------------------------------------------------- reading
class _Shard:
    """One file of one cell: where its arrays lie, checked against the manifest when the store opens."""

    def __init__(self, path: str, count: int, arrays: dict[str, tuple[Any, int, tuple[int, ...]]] | None):
        self.path = path
        self.count = count
        self.arrays = arrays  # safetensors: name -> (numpy dtype, byte offset, shape); None for .npy

    def open(self, name: str) -> np.ndarray:
        if self.arrays is None:
            return np.load(self.path, mmap_mode="r")
        dt, offset, shape = self.arrays[name]
        return np.memmap(self.path, dtype=dt, mode="r", offset=offset, shape=shape)


def _open_safetensors_shard(path: str, count: int, dtype: str, d_k: int, d_v: int) -> _Shard:
    """A shard whose header is valid (see :func:`read_safetensors_header`) and holds exactly the three
    arrays the manifest implies."""
    try:
        start, entries = read_safetensors_header(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: shard file named in the manifest is missing") from e
    except (OSError, SafetensorsFormatError) as e:
        raise ValueError(f"{e}; the shard is truncated or corrupt") from e
    expected = {"states": (_ST_CODE[dtype], [count, d_k, d_v]), "seq_index": ("I64", [count]),
                "position": ("I64", [count])}
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise ValueError(f"{path}: expected the tensors {sorted(expected)}, it also holds {extra}")
    arrays = {}
    for name, (code, shape) in expected.items():
        e = entries.get(name)
        if e is None:
            raise ValueError(f"{path}: no tensor {name!r} (holds {sorted(entries)})")
        np_dtype, torch_dtype = _ST_DTYPES[code]
        if e.shape and e.shape[0] != count:
            raise ValueError(f"{path}: {name} holds {e.shape[0]} states, the manifest says {count}")
        if e.dtype != torch_dtype or list(e.shape) != shape:
            raise ValueError(f"{path}: {name}: expected dtype {code} and shape {shape}, "
                             f"got {_code_of(e.dtype)} and {list(e.shape)}")
        arrays[name] = (np_dtype, start + e.begin, tuple(shape))
    return _Shard(path, count, arrays)


def _code_of(dtype: torch.dtype) -> str:
    return next(code for code, t in SAFETENSORS_DTYPES.items() if t == dtype)


class StateStore:
    """A store of harvested states on disk, read lazily (memory-mapped, at most ``cache_shards`` files open).

    Opens a directory written by :func:`harvest_to_store` (``manifest.json``), or one in the reference
    WriteSAE layout ``layer_{L}/head_{H}.npy`` (cells ``blocks.{L}.mixer.hook_state`` head ``H``). Every
    shard named is checked when the store opens (present, with the manifest's count, dtype and shape).
    Reads return fp32 on the CPU.

    Example:
        >>> import os, tempfile, numpy as np, torch
        >>> from recurrent_lens.states.store import StateStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.makedirs(os.path.join(d, "layer_3"))
        ...     np.save(os.path.join(d, "layer_3", "head_1.npy"), np.ones((5, 4, 2), dtype=np.float16))
        ...     store = StateStore(d)
        ...     store.cells, store.count(store.cells[0]), store.read(store.cells[0], torch.tensor([4])).dtype
        ([Cell(hook_name='blocks.3.mixer.hook_state', head=1)], 5, torch.float32)
    """

    def __init__(self, path: str | os.PathLike, *, cache_shards: int = 2):
        self.path = os.fspath(path)
        _check_int("cache_shards", cache_shards, 1)
        self._cache: OrderedDict[tuple[Cell, int, str], np.ndarray] = OrderedDict()
        self._cache_shards = cache_shards
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"path: no store directory {self.path!r}")
        self.manifest: dict[str, Any] | None = None
        if os.path.isfile(os.path.join(self.path, MANIFEST_NAME)):
            self._open_native()
        else:
            self._open_reference()
        self._offsets = {c: torch.tensor([0] + list(itertools.accumulate(s.count for s in shards)))
                         for c, shards in self._shards.items()}

    # -------------------------------------------------------------------------------- opening
    def _open_native(self) -> None:
        path = os.path.join(self.path, MANIFEST_NAME)
        try:
            with open(path) as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from e
        if not isinstance(m, dict) or m.get("format") != _FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"{path}: not a state-store manifest (format {found!r}, expected {_FORMAT!r})")
        if m.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {m.get('version')!r}, this library reads version "
                             f"{FORMAT_VERSION}")
        try:
            self.dtype: str = m["dtype"]
            self.d_k: int = int(m["model"]["d_k"])
            self.d_v: int = int(m["model"]["d_v"])
            per_seq, done = int(m["positions"]["per_sequence"]), int(m["sequences_done"])
            entries = [(Cell(e["hook_name"], int(e["head"])), e["name"], int(e["count"]),
                        [(s["file"], int(s["count"])) for s in e["shards"]]) for e in m["cells"]]
            missing = [k for k in ("context_length", "shard_size", "complete", "fingerprint") if k not in m]
            if missing:
                raise KeyError(", ".join(missing))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
        if self.dtype not in _STORE_DTYPES:
            raise ValueError(f"{path}: dtype {self.dtype!r}, expected one of {sorted(_STORE_DTYPES)}")
        expected_fp = _fingerprint(_settings_of(m), [name for _, name, _, _ in entries])
        if m["fingerprint"] != expected_fp:
            raise ValueError(f"{path}: fingerprint does not match the recorded settings (edited by hand?)")
        self._shards: dict[Cell, list[_Shard]] = {}
        for cell, name, count, shards in entries:
            if name != cell.name:
                raise ValueError(f"{path}: cell name {name!r} does not match its hook_name and head ({cell.name!r})")
            if sum(c for _, c in shards) != count or count != done * per_seq:
                raise ValueError(f"{path}: {name}: count {count}, but its shards hold {sum(c for _, c in shards)} "
                                 f"and {done} sequences x {per_seq} positions make {done * per_seq}")
            self._shards[cell] = [_open_safetensors_shard(os.path.join(self.path, name, file), n, self.dtype,
                                                          self.d_k, self.d_v) for file, n in shards]
        self.manifest = m

    def _open_reference(self) -> None:
        found: dict[Cell, str] = {}
        for layer_dir in os.listdir(self.path):
            lm = re.fullmatch(r"layer_(\d+)", layer_dir)
            if lm is None or not os.path.isdir(os.path.join(self.path, layer_dir)):
                continue
            for file in os.listdir(os.path.join(self.path, layer_dir)):
                hm = re.fullmatch(r"head_(\d+)\.npy", file)
                if hm is not None:
                    cell = Cell(f"blocks.{int(lm.group(1))}.mixer.hook_state", int(hm.group(1)))
                    found[cell] = os.path.join(self.path, layer_dir, file)
        if not found:
            raise ValueError(f"path: {self.path!r} holds neither {MANIFEST_NAME} nor reference "
                             f"layer_{{L}}/head_{{H}}.npy files")
        self._shards = {}
        dims: tuple[int, int] | None = None
        dtypes = set()
        for cell in sorted(found, key=lambda c: (c.layer, c.head)):
            file = found[cell]
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"{file}: not a readable .npy array (truncated or corrupt?): {e}") from e
            if arr.ndim != 3 or arr.dtype not in (np.float16, np.float32):
                raise ValueError(f"{file}: expected a float16 or float32 array of shape (N, d_k, d_v), "
                                 f"got {arr.dtype} of shape {arr.shape}")
            if dims is not None and arr.shape[1:] != dims:
                raise ValueError(f"{file}: states of shape {arr.shape[1:]}, other heads have {dims}")
            dims = arr.shape[1:]
            dtypes.add(str(arr.dtype))
            self._shards[cell] = [_Shard(file, int(arr.shape[0]), None)]
            del arr
        self.d_k, self.d_v = int(dims[0]), int(dims[1])
        self.dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"

    # -------------------------------------------------------------------------------- properties
    @property
    def cells(self) -> list[Cell]:
        """The stored cells, in manifest order (reference layout: by layer, then head)."""
        return list(self._shards)

    @property
    def layout(self) -> str:
        """``"native"`` (a manifest) or ``"reference"`` (``layer_{L}/head_{H}.npy``)."""
        return "reference" if self.manifest is None else "native"

    @property
    def sequences_done(self) -> int | None:
        """Source sequences stored (``None`` in the reference layout)."""
        return None if self.manifest is None else self.manifest["sequences_done"]

    @property
    def complete(self) -> bool:
        """Whether harvesting ran to its end (the reference layout counts as complete)."""
        return True if self.manifest is None else bool(self.manifest["complete"])

    def count(self, cell: Cell | str | tuple[str, int]) -> int:
        """Number of states stored for ``cell`` (a :class:`Cell`, its name, or ``(hook_name, head)``)."""
        return int(self._offsets[self._cell(cell)][-1])

    def __repr__(self) -> str:
        counts = sorted({self.count(c) for c in self._shards})
        count = f"count={counts[0]}" if len(counts) == 1 else f"counts={counts[0]}..{counts[-1]}"
        return (f"StateStore({self.path!r}, layout={self.layout}, cells={len(self._shards)}, {count}, "
                f"d_k={self.d_k}, d_v={self.d_v}, dtype={self.dtype})")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the stored states, for a training run on them to check when it resumes: a native
        store's manifest (weights, data, settings, every shard and count; a store that grew since is
        another store), or the bytes of a reference layout's files. The resolved path is shown, not compared.

        Example:
            >>> import os, tempfile, numpy as np
            >>> with tempfile.TemporaryDirectory() as d:
            ...     os.makedirs(os.path.join(d, "layer_0"))
            ...     np.save(os.path.join(d, "layer_0", "head_0.npy"), np.zeros((4, 2, 2), dtype=np.float32))
            ...     sorted(StateStore(d).fingerprint())
            ['kind', 'path', 'sha256']
        """
        if self.manifest is None:
            digest = path_digest(self.path)
        else:
            digest = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        return {"kind": f"{self.layout} state store", "path": os.path.realpath(self.path), "sha256": digest}

    def _cell(self, cell: Any) -> Cell:
        if isinstance(cell, str):
            cell = Cell.from_name(cell)
        elif isinstance(cell, (tuple, list)) and len(cell) == 2 and not isinstance(cell, Cell):
            cell = Cell(*cell)
        if cell not in self._shards:
            names = [c.name for c in self._shards]
            shown = names if len(names) <= 8 else names[:8] + ["..."]
            raise ValueError(f"cell: expected one of the stored cells {shown}, got {cell!r}")
        return cell

    # -------------------------------------------------------------------------------- reading
    def _open(self, cell: Cell, k: int, name: str) -> np.ndarray:
        """Array ``name`` of shard ``k`` of ``cell``, memory-mapped; the ``cache_shards`` latest stay mapped."""
        key = (cell, k, name)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        array = self._shards[cell][k].open(name)
        self._cache[key] = array
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return array

    def _gather(self, cell: Any, index: Any, name: str) -> tuple[Cell, Tensor]:
        cell = self._cell(cell)
        if not isinstance(index, Tensor):
            index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index: expected a 1-D integer tensor, got shape {tuple(index.shape)} "
                             f"and dtype {index.dtype}")
        index = index.long().cpu()
        n = self.count(cell)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"index: expected values in [0, {n}) for {cell.name}, got min {int(index.min())} and "
                             f"max {int(index.max())}")
        offsets = self._offsets[cell]
        which = torch.searchsorted(offsets[1:], index, right=True)
        parts: list[tuple[Tensor, Tensor]] = []
        for k in torch.unique(which).tolist():
            rows = (which == k).nonzero().squeeze(1)
            arr = self._open(cell, k, name)
            data = np.ascontiguousarray(arr[(index[rows] - offsets[k]).numpy()])
            parts.append((rows, torch.from_numpy(data)))
        return cell, self._assemble(parts, index.shape[0], name)

    def _assemble(self, parts: list[tuple[Tensor, Tensor]], n: int, name: str) -> Tensor:
        if name == "states":
            out = torch.empty(n, self.d_k, self.d_v)
            for rows, data in parts:
                out[rows] = (data.view(torch.bfloat16) if self.dtype == "bfloat16" else data).float()
        else:
            out = torch.empty(n, dtype=torch.long)
            for rows, data in parts:
                out[rows] = data
        return out

    def read(self, cell: Cell | str | tuple[str, int], index: Int[Tensor, " n"]) -> Float[Tensor, "n d_k d_v"]:
        """The states at ``index`` (row numbers in ``[0, count(cell))``) as fp32, reading only the shards needed.

        Example:
            >>> import os, tempfile, numpy as np, torch
            >>> with tempfile.TemporaryDirectory() as d:
            ...     os.makedirs(os.path.join(d, "layer_0"))
            ...     np.save(os.path.join(d, "layer_0", "head_0.npy"), np.arange(12, dtype=np.float32).reshape(3, 2, 2))
            ...     StateStore(d).read("blocks.0.mixer.hook_state.h0", torch.tensor([2, 0]))[:, 0, 0]
            tensor([8., 0.])
        """
        return self._gather(cell, index, "states")[1]

    def provenance(self, cell: Cell | str | tuple[str, int],
                   index: Int[Tensor, " n"]) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
        """``(seq_index, position)`` of the states at ``index``: the source sequence and token position
        each came from. Only native stores record this.

        Example:
            >>> import tempfile, torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = harvest_to_store(model, [("blocks.0.mixer.hook_state", 0)], torch.randint(0, 20, (2, 8)),
            ...                              d, positions_per_seq=2, progress=False)
            ...     seq, pos = store.provenance(store.cells[0], torch.arange(4))
            ...     seq.tolist(), bool(torch.equal(pos, sample_positions([0, 1], 8, 2).reshape(-1)))
            ([0, 0, 1, 1], True)
        """
        if self.manifest is None:
            raise ValueError(f"provenance: the reference layout at {self.path!r} records no sequence or position")
        _, seq_index = self._gather(cell, index, "seq_index")
        _, position = self._gather(cell, index, "position")
        return seq_index, position

    # -------------------------------------------------------------------------------- batches
    def batches_per_epoch(self, cell: Cell | str | tuple[str, int], batch_size: int) -> int:
        """Global batches of ``batch_size`` per epoch: ``count // batch_size`` (the remainder is dropped).

        Example:
            >>> import os, tempfile, numpy as np
            >>> with tempfile.TemporaryDirectory() as d:
            ...     os.makedirs(os.path.join(d, "layer_0"))
            ...     np.save(os.path.join(d, "layer_0", "head_0.npy"), np.zeros((10, 2, 2), dtype=np.float32))
            ...     StateStore(d).batches_per_epoch("blocks.0.mixer.hook_state.h0", 4)
            2
        """
        _check_int("batch_size", batch_size, 1)
        n = self.count(cell)
        if n < batch_size:
            raise ValueError(f"batch_size: expected at most the {n} states stored for {self._cell(cell).name}, "
                             f"got {batch_size}")
        return n // batch_size

    def batch_indices(self, cell: Cell | str | tuple[str, int], batch_size: int, *, shuffle: bool = True,
                      seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                      epochs: int | None = None) -> Iterator[Int[Tensor, " local"]]:
        """Row numbers of the batches that :meth:`iter_batches` reads (same arguments).

        Example:
            >>> import os, tempfile, numpy as np
            >>> with tempfile.TemporaryDirectory() as d:
            ...     os.makedirs(os.path.join(d, "layer_0"))
            ...     np.save(os.path.join(d, "layer_0", "head_0.npy"), np.zeros((6, 2, 2), dtype=np.float32))
            ...     [b.tolist() for b in StateStore(d).batch_indices("blocks.0.mixer.hook_state.h0", 4, shuffle=False,
            ...                                                     rank=1, world_size=2, epochs=2)]
            [[2, 3], [2, 3]]
        """
        per_epoch = self.batches_per_epoch(cell, batch_size)
        _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}) (world_size), got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size: expected a multiple of world_size={world_size} (the global batch is "
                             f"split evenly over ranks), got {batch_size}")
        _check_int("start", start, 0)
        _check_int("seed", seed, None)
        if epochs is not None:
            _check_int("epochs", epochs, 1)
        n = self.count(cell)
        local = batch_size // world_size
        end = math.inf if epochs is None else epochs * per_epoch
        b, order, order_epoch = start, None, -1
        while b < end:
            epoch, j = divmod(b, per_epoch)
            if epoch != order_epoch:
                if shuffle:
                    order = torch.randperm(n, generator=seeded_generator(seed, epoch))
                else:
                    order = torch.arange(n)
                order_epoch = epoch
            lo = j * batch_size + rank * local
            yield order[lo:lo + local].clone()
            b += 1

    def iter_batches(self, cell: Cell | str | tuple[str, int], batch_size: int, *, shuffle: bool = True,
                     seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                     epochs: int | None = None) -> Iterator[Float[Tensor, "local d_k d_v"]]:
        """Training batches of one cell: this rank's ``batch_size // world_size`` states of each global batch.

        Epoch ``e`` visits the states in the order ``randperm(count)`` drawn from a generator seeded by
        ``(seed, e)`` (``0..count-1`` when ``shuffle=False``) and cuts it into ``count // batch_size`` global
        batches of ``batch_size`` (the rest is dropped); global batch ``b`` is epoch ``b // batches_per_epoch``.
        Rank ``r`` of ``world_size`` gets the contiguous slice ``[r·B/W, (r+1)·B/W)`` of every global batch,
        so the ranks of a data-parallel run together see exactly the batches of a one-process run.
        ``start`` skips that many global batches (resume); ``epochs=None`` never stops.

        Example:
            >>> import os, tempfile, numpy as np, torch
            >>> with tempfile.TemporaryDirectory() as d:
            ...     os.makedirs(os.path.join(d, "layer_0"))
            ...     np.save(os.path.join(d, "layer_0", "head_0.npy"), np.random.rand(8, 2, 2).astype(np.float32))
            ...     store = StateStore(d)
            ...     whole = next(store.iter_batches("blocks.0.mixer.hook_state.h0", 4, seed=1))
            ...     halves = [next(store.iter_batches("blocks.0.mixer.hook_state.h0", 4, seed=1, rank=r, world_size=2))
            ...               for r in range(2)]
            ...     bool(torch.equal(whole, torch.cat(halves)))
            True
        """
        cell = self._cell(cell)
        for index in self.batch_indices(cell, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                        world_size=world_size, start=start, epochs=epochs):
            yield self.read(cell, index)
