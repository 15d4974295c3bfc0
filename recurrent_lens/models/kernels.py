"""fla's Triton kernels for the unhooked fast path on CUDA, imported lazily (CPU never needs Triton).

Only the fast path (no per-step matrices wanted, no explicit writes) goes through a kernel; every hooked
path stays on the torch engine. Set ``RECURRENT_LENS_KERNELS=torch`` to keep CUDA on the torch chunked
form too (e.g. to compare). Inputs arrive already normalised and scaled, so every kernel is called with
``scale=1`` and no in-kernel normalisation.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from recurrent_lens.models.scan import DeltaRule, LinearRule, RecurrenceInputs, Rule


@functools.cache
def fla_ops() -> dict[str, Any] | None:
    """fla's chunked ops by name, or ``None`` when fla (or Triton) cannot be imported."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None
    return {"gated_delta_rule": chunk_gated_delta_rule, "gla": chunk_gla, "simple_gla": chunk_simple_gla}


def kernels_enabled(x: RecurrenceInputs) -> bool:
    return x.q.is_cuda and os.environ.get("RECURRENT_LENS_KERNELS", "fla") != "torch" and fla_ops() is not None


def fla_chunked(rule: Rule, x: RecurrenceInputs, S0: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(o, final_state)`` from fla's chunked kernel for this rule, or ``None`` if it has none."""
    ops = fla_ops()
    if ops is None:
        return None
    B, T, H, dk, dv = x.shape
    beta = x.beta if x.beta is not None else torch.ones_like(x.k[..., 0])
    if isinstance(rule, DeltaRule):
        # DeltaNet (no decay) is the gated rule with g = 0; fla's own delta-rule kernel refuses fp32
        g = x.decay if x.decay is not None else torch.zeros_like(beta)
        return ops["gated_delta_rule"](x.q, x.k, x.v, g, beta, scale=1.0, initial_state=S0, output_final_state=True)
    if type(rule) is LinearRule:
        k = x.k * beta[..., None]
        if x.decay is not None and x.decay.dim() == 4:
            return ops["gla"](x.q, k, x.v, x.decay, scale=1.0, initial_state=S0, output_final_state=True)
        return ops["simple_gla"](x.q, k, x.v, g=x.decay, scale=1.0, initial_state=S0, output_final_state=True)
    return None
