"""Hook names: the ``hooks()`` context manager adds a hook for one run only."""

import pytest
import torch
from tests.support.helpers import tiny_gdn


def test_hooks_context_manager_and_return_types():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (1, 12))
    calls = []
    with model.hooks(fwd_hooks=[("blocks.1.mixer.hook_write", lambda w, hook: calls.append(hook.name))]):
        model(tokens)
    model(tokens)
    assert calls == ["blocks.1.mixer.hook_write"]
    logits, loss = model(tokens, return_type="both")
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    torch.testing.assert_close(loss, expected)
    assert model(tokens, return_type="loss", loss_per_token=True).shape == (1, 11)
    assert model(tokens, return_type=None) is None
    resid = model(tokens, stop_at_layer=1)
    assert resid.shape == (1, 12, 32)
    with pytest.raises((ValueError, TypeError), match="return_type"):  # TypeError: the suite's jaxtyping checks
        model(tokens, return_type="probs")
