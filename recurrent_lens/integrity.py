"""What a resumed run checks before it continues, and the error a run stops with when its numbers go bad.

Identity of a run's inputs, recorded when a store or a training run starts and compared on every resume:

- the **weights** (:func:`weights_fingerprint`): a digest of every parameter's and buffer's bytes as they are
  in memory (one SHA-256 pass over every weight's bytes when a run starts, so its cost grows with the model),
  so an edit made after loading, or a change anywhere in a weight file, is seen; for a model loaded from a
  checkpoint directory also a digest of its weight files in sorted name order (:func:`file_digest`: size,
  safetensors header and content — all of it for a file up to 64 MiB, else the header plus 16 evenly spaced
  1 MiB blocks of the data), which names the files as the source that differs. Neither depends on where the
  checkpoint lies: ``./ck``, its absolute path and a copy elsewhere are the same weights.
- the **data** (:func:`source_fingerprint`): for a file or directory source, a digest of its bytes (as
  above, per file) and every setting that shapes its windows (see
  :meth:`recurrent_lens.data.TokenSource.fingerprint`); for a token tensor, a digest of all of it.
  Streams without a file behind them are identified by the sequences themselves (a chain of
  :func:`sequence_chain` digests, one per sequence consumed).

A mismatch raises :class:`ResumeMismatchError` naming the part (weights, data or settings), the recorded
and the current value, and how to start afresh. A run recorded by an older recurrent_lens that lacked a field
is refused, naming the field.

Example:
    >>> import torch
    >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
    >>> cfg = ModelConfig(architecture="gla", d_model=16, n_layers=1, d_vocab=20, n_heads=2, d_k=4, d_v=4)
    >>> a, b = (HookedRecurrentModel.from_config(cfg, seed=s) for s in (0, 1))
    >>> weights_fingerprint(a) == weights_fingerprint(a), weights_fingerprint(a) == weights_fingerprint(b)
    (True, False)
    >>> first_nonfinite(torch.tensor([[1.0, 2.0], [3.0, float("inf")], [float("nan"), 0.0]]))
    1
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["NonFiniteError", "DivergedError", "ResumeMismatchError", "weights_fingerprint", "source_fingerprint",
           "file_digest", "path_digest", "tensor_digest", "sequence_chain", "first_nonfinite", "check_same",
           "refuse_unchecked"]

_FULL_BYTES = 64 * 2**20
_BLOCK_BYTES = 2**20
_N_BLOCKS = 16


class NonFiniteError(RuntimeError):
    """A NaN or an infinity where a number was needed: in harvested or training states, a loss, gradients or
    weights. The message names where the first one appeared; nothing computed from it was saved."""


class DivergedError(NonFiniteError):
    """A training loss that stayed finite but grew past its bound (the run diverged as surely as with a NaN).
    A :class:`NonFiniteError`, so whatever stops on one stops on this too."""


class ResumeMismatchError(ValueError):
    """An output directory holds a run made from other weights, data or settings than the ones given now."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a file's size and content: all of it up to 64 MiB, else its safetensors header (if any)
    and 16 evenly spaced 1 MiB blocks of what follows, the first and the last included.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = open(os.path.join(d, "a"), "wb").write(b"abc")
        ...     file_digest(os.path.join(d, "a")) == file_digest(os.path.join(d, "a"))
        True
    """
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= _FULL_BYTES:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
            return h.hexdigest()
        data = 0
        if os.fspath(path).endswith(".safetensors"):
            data = min(size - _BLOCK_BYTES, 8 + int.from_bytes(f.read(8), "little"))
        span = size - _BLOCK_BYTES - data
        spans = [(0, data)] + [(data + span * i // (_N_BLOCKS - 1), _BLOCK_BYTES) for i in range(_N_BLOCKS)]
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """:func:`file_digest` of a file, or of every file under a directory with its relative name, in sorted order."""
    if not os.path.isdir(path):
        return file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + file_digest(full).encode())
    return h.hexdigest()


def tensor_digest(t: Tensor) -> str:
    """SHA-256 over a tensor's dtype, shape and bytes."""
    t = t.detach().reshape(-1).contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_sha256(model: Any) -> str | None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    # device and source do not change the numbers; everything else in the config might
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "source")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a model's weights (see the module docstring): its parameters and buffers, the checkpoint
    files too if the model was loaded from some (``model.checkpoint_files``), and its config.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> sorted(weights_fingerprint(model)), weights_fingerprint(model)["kind"]
        (['config_sha256', 'kind', 'sha256'], 'parameters')
    """
    params = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        params.update(name.encode() + b"\0" + tensor_digest(t).encode())
    files = getattr(model, "checkpoint_files", None)
    if not files:
        return {"kind": "parameters", "sha256": params.hexdigest(), "config_sha256": _config_sha256(model)}
    h = hashlib.sha256()
    for file in sorted(files, key=os.path.basename):
        h.update(os.path.basename(file).encode() + b"\0" + file_digest(file).encode())
    return {"kind": "checkpoint files", "sha256": h.hexdigest(), "parameters_sha256": params.hexdigest(),
            "config_sha256": _config_sha256(model)}


def source_fingerprint(data: Any) -> dict[str, Any] | None:
    """Identity of a training or harvesting source: a token tensor's digest, a file source's or a state
    store's own ``fingerprint()``; ``None`` for any other iterable (identified by its sequences instead)."""
    if isinstance(data, Tensor):
        # token ids compared as int64, so int32 and int64 copies of the same tokens are the same data
        ids = data if data.is_floating_point() else data.to(torch.int64)
        return {"kind": "tensor", "sha256": tensor_digest(ids)}
    if callable(getattr(data, "fingerprint", None)):
        return data.fingerprint()
    return None


