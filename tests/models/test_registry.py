"""The architecture registry: unknown names, registering twice, and what a registry entry declares (options,
its own MLP and embedding norm)."""

import pytest
import torch
from tests.support.helpers import SIZES
from torch import nn

from recurrent_lens import Architecture, HookedRecurrentModel, ModelConfig, register_architecture
from recurrent_lens.models.components import make_mlp
from recurrent_lens.models.registry import get_architecture


def test_unregistered_architecture_and_an_architecture_without_options():
    with pytest.raises(ValueError, match="architecture: unknown name 'no_such_arch'"):
        ModelConfig(architecture="no_such_arch", **SIZES)
    register_architecture(Architecture("test_no_options", get_architecture("gla").mixer), overwrite=True)
    with pytest.raises(ValueError, match="architecture 'test_no_options' has no option 'num_kv_heads'; valid options: "
                                         r"\[\]"):
        ModelConfig(architecture="test_no_options", **SIZES, options={"num_kv_heads": 2})
    assert ModelConfig(architecture="test_no_options", **SIZES).options == {}


class _Doubling(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x, cache=None):
        return 2 * x * self.scale


def test_an_architecture_declares_its_own_mlp_and_embedding_norm():
    register_architecture(Architecture("test_own_parts", get_architecture("gla").mixer, mlp=_Doubling,
                                       embed_norm=lambda cfg: nn.Identity()), overwrite=True)
    cfg = ModelConfig(architecture="test_own_parts", **SIZES, d_mlp=8, mlp="relu2")
    model = HookedRecurrentModel.from_config(cfg, seed=0)
    assert isinstance(model.blocks[0].mlp, _Doubling) and isinstance(model.ln_embed, nn.Identity)
    with pytest.raises(ValueError, match="mlp: architecture 'gla' builds only 'swiglu' MLPs, got 'relu2'"):
        make_mlp(ModelConfig(architecture="gla", **SIZES, d_mlp=8, mlp="relu2"))


def test_registering_a_taken_name_needs_overwrite():
    gla_entry = get_architecture("gla")
    with pytest.raises(ValueError, match="architecture 'gla' is already registered \\(pass overwrite=True"):
        register_architecture(Architecture("gla", get_architecture("mamba2").mixer))
    assert get_architecture("gla") is gla_entry
