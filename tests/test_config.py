"""``ModelConfig``: the defaults it fills in, the fields TransformerLens reads derived from it, the round trip
through ``to_dict``, and each refusal naming its field; ``resolve_dtype``."""

import dataclasses

import pytest
import torch

from recurrent_lens import ModelConfig
from recurrent_lens.config import resolve_dtype

BASE = dict(architecture="gated_deltanet", d_model=32, n_layers=2, d_vocab=50, n_heads=4, d_k=8, d_v=6, d_mlp=64)
HYBRID = dict(BASE, n_layers=3, layer_types=("recurrent", "attention", "recurrent"), n_attn_heads=4, n_kv_heads=4,
              d_head_attn=16, rotary_dim=8)


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bfloat16', 'float16', 'float32', 'float64'\] "
                                         r"or a torch.dtype, got 'fp8'"):
        resolve_dtype("fp8")


def test_defaults_and_derived_fields_of_an_all_recurrent_model():
    cfg = ModelConfig(**BASE, source="/ckpts/my-model/")
    assert cfg.n_key_heads == 4 and cfg.layer_types == ("recurrent", "recurrent") and cfg.recurrent_layers == [0, 1]
    assert not cfg.has_attention and cfg.n_key_value_heads is None and cfg.d_head == 6
    assert (cfg.act_fn, cfg.gated_mlp, cfg.attn_only, cfg.normalization_type) == ("silu", True, False, "RMS")
    assert (cfg.positional_embedding_type, cfg.model_name, cfg.torch_dtype) == ("none", "my-model", torch.float32)
    no_mlp = ModelConfig(**{**BASE, "d_mlp": 0, "norm": "layer"})
    assert (no_mlp.act_fn, no_mlp.gated_mlp, no_mlp.attn_only, no_mlp.normalization_type) == (None, False, True, "LN")
    assert no_mlp.model_name == "gated_deltanet"


def test_derived_fields_of_a_hybrid():
    cfg = ModelConfig(**HYBRID)
    assert cfg.layer_types == ("recurrent", "attention", "recurrent") and cfg.recurrent_layers == [0, 2]
    assert cfg.has_attention and cfg.d_head == 16 and cfg.positional_embedding_type == "rotary"
    assert cfg.n_key_value_heads == 4
    with pytest.raises(AttributeError, match=r"n_key_value_heads: this hybrid's hook_k/hook_v have 4 heads in "
                                             r"recurrent layers \[0, 2\] and 2 \(n_kv_heads\)"):
        ModelConfig(**{**HYBRID, "n_kv_heads": 2}).n_key_value_heads


def test_dict_round_trip_and_unknown_fields():
    cfg = ModelConfig(**HYBRID)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict() == dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match=r"ModelConfig.from_dict: unknown fields \['d_ff'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "d_ff": 3})


@pytest.mark.parametrize("fields, message", [
    ({"layer_types": ("recurrent",)}, r"layer_types: expected 2 entries \(n_layers\), got 1"),
    ({"layer_types": ("recurrent", "conv")}, r"layer_types: expected 'recurrent' or 'attention', got \['conv'\]"),
    ({"n_key_heads": 3}, r"n_heads \(4\) must be a multiple of n_key_heads \(3\)"),
    ({"norm": "batch"}, "norm: expected 'rms', 'rms_one_plus' or 'layer', got 'batch'"),
    ({"mlp": "gelu"}, "mlp: expected 'swiglu' or 'relu2', got 'gelu'"),
    ({"chunk_size": 0}, "chunk_size: expected a positive int, got 0"),
    ({"dtype": "half"}, "dtype: expected one of"),
    ({"layer_types": ("recurrent", "attention")}, "attention layers need n_attn_heads, n_kv_heads and d_head_attn"),
    ({"architecture": "transformer"}, "transformer"),
])
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **fields})
