"""File helpers shared by model loading, SAE files, training and the state store.

- :func:`read_safetensors_header` validates a safetensors header against the format and the file before
  any byte of data is trusted; :func:`read_safetensors` reads a whole (small) file through it. Model
  checkpoints, SAE weights and state-store shards all go through this one reader.
- :func:`atomic_write` creates a file under a temporary name and renames it into place, so a crash never
  leaves a half-written file under the final name; :func:`remove_stale_temporaries` clears what a killed
  writer left.
- :func:`check_writable` proves a directory writable before any work starts.
- :class:`DirectoryLock` makes one run at a time the writer of an output directory.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "w.safetensors")
    ...     atomic_write(path, lambda tmp: save_file({"w": torch.ones(2, 3)}, tmp))
    ...     with DirectoryLock(d, "out_dir"):
    ...         tensors = read_safetensors(path)
    ...     sorted(os.listdir(d)), tensors["w"].shape
    (['w.safetensors'], torch.Size([2, 3]))
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any, NamedTuple

import torch
from jaxtyping import Shaped
from torch import Tensor

__all__ = [
    "SafetensorsFormatError", "SafetensorsEntry", "SAFETENSORS_DTYPES", "read_safetensors_header",
    "read_safetensors_metadata", "read_safetensors", "require_finite", "atomic_write", "check_writable", "remove_stale_temporaries",
    "DirectoryLock", "DirectoryLockedError", "LOCK_NAME",
]


# ---------------------------------------------------------------------------------------------- safetensors
class SafetensorsFormatError(ValueError):
    """A safetensors file whose header does not describe its bytes; the message starts with the file's path."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtype codes this reader accepts, and the torch dtype of each."""

_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


