"""The toy's MQAR task (``ToyTask``): batch format, query orders, determinism and errors; the ``accuracy`` helper."""

import pytest
import torch

from recurrent_lens.toy import BOS, SEP, ToyTask, accuracy


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
