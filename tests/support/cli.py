"""What the command-line tests share: a tiny SAE saved by ``train-sae`` and its quick settings."""

from __future__ import annotations

import pytest

from recurrent_lens.cli import main

QUICK_SAE = ["--steps", "5", "--n-features", "16", "--k", "2", "--train-sequences", "16", "--no-progress"]


@pytest.fixture(scope="module")
def gdn_sae(tmp_path_factory) -> str:
    """A tiny WriteSAE (16 features) on the toy GDN's default hook, saved by ``train-sae``."""
    sae_dir = str(tmp_path_factory.mktemp("gdn") / "sae")
    assert main(["train-sae", "--arch", "gdn", "--out", sae_dir, *QUICK_SAE]) == 0
    return sae_dir
