"""SAELens for the tests that run its SAE objects on our models."""

from __future__ import annotations

import os

import pytest
import torch


def sae_lens():
    """The ``sae_lens`` module; skip without it unless CI requires it."""
    if os.environ.get("RECURRENT_LENS_REQUIRE_SAELENS") == "1":
        import sae_lens as module

        return module
    return pytest.importorskip("sae_lens")


def standard_sae(d_in, hook_name=None, head=None, seed=0):
    """A SAELens ``StandardSAE`` (2 x ``d_in`` features) whose parameters are moved off their initialisation, so
    that the SAE visibly changes what flows through the hook it is attached to."""
    sl = sae_lens()
    torch.manual_seed(seed)
    sae = sl.StandardSAE(sl.StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.hook_head_index = head
    return sae
