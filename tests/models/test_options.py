"""Architectures' typed options: parsed from ``ModelConfig.options`` into each architecture's dataclass, with
clear errors for unknown keys, wrong types and values that do not fit the config."""

import dataclasses
import typing

import pytest
from tests.support.helpers import BUILTINS, SIZES

from recurrent_lens import ModelConfig
from recurrent_lens.models import gla, rwkv7
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import get_architecture


@pytest.mark.parametrize("arch", BUILTINS)
def test_unknown_option_names_the_architecture_the_key_and_the_valid_keys(arch):
    valid = sorted(f.name for f in dataclasses.fields(get_architecture(arch).options))
    with pytest.raises(ValueError) as err:
        ModelConfig(architecture=arch, **SIZES, options={"use_gat": False})
    assert str(err.value) == f"options: architecture {arch!r} has no option 'use_gat'; valid options: {valid}"


@pytest.mark.parametrize("arch, key, value, expected", [
    ("gated_deltanet", "use_gate", "false", "True or False"),
    ("gated_deltanet", "gate_act", "swish", "'silu' or 'sigmoid'"),
    ("delta_net", "use_beta", 1, "True or False"),
    ("gla", "num_kv_heads", 2.0, "an int or None"),
    ("gla", "clamp_min", "low", "a number or None"),
    ("mamba2", "time_step_limit", (0.1,), "a list or tuple of 2 (a number, a number)"),
    ("rwkv7", "decay_low_rank_dim", True, "an int or None"),
])
def test_option_of_the_wrong_type_is_refused(arch, key, value, expected):
    with pytest.raises(ValueError, match=r"^options\['" + key + r"'\] of architecture '" + arch + "': expected "
                       + expected.replace("(", r"\(").replace(")", r"\)") + ", got"):
        ModelConfig(architecture=arch, **SIZES, options={key: value})


def test_options_stay_the_given_dict_and_parse_into_the_dataclass():
    options = {"time_step_limit": [0, 2], "gated_norm_eps": 1}
    cfg = ModelConfig(architecture="mamba2", **SIZES, options=options)
    assert cfg.options is options and ModelConfig.from_dict(cfg.to_dict()) == cfg
    parsed = get_architecture("mamba2").options.from_config(cfg)
    assert parsed.time_step_limit == (0.0, 2.0) and parsed.gated_norm_eps == 1.0 and parsed.d_inner is None
    assert type(parsed.gated_norm_eps) is float


def test_options_that_do_not_fit_the_config_are_refused_when_it_is_built():
    with pytest.raises(ValueError, match=r"options\['num_kv_heads'\]: must divide n_heads = 4, got 3"):
        ModelConfig(architecture="gla", **SIZES, options={"num_kv_heads": 3})
    with pytest.raises(ValueError, match=r"options\['d_inner'\]: expected >= n_heads·d_v = 64, got 32"):
        ModelConfig(architecture="mamba2", **SIZES, options={"d_inner": 32})
    with pytest.raises(ValueError, match=r"options\['time_step_limit'\]: expected \(low, high\) with low <= high"):
        ModelConfig(architecture="mamba2", **SIZES, options={"time_step_limit": (1, 0)})


def test_option_literals_match_what_the_code_implements():
    hint = typing.get_type_hints(gla.GLAOptions)["feature_map"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(gla._FEATURE_MAPS)


def test_every_option_has_a_default():
    for arch in BUILTINS:
        options = get_architecture(arch).options
        assert issubclass(options, ArchOptions) and options.parse(arch, {}) == options()
        for f in dataclasses.fields(options):
            assert f.default is not dataclasses.MISSING, (arch, f.name)
    cfg = ModelConfig(architecture="rwkv7", **SIZES, options={"a_low_rank_dim": 8})
    assert rwkv7.RWKV7Options.from_config(cfg).low_rank_dims(cfg) == {**rwkv7.default_low_rank_dims(64, 16),
                                                                       "a_low_rank_dim": 8}
