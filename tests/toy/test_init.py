"""The toy zoo (``recurrent_lens.toy``): embedded weights, loading, training on first use and caching, of the models
and of the probe SAE."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from recurrent_lens import HookedRecurrentModel, toy
from recurrent_lens.toy import accuracy
from recurrent_lens.toy import train as toy_train


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