class SafetensorsEntry(NamedTuple):
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, SafetensorsEntry]]:
    """Validate the header of safetensors file ``path`` against the format and the file's size; return
    where the data section starts and every tensor's entry.

    Refused, each with a :class:`SafetensorsFormatError` whose message starts with the file's path and
    names the tensor or field, the expected and the found: a header length that does not fit in the file
    or exceeds the format's limit, a header that is not a JSON object (or repeats a key), an entry lacking
    ``dtype``/``shape``/``data_offsets`` or holding values of the wrong type (negative offsets included),
    an unsupported dtype, a byte range whose length is not ``dtype`` x ``shape``, and byte ranges that
    overlap, leave gaps, or do not end exactly at the end of the file.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_file({"w": torch.zeros(2, 3), "b": torch.ones(3)}, f"{d}/w.safetensors")
        ...     data_start, entries = read_safetensors_header(f"{d}/w.safetensors")
        >>> entries["w"]
        SafetensorsEntry(dtype=torch.float32, shape=(2, 3), begin=12, end=36)
    """
    start, entries, _ = _read_header(path)
    return start, entries


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of safetensors file ``path`` (``{}`` if it has none), read only after its
    header has been validated as :func:`read_safetensors_header` does.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_file({"w": torch.zeros(2)}, f"{d}/w.safetensors", metadata={"steps": "7"})
        ...     read_safetensors_metadata(f"{d}/w.safetensors")
        {'steps': '7'}
    """
    return _read_header(path)[2]


def _read_header(path: str | os.PathLike) -> tuple[int, dict[str, SafetensorsEntry], dict[str, str]]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path} is corrupt or truncated: {size} bytes, fewer than the 8 of the "
                                         "header length")
        n = int.from_bytes(prefix, "little")
        if n == 0 or 8 + n > size:
            raise SafetensorsFormatError(f"{path} is corrupt or truncated: header length {n} does not fit in a "
                                         f"file of {size} bytes")
        if n > _MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"{path} is corrupt: header length {n} exceeds the format's limit of "
                                         f"{_MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{path} is corrupt: its header is not valid JSON with unique keys "
                                         f"({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header: expected a JSON object, got {type(header).__name__}")
    strings = header.pop("__metadata__", None)
    if strings is not None and not (isinstance(strings, dict) and all(isinstance(v, str) for v in strings.values())):
        raise SafetensorsFormatError(f"{path}: header field '__metadata__': expected an object of strings, "
                                     f"got {strings!r}")
    data_size = size - 8 - n
    entries = {}
    for key, e in header.items():
        if not isinstance(e, dict):
            raise SafetensorsFormatError(f"{path}: tensor {key!r}: expected an object with dtype, shape and "
                                         f"data_offsets, got {e!r}")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in e:
                raise SafetensorsFormatError(f"{path}: tensor {key!r} lacks the field {field!r}")
        if not isinstance(e["dtype"], str) or e["dtype"] not in SAFETENSORS_DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {key!r} has unsupported dtype {e['dtype']!r}; "
                                         f"supported: {sorted(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        shape = e["shape"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsFormatError(f"{path}: tensor {key!r} field 'shape': expected a list of non-negative "
                                         f"ints, got {shape!r}")
        offsets = e["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise SafetensorsFormatError(f"{path}: tensor {key!r} field 'data_offsets': expected [begin, end] with "
                                         f"0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise SafetensorsFormatError(f"{path} is truncated: tensor {key!r} ends at byte {8 + n + end}, the "
                                         f"file has {size}")
        need = math.prod(shape) * dtype.itemsize
        if end - begin != need:
            raise SafetensorsFormatError(f"{path}: tensor {key!r} holds {end - begin} bytes (data_offsets "
                                         f"{offsets}), its shape {shape} and dtype {e['dtype']} need {need}")
        entries[key] = SafetensorsEntry(dtype, tuple(shape), begin, end)
    # the tensors must tile the data section exactly, as the format requires: a gap or an overlap means
    # the offsets do not describe the bytes that were written
    pos, prev = 0, None
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != pos:
            what = "overlaps" if e.begin < pos else f"leaves {e.begin - pos} unused bytes after"
            raise SafetensorsFormatError(f"{path}: tensor {key!r} (data_offsets [{e.begin}, {e.end}]) {what} "
                                         + (f"tensor {prev!r}" if prev is not None else "the start of the data"))
        pos, prev = e.end, key
    if pos != data_size:
        raise SafetensorsFormatError(f"{path}: {data_size - pos} bytes after the last tensor belong to no tensor "
                                     "(a corrupt header or a file with trailing data)")
    return 8 + n, entries, dict(strings or {})


def read_safetensors(path: str | os.PathLike) -> dict[str, Shaped[Tensor, "..."]]:
    """Every tensor of safetensors file ``path`` on the CPU, read after :func:`read_safetensors_header`
    has validated the header (its errors are :class:`SafetensorsFormatError`).

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_file({"b": torch.arange(3)}, f"{d}/b.safetensors")
        ...     read_safetensors(f"{d}/b.safetensors")
        {'b': tensor([0, 1, 2])}
    """
    start, entries = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for key, e in entries.items():
            tensor = torch.empty(e.shape, dtype=e.dtype)
            raw = tensor.reshape(-1).view(torch.uint8)
            f.seek(start + e.begin)
            if f.readinto(raw.numpy()) != raw.numel():
                raise SafetensorsFormatError(f"{path} is truncated inside tensor {key!r}")
            tensors[key] = tensor
    return tensors


def require_finite(tensors: dict[str, Tensor], source: str, *, minus_inf_ok: Collection[str] = ()) -> None:
    """Refuse (``ValueError`` naming ``source`` and the tensor) floating-point tensors holding NaN or Inf;
    the tensors named in ``minus_inf_ok`` may hold ``-inf`` (a log-threshold of 0).

    Example:
        >>> require_finite({"W_dec": torch.tensor([1.0, float("nan")])}, "sae_weights.safetensors")
        Traceback (most recent call last):
        ...
        ValueError: sae_weights.safetensors: tensor 'W_dec': expected finite values, got 1 NaN and 0 Inf of 2
    """
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if name in minus_inf_ok:
            bad &= t != -math.inf
        if bool(bad.any()):
            nan, inf = int(torch.isnan(t).sum()), int((bad & torch.isinf(t)).sum())
            what = "finite values or -inf" if name in minus_inf_ok else "finite values"
            raise ValueError(f"{source}: tensor {name!r}: expected {what}, got {nan} NaN and {inf} Inf of {t.numel()}")


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file beside it and renaming it into place,
    so that a crash never leaves a partial file (the temporary file is removed on any error). An
    ``OSError`` is raised again naming ``path``, with the same ``errno``; so is any other failure of
    ``write`` while the disk is full (``torch.save`` and safetensors report one in their own exceptions),
    as an ``OSError`` with ``errno.ENOSPC``.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_write(os.path.join(d, "a.txt"), lambda tmp: open(tmp, "w").write("done"))
        ...     os.listdir(d)
        ['a.txt']
    """
    directory = os.path.dirname(path) or "."
    # The temporary file keeps the target's extension: torch.save names its archive after the file's stem.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; saved weights are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException as e:
        # looked at before the partial file goes, since removing it frees space
        full = isinstance(e, Exception) and not isinstance(e, OSError) and _disk_full(directory, e)
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) or full:
            # the writer's own message names the temporary file at best, which is gone by now
            code, reason = (e.errno, e.strerror or str(e)) if isinstance(e, OSError) else (
                errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(e).__name__}: {e})")
            raise OSError(code, f"cannot write {path}: {reason} (its partial copy was removed and {path} left as "
                                f"it was)") from e
        raise


def _disk_full(directory: str, error: Exception) -> bool:
    """Whether ``error`` says the disk is full (safetensors does), or at most 1 MiB is left where ``directory``
    lies (``torch.save`` only says that its write fell short)."""
    if os.strerror(errno.ENOSPC) in str(error) or f"os error {errno.ENOSPC})" in str(error):
        return True
    try:
        return shutil.disk_usage(directory).free <= 1 << 20
    except OSError:
        return False