def sequence_chain(previous: str, seq: Int[Tensor, " ctx"]) -> str:
    """The next link of a hash chain over token sequences: it identifies a whole prefix of a stream, in order.

    Example:
        >>> import torch
        >>> a = sequence_chain(sequence_chain("", torch.tensor([1, 2])), torch.tensor([3, 4]))
        >>> a == sequence_chain(sequence_chain("", torch.tensor([3, 4])), torch.tensor([1, 2]))
        False
    """
    ids = torch.as_tensor(seq).to(torch.int64).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(previous.encode() + ids).hexdigest()


def first_nonfinite(x: Float[Tensor, "n *rest"]) -> int | None:
    """Index of the first row of ``x`` holding a NaN or an infinity, ``None`` if all are finite (one
    ``isfinite(x).all()`` when they are)."""
    if bool(torch.isfinite(x).all()):
        return None
    return int((~torch.isfinite(x.reshape(len(x), -1)).all(1)).nonzero()[0, 0])


def _differences(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return [] if recorded == current else [f"recorded {recorded!r}, current {current!r}"]
    # where a file lies is shown, not compared: the same bytes elsewhere are the same weights or data
    keys = [k for k in dict.fromkeys([*current, *recorded]) if k != "path"]  # the fingerprint's own order
    return [f"{k}: not recorded (by an older recurrent_lens), current {current[k]!r}" if k not in recorded else
            f"{k}: recorded {recorded.get(k)!r}, current {current.get(k)!r}"
            for k in keys if recorded.get(k) != current.get(k)]


def check_same(part: str, recorded: Any, current: Any, where: str, what: str, arg: str = "out_dir") -> None:
    """Raise :class:`ResumeMismatchError` if ``recorded`` and ``current`` (identities of ``part``: ``"weights"``,
    ``"data"`` or ``"settings"``) differ; ``where`` is the output (the argument ``arg``), ``what`` names the
    run it holds."""
    diffs = _differences(recorded, current)
    if not diffs:
        return
    paths = ""
    if isinstance(recorded, dict) and isinstance(current, dict) and (recorded.get("path") or current.get("path")):
        paths = f" (recorded from {recorded.get('path')!r}, now {current.get('path')!r})"
    raise ResumeMismatchError(
        f"{arg}: {where!r} holds {what} made from other {part}{paths}: {'; '.join(diffs)}. Resume it with the "
        f"same {part}, or start afresh: use another output directory (--out) or delete {where!r}")


def refuse_unchecked(where: str, what: str, arg: str = "out_dir") -> ResumeMismatchError:
    """The error for a run recorded by a version that did not fingerprint its weights and data."""
    return ResumeMismatchError(
        f"{arg}: {where!r} holds {what} written by an older recurrent_lens that did not record the weights and "
        f"data it was made from, so resuming it cannot be checked. Start afresh: use another output directory "
        f"(--out) or delete {where!r}")
