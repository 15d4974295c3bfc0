"""protocol="paper" vs "ours": presets equal the documented choices, explicit options win, settings records, and
the command line's protocol defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pandas as pd
import pytest
from tests.support.analysis import HOOK, _sae, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis
from recurrent_lens.analysis import PRESET, preset, preset_table
from recurrent_lens.cli import build_parser
from recurrent_lens.cli.args import resolve_args

# The documented choices, restated here independently of the code (docstrings of each function).
DOCUMENTED = {
    "substitution": {
        "paper": dict(replace="write", scale="match_norm", random="sae_atom", readout="last", readout_offset=None,
                      kl="native_to_condition", atom="dominant", max_firings_per_atom=30),
        "ours": dict(replace="update", scale="coefficient", random="rank1", readout="offset", readout_offset=1,
                     kl="native_to_condition", atom="dominant", max_firings_per_atom=30),
    },
    "logit_shift": {
        "paper": dict(eps=(0.1, 0.3, 1.0, 3.0), n_atoms=50, positions_per_atom=500, fit="context",
                      formula="closed_form", readout="unembed", readout_offset=1),
        "ours": dict(eps=(0.1, 0.3, 1.0, 3.0), n_atoms=10, positions_per_atom=50, fit="none", formula="closed_form",
                     readout="unembed", readout_offset=1),
    },
    "install": {
        "paper": dict(magnitude=3.0, magnitude_ref="kv", direction="out_proj", max_new_tokens=20),
        "ours": dict(magnitude=3.0, magnitude_ref="update", direction="jacobian", max_new_tokens=20),
    },
    "partition": {
        "paper": dict(statistic="median_cos_gmm", replace="update", max_firings_per_atom=None, tau=0.05),
        "ours": dict(statistic="median_cos_gmm", replace="update", max_firings_per_atom=200, tau=0.05),
    },
}
FUNCTIONS = {"substitution": [analysis.substitution_test], "logit_shift": [analysis.logit_shift_prediction],
             "install": [analysis.install, analysis.install_during_generation],
             "partition": [analysis.partition_atoms]}


@pytest.mark.parametrize("kind", list(DOCUMENTED))
def test_presets_are_the_documented_choices_with_sources(kind):
    for protocol in ("paper", "ours"):
        assert preset(kind, protocol) == DOCUMENTED[kind][protocol]
        for option, (value, source) in preset_table(kind, protocol).items():
            assert source, (kind, protocol, option)
            if protocol == "paper" and value is not None:
                assert "App." in source or "§" in source or "reference repository" in source or "Eq." in source
    for fn in FUNCTIONS[kind]:
        doc = inspect.getdoc(fn)
        for protocol in ("paper", "ours"):
            for option, value in DOCUMENTED[kind][protocol].items():
                if kind == "install" and option == "max_new_tokens" and fn is analysis.install:
                    continue
                shown = f"{option}={value!r}" if not isinstance(value, tuple) else f"{option}={value}"
                assert shown in doc, (fn.__name__, protocol, shown)


def test_every_function_records_its_protocol_in_frozen_settings():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=10)
    sae = _sae(model, n=8, k=2)
    for protocol in ("paper", "ours"):
        sub = analysis.substitution_test(model, sae, HOOK, 0, tokens, protocol=protocol)
        shift = analysis.logit_shift_prediction(model, sae, HOOK, 0, tokens, protocol=protocol, atoms=[1],
                                                positions_per_atom=4)
        part = analysis.partition_atoms(model, sae, HOOK, 0, tokens, protocol=protocol)
        inst = analysis.install(model, HOOK, 0, tokens, positions=[3], target=5, protocol=protocol)
        gen = analysis.install_during_generation(model, HOOK, 0, tokens[:, :6], positions=[3, 4, 5], target=5,
                                                 protocol=protocol, max_new_tokens=3)
        for res, kind in ((sub, "substitution"), (shift, "logit_shift"), (part, "partition"), (inst, "install"),
                          (gen, "install")):
            st = res.settings
            assert st.protocol == protocol and st["protocol"] == protocol
            for option, value in DOCUMENTED[kind][protocol].items():
                if option in st and option not in st.overrides:
                    got = tuple(st[option]) if isinstance(value, tuple) else st[option]
                    assert got == value, (kind, protocol, option)
        assert shift.settings.overrides == ("positions_per_atom",)
        assert gen.settings.overrides == ("max_new_tokens",)
        assert sub.settings.overrides == () and part.settings.overrides == ()
    st = sub.settings
    assert isinstance(st, analysis.SubstitutionSettings) and dict(st)["kl"] == st.kl and "atom" in st
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.atom = "rising"
    with pytest.raises(KeyError):
        st["nope"]
    assert {**st}["replace"] == "update" and st == dict(st)


def test_explicit_options_win_over_the_preset():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=10)
    sae = _sae(model, n=8, k=2)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, protocol="paper", replace="update",
                                     scale="match_norm")
    assert res.settings.replace == "update" and res.settings.overrides == ("replace",)
    # an explicit offset asks for the offset readout under either protocol
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, protocol="paper", readout_offset=2)
    assert (res.settings.readout, res.settings.readout_offset) == ("offset", 2)
    assert set(res.settings.overrides) == {"readout", "readout_offset"}
    with pytest.raises(ValueError, match="readout_offset: applies to readout='offset' only"):
        analysis.substitution_test(model, sae, HOOK, 0, tokens, readout="last", readout_offset=2)
    with pytest.raises(ValueError, match="protocol: expected one of"):
        analysis.substitution_test(model, sae, HOOK, 0, tokens, protocol="reference")
    for fn, kw in ((analysis.logit_shift_prediction, {}), (analysis.partition_atoms, {})):
        with pytest.raises(ValueError, match="protocol"):
            fn(model, sae, HOOK, 0, tokens, protocol="Paper", **kw)
    assert repr(PRESET) == "PRESET"


def test_an_options_dataclass_replaces_the_preset_and_keywords_still_win():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=10)
    sae = _sae(model, n=8, k=2)
    options = analysis.SubstitutionOptions(replace="write", max_firings_per_atom=5)
    res = analysis.substitution_test(model, sae, HOOK, 0, tokens, options=options, scale="match_norm")
    assert (res.settings.replace, res.settings.scale, res.settings.max_firings_per_atom) == ("write", "match_norm", 5)
    assert res.settings.overrides == ("replace", "scale", "max_firings_per_atom")
    same = analysis.substitution_test(model, sae, HOOK, 0, tokens, replace="write", scale="match_norm",
                                      max_firings_per_atom=5)
    pd.testing.assert_frame_equal(same.to_pandas(), res.to_pandas())
    with pytest.raises((ValueError, TypeError), match="options"):  # TypeError: the type checker of the tests
        analysis.substitution_test(model, sae, HOOK, 0, tokens, options=analysis.PartitionOptions())
    with pytest.raises((ValueError, TypeError), match="replace"):
        analysis.SubstitutionOptions(replace="erase")
    assert analysis.presets("partition")["paper"].max_firings_per_atom is None


def test_cli_protocol_defaults_and_explicit_flags():
    from recurrent_lens.cli import logit_shift, partition, substitution

    resolvers = {"substitution": substitution.resolve, "logit-shift": lambda a: resolve_args(a, "logit_shift"),
                 "partition": lambda a: resolve_args(a, "partition")}
    parser = build_parser()
    for argv, expected in (
        (["substitution", "--sae", "x"], dict(replace="update", atom="rising", positions="values", readout="offset")),
        (["substitution", "--sae", "x", "--protocol", "paper"],
         dict(replace="write", scale="match_norm", random="sae_atom", atom="dominant", positions="all",
              readout="last")),
        (["substitution", "--sae", "x", "--protocol", "paper", "--replace", "update", "--readout-offset", "16"],
         dict(replace="update", readout="offset", readout_offset=16)),
        (["logit-shift", "--sae", "x", "--protocol", "paper"],
         dict(n_atoms=50, positions_per_atom=500, fit="context", eps=[0.1, 0.3, 1.0, 3.0])),
        (["logit-shift", "--sae", "x"], dict(n_atoms=10, positions_per_atom=50, fit="none")),
        (["partition", "--sae", "x", "--protocol", "paper"], dict(max_firings_per_atom=None, tau=0.05)),
        (["partition", "--sae", "x", "--protocol", "paper", "--tau", "0.1"], dict(tau=0.1)),
    ):
        args = parser.parse_args(argv)
        resolvers[argv[0]](args)
        for k, v in expected.items():
            assert getattr(args, k) == v, (argv, k)
