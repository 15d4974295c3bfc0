"""``analysis.reproduce``: the ``device`` option changes nothing on the CPU and keeps every tensor on the model's
device."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from recurrent_lens import analysis, toy


def test_reproduce_device_changes_nothing_on_the_cpu_and_keeps_the_tensors_on_the_models_device(monkeypatch):
    from recurrent_lens.analysis import _common, reproduce as rep_module

    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(8, seed=10_000)[0]
    kwargs = dict(protocol="paper", band=(17, 33), magnitudes=(3.0,), population_atoms=4,
                  logit_shift=dataclasses.replace(analysis.presets("logit_shift")["paper"], n_atoms=2,
                                                  positions_per_atom=20))
    before = rep_module.reproduce(model, sae, "blocks.1.mixer.hook_state", 0, tokens, tokens[:, :18], **kwargs)
    seen = []
    branch = _common.branch_logits

    def spy(model, tokens, site, rows, positions, edit, *args, **kw):
        seen.append((tokens.device, rows.device, positions.device))
        return branch(model, tokens, site, rows, positions, edit, *args, **kw)

    for module in ("substitution", "logit_shift"):
        monkeypatch.setattr(f"recurrent_lens.analysis.{module}.branch_logits", spy)
    after = rep_module.reproduce(model, sae, "blocks.1.mixer.hook_state", 0, tokens, tokens[:, :18], device="cpu",
                                 **kwargs)
    pd.testing.assert_frame_equal(before.table, after.table)  # bit for bit: the same draws, the same arithmetic
    for name in ("substitution", "population", "logit_shift", "partition"):
        pd.testing.assert_frame_equal(before.results[name].rows, after.results[name].rows)
    assert len(seen) == 3 and all(d == model.embed.weight.device for devices in seen for d in devices)
    with pytest.raises(ValueError, match="^device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu'"):
        rep_module.reproduce(model, sae, "blocks.1.mixer.hook_state", 0, tokens, tokens[:, :18], device="gpu", **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: expected a device this machine has, got 'cuda'"):
            rep_module.reproduce(model, sae, "blocks.1.mixer.hook_state", 0, tokens, tokens[:, :18], device="cuda",
                                 **kwargs)
