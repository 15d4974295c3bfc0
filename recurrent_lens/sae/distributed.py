"""The collectives of data-parallel SAE training under ``torch.distributed`` (e.g. ``torchrun``).

:class:`DataParallelSync` keeps every rank's SAE identical: gradients averaged with ``all_reduce``,
dead-feature counters reduced with ``MIN`` (a feature is alive if it fired on any rank), dead features
resampled from the gathered global batch and rank 0's SAE then broadcast, and a divergence one rank sees
stops every rank at the same check. Every collective runs inside
:func:`collective`, which turns a peer that stopped, died or missed the process group's timeout into a
:class:`CollectiveError` naming the operation and the rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from recurrent_lens.sae.base import SAE

__all__ = ["CollectiveError", "collective", "DataParallelSync"]


class CollectiveError(RuntimeError):
    """A collective of a distributed run failed on this rank, typically because a peer rank stopped, died or
    did not reach it within the process group's timeout (``init_process_group(timeout=...)``)."""


@contextmanager
def collective(op: str) -> Iterator[None]:
    """Run the collective ``op`` (``"all_reduce of the SAE gradients"``, say), turning the backend's failure
    into a :class:`CollectiveError` that names the operation and this rank.

    Example:
        >>> with collective("nothing"):
        ...     pass
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # gloo and NCCL report a timed-out or vanished peer as a RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveError(f"rank {rank}: {op} did not complete (a peer rank stopped, died or did not reach it "
                              f"within the process group's timeout): {e}") from e


class DataParallelSync:
    """The collectives that keep data-parallel SAEs identical on every rank (see the module docstring)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)

    def gradients(self, params: Sequence[Tensor]) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        with collective("all_reduce of the SAE gradients"):
            dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    def counters(self, sae: SAE) -> None:
        with collective("all_reduce of the dead-feature counters"):
            dist.all_reduce(sae.steps_since_active, op=dist.ReduceOp.MIN, group=self.group)

    def gather(self, x: Tensor) -> Tensor:
        """The global batch: every rank's ``x`` concatenated in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        with collective("all_gather of the batch for resampling"):
            dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def parameters(self, sae: SAE) -> None:
        with collective("broadcast of rank 0's SAE"):
            for t in [*sae.parameters(), *sae.buffers()]:
                dist.broadcast(t.data, 0, group=self.group)

    def anywhere(self, flag: Tensor) -> bool:
        """Whether ``flag`` (a boolean scalar tensor) is true on any rank."""
        x = flag.reshape(1).to(torch.int32)
        with collective("all_reduce of the divergence check"):
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return bool(x)

    def mean(self, x: Tensor) -> Tensor:
        x = x.clone()
        with collective("all_reduce of the states' mean"):
            dist.all_reduce(x, group=self.group)
        return x / self.world
