"""Streamed token sources: fixed-length windows of token ids from text or pre-tokenized files.

:func:`open_tokens` opens a source and returns a :class:`TokenSource`, an iterable that yields 1-D
``torch.long`` tensors of exactly ``context_length`` ids, always in the same order, reading the
corpus lazily (text line by line, dataset rows one at a time, arrays through a memory map) so that
corpora larger than memory stream through. :func:`batches` stacks the windows into ``[batch, ctx]``.

Sources, chosen from ``source``:

- ``*.txt``: one document per line, per paragraph (blank-line separated) or the whole file, as
  ``sample_by`` says (the names of ``datasets``' text loader);
- ``*.jsonl``: one JSON object per line, the document in its ``text_field``;
- a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose
  ``split`` is read), documents in the column ``text_field``;
- ``*.npy``, ``*.safetensors``, ``*.pt``: pre-tokenized ids shaped ``[n_seq, ctx]``, one window per
  row, yielded as stored;
- any other string that is not an existing path: a hub dataset id, streamed with
  ``datasets.load_dataset(id, split=split, streaming=True)``.

Text is tokenized with ``add_special_tokens=False``; documents are concatenated into one stream,
each followed by a separator (the tokenizer's EOS id, or its BOS id where it has no EOS), and the
stream is cut into consecutive windows; with BOS prepended a window is ``[bos]`` plus
``context_length - 1`` stream tokens. Empty and whitespace-only documents are skipped. The trailing
partial window is dropped (the usual convention; at most ``context_length - 1`` tokens are lost).

A tiny corpus with a word-level tokenizer that has an EOS token and no BOS:

>>> import tempfile
>>> from pathlib import Path
>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> from transformers import PreTrainedTokenizerFast
>>> vocab = {"<eos>": 0, "the": 1, "cat": 2, "sat": 3, "dog": 4, "ran": 5}
>>> core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
>>> core.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
>>> path = Path(tempfile.mkdtemp()) / "docs.txt"
>>> _ = path.write_text("the cat sat\\n\\nthe dog ran\\nthe cat\\n")
>>> source = open_tokens(path, tokenizer=tok, context_length=3)
>>> [window.tolist() for window in source]
[[1, 2, 3], [0, 1, 4], [5, 0, 1]]
>>> [window.tolist() for window in open_tokens(path, tokenizer=tok, context_length=3, rank=1, world_size=2)]
[[0, 1, 4]]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import datasets
import numpy as np
import torch
from jaxtyping import Int
from safetensors import safe_open
from torch import Tensor

from recurrent_lens.integrity import path_digest

__all__ = ["TokenSource", "TextSource", "PreTokenizedSource", "open_tokens", "batches"]

_TEXT_SUFFIXES = (".txt", ".jsonl")
SampleBy = Literal["line", "paragraph", "document"]
_TOKEN_SUFFIXES = (".npy", ".safetensors", ".pt")
_SAFETENSORS_INTEGER_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
_TOKEN_KEYS = ("input_ids", "tokens")
# documents tokenized per call: the fast tokenizers work on a list in parallel, and 64 lines ahead
# is still a negligible read-ahead for a streamed corpus
_DOC_BATCH = 64
_CHECK_ROWS = 4096
"""Rows of a pre-tokenized file read at once by :meth:`PreTokenizedSource.check`."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_selection(rank: int, world_size: int, skip: int, max_sequences: int | None) -> None:
    _check_int("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
    _check_int("skip", skip, 0)
    if max_sequences is not None:
        _check_int("max_sequences", max_sequences, 1)


class TokenSource:
    """Deterministic stream of ``context_length``-id windows (1-D ``torch.long`` tensors).

    Built by :func:`open_tokens`. Every ``iter()`` starts again from the beginning and yields the
    same windows in the same order. Of the full stream of windows ``w_0, w_1, ...`` shard ``rank`` of
    ``world_size`` owns ``w_rank, w_{rank + world_size}, ...``; of those it skips the first ``skip``
    (to resume) and stops after ``max_sequences``. A shard that runs out early yields fewer windows
    (nothing when ``skip`` is past its end); ranks of one stream can therefore differ by one window.

    ``n_sequences`` is the number of windows ``iter()`` yields where that is known without reading the
    corpus (pre-tokenized files, which also support ``len()``), else ``None``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "ids.npy"
    >>> np.save(path, np.arange(12).reshape(4, 3))
    >>> source = open_tokens(path, world_size=2, rank=1)
    >>> source.n_sequences, [window.tolist() for window in source]
    (2, [[3, 4, 5], [9, 10, 11]])
    """

    kind: str = ""

    def __init__(self, path: str, context_length: int | None, *, rank: int, world_size: int, skip: int,
                 max_sequences: int | None) -> None:
        _check_selection(rank, world_size, skip, max_sequences)
        if context_length is not None:
            _check_int("context_length", context_length, 1)
        self.path = path
        self.context_length = context_length
        self.rank = rank
        self.world_size = world_size
        self.skip = skip
        self.max_sequences = max_sequences
        # the d_vocab values check() passed: a trainer checks again what the command line checked already
        self._checked: set[int | None] = set()

    @property
    def n_sequences(self) -> int | None:
        return None

    def _selection(self) -> tuple[int, int, int | None]:
        """First global window index, stride, and the global index to stop before (None: the end)."""
        first = self.rank + self.skip * self.world_size
        stop = None if self.max_sequences is None else first + self.max_sequences * self.world_size
        return first, self.world_size, stop

    def _windows(self, first: int, step: int, stop: int | None) -> Iterator[Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Int[Tensor, " ctx"]]:
        return self._windows(*self._selection())

    def check(self, d_vocab: int | None = None) -> None:
        """Read this shard once, before any work, and raise the error that iterating would raise later.

        Text files are decoded and parsed line by line (without tokenizing); pre-tokenized rows are checked
        to hold ids in ``[0, d_vocab)`` (``>= 0`` without ``d_vocab``). ``datasets`` sources are not read.

        Example:
            >>> import tempfile
            >>> from pathlib import Path
            >>> path = Path(tempfile.mkdtemp()) / "ids.npy"
            >>> np.save(path, np.array([[1, 2], [3, 70]]))
            >>> open_tokens(path).check(d_vocab=50)
            Traceback (most recent call last):
            ...
            ValueError: npy '...ids.npy', row 1: expected token ids in [0, 50) (d_vocab), got 70
        """

    def _extra_repr(self) -> str:
        return ""

    def _settings(self) -> dict[str, Any]:
        return {}

    def _corpus(self) -> str | None:
        """The file or directory the windows are read from (``None``: not on this disk)."""
        return self.path if os.path.exists(self.path) else None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this stream's windows, for a resumed run to check: the corpus (its resolved path,
        shown only, and a digest of its bytes, see :func:`recurrent_lens.integrity.path_digest`; a hub
        dataset has only its id) and every setting that shapes or selects the windows. The shard's
        ``rank`` is left out: the ranks of one run read one stream.

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "ids.npy"
        >>> np.save(path, np.arange(12).reshape(4, 3))
        >>> a = open_tokens(path).fingerprint()
        >>> a == open_tokens(path, rank=0).fingerprint(), a == open_tokens(path, skip=1).fingerprint()
        (True, False)
        """
        corpus = self._corpus()
        return {"kind": self.kind, "path": self.path if corpus is None else os.path.realpath(corpus),
                "content": None if corpus is None else path_digest(corpus), "context_length": self.context_length,
                "world_size": self.world_size, "skip": self.skip, "max_sequences": self.max_sequences,
                **self._settings()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, path={self.path!r}, "
                f"context_length={self.context_length}{self._extra_repr()}, shard={self.rank}/{self.world_size}, "
                f"skip={self.skip}, max_sequences={self.max_sequences})")


# ---------------------------------------------------------------------------------------------- text
class TextSource(TokenSource):
    """Documents tokenized on the fly, concatenated with separators and cut into windows.

    ``prepend_bos`` (resolved) and ``separator_id`` (``None``: documents are joined directly) say how
    the windows are built. ``n_sequences`` is ``None`` and ``len()`` is not defined: counting needs a
    full pass of the tokenizer over the corpus.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers, processors
    >>> from transformers import PreTrainedTokenizerFast
    >>> import tempfile, json
    >>> from pathlib import Path
    >>> core = Tokenizer(models.WordLevel({"<bos>": 0, "<eos>": 1, "a": 2, "b": 3}, unk_token="<eos>"))
    >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")
    >>> path = Path(tempfile.mkdtemp()) / "docs.jsonl"
    >>> _ = path.write_text(json.dumps({"text": "a b a"}) + "\\n" + json.dumps({"text": "b b"}) + "\\n")
    >>> source = open_tokens(path, tokenizer=tok, context_length=4)
    >>> source.prepend_bos, source.separator_id
    (True, 1)
    >>> [window.tolist() for window in source]
    [[0, 2, 3, 2], [0, 1, 3, 3]]
    """

    def __init__(self, path: str, tokenizer: Any, context_length: int | None, prepend_bos: bool | None,
                 **shard: Any) -> None:
        super().__init__(path, context_length, **shard)
        if tokenizer is None:
            raise ValueError(f"tokenizer: a text source ({self.kind} {path!r}) needs a tokenizer, got None "
                             "(e.g. model.tokenizer or transformers.AutoTokenizer.from_pretrained(model_dir))")
        if context_length is None:
            raise ValueError(f"context_length: a text source ({self.kind} {path!r}) needs a window length, got None")
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if prepend_bos is None:
            prepend_bos = bos is not None and self._adds_bos(tokenizer, bos)
        elif prepend_bos and bos is None:
            raise ValueError(f"prepend_bos: True needs a tokenizer with a BOS token, but {type(tokenizer).__name__} "
                             "has bos_token_id=None")
        if prepend_bos and context_length < 2:
            raise ValueError(f"context_length: expected >= 2 when a BOS token is prepended, got {context_length}")
        self.tokenizer = tokenizer
        self.prepend_bos = bool(prepend_bos)
        self.bos_id = bos
        self.separator_id = eos if eos is not None else bos

    @staticmethod
    def _adds_bos(tokenizer: Any, bos: int) -> bool:
        """Whether the tokenizer puts BOS in front by itself, i.e. whether the model was trained with it."""
        probe = "Hello world"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        return special[:1] == [bos] and plain[:1] != [bos]

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def check(self, d_vocab: int | None = None) -> None:
        if self._checked:
            return
        for _ in self._documents():
            pass
        self._checked.add(d_vocab)

    def _token_lists(self) -> Iterator[list[int]]:
        pending: list[str] = []
        for text in self._documents():
            if not text.strip():
                continue
            pending.append(text)
            if len(pending) == _DOC_BATCH:
                yield from self._encode(pending)
                pending = []
        if pending:
            yield from self._encode(pending)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model's maximum length are fine here, they get cut
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                              verbose=False)["input_ids"]

    def _windows(self, first: int, step: int, stop: int | None) -> Iterator[Tensor]:
        need = self.context_length - 1 if self.prepend_bos else self.context_length
        head = [self.bos_id] if self.prepend_bos else []
        buffer: list[int] = []
        n_tokens = 0
        index = 0
        for ids in self._token_lists():
            buffer.extend(ids)
            if self.separator_id is not None:
                buffer.append(self.separator_id)
            n_tokens += len(ids) + (self.separator_id is not None)
            start = 0
            while len(buffer) - start >= need:
                if index >= first and (index - first) % step == 0:
                    yield torch.tensor(head + buffer[start:start + need], dtype=torch.long)
                    if stop is not None and index + step >= stop:
                        return
                start += need
                index += 1
            del buffer[:start]
        if index == 0:
            bos_note = f" ({need} stream tokens after the BOS)" if self.prepend_bos else ""
            raise ValueError(f"{self.kind} {self.path!r}: the dataset is shorter than one context: it gives "
                             f"{n_tokens} tokens (separators included), context_length={self.context_length}"
                             f"{bos_note}")

    def _extra_repr(self) -> str:
        return f", prepend_bos={self.prepend_bos}, separator_id={self.separator_id}"

    def _settings(self) -> dict[str, Any]:
        vocab = getattr(self.tokenizer, "get_vocab", None)
        vocab = json.dumps(sorted(vocab().items())) if callable(vocab) else type(self.tokenizer).__name__
        return {"prepend_bos": self.prepend_bos, "bos_id": self.bos_id, "separator_id": self.separator_id,
                "tokenizer_vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


class TxtSource(TextSource):
    """A UTF-8 text file, cut into documents by ``sample_by``: every line, every paragraph (lines up to a blank
    line, their newlines kept), or the whole file (read into memory; a corpus larger than memory belongs in a
    ``.jsonl`` file or lines). Each document is followed by the separator, so a play read line by line puts
    an end-of-text token after every verse line, which a model trained on whole plays never saw.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> import tempfile
    >>> from pathlib import Path
    >>> core = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    >>> path = Path(tempfile.mkdtemp()) / "poem.txt"
    >>> _ = path.write_text("a b\\nb\\n\\na a\\n")
    >>> [open_tokens(path, tokenizer=tok, context_length=6, sample_by=by).__iter__().__next__().tolist()
    ...  for by in ("line", "paragraph", "document")]
    [[1, 2, 0, 2, 0, 1], [1, 2, 2, 0, 1, 1], [1, 2, 2, 1, 1, 0]]
    """

    kind = "txt"

    def __init__(self, path: str, sample_by: SampleBy, *args: Any, **kwargs: Any) -> None:
        self.sample_by = sample_by
        super().__init__(path, *args, **kwargs)

    def _documents(self) -> Iterator[str]:
        if self.sample_by == "line":
            for _, line in _numbered_lines(self.path):
                yield line.rstrip("\n")
            return
        paragraph: list[str] = []
        for _, line in _numbered_lines(self.path):
            if self.sample_by == "paragraph" and not line.strip():
                yield "".join(paragraph)
                paragraph = []
            else:
                paragraph.append(line)
        yield "".join(paragraph)

    def _extra_repr(self) -> str:
        return f", sample_by={self.sample_by!r}{super()._extra_repr()}"

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "sample_by": self.sample_by}


class JsonlSource(TextSource):
    """A JSON-lines file, one object per line with the document in ``text_field``."""

    kind = "jsonl"

    def __init__(self, path: str, text_field: str, *args: Any, **kwargs: Any) -> None:
        self.text_field = text_field
        super().__init__(path, *args, **kwargs)

    def _documents(self) -> Iterator[str]:
        for lineno, line in _numbered_lines(self.path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}, line {lineno}: expected a JSON object, got invalid JSON "
                                 f"({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{self.path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            yield _text_field(record, self.text_field, f"{self.path}, line {lineno}")

    def _extra_repr(self) -> str:
        return f", text_field={self.text_field!r}" + super()._extra_repr()

    def _settings(self) -> dict[str, Any]:
        return {"text_field": self.text_field, **super()._settings()}


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, read lazily; bytes that are not UTF-8 raise a ValueError
    naming the file, the line and the byte."""
    with open(path, encoding="utf-8") as f:
        try:
            yield from enumerate(f, start=1)
        except UnicodeDecodeError:
            # text mode decodes ahead in blocks, so the line being read is not the one at fault: find it
            raise _utf8_error(path) from None