def check_writable(directory: str, what: str) -> None:
    """Create ``directory`` if needed and prove it writable now, before any work starts.

    Raises a ``ValueError`` naming ``what`` (the argument or option) when it cannot be written.

    Example:
        >>> check_writable("/proc/no-such-dir", "--out")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --out: cannot write to '/proc/no-such-dir' (...)
    """
    try:
        os.makedirs(directory, exist_ok=True)
        # not ".tmp-": another process clearing stale temporaries in the same directory must not take it
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write to {directory!r} ({type(e).__name__}: {e})") from e


def remove_stale_temporaries(directory: str) -> None:
    """Delete ``.tmp-*`` files that a killed writer (see :func:`atomic_write`) left behind in ``directory``.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     open(os.path.join(d, ".tmp-x.pt"), "w").close()
        ...     remove_stale_temporaries(d)
        ...     os.listdir(d)
        []
    """
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(directory, name))


# ---------------------------------------------------------------------------------------------- locking
LOCK_NAME = ".recurrent-lens.lock"
"""The lock file :class:`DirectoryLock` creates in the directory it locks."""


class DirectoryLockedError(ValueError):
    """Another live run holds the lock of the output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_holder(path: str) -> dict[str, Any] | None:
    """The lock file's ``{pid, host, started}``; ``None`` while it is empty or malformed (a writer may be
    between creating it and writing it, so a few reads are tried)."""
    for attempt in range(5):
        try:
            with open(path) as f:
                holder = json.load(f)
            if isinstance(holder, dict) and type(holder.get("pid")) is int and isinstance(holder.get("host"), str):
                return holder
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.05 * (attempt + 1))
    return None


class DirectoryLock:
    """An exclusive lock on an output directory, so that one run at a time writes it.

    :meth:`acquire` creates ``directory/.recurrent-lens.lock`` with ``O_CREAT | O_EXCL`` (atomic, also on
    NFS) holding the pid, host name and start time. A lock left by a process that is no longer running on
    this host is taken over with a ``RuntimeWarning`` saying so; a live holder (or one on another host,
    whose pid cannot be checked) raises :class:`DirectoryLockedError` naming the directory, the holder
    and how to proceed. :meth:`release` deletes the file if this lock still holds it; the context manager
    releases on exit, exceptions included.

    Args:
        directory: the directory to lock (created if missing).
        what: the argument or option that named it, for the error messages.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with DirectoryLock(d, "--out"):
        ...         try:
        ...             DirectoryLock(d, "--out").acquire()
        ...         except DirectoryLockedError as e:
        ...             print(str(e).split(":")[0], "is locked")
        --out is locked
    """

    def __init__(self, directory: str | os.PathLike, what: str = "out_dir") -> None:
        self.directory = os.fspath(directory)
        self.what = what
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._held: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock (see the class docstring); returns ``self``."""
        if self._held is not None:
            return self
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.what}: cannot create {self.directory!r} as a directory ({e})") from e
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    self._take_over_if_stale(me)
                except FileNotFoundError:  # its holder released it meanwhile
                    pass
                continue
            except OSError as e:
                raise ValueError(f"{self.what}: cannot create the lock file {self.path!r} "
                                 f"({type(e).__name__}: {e})") from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = me
            return self
        raise DirectoryLockedError(f"{self.what}: {self.directory!r}: could not take the lock {self.path} after 10 "
                                   "tries (other runs keep taking it); run one at a time")

    def _take_over_if_stale(self, me: dict[str, Any]) -> None:
        holder = _read_holder(self.path)
        if holder is None:
            raise DirectoryLockedError(
                f"{self.what}: {self.directory!r} holds the lock file {self.path} with no readable pid, host and "
                "start time; if no other run uses this directory, delete that file and retry")
        pid, host, started = holder["pid"], holder["host"], holder.get("started", "?")
        if host != me["host"] or _pid_alive(pid):
            where = "this host" if host == me["host"] else f"host {host!r} (this is {me['host']!r})"
            raise DirectoryLockedError(
                f"{self.what}: {self.directory!r} is in use by another run: pid {pid} on {where}, started {started} "
                f"(lock file {self.path}). Wait for it to finish or stop it, or choose another directory; if that "
                f"process is gone, delete {self.path} and retry")
        # Move the stale file aside before deleting it: if another process took it over first, what was
        # moved is that process's fresh lock, which goes back.
        aside = f"{self.path}.stale-{me['pid']}"
        os.rename(self.path, aside)
        moved = _read_holder(aside)
        if moved != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        warnings.warn(f"{self.what}: took over the stale lock {self.path} of pid {pid} on {host} (started "
                      f"{started}): that process is no longer running, so its run was interrupted",
                      RuntimeWarning, stacklevel=4)

    def release(self) -> None:
        """Delete the lock file if this object holds it (a no-op otherwise)."""
        if self._held is None:
            return
        try:
            with open(self.path) as f:
                ours = json.load(f) == self._held
        except (OSError, ValueError):
            ours = False
        if ours:
            os.remove(self.path)
        self._held = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirectoryLock({self.directory!r}, held={self.held})"
