"""The trainer: many cells from one model pass (same SAEs as each cell alone), exact resume, sources, bad
input; and its one-cell case (SAETrainer, train): loss falls, held-out quality, checkpoints."""

import json
import os

import numpy as np
import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.data import open_tokens
from recurrent_lens.sae import SAETrainer, TrainConfig, WriteSAE, load, train
from recurrent_lens.states.cells import Cell
from recurrent_lens.sae.trainer import MultiCellTrainer, train_cells

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


def test_how_to_draw_and_what_to_hold_out_are_checked_before_any_work(model, tokens):
    windows = list(tokens)
    with pytest.raises(ValueError, match="draw: 'generator' reads a token tensor in one process"):
        MultiCellTrainer(model, [A], windows, cfg(), draw="generator")
    with pytest.raises(ValueError, match="draw: expected 'per_sequence' or 'generator', got 'random'"):
        MultiCellTrainer(model, [A], tokens, cfg(), draw="random")
    with pytest.raises(ValueError, match="TrainConfig.val_sequences: holds out the last sequences of a token tensor"):
        MultiCellTrainer(model, [A], windows, cfg(val_sequences=2))
    with pytest.raises(ValueError, match="val_tokens: given together with TrainConfig.val_sequences=2"):
        MultiCellTrainer(model, [A], tokens, cfg(val_sequences=2), val_tokens=tokens[:2])
    with pytest.raises(ValueError, match="TrainConfig.val_sequences: expected fewer than the 24 sequences"):
        MultiCellTrainer(model, [A], tokens, cfg(val_sequences=24))
    with pytest.raises(ValueError, match="TrainConfig.skip_positions: sequences of length 20 leave no position"):
        MultiCellTrainer(model, [A], tokens, cfg(skip_positions=20))


def test_a_state_feed_given_as_data_is_read_as_it_is(model, tokens, tmp_path):
    from recurrent_lens.states.feeds import HarvestFeed

    c = cfg()
    built = MultiCellTrainer(model, [A, B], HarvestFeed(model, [A, B], tokens, c), c, out_dir=str(tmp_path)).train()
    plain = MultiCellTrainer(model, [A, B], tokens, c).train()
    assert same(built[A], plain[A]) and same(built[B], plain[B])
    with pytest.raises(ValueError, match="cells: expected the cells the feed reads"):
        MultiCellTrainer(model, [B], HarvestFeed(model, [A], tokens, c), c)
    with pytest.raises(ValueError, match="cfg: the feed draws with other settings"):
        MultiCellTrainer(model, [A], HarvestFeed(model, [A], tokens, c), cfg(seed=1))
    with pytest.raises(ValueError, match="draw: a feed given as data draws its own way"):
        MultiCellTrainer(model, [A], HarvestFeed(model, [A], tokens, c), c, draw="generator")


def test_val_sequences_hold_out_the_last_sequences_as_val_tokens_does(model, tokens):
    held = MultiCellTrainer(model, [A], tokens, cfg(val_sequences=4)).train()
    given = MultiCellTrainer(model, [A], tokens[:20], cfg(), val_tokens=tokens[20:]).train()
    assert same(held[A], given[A])


def test_a_batch_larger_than_the_store_is_refused_before_any_work(tmp_path):
    from recurrent_lens.states.store import StateStore

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


def test_resumed_train_log_equals_an_uninterrupted_one(model, tokens, tmp_path):
    # step 6 is mid log window (log_every=4): the running averages must survive the checkpoint
    train_cells(model, [A, B], tokens, cfg(), out_dir=str(tmp_path / "full"), val_tokens=tokens[:4])
    MultiCellTrainer(model, [A, B], tokens, cfg(), out_dir=str(tmp_path / "cut"), val_tokens=tokens[:4]).train(
        until_step=6)
    MultiCellTrainer(model, [A, B], tokens, cfg(), out_dir=str(tmp_path / "cut"), val_tokens=tokens[:4]).train()
    for cell in (A, B):
        full = (tmp_path / "full" / cell.name / "train_log.json").read_text()
        assert (tmp_path / "cut" / cell.name / "train_log.json").read_text() == full
        assert [row["step"] for row in json.loads(full)["train"]] == [4, 8, 12]