def _utf8_error(path: str) -> ValueError:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}, line {lineno}: expected UTF-8 text, got byte 0x{raw[e.start]:02x} at byte "
                                  f"{e.start + 1} of the line")
    return ValueError(f"{path}: expected UTF-8 text, got a sequence cut off at the end of the file")


def _text_field(record: dict[str, Any], field: str, where: str) -> str:
    """``record[field]``, which must exist and be a string; errors say ``where`` the record came from."""
    if field not in record:
        raise ValueError(f"{where}: expected a field text_field={field!r}, got fields {sorted(record)}")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r}: expected a string, got {type(text).__name__}")
    return text


class DatasetSource(TextSource):
    """A ``datasets`` dataset (saved to disk, or streamed from the hub), read row by row."""

    def __init__(self, path: str, kind: str, dataset: Any, text_field: str, *args: Any, split: str | None = None,
                 root: str | None = None, **kwargs: Any) -> None:
        self.kind = kind
        self.text_field = text_field
        self.split = split
        self.root = root
        names = getattr(dataset, "column_names", None)
        if names is not None and text_field not in names:
            raise ValueError(f"text_field: expected a column of {kind} dataset {path!r}, got {text_field!r} "
                             f"(columns: {list(names)})")
        self.dataset = dataset if names is None else dataset.select_columns([text_field])
        super().__init__(path, *args, **kwargs)

    def check(self, d_vocab: int | None = None) -> None:
        pass  # a dataset may be streamed and without end: its rows are checked as they are read

    def _documents(self) -> Iterator[str]:
        for row_index, row in enumerate(self.dataset):
            yield _text_field(row, self.text_field, f"{self.kind} dataset {self.path!r}, row {row_index}")

    def _extra_repr(self) -> str:
        return f", text_field={self.text_field!r}" + super()._extra_repr()

    def _settings(self) -> dict[str, Any]:
        return {"split": self.split, "text_field": self.text_field, **super()._settings()}

    def _corpus(self) -> str | None:
        return self.root


