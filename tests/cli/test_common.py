"""What the subcommands share after parsing: a saved SAE, a site, an index or an output refused as a usage error,
a warning for an SAE of another site."""

from __future__ import annotations

import os

import pytest

from tests.support.cli import gdn_sae  # noqa: F401 (a fixture)
from recurrent_lens.cli import main


@pytest.mark.parametrize("argv, message", [
    (["erase", "--atom", "16"], "argument --atom: expected an atom index in [0, 16), got 16"),
    (["erase", "--atom", "-1"], "argument --atom: expected an atom index in [0, 16), got -1"),
    (["erase", "--atom", "0", "--target", "34"], "argument --target: expected a token id in [0, 34), got 34"),
    (["erase", "--atom", "0", "--readout-offset", "33"], "argument --readout-offset: expected at most 32"),
    (["logit-shift", "--atoms", "2", "99", "-3"], "argument --atoms: expected atom indices in [0, 16), got 99, -3"),
    (["partition", "--hook", "blocks.0.mixer.hook_write"], "argument --hook"),
    (["partition", "--sae", "{parent}"], "argument --sae: cannot load an SAE from"),
])
def test_bad_arguments_with_sae(argv, message, gdn_sae, capsys):
    argv = [a.format(parent=os.path.dirname(gdn_sae)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["substitution", "--readout-offset", "40"], "argument --readout-offset: expected at most 32"),
    (["substitution", "--csv", "{blocker}/x.csv"], "argument --csv: cannot write"),
    (["partition", "--csv", "{blocker}/x.csv"], "argument --csv: cannot write"),
])
def test_bad_arguments_refused_before_work(argv, message, gdn_sae, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker) for a in argv]
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sae_from_another_site_gets_a_warning(gdn_sae, capsys):
    assert main(["partition", "--sae", gdn_sae, "--head", "1", "--eval-sequences", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the SAE in" in err and "trained on head 0, this run uses 1" in err