def test_resume_checks_the_weights_and_the_data(model, tokens, tmp_path):
    MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(tmp_path)).train(until_step=2)
    changed = tiny_gdn(seed=0)
    with torch.no_grad():
        changed.embed.weight[3, 0] += 1e-3
    with pytest.raises(ValueError, match=r"other weights: sha256: recorded '[0-9a-f]{64}', current '[0-9a-f]{64}'"
                                         r".*use another output directory \(--out\) or delete"):
        MultiCellTrainer(changed, [A], tokens, cfg(), out_dir=str(tmp_path))
    other = tokens.clone()
    other[0, 0] += 1
    with pytest.raises(ValueError, match="other data: sha256: recorded"):
        MultiCellTrainer(model, [A], other, cfg(), out_dir=str(tmp_path))
    assert MultiCellTrainer(model, [A], tokens.clone(), cfg(), out_dir=str(tmp_path)).step == 2


def test_resume_checks_a_file_source_and_its_order(model, tokens, tmp_path):
    ids, out = tmp_path / "ids.npy", str(tmp_path / "out")
    np.save(ids, tokens.numpy())
    MultiCellTrainer(model, [A], open_tokens(str(ids)), cfg(), out_dir=out).train(until_step=3)
    with pytest.raises(ValueError, match="other data .*skip: recorded 0, current 2"):
        MultiCellTrainer(model, [A], open_tokens(str(ids), skip=2), cfg(), out_dir=out)
    with pytest.raises(ValueError, match="other data: recorded"):
        MultiCellTrainer(model, [A], iter(list(tokens)), cfg(), out_dir=out)
    np.save(ids, tokens.flip(0).numpy())
    with pytest.raises(ValueError, match="other data .*content: recorded"):
        MultiCellTrainer(model, [A], open_tokens(str(ids)), cfg(), out_dir=out)


def test_resume_checks_the_order_of_a_plain_iterable(model, tokens, tmp_path):
    class Rows:
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(list(self.rows))

    MultiCellTrainer(model, [A], Rows(tokens), cfg(), out_dir=str(tmp_path)).train(until_step=3)
    trainer = MultiCellTrainer(model, [A], Rows(tokens.flip(0)), cfg(), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="windows already read this epoch"):
        trainer.train()


def test_a_run_without_recorded_weights_is_not_resumed(model, tokens, tmp_path):
    MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(tmp_path)).train(until_step=2)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    del manifest["weights"], manifest["data"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="older recurrent_lens that did not record the weights and data"):
        MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(tmp_path))


