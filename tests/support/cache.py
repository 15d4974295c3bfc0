"""Bit-exact snapshots of a :class:`~recurrent_lens.models.cache.RecurrentCache`, to check that a failed or refused
call left it as it was."""

from __future__ import annotations

import torch


def snapshot(cache) -> tuple[int, dict[tuple[int, str], torch.Tensor]]:
    """``(seq_len, {(layer, tensor name): a copy of the tensor})`` of ``cache``."""
    return cache.seq_len, {(l, name): t.clone() for l, layer in enumerate(cache.layers)
                           for name, t in layer.tensors().items()}


def assert_same(cache, snap) -> None:
    """``cache`` holds exactly what ``snap`` (a :func:`snapshot`) recorded: the same tensors, dtypes and bits."""
    seq_len, tensors = snap
    now = snapshot(cache)[1]
    assert cache.seq_len == seq_len
    assert now.keys() == tensors.keys()
    for key, t in tensors.items():
        assert now[key].dtype == t.dtype and torch.equal(now[key], t), key
