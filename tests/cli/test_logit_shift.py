"""``recurrent-lens logit-shift``: given atoms, the most dominant ones, --atoms vs --n-atoms."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tests.support.cli import gdn_sae  # noqa: F401 (a fixture)
from recurrent_lens.cli import main


def test_logit_shift(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "shift.csv"
    assert main(["logit-shift", "--sae", gdn_sae, "--eval-sequences", "4", "--atoms", "3", "0", "--eps", "0.5", "-2",
                 "--positions-per-atom", "6", "--readout", "final_norm", "--readout-offset", "2", "--csv", str(csv),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "read at t0 + 2 through final_norm: 2 atoms x 2 eps (n=24)" in text
    for line in (r"R\^2 zero-parameter  -?\d", r"R\^2 one-parameter   -?\d.* \(fitted scale ",
                 r"median cell R\^2 .* over 4 "):
        assert re.search("^  " + line, text, re.M), line
    rows = pd.read_csv(csv)
    assert len(rows) == 24 and set(rows["atom"]) == {0, 3} and set(rows["eps"]) == {0.5, -2.0}
    assert rows["pos"].min() >= 1 and rows["pos"].max() <= 31  # BOS skipped, read at t0 + 2 <= 33


def test_logit_shift_n_atoms(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "shift.csv"
    assert main(["logit-shift", "--sae", gdn_sae, "--eval-sequences", "4", "--n-atoms", "3", "--eps", "0.5",
                 "--positions-per-atom", "2", "--csv", str(csv), "--no-progress"]) == 0
    assert ": 3 atoms x 1 eps (n=6)" in capsys.readouterr().out
    assert pd.read_csv(csv)["atom"].nunique() == 3


@pytest.mark.parametrize("argv, message", [
    (["logit-shift", "--atoms", "1", "--n-atoms", "3"], "argument --n-atoms: not allowed with argument --atoms"),
    (["logit-shift", "--n-atoms", "0"], "argument --n-atoms: expected a positive integer, got 0"),
])
def test_bad_n_atoms(argv, message, gdn_sae, capsys):
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--sae", gdn_sae, "--no-progress", *argv[1:]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
