"""The ``ActivationCache`` that ``run_with_cache`` returns, sliced along positions with ``pos_slice``."""

import torch
from tests.support.helpers import tiny_gdn
from transformer_lens import ActivationCache


def test_run_with_cache_returns_activation_cache_with_position_slicing():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (2, 9))
    _, full = model.run_with_cache(tokens)
    assert isinstance(full, ActivationCache)
    _, last = model.run_with_cache(tokens, pos_slice=-1)
    _, first3 = model.run_with_cache(tokens, pos_slice=[0, 1, 2])
    for name in ["blocks.0.mixer.hook_state", "blocks.1.mixer.hook_q", "blocks.1.hook_resid_post",
                 "blocks.0.mixer.hook_beta"]:
        assert last[name].shape[1] == 1 and first3[name].shape[1] == 3
        torch.testing.assert_close(last[name][:, 0], full[name][:, -1])
        torch.testing.assert_close(first3[name], full[name][:, :3])
    assert last["blocks.0.mixer.hook_state"].shape == (2, 1, 4, 8, 8)