def reference_store(path, states):
    from recurrent_lens.states.store import StateStore

    (path / "layer_0").mkdir(parents=True)
    np.save(path / "layer_0" / "head_1.npy", states.numpy())
    return StateStore(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    from recurrent_lens.integrity import NonFiniteError

    states = torch.randn(2000, 4, 6, generator=torch.Generator().manual_seed(0))
    cell = Cell("blocks.0.mixer.hook_state", 1)
    row = int(next(reference_store(tmp_path / "good", states).batch_indices(cell, 32, seed=0, start=3))[5])
    states[row, 1, 2] = bad  # one state among 2000, read in the batch of step 3
    out = tmp_path / "out"
    trainer = MultiCellTrainer(None, [cell], reference_store(tmp_path / "bad", states),
                               cfg(checkpoint_every=2, log_every=100), out_dir=str(out))
    message = ("non-finite loss at step 3" if bad == 1e30 else
               rf"non-finite training states at step 3 \(row 5 of the batch\); the first non-finite state read: "
               rf"store row {row}")
    with pytest.raises(NonFiniteError, match=rf"blocks.0.mixer.hook_state.h1: training diverged: {message}"):
        trainer.train()
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2
    kept = torch.load(out / cell.name / "checkpoint-00000002.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in kept["sae_state"].values() if t.is_floating_point())
    assert not (out / cell.name / "train_log.json").exists() and not (out / cell.name / "cfg.json").exists()


def test_a_huge_learning_rate_is_caught(tmp_path):
    from recurrent_lens.integrity import NonFiniteError

    store = reference_store(tmp_path / "store", torch.randn(512, 4, 6, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(NonFiniteError, match="training diverged: non-finite"):
        train_cells(None, [Cell("blocks.0.mixer.hook_state", 1)], store, cfg(lr=1e6, warmup_steps=0, n_steps=40,
                                                                            max_nmse=0.0))


def test_a_run_that_diverges_but_stays_finite_is_stopped_before_its_next_checkpoint(model, long_tokens, tmp_path):
    from recurrent_lens.integrity import DivergedError

    cfg = small_cfg(lr=30.0, warmup_steps=0, checkpoint_every=1)  # finite, far past the bound (asserted below)
    trainer = SAETrainer(model, ONE_HOOK, 0, long_tokens, cfg, out_dir=str(tmp_path))
    with pytest.raises(DivergedError, match=rf"{ONE_HOOK}.h0: training diverged: normalised MSE above "
                                            r"TrainConfig.max_nmse=1000 \(finite, .*\) at step 1\b"):
        trainer.train()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 1  # the last step below the bound
    sae, log = train(model, ONE_HOOK, 0, long_tokens, small_cfg(lr=30.0, warmup_steps=0, n_steps=20, max_nmse=0.0))
    assert log.train[-1]["nmse"] > 1000  # with the check off the run goes on, finite and useless


def test_a_nan_weight_in_the_model_is_caught(tokens):
    from recurrent_lens.integrity import NonFiniteError

    broken = tiny_gdn(seed=0)
    with torch.no_grad():
        broken.blocks[0].ln1.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"blocks.0.mixer.hook_state.h1: training diverged: non-finite "
                                             r"(training states|weights) at step 0.*sequence \d+, position \d+"):
        train_cells(broken, [A], tokens, cfg())
    with pytest.raises(NonFiniteError, match="held-out states of blocks.0.mixer.hook_state.h1: .*sequence 0"):
        MultiCellTrainer(broken, [A], tokens, cfg(), val_tokens=tokens[:2])


def test_training_from_a_store_that_grew_is_not_resumed(model, tokens, tmp_path):
    from recurrent_lens.states.store import StateStore, harvest_to_store

    kw = dict(positions_per_seq=6, progress=False)
    harvest_to_store(model, [A], tokens, tmp_path / "store", max_sequences=12, **kw)
    out = str(tmp_path / "out")
    MultiCellTrainer(None, [A], StateStore(tmp_path / "store"), cfg(), out_dir=out).train(until_step=2)
    harvest_to_store(model, [A], tokens, tmp_path / "store", **kw)
    with pytest.raises(ValueError, match="other data .*sha256: recorded"):
        MultiCellTrainer(None, [A], StateStore(tmp_path / "store"), cfg(), out_dir=out)


def test_an_iterable_too_short_for_skip_positions_names_the_setting(model, tokens):
    trainer = MultiCellTrainer(model, [A], iter(list(tokens)), cfg(skip_positions=20))
    with pytest.raises(ValueError, match=r"^TrainConfig\.skip_positions: sequences of length 20 leave no position"):
        trainer.train()


def test_resume_may_change_how_the_run_reports_but_not_what_it_computes(model, tokens, tmp_path):
    MultiCellTrainer(model, [A], tokens, cfg(), out_dir=str(tmp_path)).train(until_step=3)
    resumed = MultiCellTrainer(model, [A], tokens, cfg(progress=True, wandb_run_name="again"), out_dir=str(tmp_path))
    assert resumed.step == 3
    resumed.train(until_step=4)  # releases out_dir
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        MultiCellTrainer(model, [A], tokens, cfg(lr=1e-3), out_dir=str(tmp_path))


# ---------------------------------------------------------------- one cell: SAETrainer and train()

ONE_HOOK = "blocks.0.mixer.hook_state"


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(0, 61, (48, 24), generator=torch.Generator().manual_seed(1))


def small_cfg(**kw):
    base = dict(n_steps=40, batch_size=64, n_features=128, k=16, buffer_size=512, positions_per_seq=16,
                model_batch_size=16, lr=3e-3, lr_min=3e-4, warmup_steps=5, resample_every=15, log_every=10,
                progress=False, sae_kwargs={"k_aux": 16, "dead_threshold": 5})
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_validation_metrics(model, long_tokens):
    sae, log = train(model, ONE_HOOK, 1, long_tokens, small_cfg(n_steps=60, val_sequences=8, val_every=60))
    assert isinstance(sae, WriteSAE) and sae.cfg.metadata["head"] == 1
    assert log.train[-1]["mse"] < 0.6 * log.train[0]["mse"]
    val = log.val[-1]
    assert set(val) >= {"val_mse", "val_nmse", "val_explained_variance", "val_l0", "val_dead"}
    assert val["val_l0"] <= 16 and val["val_mse"] < log.train[0]["mse"] and val["val_explained_variance"] < 1
    assert torch.count_nonzero(sae.mean) > 0  # centred on the data mean
    assert log.resampled and all(r["step"] % 15 == 0 for r in log.resampled)


def test_one_cell_resume_is_bit_identical(model, long_tokens, tmp_path):
    full, _ = train(model, ONE_HOOK, 2, long_tokens, small_cfg())
    SAETrainer(model, ONE_HOOK, 2, long_tokens, small_cfg(), out_dir=str(tmp_path)).train(until_step=23)
    resumed, log = SAETrainer.from_checkpoint(model, long_tokens, str(tmp_path)).train()
    a, b = full.state_dict(), resumed.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert log.train[-1]["step"] == 40
    resumed.save_pretrained(str(tmp_path / "sae"))
    assert torch.equal(load(str(tmp_path / "sae")).V_dec, resumed.V_dec)


def test_one_cell_resumed_train_log_equals_an_uninterrupted_one(model, long_tokens, tmp_path):
    # step 23 is mid log window (log_every=10): the running averages must survive the checkpoint
    cfg = dict(val_sequences=8, val_every=15)
    SAETrainer(model, ONE_HOOK, 2, long_tokens, small_cfg(**cfg), out_dir=str(tmp_path / "full")).train()
    SAETrainer(model, ONE_HOOK, 2, long_tokens, small_cfg(**cfg), out_dir=str(tmp_path / "cut")).train(until_step=23)
    SAETrainer.from_checkpoint(model, long_tokens, str(tmp_path / "cut")).train()
    full = (tmp_path / "full" / f"{ONE_HOOK}.h2" / "train_log.json").read_text()
    assert (tmp_path / "cut" / f"{ONE_HOOK}.h2" / "train_log.json").read_text() == full
    assert [row["step"] for row in json.loads(full)["train"]] == [10, 20, 30, 40]


def test_resampling_clears_adam_moments(model, long_tokens):
    trainer = SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(n_steps=4, resample_every=0))
    trainer.train()
    sae = trainer.sae
    sae.steps_since_active.fill_(0)
    sae.steps_since_active[[3, 7]] = 100
    idx = sae.resample_dead_features(trainer.feed.next()[trainer.cell])
    trainer.learner.clear_moments(idx)
    for p in sae.feature_parameters().values():
        state = trainer.optimizer.state[p]
        assert state["exp_avg"][[3, 7]].abs().max() == 0 and state["exp_avg_sq"][[3, 7]].abs().max() == 0
        assert state["exp_avg_sq"].abs().sum() > 0


def test_training_runs_under_no_grad_and_centres_a_given_sae():
    """Notebooks disable gradients globally; a user-built SAE with ``center`` still gets the dataset mean."""
    from tests.support.helpers import tiny_gdn

    from recurrent_lens.sae import TrainConfig, WriteSAE, train

    model = tiny_gdn()
    tokens = torch.randint(0, 61, (8, 12))
    sae = WriteSAE(8, 8, 32, k=4, center=True)
    assert not sae.mean.any()
    with torch.no_grad():
        trained, log = train(model, "blocks.0.mixer.hook_state", 1, tokens,
                             TrainConfig(n_steps=3, batch_size=16, buffer_size=64, progress=False), sae=sae)
    assert trained.mean.abs().sum() > 0
    assert len(log.train) == 1


def test_writesae_explains_held_out_toy_gdn_states():
    """Issue acceptance: a WriteSAE trained from hooks on the toy GDN's layer-1 states (head 0, 16×16) explains
    ≥ 0.8 of the variance of held-out states (per-coordinate centred, the stricter definition) at k=32."""
    from recurrent_lens import toy
    from recurrent_lens.sae import TrainConfig, train

    model, task = toy.load("gdn", progress=False)[:2]
    tokens = task.make_batch(320, seed=1)[0]
    cfg = TrainConfig(n_steps=1000, batch_size=128, n_features=256, k=32, buffer_size=2048, val_sequences=64,
                      val_every=1000, lr=3e-3, lr_min=3e-4, resample_every=100, skip_positions=1, progress=False)
    sae, log = train(model, "blocks.1.mixer.hook_state", 0, tokens, cfg)
    assert log.train[-1]["mse"] < log.train[0]["mse"]
    assert log.val[-1]["val_explained_variance"] >= 0.8, log.val[-1]


def test_out_dir_that_does_not_exist_yet_gets_the_final_checkpoint_and_log(model, long_tokens, tmp_path):
    target = tmp_path / "new" / "run"
    (tmp_path / "new").mkdir()
    sae, log = train(model, ONE_HOOK, 0, long_tokens, small_cfg(n_steps=3), out_dir=str(target))
    assert sae.cfg.metadata["train_steps"] == 3
    cell = f"{ONE_HOOK}.h0"
    assert sorted(p.name for p in target.iterdir()) == [cell, "checkpoint.json"]
    assert sorted(p.name for p in (target / cell).iterdir()) == ["cfg.json", "checkpoint-00000003.pt",
                                                                  "sae_weights.safetensors", "train_log.json"]
    assert SAETrainer.from_checkpoint(model, long_tokens, str(target)).step == 3


def test_outputs_checked_and_stale_temporaries_removed_before_work(model, long_tokens, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out_dir: cannot write"):
        SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(), out_dir=str(blocker / "x"))
    stale = tmp_path / "ckpt"
    stale.mkdir()
    (stale / ".tmp-abc.pt").write_bytes(b"half a checkpoint")
    SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(), out_dir=str(stale))
    assert not (stale / ".tmp-abc.pt").exists()


@pytest.mark.parametrize("hook, head, kw, message", [
    ("blocks.0.mixer.hook_read", 0, {}, "hook_name"),
    ("blocks.3.mixer.hook_state", 0, {}, "not a recurrent layer"),
    (ONE_HOOK, -1, {}, "head"),
    (ONE_HOOK, True, {}, "head"),
    (ONE_HOOK, 4, {}, "head"),
    (ONE_HOOK, 0, {"architecture": "nope"}, "architecture"),
    (ONE_HOOK, 0, {"batch_size": 0}, "batch_size"),
    (ONE_HOOK, 0, {"buffer_size": 8}, "buffer_size"),
    (ONE_HOOK, 0, {"lr": float("nan")}, "lr"),
])


def test_bad_settings_refused_up_front(model, long_tokens, hook, head, kw, message):
    with pytest.raises(ValueError, match=message):
        SAETrainer(model, hook, head, long_tokens, small_cfg(**kw))


def test_bad_tokens_refused_up_front(model, long_tokens):
    with pytest.raises(ValueError, match="d_vocab"):
        SAETrainer(model, ONE_HOOK, 0, long_tokens + 61, small_cfg())
    with pytest.raises(ValueError, match="no position"):
        SAETrainer(model, ONE_HOOK, 0, long_tokens[:, :2], small_cfg(skip_positions=2))


def test_from_checkpoint_refuses_other_tokens_or_model(model, long_tokens, tmp_path):
    SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(), out_dir=str(tmp_path)).train(until_step=2)
    assert SAETrainer.from_checkpoint(model, long_tokens.int(), str(tmp_path)).step == 2  # the same ids as int32
    with pytest.raises(ValueError, match="made from other data"):
        SAETrainer.from_checkpoint(model, long_tokens.flip(0), str(tmp_path))
    with pytest.raises(ValueError, match="states"):
        SAETrainer.from_checkpoint(tiny_gdn(seed=0, d_k=4), long_tokens, str(tmp_path))
    with pytest.raises(ValueError, match="other weights: sha256: recorded"):
        SAETrainer.from_checkpoint(tiny_gdn(seed=1), long_tokens, str(tmp_path))


