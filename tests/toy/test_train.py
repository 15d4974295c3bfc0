"""Training a toy model (deterministic, evaluated on a held-out batch) and the fingerprints that key the caches of
the toys and of their probe SAEs."""

import dataclasses

import torch

from recurrent_lens import toy
from recurrent_lens.toy import accuracy
from recurrent_lens.toy import train as toy_train


def test_training_is_deterministic():
    spec = toy.TOY_SPECS["gdn"]
    a, info = toy_train.train_toy(spec, progress=False, steps=3)
    b, _ = toy_train.train_toy(spec, progress=False, steps=3)
    assert not a.training and info.steps == 3
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_fingerprints_follow_what_determines_the_weights(monkeypatch):
    spec = toy.TOY_SPECS["gdn"]
    for change in ({"steps": spec.steps + 1}, {"lr": spec.lr / 2}, {"seed": 1}, {"config": {**spec.config, "d_k": 8}}):
        assert dataclasses.replace(spec, **change).fingerprint() != spec.fingerprint(), change
    moved = dataclasses.replace(spec, probe=(0, 1))  # the probe site does not change the weights, only the SAE
    assert moved.fingerprint() == spec.fingerprint()
    key = toy_train.probe_sae_fingerprint(spec)
    assert toy_train.probe_sae_fingerprint(moved) != key
    monkeypatch.setitem(toy_train.PROBE_SAE, "k", 8)
    assert toy_train.probe_sae_fingerprint(spec) != key


def test_evaluate_is_the_recall_accuracy_on_the_held_out_batch():
    model, info = toy_train.train_toy(toy.TOY_SPECS["gla"], progress=False, steps=2)
    task = toy.TOY_SPECS["gla"].task
    tokens, targets = task.make_batch(64, seed=3)
    with torch.no_grad():
        expected = accuracy(model(tokens), targets)
    assert toy_train.evaluate(model, task, n=64, seed=3) == expected
    assert info.recall == toy_train.evaluate(model, task) and info.fingerprint == toy.TOY_SPECS["gla"].fingerprint()
