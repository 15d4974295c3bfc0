"""``recurrent-lens reproduce``: the paper's claims on the toy under both protocols and on a tiny checkpoint."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from recurrent_lens.cli import main


@pytest.mark.parametrize("protocol", ["paper", "ours"])
def test_reproduce_on_the_toy(protocol, tmp_path, capsys):
    assert main(["reproduce", "--quick", "--no-progress", "--protocol", protocol, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "92.4%" in out and "targets ranked 17-33" in out and "lower half" in out
    table = pd.read_csv(tmp_path / f"reproduce_{protocol}.csv")
    assert len(table) == 11 and (table["protocol"] == protocol).all() and table["value"].notna().all()
    assert (tmp_path / f"reproduce_{protocol}.png").stat().st_size > 0


def test_reproduce_on_a_tiny_checkpoint(tmp_path, capsys):
    from tests.support.helpers import tiny_qwen3_5
    from tests.support.helpers import word_tokenizer
    from tests.support.cli import WORDS

    ckpt = tmp_path / "qwen"
    tiny_qwen3_5(seed=0).save_pretrained(ckpt)
    word_tokenizer(["<unk>", "<eos>", *WORDS]).save_pretrained(ckpt)
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(12)]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    torch.manual_seed(0)
    from recurrent_lens.sae import WriteSAE

    WriteSAE(8, 12, 16, k=2).save_pretrained(str(tmp_path / "sae"))
    argv = ["reproduce", "--model", ckpt, "--dataset", tmp_path / "docs.txt", "--context-length", 16, "--sae",
            tmp_path / "sae", "--hook", "blocks.0.mixer.hook_state", "--head", 1, "--sequences", 8,
            "--install-prompts", 4, "--magnitudes", 1.5, 3, "--population-atoms", 4, "--no-progress", "--out",
            tmp_path / "out"]
    (tmp_path / "out").mkdir()
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "targets ranked 48-96" in out
    table = pd.read_csv(tmp_path / "out" / "reproduce_paper.csv")
    assert len(table) == 12 and set(table["claim"]) >= {"install m=1.5: installed inclusion",
                                                        "partition: delta BIC"}
    with pytest.raises(SystemExit):
        main([str(a) for a in argv[:argv.index("--hook")]] + ["--out", str(tmp_path / "out")])
    assert "--hook and --head: required" in capsys.readouterr().err


def test_reproduce_refuses_a_bad_device_by_name(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["reproduce", "--quick", "--device", "gpu", "--out", str(tmp_path)])
    assert "argument --device: expected a torch device" in capsys.readouterr().err
