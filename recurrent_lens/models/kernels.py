"""fla's Triton kernels for the unhooked fast path on CUDA: opt-in, imported lazily (CPU never needs Triton).

Set ``RECURRENT_LENS_KERNELS=fla`` to route the fast path (no per-step matrices wanted, no explicit
writes) of CUDA tensors through fla's chunked kernels; every hooked path stays on the torch engine.
They are off by default because they are not fp32-exact: measured on an H200 with fla 0.6.0 and
Triton 3.6 (T=300, 4 heads of 64×64, fp32), fla's forward differed from the recurrent reference by up
to 3.5e-3 (GDN), 6.7e-3 (DeltaNet), 2.6e-3 (scalar decay) and 3.5e-3 (GLA) on outputs of size ~3-4,
against ≤ 2e-6 for our torch chunked form on the same GPU, and fla refused the gated backward on
Hopper with Triton < 3.7.1 (its issue #640); ``benchmarks/gpu_kernels.py`` repeats the comparison (the
numbers above were printed by the session-local script it was made from). Inputs arrive already normalised and scaled, so every
kernel is called with ``scale=1`` and no in-kernel normalisation.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from recurrent_lens.models.scan import RecurrenceInputs, Rule


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
    return x.q.is_cuda and os.environ.get("RECURRENT_LENS_KERNELS", "torch") == "fla" and fla_ops() is not None


def fla_chunked(rule: Rule, x: RecurrenceInputs, S0: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(o, final_state)`` from fla's chunked kernel for this rule, or ``None`` if it has none."""
    ops = fla_ops()
    if ops is None:
        return None
    B, T, H, dk, dv = x.shape
    beta = x.beta if x.beta is not None else torch.ones_like(x.k[..., 0])
    if rule.fla_kernel == "gated_delta_rule":
        # DeltaNet (no decay) is the gated rule with g = 0; fla's own delta-rule kernel refuses fp32
        g = x.decay if x.decay is not None else torch.zeros_like(beta)
        return ops["gated_delta_rule"](x.q, x.k, x.v, g, beta, scale=1.0, initial_state=S0, output_final_state=True)
    if rule.fla_kernel == "gla":
        k = x.k * beta[..., None]
        if x.decay is not None and x.decay.dim() == 4:
            return ops["gla"](x.q, k, x.v, x.decay, scale=1.0, initial_state=S0, output_final_state=True)
        return ops["simple_gla"](x.q, k, x.v, g=x.decay, scale=1.0, initial_state=S0, output_final_state=True)
    return None
