"""Cross-cutting checks of the analyses: their independence from the global RNG, and the objects the analysis
doctests share (root conftest.py)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from tests.support.analysis import HOOK, _sae, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis

SHARED = ("toy_model", "toy_task", "toy_sae", "tiny_model", "tiny_sae", "tiny_tokens")
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


RUNS = {
    "substitution": lambda m, s, x: analysis.substitution_test(m, s, HOOK, 0, x, random="sae_atom").rows,
    "substitution_empirical": lambda m, s, x: analysis.substitution_test(m, s, HOOK, 0, x, random="empirical").rows,
    "logit_shift": lambda m, s, x: analysis.logit_shift_prediction(m, s, HOOK, 0, x, n_atoms=2, positions_per_atom=4,
                                                                   eps=(0.5, 1.0)).to_pandas(),
    "partition": lambda m, s, x: analysis.partition_atoms(m, s, HOOK, 0, x, max_firings_per_atom=2).to_pandas(),
    "generation": lambda m, s, x: analysis.install_during_generation(m, HOOK, 0, x[:, :6], positions=[4, 5],
                                                                     target=[1, 2, 3], max_new_tokens=4).to_pandas(),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_analyses_neither_read_nor_advance_the_global_rng(name):
    """Every draw comes from the analysis's own seeded generators, in a fixed order."""
    model = tiny_gdn(0)
    sae, tokens = _sae(model), _tokens(model)
    tables = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        tables.append(RUNS[name](model, sae, tokens))
        assert torch.equal(torch.get_rng_state(), before)
    pd.testing.assert_frame_equal(tables[0], tables[1])


def _root_conftest():
    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a, b) -> bool:
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return type(a) is type(b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_building_the_shared_doctest_objects_leaves_the_global_rng_alone():
    conftest = _root_conftest()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    built = {**conftest._build_toy(), **conftest._build_toy_sae(), **conftest._build_tiny()}
    assert set(built) == set(SHARED)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_documented_recipe_builds_the_shared_doctest_objects(_doctest_toy, _doctest_toy_sae, _doctest_tiny):
    doc = analysis.__doc__
    block = doc[doc.index("build them first::") + len("build them first::"):]
    recipe = inspect.cleandoc(re.split(r"\n(?=\S)", block)[0])
    namespace: dict = {}
    with torch.random.fork_rng(devices=[]):
        exec(recipe, namespace)  # the docstring's code, as a reader would run it
    shared = {**_doctest_toy, **_doctest_toy_sae, **_doctest_tiny}
    assert set(shared) == set(SHARED)
    for name, value in shared.items():
        assert _same(value, namespace[name]), name
    assert not shared["tiny_model"].training


def _examples(module) -> str:
    tests = doctest.DocTestFinder().find(module, module.__name__)
    return "\n".join(example.source for test in tests for example in test.examples)


@pytest.mark.parametrize("name", ["interventions", "logit_shift", "partition", "reproduce", "substitution"])
def test_analysis_modules_say_what_the_shared_doctest_names_are(name):
    module = importlib.import_module(f"recurrent_lens.analysis.{name}")
    source = _examples(module)
    used = [n for n in SHARED if re.search(rf"\b{n}\b", source)]
    assert used, name
    for n in used:
        assert re.search(rf"\b{n}\b", module.__doc__), (name, n)
    assert "toy.load" not in source and "from_config" not in source, name
