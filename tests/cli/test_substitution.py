"""``recurrent-lens substitution`` on an SAE saved by ``train-sae``."""

from __future__ import annotations

import os
import re

import pandas as pd

from tests.support.cli import QUICK_SAE, gdn_sae  # noqa: F401 (a fixture)
from recurrent_lens.cli import main


def test_train_sae_then_substitution(tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    assert main(["train-sae", "--arch", "mamba2", "--out", str(sae_dir), *QUICK_SAE]) == 0
    assert os.path.exists(sae_dir / "sae_weights.safetensors")
    csv = tmp_path / "rows.csv"
    assert main(["substitution", "--arch", "mamba2", "--sae", str(sae_dir), "--eval-sequences", "4",
                 "--csv", str(csv), "--scale", "match_norm", "--positions", "all", "--atom", "dominant",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"atom beats delete: \d+\.\d% \(n=\d+\)", text)
    # mamba2's probe site (where its recall lives) is layer 0
    assert "substitution test on blocks.0.mixer.hook_state head 0" in text and "read at t + 1, dominant atom" in text
    rows = pd.read_csv(csv)
    assert rows["pos"].nunique() > 8 and rows["pos"].max() <= 32  # every position, read at t + 1


def test_substitution_controls_and_flat_svd_options(gdn_sae, tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    assert main(["substitution", "--sae", gdn_sae, "--eval-sequences", "4", "--random", "empirical", "--rank1-atoms",
                 "--csv", str(csv), "--no-progress"]) == 0
    assert re.search(r"atom beats delete: \d+\.\d% \(n=\d+\)", capsys.readouterr().out)
    assert set(pd.read_csv(csv)["pos"]) <= {2, 4, 6, 8, 10, 12, 14, 16}