def test_one_cell_divergence_stops_training_and_keeps_the_last_good_checkpoint(model, long_tokens, tmp_path):
    from recurrent_lens.integrity import NonFiniteError

    cfg = small_cfg(lr=1e6, warmup_steps=0, checkpoint_every=1, max_nmse=0.0)  # the finite bound off: NaN follows
    trainer = SAETrainer(model, ONE_HOOK, 0, long_tokens, cfg, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=rf"{ONE_HOOK}.h0: training diverged: non-finite \w+ at step \d+"):
        trainer.train()
    step = json.loads((tmp_path / "checkpoint.json").read_text())["step"]
    kept = torch.load(tmp_path / f"{ONE_HOOK}.h0" / f"checkpoint-{step:08d}.pt", weights_only=True)
    assert kept["step"] < trainer.step
    assert all(torch.isfinite(t).all() for t in kept["sae_state"].values() if t.is_floating_point())
    assert not (tmp_path / f"{ONE_HOOK}.h0" / "train_log.json").exists()
    broken = tiny_gdn(seed=0)
    with torch.no_grad():
        broken.blocks[0].ln1.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"training diverged: non-finite (training states|weights) at step 0.*"
                                             r"sequence \d+ of the training tokens, position \d+"):
        train(broken, ONE_HOOK, 0, long_tokens, small_cfg())


def test_an_earlier_versions_one_sae_checkpoint_is_refused_not_restarted_beside(model, long_tokens, tmp_path):
    from recurrent_lens.integrity import ResumeMismatchError

    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier version's one-SAE checkpoint")
    with pytest.raises(ResumeMismatchError, match="holds a checkpoint.pt of an earlier recurrent_lens's one-SAE"):
        SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(), out_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing written, the lock released


def test_from_checkpoint_ignores_a_setting_an_earlier_version_recorded(model, long_tokens, tmp_path):
    SAETrainer(model, ONE_HOOK, 0, long_tokens, small_cfg(), out_dir=str(tmp_path)).train(until_step=2)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    manifest["train_config"]["checkpoint_dir"] = str(tmp_path)  # as runs of earlier versions recorded it
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    assert SAETrainer.from_checkpoint(model, long_tokens, str(tmp_path)).step == 2
