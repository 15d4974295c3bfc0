"""Checkpoints of a tiny Qwen3.5 hybrid saved by transformers, shared by several test modules."""

import pytest
from tests.support.helpers import tiny_qwen3_5, word_tokenizer

from recurrent_lens import HookedRecurrentModel


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    ref = tiny_qwen3_5(seed=1)
    path = tmp_path_factory.mktemp("qwen")
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tok")
    tiny_qwen3_5(seed=3).save_pretrained(path)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(95)]
    word_tokenizer(words).save_pretrained(path)
    return HookedRecurrentModel.from_pretrained(path)
