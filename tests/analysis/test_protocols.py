"""The analyses' docstrings document their options from the options dataclasses, and the install functions resolve
``options=`` like the other analyses."""

from __future__ import annotations

import textwrap
from dataclasses import fields

import pytest
import torch

from recurrent_lens import analysis
from recurrent_lens.sae import WriteSAE
from recurrent_lens.analysis.protocols import _doc_help, check_options, options_doc, resolve
from tests.support.helpers import tiny_gdn

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
