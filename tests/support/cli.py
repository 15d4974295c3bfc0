"""What the command-line tests share: a tiny SAE saved by ``train-sae`` and its quick settings, and a tiny saved
Qwen3.5 checkpoint with a word tokenizer and a corpus, with the ``train-sae`` arguments that train on it."""

from __future__ import annotations

import pytest
import torch
from tests.support.helpers import tiny_qwen3_5, word_tokenizer

from recurrent_lens.cli import main

QUICK_SAE = ["--steps", "5", "--n-features", "16", "--k", "2", "--train-sequences", "16", "--no-progress"]


@pytest.fixture(scope="module")
def gdn_sae(tmp_path_factory) -> str:
    """A tiny WriteSAE (16 features) on the toy GDN's default hook, saved by ``train-sae``."""
    sae_dir = str(tmp_path_factory.mktemp("gdn") / "sae")
    assert main(["train-sae", "--arch", "gdn", "--out", sae_dir, *QUICK_SAE]) == 0
    return sae_dir


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Qwen3.5 checkpoint's directory, its corpus in ``docs.txt``."""
    path = tmp_path_factory.mktemp("qwen")
    tiny_qwen3_5(seed=0).save_pretrained(path)
    word_tokenizer(["<unk>", "<eos>", *WORDS]).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
            for n in torch.randint(5, 30, (60,), generator=g)]
    (path / "docs.txt").write_text("\n".join(docs) + "\n")
    return path


def run(*argv):
    """``recurrent-lens`` on ``argv`` given as any objects (paths, numbers)."""
    return main([str(a) for a in argv])


def small(checkpoint, out, *extra):
    """A seconds-long ``train-sae`` on ``checkpoint`` into ``out``."""
    return ["train-sae", "--model", checkpoint, "--dataset", checkpoint / "docs.txt", "--context-length", 16,
            "--steps", 6, "--batch-size", 32, "--n-features", 16, "--k", 2, "--buffer-size", 64,
            "--positions-per-seq", 4, "--no-progress", "--out", out, *extra]