# -------------------------------------------------------------------------------------- pre-tokenized
class PreTokenizedSource(TokenSource):
    """Rows of a ``[n_seq, ctx]`` integer array on disk, one window per row, read lazily.

    ``n_rows`` is the file's number of rows; ``n_sequences`` and ``len()`` give how many windows this
    shard yields after ``skip`` and ``max_sequences``. Rows are checked to hold non-negative ids.
    """

    def __init__(self, path: str, context_length: int | None, **shard: Any) -> None:
        super().__init__(path, context_length, **shard)
        n_rows, ctx, dtype = self._inspect()
        if context_length is not None and context_length != ctx:
            raise ValueError(f"context_length: {path!r} holds sequences of {ctx} tokens, got context_length="
                             f"{context_length} (pass None to use the file's length)")
        if n_rows == 0:
            raise ValueError(f"{self.kind} {path!r}: the dataset is shorter than one context: it holds 0 sequences "
                             f"(0 tokens), context_length={ctx}")
        self.context_length = ctx
        self.n_rows = n_rows
        self.dtype = dtype

    def _inspect(self) -> tuple[int, int, str]:
        """``(n_rows, ctx, dtype name)``, after checking for a 2-D integer array."""
        raise NotImplementedError

    def _read_rows(self, rows: range) -> Iterator[Tensor]:
        raise NotImplementedError

    def _read_block(self, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop - 1`` as one ``[n, ctx]`` int64 tensor."""
        raise NotImplementedError

    def check(self, d_vocab: int | None = None) -> None:
        if d_vocab is not None:
            _check_int("d_vocab", d_vocab, 1)
        if d_vocab in self._checked:
            return
        rows = self._range()
        for at in range(0, len(rows), _CHECK_ROWS):
            part = rows[at:at + _CHECK_ROWS]
            block = self._read_block(part.start, part[-1] + 1)[::part.step]
            bad = block < 0 if d_vocab is None else (block < 0) | (block >= d_vocab)
            if bool(bad.any()):
                i = int(bad.any(1).nonzero()[0])
                got = int(block[i][bad[i]][0])
                expected = ">= 0" if d_vocab is None else f"in [0, {d_vocab}) (d_vocab)"
                raise ValueError(f"{self.kind} {self.path!r}, row {part[i]}: expected token ids {expected}, got {got}")
        self._checked.add(d_vocab)

    def _check_shape_dtype(self, shape: tuple[int, ...], is_integer: bool, dtype: str, what: str = "") -> None:
        if len(shape) != 2:
            raise ValueError(f"{self.kind} {self.path!r}{what}: expected a 2-D [n_seq, ctx] array of token ids, "
                             f"got shape {tuple(shape)}")
        if not is_integer:
            raise ValueError(f"{self.kind} {self.path!r}{what}: expected an integer dtype for token ids, got {dtype}")

    def _range(self) -> range:
        first, step, stop = self._selection()
        return range(first, self.n_rows if stop is None else min(stop, self.n_rows), step)

    @property
    def n_sequences(self) -> int:
        return len(self._range())

    def __len__(self) -> int:
        return self.n_sequences

    def _windows(self, first: int, step: int, stop: int | None) -> Iterator[Tensor]:
        rows = range(first, self.n_rows if stop is None else min(stop, self.n_rows), step)
        for index, row in zip(rows, self._read_rows(rows)):
            row = row.to(torch.long)
            # a wrapped uint64 shows up negative too
            if bool((row < 0).any()):
                raise ValueError(f"{self.kind} {self.path!r}, row {index}: expected token ids >= 0, "
                                 f"got {int(row.min())}")
            yield row

    def _extra_repr(self) -> str:
        return f", n_rows={self.n_rows}, dtype={self.dtype}"


class NpySource(PreTokenizedSource):
    """A ``.npy`` array, memory-mapped."""

    kind = "npy"

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"npy {self.path!r}: expected a .npy array of token ids, got a file numpy cannot read "
                             f"as one ({e})") from None

    def _inspect(self) -> tuple[int, int, str]:
        array = self._open()
        self._check_shape_dtype(array.shape, np.issubdtype(array.dtype, np.integer), str(array.dtype))
        return array.shape[0], array.shape[1], str(array.dtype)

    def _read_rows(self, rows: range) -> Iterator[Tensor]:
        array = self._open()
        for i in rows:
            yield torch.from_numpy(np.array(array[i], dtype=np.int64))

    def _read_block(self, start: int, stop: int) -> Tensor:
        return torch.from_numpy(np.array(self._open()[start:stop], dtype=np.int64))


class SafetensorsSource(PreTokenizedSource):
    """A ``.safetensors`` file holding one tensor, or one named ``input_ids`` or ``tokens``."""

    kind = "safetensors"

    def _inspect(self) -> tuple[int, int, str]:
        with safe_open(self.path, framework="pt") as f:
            self.key = _pick_key(self.kind, self.path, list(f.keys()))
            part = f.get_slice(self.key)
            shape, dtype = tuple(part.get_shape()), part.get_dtype()
        self._check_shape_dtype(shape, dtype in _SAFETENSORS_INTEGER_DTYPES, dtype, f" tensor {self.key!r}")
        return shape[0], shape[1], dtype

    def _read_rows(self, rows: range) -> Iterator[Tensor]:
        with safe_open(self.path, framework="pt") as f:
            part = f.get_slice(self.key)
            for i in rows:
                yield part[i:i + 1][0]

    def _read_block(self, start: int, stop: int) -> Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.key)[start:stop].to(torch.long)


class TorchFileSource(PreTokenizedSource):
    """A ``.pt`` file (``torch.save``): a 2-D integer tensor, or a dict with ``input_ids`` or ``tokens``.

    Loaded with ``weights_only=True`` and ``mmap=True``, so rows are paged in as read.
    """

    kind = "pt"

    def _open(self) -> Tensor:
        obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            self.key = _pick_key(self.kind, self.path, list(tensors))
            return tensors[self.key]
        if not isinstance(obj, Tensor):
            raise ValueError(f"pt {self.path!r}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
        self.key = None
        return obj

    def _inspect(self) -> tuple[int, int, str]:
        tensor = self._open()
        dtype = tensor.dtype
        is_integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        self._check_shape_dtype(tuple(tensor.shape), is_integer, str(dtype).removeprefix("torch."))
        return tensor.shape[0], tensor.shape[1], str(dtype).removeprefix("torch.")

    def _read_rows(self, rows: range) -> Iterator[Tensor]:
        tensor = self._open()
        for i in rows:
            yield tensor[i]

    def _read_block(self, start: int, stop: int) -> Tensor:
        return self._open()[start:stop].to(torch.long)


def _pick_key(kind: str, path: str, keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    named = [k for k in _TOKEN_KEYS if k in keys]
    if len(named) != 1:
        raise ValueError(f"{kind} {path!r}: expected one tensor, or exactly one named 'input_ids' or 'tokens', "
                         f"got tensors {sorted(keys)}")
    return named[0]


# --------------------------------------------------------------------------------------------- open
def _looks_like_path(name: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a hub id like ``owner/name``."""
    return (name.lower().endswith(_TEXT_SUFFIXES + _TOKEN_SUFFIXES) or os.path.isabs(name)
            or name.startswith(("./", "../", "~", ".\\", "..\\")) or name.count("/") > 1)


def _open_saved_dataset(path: Path, split: str) -> tuple[Any, str]:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split: expected one of {sorted(loaded)} saved in {str(path)!r}, got {split!r}")
        return loaded[split], f"{path}[{split}]"
    return loaded, str(path)


def _open_hub_dataset(name: str, split: str) -> Any:
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise FileNotFoundError(f"source: {name!r} is neither a local file or directory nor a reachable hub dataset "
                                f"(split={split!r}): {type(e).__name__}: {e}") from e


def open_tokens(source: str | os.PathLike, *, tokenizer: Any = None, context_length: int | None = None,
                text_field: str = "text", prepend_bos: bool | None = None, split: str = "train", rank: int = 0,
                world_size: int = 1, skip: int = 0, max_sequences: int | None = None,
                sample_by: SampleBy = "line") -> TokenSource:
    """Open a corpus as a deterministic stream of ``context_length``-token windows.

    Args:
        source: a ``.txt`` (one document per line) or ``.jsonl`` file, a directory written by
            ``datasets``' ``save_to_disk``, a pre-tokenized ``.npy`` / ``.safetensors`` / ``.pt`` file
            of shape ``[n_seq, ctx]``, or a hub dataset id (streamed; anything that is not a path).
        tokenizer: a Hugging Face tokenizer; required for text, unused for pre-tokenized ids.
        context_length: window length; required for text. For pre-tokenized files ``None`` means the
            file's ``ctx`` and any other value than ``ctx`` is an error.
        text_field: the JSON field / dataset column holding the document text.
        prepend_bos: start every window with the BOS id. ``None``: exactly when the tokenizer itself
            adds BOS under ``add_special_tokens=True`` (as the model expects). Text sources only.
        split: the split of a saved ``DatasetDict`` or of a hub dataset (ignored for a single saved
            ``Dataset`` and for files).
        rank, world_size: this process's shard: windows ``rank, rank + world_size, ...`` of the stream.
        skip: windows of this shard to skip first (to resume after ``skip`` windows).
        max_sequences: stop after this many windows of this shard (``None``: the whole shard).
        sample_by: what one document of a ``.txt`` file is: a ``"line"``, a ``"paragraph"`` (up to a blank
            line) or the whole file (``"document"``); each is followed by the separator. Other sources
            refuse any value but the default.

    Raises:
        FileNotFoundError: a missing local path, or a hub id that cannot be loaded.
        ValueError: bad arguments or file contents. A text corpus shorter than one window raises when
            iterated, since that is when it is read.

    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "ids.npy"
    >>> np.save(path, np.arange(10, dtype=np.int32).reshape(5, 2))
    >>> source = open_tokens(path, skip=1, max_sequences=2)
    >>> [window.tolist() for window in source]
    [[2, 3], [4, 5]]
    """
    _check_selection(rank, world_size, skip, max_sequences)
    shard = dict(rank=rank, world_size=world_size, skip=skip, max_sequences=max_sequences)
    text_args = (tokenizer, context_length, prepend_bos)
    name = os.fspath(source)
    if not isinstance(name, str):
        raise ValueError(f"source: expected a path or a hub dataset id, got {source!r}")
    path = Path(name).expanduser()
    if sample_by not in get_args(SampleBy):
        raise ValueError(f"sample_by: expected one of {get_args(SampleBy)}, got {sample_by!r}")
    if sample_by != "line" and path.suffix.lower() != ".txt":
        raise ValueError(f"sample_by: applies to .txt files only (a .jsonl row or dataset record is one "
                         f"document), got sample_by={sample_by!r} for {name!r}")
    if not path.exists():
        if not isinstance(source, str) or _looks_like_path(name):
            raise FileNotFoundError(f"source: no such file or directory: {name!r}")
        dataset = _open_hub_dataset(name, split)
        return DatasetSource(name, "hub", dataset, text_field, *text_args, split=split, **shard)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset, label = _open_saved_dataset(path, split)
            return DatasetSource(label, "datasets", dataset, text_field, *text_args, split=split,
                                 root=str(path), **shard)
        raise ValueError(f"source: expected a directory written by datasets' save_to_disk (with state.json or "
                         f"dataset_dict.json), got {name!r}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return TxtSource(str(path), sample_by, *text_args, **shard)

    if suffix == ".jsonl":
        return JsonlSource(str(path), text_field, *text_args, **shard)
    if suffix in _TOKEN_SUFFIXES:
        if prepend_bos is not None:
            raise ValueError(f"prepend_bos: applies to text sources only; pre-tokenized rows of {name!r} are "
                             f"yielded as stored, got prepend_bos={prepend_bos}")
        cls = {".npy": NpySource, ".safetensors": SafetensorsSource, ".pt": TorchFileSource}[suffix]
        return cls(str(path), context_length, **shard)
    raise ValueError(f"source: expected a file ending in one of {_TEXT_SUFFIXES + _TOKEN_SUFFIXES} or a saved "
                     f"dataset directory, got {name!r}")


def batches(source: Iterable[Tensor], batch_size: int, *,
            drop_last: bool = False) -> Iterator[Int[Tensor, "batch ctx"]]:
    """Stack consecutive windows of ``source`` into ``[batch_size, ctx]`` batches.

    The last batch holds the remaining windows and may be smaller; ``drop_last=True`` drops it.

    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "ids.npy"
    >>> np.save(path, np.arange(10).reshape(5, 2))
    >>> [tuple(batch.shape) for batch in batches(open_tokens(path), 2)]
    [(2, 2), (2, 2), (1, 2)]
    >>> [tuple(batch.shape) for batch in batches(open_tokens(path), 2, drop_last=True)]
    [(2, 2), (2, 2)]
    """
    _check_int("batch_size", batch_size, 1)
    pending: list[Tensor] = []
    shape: torch.Size | None = None
    for window in source:
        if window.dim() != 1 or (shape is not None and window.shape != shape):
            expected = "a 1-D window" if shape is None else f"shape {tuple(shape)} like the first"
            raise ValueError(f"source: expected windows of {expected}, got shape {tuple(window.shape)}")
        shape = window.shape
        pending.append(window)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending and not drop_last:
        yield torch.stack(pending)
