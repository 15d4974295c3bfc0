"""The toy zoo: MQAR data, the recall helper, embedded weights, training, caching."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from recurrent_lens import HookedRecurrentModel, toy
from recurrent_lens.toy import BOS, SEP, ToyTask, accuracy
from recurrent_lens.toy import train as toy_train


def test_make_batch_format():
    task = ToyTask(n_keys=8, n_values=6, n_pairs=5, n_queries=3)
    tokens, targets = task.make_batch(50, seed=3)
    assert tokens.shape == targets.shape == (50, task.seq_len) == (50, 2 + 10 + 6)
    assert (tokens[:, 0] == BOS).all() and (tokens[:, 11] == SEP).all()
    keys, values = tokens[:, 1:11:2], tokens[:, 2:11:2]
    assert ((keys >= 2) & (keys < 10)).all() and ((values >= 10) & (values < task.d_vocab)).all()
    for b in range(50):
        assert len(set(keys[b].tolist())) == 5
        table = dict(zip(keys[b].tolist(), values[b].tolist()))
        for j, p in enumerate(task.query_positions.tolist()):
            q, a = int(tokens[b, p]), int(tokens[b, p + 1])
            assert table[q] == a == int(targets[b, p])
        assert (targets[b] >= 0).sum() == 3
        assert len(set(tokens[b, task.query_positions].tolist())) == 3


def test_query_order_pairs_fixes_the_write_to_read_distance():
    task = ToyTask(n_keys=8, n_values=6, n_pairs=5, n_queries=3)
    assert task.query_order == "pairs" and task.recall_offset == 10
    assert torch.equal(task.value_positions, torch.tensor([2, 4, 6]))
    assert torch.equal(task.value_positions + task.recall_offset, task.query_positions)
    tokens, targets = task.make_batch(20, seed=4)
    for j, (v, q) in enumerate(zip(task.value_positions.tolist(), task.query_positions.tolist())):
        assert torch.equal(tokens[:, q], tokens[:, v - 1])  # q_j is k_j
        assert torch.equal(targets[:, q], tokens[:, v]) and torch.equal(tokens[:, q + 1], tokens[:, v])


def test_query_order_random():
    task = ToyTask(n_keys=8, n_values=6, n_pairs=5, n_queries=5, query_order="random")
    tokens, _ = task.make_batch(64, seed=4)
    keys, queries = tokens[:, 1:11:2], tokens[:, task.query_positions]
    assert (keys.sort(-1).values == queries.sort(-1).values).all()  # every pair queried once
    assert not torch.equal(keys, queries)
    for what in ("recall_offset", "value_positions"):
        with pytest.raises(ValueError, match=what):
            getattr(task, what)
    with pytest.raises(ValueError, match="query_order"):
        ToyTask(query_order="reversed")


def test_make_batch_deterministic_and_errors():
    task = ToyTask()
    a, _ = task.make_batch(4, seed=1)
    b, _ = task.make_batch(4, seed=1)
    c, _ = task.make_batch(4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="n_pairs"):
        ToyTask(n_keys=4, n_pairs=5, n_queries=2)
    with pytest.raises(ValueError, match="n_queries"):
        ToyTask(n_pairs=3, n_queries=4)
    with pytest.raises(ValueError, match="batch_size"):
        task.make_batch(0)


def test_accuracy_helper():
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 4] = 1
    logits[1, 1, 2] = 1
    assert accuracy(logits, torch.tensor([[-1, 4, -1], [-1, 3, -1]])) == 0.5
    with pytest.raises(ValueError, match="targets"):
        accuracy(logits, torch.full((2, 3), -1))


@pytest.mark.parametrize("name", toy.names())
def test_embedded_toys_recall(name):
    model, task = toy.load(name, progress=False)
    assert isinstance(model, HookedRecurrentModel) and not model.training
    tokens, targets = task.make_batch(128, seed=777)
    with torch.no_grad():
        assert accuracy(model(tokens), targets) > 0.95
    assert os.path.getsize(toy.EMBEDDED_DIR / f"{name}.safetensors") < 1_000_000
    assert toy.embedded_info(name)["fingerprint"] == toy.TOY_SPECS[name].fingerprint()


def test_load_unknown_name():
    with pytest.raises(ValueError, match="name: expected one of"):
        toy.load("transformer")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RECURRENT_LENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert toy.cache_dir() == tmp_path / "xdg" / "recurrent_lens" / "toy"
    monkeypatch.setenv("RECURRENT_LENS_CACHE", str(tmp_path / "rl"))
    assert toy.cache_dir() == tmp_path / "rl" / "toy"


@pytest.fixture
def short_gdn(monkeypatch, tmp_path):
    """The gdn recipe cut to a few steps, no embedded weights, a private cache."""
    spec = dataclasses.replace(toy.TOY_SPECS["gdn"], steps=4)
    monkeypatch.setitem(toy.TOY_SPECS, "gdn", spec)
    monkeypatch.setattr(toy, "EMBEDDED_DIR", tmp_path / "none")
    monkeypatch.setenv("RECURRENT_LENS_CACHE", str(tmp_path / "cache"))
    return spec


def test_train_on_first_use_then_cached(short_gdn, monkeypatch):
    model, _ = toy.load("gdn", progress=False)
    files = sorted(os.listdir(toy.cache_dir()))
    assert files == [f"gdn-{short_gdn.fingerprint()}.safetensors"]  # no temporary file left behind

    def no_training(*a, **k):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(toy, "train_toy", no_training)
    again, _ = toy.load("gdn", progress=False)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_corrupt_cache_is_retrained(short_gdn):
    path = toy.cache_dir() / f"gdn-{short_gdn.fingerprint()}.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    toy.load("gdn", progress=False)
    assert path.stat().st_size > 1000


def test_training_is_deterministic():
    spec = toy.TOY_SPECS["gdn"]
    a, info = toy_train.train_toy(spec, progress=False, steps=3)
    b, _ = toy_train.train_toy(spec, progress=False, steps=3)
    assert not a.training and info.steps == 3
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.fixture
def tiny_probe_sae(short_gdn, monkeypatch):
    """The probe-SAE recipe cut to seconds, on the short gdn with a private cache."""
    for key, value in dict(n_features=16, k=2, n_steps=3, train_sequences=16).items():
        monkeypatch.setitem(toy.PROBE_SAE, key, value)
    return toy_train.probe_sae_fingerprint(short_gdn)


def test_probe_sae_trained_on_first_use_then_cached(tiny_probe_sae, monkeypatch):
    runs = []

    def counted(*args, **kwargs):
        runs.append(1)
        return toy_train.train_probe_sae(*args, **kwargs)

    monkeypatch.setattr(toy, "train_probe_sae", counted)
    sae = toy.load_sae("gdn", progress=False)
    assert len(runs) == 1 and sae.cfg.n_features == 16 and sae.cfg.metadata["recipe"] == tiny_probe_sae
    assert sae.cfg.metadata["hook_name"] == "blocks.1.mixer.hook_state" and sae.cfg.metadata["head"] == 0
    cached = toy.cache_dir() / f"gdn-sae-{tiny_probe_sae}"
    assert (cached / "sae_weights.safetensors").is_file()
    again = toy.load_sae("gdn", progress=False)
    assert len(runs) == 1
    for (n, p), (_, q) in zip(sae.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    # a truncated weights file is retrained over, not trusted
    weights = cached / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    toy.load_sae("gdn", progress=False)
    assert len(runs) == 2 and weights.stat().st_size > 1000


def test_probe_sae_recipe_change_is_not_reused(tiny_probe_sae, monkeypatch):
    toy.load_sae("gdn", progress=False)
    monkeypatch.setitem(toy.PROBE_SAE, "k", 3)
    sae = toy.load_sae("gdn", progress=False)
    assert sae.cfg.k == 3 and sae.cfg.metadata["recipe"] != tiny_probe_sae


def test_embedded_gdn_sae_reproduces_the_substitution_effect():
    """The acceptance numbers of the toy protocol (the table in docs/reproduction.md) on the shipped demo SAE."""
    from recurrent_lens.analysis import substitution_test

    model, task = toy.load("gdn", progress=False)
    key = toy_train.probe_sae_fingerprint(toy.TOY_SPECS["gdn"])
    assert toy._read_sae(toy.EMBEDDED_DIR / "gdn_sae", key) is not None, "the shipped GDN SAE is missing or stale"
    sae = toy.load_sae("gdn", progress=False)
    assert sae.cfg.metadata["recipe"] == key
    tokens, _ = task.make_batch(128, seed=10_000)
    protocol = dict(positions=task.value_positions, readout_offset=task.recall_offset, skip_positions=1)
    rising = substitution_test(model, sae, "blocks.1.mixer.hook_state", 0, tokens, atom="rising", **protocol)
    m = rising.medians
    assert rising.n == 1024 and rising.win_ci[0] > 0.8, rising.report()
    assert m["atom"] < m["delete"] < m["random"], m
    dominant = substitution_test(model, sae, "blocks.1.mixer.hook_state", 0, tokens, atom="dominant", **protocol)
    assert dominant.win_rate < rising.win_rate - 0.15
