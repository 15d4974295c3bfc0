"""Random inputs of the scan engine for every kind of rule, shared by the scan and kernel tests."""

import torch
import torch.nn.functional as F

from recurrent_lens.models.scan import DeltaRule, DPLRRule, LinearRule, RecurrenceInputs


def make_inputs(rule, B, T, H, dk, dv, *, seed=0, per_channel=False, with_beta=True, with_decay=True,
                requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    k = F.normalize(r(B, T, H, dk), dim=-1)
    decay = None
    if with_decay:
        decay = -torch.rand(B, T, H, dk, generator=g) if per_channel else -torch.rand(B, T, H, generator=g)
    extra = {}
    if isinstance(rule, DPLRRule):
        decay = -torch.rand(B, T, H, dk, generator=g) * 0.5
        extra = {"erase_key": F.normalize(r(B, T, H, dk), dim=-1), "a": torch.rand(B, T, H, dk, generator=g)}
    x = RecurrenceInputs(q=r(B, T, H, dk) * dk**-0.5, k=k, v=r(B, T, H, dv),
                         beta=torch.rand(B, T, H, generator=g) if with_beta else None, decay=decay, extra=extra)
    if requires_grad:
        x = x.map(lambda t: t.clone().requires_grad_(True))
    return x


CASES = {
    "delta-gated": (DeltaRule(), {}),
    "delta-nodecay": (DeltaRule(), {"with_decay": False}),
    "linear-scalar": (LinearRule(), {}),
    "linear-channel": (LinearRule(), {"per_channel": True}),
    "linear-nobeta": (LinearRule(), {"with_beta": False, "per_channel": True}),
    "dplr": (DPLRRule(), {}),
}
