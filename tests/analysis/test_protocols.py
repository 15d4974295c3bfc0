"""Every analysis's options, declared once: presets equal the documented choices of each protocol, explicit
options win, settings record the protocol, the docstrings' options sections are generated from the options
dataclasses, and the install functions and reproduce take options dataclasses."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from dataclasses import fields

import pandas as pd
import pytest
import torch
from tests.support.analysis import HOOK as ANALYSIS_HOOK
from tests.support.analysis import _sae, _tokens
from tests.support.helpers import tiny_gdn

from recurrent_lens import analysis
from recurrent_lens.analysis import PRESET, preset, preset_table
from recurrent_lens.analysis.protocols import _doc_help, check_options, options_doc, resolve
from recurrent_lens.sae import WriteSAE

# The documented choices, restated here independently of the code (docstrings of each function).
PRESETS = {
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


@pytest.mark.parametrize("kind", list(PRESETS))
def test_presets_are_the_documented_choices_with_sources(kind):
    for protocol in ("paper", "ours"):
        assert preset(kind, protocol) == PRESETS[kind][protocol]
        for option, (value, source) in preset_table(kind, protocol).items():
            assert source, (kind, protocol, option)
            if protocol == "paper" and value is not None:
                assert "App." in source or "§" in source or "reference repository" in source or "Eq." in source
    for fn in FUNCTIONS[kind]:
        doc = inspect.getdoc(fn)
        for protocol in ("paper", "ours"):
            for option, value in PRESETS[kind][protocol].items():
                if kind == "install" and option == "max_new_tokens" and fn is analysis.install:
                    continue
                shown = f"{option}={value!r}" if not isinstance(value, tuple) else f"{option}={value}"
                assert shown in doc, (fn.__name__, protocol, shown)


def test_every_function_records_its_protocol_in_frozen_settings():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=10)
    sae = _sae(model, n=8, k=2)
    for protocol in ("paper", "ours"):
        sub = analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, protocol=protocol)
        shift = analysis.logit_shift_prediction(model, sae, ANALYSIS_HOOK, 0, tokens, protocol=protocol, atoms=[1],
                                                positions_per_atom=4)
        part = analysis.partition_atoms(model, sae, ANALYSIS_HOOK, 0, tokens, protocol=protocol)
        inst = analysis.install(model, ANALYSIS_HOOK, 0, tokens, positions=[3], target=5, protocol=protocol)
        gen = analysis.install_during_generation(model, ANALYSIS_HOOK, 0, tokens[:, :6], positions=[3, 4, 5], target=5,
                                                 protocol=protocol, max_new_tokens=3)
        for res, kind in ((sub, "substitution"), (shift, "logit_shift"), (part, "partition"), (inst, "install"),
                          (gen, "install")):
            st = res.settings
            assert st.protocol == protocol and st["protocol"] == protocol
            for option, value in PRESETS[kind][protocol].items():
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
    res = analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, protocol="paper", replace="update",
                                     scale="match_norm")
    assert res.settings.replace == "update" and res.settings.overrides == ("replace",)
    # an explicit offset asks for the offset readout under either protocol
    res = analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, protocol="paper", readout_offset=2)
    assert (res.settings.readout, res.settings.readout_offset) == ("offset", 2)
    assert set(res.settings.overrides) == {"readout", "readout_offset"}
    with pytest.raises(ValueError, match="readout_offset: applies to readout='offset' only"):
        analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, readout="last", readout_offset=2)
    with pytest.raises(ValueError, match="protocol: expected one of"):
        analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, protocol="reference")
    for fn, kw in ((analysis.logit_shift_prediction, {}), (analysis.partition_atoms, {})):
        with pytest.raises(ValueError, match="protocol"):
            fn(model, sae, ANALYSIS_HOOK, 0, tokens, protocol="Paper", **kw)
    assert repr(PRESET) == "PRESET"


def test_an_options_dataclass_replaces_the_preset_and_keywords_still_win():
    model = tiny_gdn(0)
    tokens = _tokens(model, B=3, T=10)
    sae = _sae(model, n=8, k=2)
    options = analysis.SubstitutionOptions(replace="write", max_firings_per_atom=5)
    res = analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, options=options, scale="match_norm")
    assert (res.settings.replace, res.settings.scale, res.settings.max_firings_per_atom) == ("write", "match_norm", 5)
    assert res.settings.overrides == ("replace", "scale", "max_firings_per_atom")
    same = analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, replace="write", scale="match_norm",
                                      max_firings_per_atom=5)
    pd.testing.assert_frame_equal(same.to_pandas(), res.to_pandas())
    with pytest.raises((ValueError, TypeError), match="options"):  # TypeError: the type checker of the tests
        analysis.substitution_test(model, sae, ANALYSIS_HOOK, 0, tokens, options=analysis.PartitionOptions())
    with pytest.raises((ValueError, TypeError), match="replace"):
        analysis.SubstitutionOptions(replace="erase")
    assert analysis.presets("partition")["paper"].max_firings_per_atom is None


DOCUMENTED = [(analysis.substitution_test, "substitution", analysis.SubstitutionOptions),
              (analysis.logit_shift_prediction, "logit_shift", analysis.LogitShiftOptions),
              (analysis.partition_atoms, "partition", analysis.PartitionOptions),
              (analysis.erase_atom, "erase", analysis.EraseOptions),
              (analysis.install, "install", analysis.InstallOptions),
              (analysis.install_during_generation, "install", analysis.GenerationInstallOptions)]
HOOK = "blocks.0.mixer.hook_state"


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("function, kind, cls", DOCUMENTED, ids=[f.__name__ for f, _, _ in DOCUMENTED])
def test_the_options_section_is_generated_and_not_repeated_by_hand(function, kind, cls):
    section = textwrap.indent(options_doc(kind, cls), " " * 4)
    doc = function.__doc__
    assert doc.count(section) == 1
    entries = [line.strip() for line in section.splitlines() if line.startswith(" " * 8) and not
               line.startswith(" " * 12)]
    assert [e.split(" ", 1)[0] for e in entries[-len(fields(cls)):]] == [f.name for f in fields(cls)]
    by_hand = _flat(doc.replace(section, ""))
    for f in fields(cls):
        assert f" {f.name}: " not in by_hand, f"{function.__name__} documents {f.name} by hand"
        assert _flat(_doc_help(f.metadata["help"], f.default)) not in by_hand, f.name
    assert "Returns:" not in section and doc.index(section) < doc.index("Example")


def test_the_section_gives_each_protocol_option_its_values_and_sources():
    doc = _flat(options_doc("partition"))
    assert ("max_firings_per_atom (int | None, > 0): *(protocol)* cosines per atom for 'median_cos_gmm', a seeded "
            "subsample. Ours ``max_firings_per_atom=200`` (this library: a seeded subsample of 200 firings per atom); "
            "paper ``max_firings_per_atom=None`` (§3.1: the median over the atom's firings (no cap stated)).") in doc
    assert "min_firings (int, > 0): atoms with fewer firings count as dead. Default ``min_firings=1``." in doc
    substitution = _flat(options_doc("substitution"))
    assert "An explicit ``readout_offset`` asks for the offset readout" in substitution
    assert "with ``sae_type`` flat_sae and ``scale`` match_norm" in substitution  # the CLI's flags as keywords
    assert "*(protocol)*" not in options_doc("erase")


@pytest.fixture(scope="module")
def site():
    model = tiny_gdn(n_layers=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_install_takes_options_and_keywords_win(site):
    model, tokens = site
    d = torch.ones(model.cfg.d_v)
    by_keyword = analysis.install(model, HOOK, 0, tokens, d, [3], target=5, magnitude=1.5, magnitude_ref="kv")
    by_options = analysis.install(model, HOOK, 0, tokens, d, [3], target=5,
                                  options=analysis.InstallOptions(magnitude=1.5, magnitude_ref="kv"))
    assert by_options.settings == by_keyword.settings
    assert by_options.settings.overrides == ("magnitude", "magnitude_ref", "direction")
    both = analysis.install(model, HOOK, 0, tokens, d, [3], target=5, magnitude=2.0,
                            options=analysis.InstallOptions(magnitude=1.5))
    assert both.settings.magnitude == 2.0
    paper = analysis.install(model, HOOK, 0, tokens, positions=[3], target=5, protocol="paper",
                             options=analysis.presets("install")["paper"])
    assert paper.settings.direction == "out_proj" and paper.settings.overrides == ()


def test_install_during_generation_takes_its_options(site):
    model, tokens = site
    options = analysis.GenerationInstallOptions(max_new_tokens=3, magnitude_ref="write")
    res = analysis.install_during_generation(model, HOOK, 0, tokens[:, :5], positions=[4], target=5, options=options)
    assert (res.settings.max_new_tokens, res.settings.magnitude_ref) == (3, "write")
    assert res.settings.overrides == ("magnitude_ref", "max_new_tokens")


def test_install_options_errors_name_the_argument(site):
    model, tokens = site
    with pytest.raises(ValueError, match="^options: expected a GenerationInstallOptions or None, got InstallOptions$"):
        resolve("install", "ours", {}, analysis.InstallOptions())
    assert resolve("install", "ours", {}, analysis.GenerationInstallOptions(), analysis.InstallOptions)[1] == ()
    # under the tests, beartype checks the annotation first (pyproject's --jaxtyping-packages)
    with pytest.raises(TypeError, match=r"parameter 'options'(.|\n)*GenerationInstallOptions"):
        analysis.install_during_generation(model, HOOK, 0, tokens[:, :5], positions=[4], target=5,
                                           options=analysis.InstallOptions())
    with pytest.raises(ValueError, match="^direction: expected a tensor with options.direction='given', got PRESET$"):
        analysis.install(model, HOOK, 0, tokens, positions=[3], target=5,
                         options=analysis.InstallOptions(direction="given"))


def test_reproduce_takes_options_dataclasses_and_refuses_a_dict(site):
    from recurrent_lens.analysis.reproduce import reproduce

    model, tokens = site
    # under the tests, beartype checks the annotation first; without it, check_options names the argument
    with pytest.raises(TypeError, match=r"parameter 'logit_shift'(.|\n)*LogitShiftOptions"):
        reproduce(model, WriteSAE(8, 8, 16, k=2), HOOK, 0, tokens, tokens[:, :5], logit_shift={"n_atoms": 2})
    with pytest.raises(ValueError, match="^substitution: expected a SubstitutionOptions or None, got dict$"):
        check_options("substitution", {"atom": "rising"}, analysis.SubstitutionOptions)
