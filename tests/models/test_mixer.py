"""The matrix mixer's hooks: backward hooks on the per-token states."""

import torch
from tests.support.helpers import tiny_gdn


def test_backward_hooks_on_states():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (1, 6))
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                    names_filter="blocks.0.mixer.hook_state")
    assert cache["blocks.0.mixer.hook_state_grad"].shape == (1, 6, 4, 8, 8)
    assert cache["blocks.0.mixer.hook_state_grad"].abs().sum() > 0
