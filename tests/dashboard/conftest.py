"""The toy Gated DeltaNet, its demo SAE, a batch of its task, the SAE's codes recomputed through hooks, and the
dashboard built on them: built once for the whole package (several test modules check the same dashboard)."""

import pytest
import torch
from tests.support.dashboard import HEAD, HOOK

from recurrent_lens import toy
from recurrent_lens.dashboard import build_dashboard


@pytest.fixture(scope="package")
def toy_setup():
    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(12, seed=3)[0]
    return model, sae, tokens


@pytest.fixture(scope="package")
def codes(toy_setup):
    """Every code at every position, recomputed through run_with_cache on the SAE's hook: [n_seq, pos, n_f]."""
    model, sae, tokens = toy_setup
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK][:, :, HEAD])


@pytest.fixture(scope="package")
def dash(toy_setup):
    model, sae, tokens = toy_setup
    return build_dashboard(model, sae, tokens, n_examples=6, context=5, n_samples=8, batch_size=5, progress=False)
