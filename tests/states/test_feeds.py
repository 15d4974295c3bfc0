"""State feeds: the protocol, each feed's draw checked by hand, resume from a state_dict, held-out states."""

import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.integrity import NonFiniteError
from recurrent_lens.sae import TrainConfig
from recurrent_lens.states.cells import Cell, sample_positions
from recurrent_lens.states.feeds import GeneratorFeed, HarvestFeed, StateFeed, StoreFeed
from recurrent_lens.states.store import harvest_to_store

A, B = Cell("blocks.0.mixer.hook_state", 1), Cell("blocks.1.mixer.hook_write", 2)


@pytest.fixture(scope="module")
def model():
    return tiny_gdn(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 61, (12, 14), generator=torch.Generator().manual_seed(3))


def cfg(**kw):
    base = dict(batch_size=8, buffer_size=24, positions_per_seq=3, model_batch_size=4, seed=5, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def states_of(model, tokens, pos, cell):
    got = model.harvest(tokens, pos, [(cell.hook_name, cell.head)])[cell.hook_name, cell.head]
    return got.reshape(-1, *got.shape[-2:]).float()


def test_every_feed_is_a_state_feed(model, tokens, tmp_path):
    store = harvest_to_store(model, [A], tokens, tmp_path / "store", positions_per_seq=3, progress=False)
    feeds = [HarvestFeed(model, [A], tokens, cfg()), GeneratorFeed(model, [A], tokens, cfg()),
             StoreFeed(store, [A], cfg())]
    for feed in feeds:
        assert isinstance(feed, StateFeed)
        assert feed.shape == (8, 8) and tuple(feed.next()[A].shape) == (8, 8, 8)


def test_generator_feed_draws_one_stream_as_written_out_by_hand(model, tokens):
    c = cfg(skip_positions=2)
    feed = GeneratorFeed(model, [A], tokens, c)
    gen = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(tokens), generator=gen)
    parts = []
    for lo in range(0, 8, c.model_batch_size):  # two model batches fill the 24-state buffer
        rows = tokens[order[lo : lo + c.model_batch_size]]
        pos = torch.rand(len(rows), 14 - 2, generator=gen).argsort(-1)[:, :3] + 2
        parts.append(states_of(model, rows, pos, A))
    merged = torch.cat(parts)
    buffer = merged[torch.randperm(len(merged), generator=gen)]
    assert torch.equal(feed.next()[A], buffer[-8:])
    assert torch.equal(feed.next()[A], buffer[-16:-8])
    assert feed.generator(A, "learner") is feed.gen  # resampling reads on from the same stream
    assert feed.generator(A, "init").initial_seed() == c.seed


def test_harvest_feed_seeds_each_sequence_and_each_cell(model, tokens):
    c = cfg()
    alone, together = HarvestFeed(model, [B], tokens, c), HarvestFeed(model, [A, B], tokens, c)
    for _ in range(4):
        assert torch.equal(alone.next()[B], together.next()[B])
    feed = HarvestFeed(model, [A], tokens, c)
    feed.mean(A)  # fills the buffer
    # the first epoch's order is seeded by (seed, epoch); each sequence's positions by (seed, its index)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed((c.seed * 0x9E3779B97F4A7C15) % 2**63))
    first = order[: c.model_batch_size]
    want = states_of(model, tokens[first], sample_positions(first, 14, 3, seed=c.seed), A)
    assert all(any(torch.equal(s, t) for t in feed.buffers[A]) for s in want)


@pytest.mark.parametrize("kind", ["harvest", "generator"])
def test_a_feed_continues_bit_for_bit_from_its_state_dict(model, tokens, kind):
    make = (lambda: HarvestFeed(model, [A, B], tokens, cfg())) if kind == "harvest" else \
        (lambda: GeneratorFeed(model, [A, B], tokens, cfg()))
    first = make()
    for _ in range(5):
        first.next()
    second = make()
    second.load_state_dict(first.state_dict())
    for _ in range(6):  # across refills and an epoch boundary
        a, b = first.next(), second.next()
        assert torch.equal(a[A], b[A]) and torch.equal(a[B], b[B])


def test_held_out_states_are_fixed_and_leave_the_training_stream_alone(model, tokens):
    held = tokens[:5]
    for make in (lambda: HarvestFeed(model, [A], tokens, cfg()), lambda: GeneratorFeed(model, [A], tokens, cfg())):
        plain, probed = make(), make()
        once = probed.held_out(held)
        assert tuple(once[A].shape) == (15, 8, 8) and torch.equal(once[A], probed.held_out(held)[A])
        for _ in range(3):
            assert torch.equal(plain.next()[A], probed.next()[A])


def test_held_out_nonfinite_state_is_named(model, tokens):
    broken = tiny_gdn(seed=0)
    with torch.no_grad():
        broken.blocks[0].ln1.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="held-out states of blocks.0.mixer.hook_state.h1: non-finite state at "
                                         "sequence 0 of the held-out tokens, position"):
        HarvestFeed(broken, [A], tokens, cfg()).held_out(tokens[:2])


def test_a_store_feed_has_no_model_for_held_out_states(model, tokens, tmp_path):
    store = harvest_to_store(model, [A], tokens, tmp_path, positions_per_seq=3, progress=False)
    with pytest.raises(ValueError, match="val_tokens: a state store holds no model"):
        StoreFeed(store, [A], cfg()).held_out(tokens)


def test_a_one_shot_iterator_is_refused_when_read_again(model, tokens):
    feed = HarvestFeed(model, [A], iter(list(tokens[:4])), cfg(buffer_size=24))
    with pytest.raises(ValueError, match="yields no sequence when read again: a one-shot iterator cannot be restarted"):
        feed.next()
