"""``recurrent-lens erase`` (of an atom ``partition`` finds alive) and ``partition``: tables, reports, progress bars."""

from __future__ import annotations

import re

import pandas as pd

from tests.support.cli import gdn_sae  # noqa: F401 (a fixture)
from recurrent_lens.cli import main


def test_partition_then_erase(gdn_sae, tmp_path, capsys):
    parts = tmp_path / "partition.csv"
    assert main(["partition", "--sae", gdn_sae, "--eval-sequences", "4", "--tau", "0.01", "--csv", str(parts),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    alive = pd.read_csv(parts)
    assert re.search(rf"^  alive {len(alive)}, dead {16 - len(alive)}$", text, re.M)
    registers = int((alive["label"] == "register").sum())
    assert re.search(rf"^  registers {registers}, bundles {len(alive) - registers} ", text, re.M)
    assert re.search(r"^  delta BIC \S+ \(", text, re.M)

    atom = int(alive.sort_values("n")["atom"].iloc[-1])  # the most frequent, so it fires at t <= 32
    erased = tmp_path / "erase.csv"
    assert main(["erase", "--sae", gdn_sae, "--atom", str(atom), "--eval-sequences", "4", "--max-positions", "5",
                 "--control-multipliers", "1", "3", "--target", "20", "--csv", str(erased), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (f"erase atom {atom} on blocks.1.mixer.hook_state head 0 where it fires, read at t + 1: "
            "target token 20") in text
    for condition in ("erase", "add_x1", "add_x3"):
        assert re.search(rf"^  {condition} +5 +-?\d", text, re.M), condition
    rows = pd.read_csv(erased)
    assert rows.groupby("condition").size().to_dict() == {"erase": 5, "add_x1": 5, "add_x3": 5}


def test_progress_bars_of_erase_and_partition(gdn_sae, tmp_path, capsys):
    parts = tmp_path / "partition.csv"
    assert main(["partition", "--sae", gdn_sae, "--eval-sequences", "4", "--csv", str(parts)]) == 0
    assert "partition:" in capsys.readouterr().err
    atom = int(pd.read_csv(parts).sort_values("n")["atom"].iloc[-1])
    assert main(["erase", "--sae", gdn_sae, "--atom", str(atom), "--eval-sequences", "4", "--max-positions", "2"]) == 0
    err = capsys.readouterr().err
    assert "erase:" in err and "erase controls:" in err
