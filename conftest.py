"""Objects shared by the package's doctests, so that examples need not repeat their setup.

A doctest that uses one of these names gets it in its namespace (``doctest_namespace``):

- ``toy_model``, ``toy_task``: ``toy.load("gdn")``, the trained toy Gated DeltaNet and its task;
- ``toy_sae``: ``toy.load_sae("gdn")``, the demo's WriteSAE of that toy;
- ``tiny_model``, ``tiny_sae``, ``tiny_tokens``: a random one-layer Gated DeltaNet, a random WriteSAE on its
  ``[8, 8]`` states and two random sequences (:func:`_build_tiny`).

The recipe is also in the docstring of :mod:`recurrent_lens.analysis`, for readers who run the examples by
hand. Each group is built once per test process, the first time a doctest names it, inside
:func:`torch.random.fork_rng`, so building it leaves the global RNG as it was (doctests that need a seed
set it themselves). The objects are shared: examples must not modify them.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from recurrent_lens import HookedRecurrentModel, ModelConfig, toy
from recurrent_lens.sae import WriteSAE


def _build_toy() -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        toy_model, toy_task = toy.load("gdn", progress=False)
    return {"toy_model": toy_model, "toy_task": toy_task}


def _build_toy_sae() -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        return {"toy_sae": toy.load_sae("gdn", progress=False)}


def _build_tiny() -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=8,
                          d_mlp=64)
        tiny_model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
        torch.manual_seed(0)
        tiny_sae = WriteSAE(8, 8, 16, k=2)
    tiny_tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"tiny_model": tiny_model, "tiny_sae": tiny_sae, "tiny_tokens": tiny_tokens}


_GROUPS = {"_doctest_toy": ("toy_model", "toy_task"), "_doctest_toy_sae": ("toy_sae",),
           "_doctest_tiny": ("tiny_model", "tiny_sae", "tiny_tokens")}


@pytest.fixture(scope="session")
def _doctest_toy() -> dict[str, Any]:
    return _build_toy()


@pytest.fixture(scope="session")
def _doctest_toy_sae() -> dict[str, Any]:
    return _build_toy_sae()


@pytest.fixture(scope="session")
def _doctest_tiny() -> dict[str, Any]:
    return _build_tiny()


@pytest.fixture(autouse=True)
def _shared_doctest_objects(request: pytest.FixtureRequest) -> None:
    """Puts the groups whose names a doctest uses into ``doctest_namespace`` (other tests: nothing)."""
    test = getattr(request.node, "dtest", None)
    if test is None:
        return
    source = "\n".join(example.source for example in test.examples)
    for fixture, names in _GROUPS.items():
        if any(re.search(rf"\b{name}\b", source) for name in names):
            request.getfixturevalue("doctest_namespace").update(request.getfixturevalue(fixture))
