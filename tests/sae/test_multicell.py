"""Many cells from one model pass: same SAEs as training each cell alone, exact resume, sources, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.data import open_tokens
from recurrent_lens.sae import TrainConfig, load
from recurrent_lens.sae.cells import Cell
from recurrent_lens.sae.multicell import MultiCellTrainer, train_cells

A, B = Cell("blocks.0.mixer.hook_state", 1), Cell("blocks.1.mixer.hook_write", 2)


@pytest.fixture(scope="module")
def model():
    return tiny_gdn(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 61, (24, 20), generator=torch.Generator().manual_seed(2))


def cfg(**kw):
    base = dict(n_steps=12, batch_size=32, n_features=32, k=4, buffer_size=128, positions_per_seq=6,
                model_batch_size=4, lr=3e-3, warmup_steps=2, resample_every=5, log_every=4, progress=False,
                sae_kwargs={"dead_threshold": 3})
    base.update(kw)
    return TrainConfig(**base)


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cells_together_equal_cells_alone_and_one_pass_per_batch(model, tokens):
    passes = []
    handle = model.embed.register_forward_hook(lambda *a: passes.append(1))
    try:
        together = train_cells(model, [A, B], tokens, cfg())
        n_together = len(passes)
        alone = train_cells(model, [B], tokens, cfg())
    finally:
        handle.remove()
    assert same(together[B], alone[B])
    assert n_together == len(passes) - n_together  # two cells cost the passes of one
    assert not same(together[A], together[B]) if together[A].cfg.d_k == together[B].cfg.d_k else True
    assert together[A].cfg.metadata["hook_name"] == A.hook_name and together[B].cfg.metadata["head"] == 2


def test_resume_is_bit_identical(model, tokens, tmp_path):
    full = train_cells(model, [A, B], tokens, cfg())
    MultiCellTrainer(model, [A, B], tokens, cfg(checkpoint_every=5), out_dir=str(tmp_path)).train(until_step=7)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["step"] == 7
    assert sorted(os.listdir(tmp_path / A.name)) == ["checkpoint-00000007.pt"]  # step 5's files are gone
    resumed = MultiCellTrainer(model, [A, B], tokens, cfg(checkpoint_every=5), out_dir=str(tmp_path))
    assert resumed.step == 7
    saes = resumed.train()
    for cell in (A, B):
        assert same(full[cell], saes[cell]), cell
        loaded = load(str(tmp_path / cell.name))
        assert torch.equal(loaded.V_dec, saes[cell].V_dec)
        log = json.loads((tmp_path / cell.name / "train_log.json").read_text())
        assert log["train"][-1]["step"] == 12


def test_resume_refuses_other_settings_or_cells(model, tokens, tmp_path):
    MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(tmp_path)).train(until_step=2)
    with pytest.raises(ValueError, match="lr differ"):
        MultiCellTrainer(model, [A], tokens, cfg(lr=1e-2), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cells"):
        MultiCellTrainer(model, [A, B], tokens, cfg(), out_dir=str(tmp_path))


def test_token_source_and_validation(model, tokens, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, tokens.numpy())
    from_source = train_cells(model, [A], open_tokens(str(path)), cfg(n_steps=4))
    assert from_source[A].cfg.metadata["train_steps"] == 4
    trainer = MultiCellTrainer(model, [A, B], tokens[:20], cfg(n_steps=4, val_every=2), val_tokens=tokens[20:])
    trainer.train()
    assert [row["step"] for row in trainer.logs[B].val] == [2, 4]
    assert 0 < trainer.logs[A].val[-1]["val_l0"] <= 4


def test_bad_input_is_refused_before_any_work(model, tokens, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out_dir"):
        MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(blocker / "sub"))
    with pytest.raises(ValueError, match="not a recurrent layer|hook_name"):
        MultiCellTrainer(model, [("blocks.5.mixer.hook_state", 0)], tokens, cfg())
    with pytest.raises(ValueError, match="head"):
        MultiCellTrainer(model, [("blocks.0.mixer.hook_state", 4)], tokens, cfg())
    with pytest.raises(ValueError, match="hook_name"):
        MultiCellTrainer(model, [("blocks.0.mixer.hook_read", 0)], tokens, cfg())
    with pytest.raises(ValueError, match="d_vocab"):
        MultiCellTrainer(model, [A], tokens + 100, cfg())
    with pytest.raises(ValueError, match="batch_size"):
        MultiCellTrainer(model, [A], tokens, cfg(batch_size=0))
    with pytest.raises(ValueError, match="distributed"):
        MultiCellTrainer(model, [A], tokens, cfg(), distributed="data")


def test_a_batch_larger_than_the_store_is_refused_before_any_work(tmp_path):
    from recurrent_lens.sae.store import StateStore

    (tmp_path / "layer_0").mkdir()
    np.save(tmp_path / "layer_0" / "head_1.npy", np.random.rand(20, 3, 5).astype(np.float32))
    store = StateStore(str(tmp_path))
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size: expected at most the 20 states stored for "
                                         r"blocks.0.mixer.hook_state.h1 in .*, got 32"):
        MultiCellTrainer(None, store.cells, store, cfg(batch_size=32, buffer_size=32))


def test_a_finished_run_keeps_no_buffers_and_reruns_as_a_no_op(model, tokens, tmp_path):
    first = train_cells(model, [A], tokens, cfg(n_steps=3), out_dir=str(tmp_path))
    assert not list(tmp_path.glob("data-*.pt"))
    assert json.loads((tmp_path / "checkpoint.json").read_text())["complete"] is True
    again = MultiCellTrainer(model, [A], tokens, cfg(n_steps=3), out_dir=str(tmp_path))
    assert again.step == 3 and same(again.train()[A], first[A])
