"""The analyses' argument protocols (ModelLike, SAELike) against the real classes and against impostors."""

from __future__ import annotations

import inspect

import pytest
import torch
from tests.support.analysis import HOOK, _sae, _tokens
from tests.support.helpers import ARCHS, tiny_gdn

from recurrent_lens import analysis, toy
from recurrent_lens.analysis import ModelLike, SAELike
from recurrent_lens.sae import SAE_REGISTRY


def _members(protocol: type) -> set[str]:
    """The members an isinstance check against ``protocol`` asks for: its attributes and public methods."""
    methods = {n for n, v in vars(protocol).items() if callable(v) and (not n.startswith("_") or n == "__call__")}
    return set(protocol.__annotations__) | methods


def test_protocol_members_are_what_the_analyses_use():
    assert _members(ModelLike) == {"cfg", "hook_dict", "positions", "__call__", "make_cache", "run_with_cache",
                                   "run_with_hooks", "hooks", "generate"}
    assert _members(SAELike) == {"cfg", "encode", "decoder_atoms"}


@pytest.mark.parametrize("arch", ["gated_deltanet", "mamba2", "rwkv7", "qwen3_5_hybrid", "toy"])
def test_model_like_accepts_the_real_models(arch):
    model = toy.load("gdn", progress=False).model if arch == "toy" else ARCHS[arch](0)
    assert isinstance(model, ModelLike)
    assert not isinstance(model, SAELike)
    # Python >= 3.12 checks protocols without running __getattr__: every member must be found that way
    for name in _members(ModelLike):
        inspect.getattr_static(model, name)


@pytest.mark.parametrize("cls", sorted(set(SAE_REGISTRY.values()), key=lambda c: c.__name__))
def test_sae_like_accepts_every_sae_class(cls):
    sae = cls(4, 3, 8, k=2)
    assert isinstance(sae, SAELike)
    assert not isinstance(sae, ModelLike)
    for name in _members(SAELike):
        inspect.getattr_static(sae, name)


def test_sae_like_is_structural_and_needs_every_member():
    class Atoms:
        def __init__(self):
            self.cfg = type("Cfg", (), {"d_k": 2, "d_v": 2, "n_features": 3})()

        def encode(self, S):
            return S.flatten(-2)[..., :3]

        def decoder_atoms(self):
            return torch.eye(4)[:3].reshape(3, 2, 2)

    class NoDecoder(Atoms):
        decoder_atoms = None

    assert isinstance(Atoms(), SAELike)
    assert not isinstance(NoDecoder(), SAELike)
    assert not isinstance(object(), SAELike) and not isinstance(object(), ModelLike)


def test_analyses_refuse_arguments_that_are_not_a_model_or_an_sae():
    model = tiny_gdn(0)
    sae, tokens = _sae(model), _tokens(model)
    # beartype checks the annotations (pyproject's --jaxtyping-packages); the error names the argument
    with pytest.raises(TypeError, match=r"parameter 'model'(.|\n)*ModelLike"):
        analysis.partition_atoms(sae, model, HOOK, 0, tokens)  # swapped
    with pytest.raises(TypeError, match=r"parameter 'sae'(.|\n)*SAELike"):
        analysis.substitution_test(model, model, HOOK, 0, tokens)
    with pytest.raises(TypeError, match=r"parameter 'model'(.|\n)*ModelLike"):
        analysis.install_during_generation(object(), HOOK, 0, tokens, positions=[3], target=1)
    with pytest.raises(TypeError, match=r"parameter 'sae'(.|\n)*SAELike"):
        analysis.logit_shift_prediction(model, object(), HOOK, 0, tokens)
