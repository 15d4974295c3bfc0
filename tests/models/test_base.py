"""HookedRecurrentModel's forward: stop_at_layer with a cache, initial states of another dtype, and per-thread
positions (which still let the model be copied and pickled)."""

import copy
import pickle
import threading

import pytest
import torch
from tests.support.helpers import tiny_gdn


def test_cache_refuses_stop_at_layer_that_would_skip_layers():
    model = tiny_gdn()
    cache = model.make_cache()
    with pytest.raises(ValueError, match="stop_at_layer: 1 cannot be combined with cache"):
        model(torch.tensor([[1, 2]]), cache=cache, stop_at_layer=1)
    assert cache.seq_len == 0 and cache[0].state is None
    model(torch.tensor([[1, 2]]), cache=cache, stop_at_layer=2)
    assert cache.seq_len == 2


def test_initial_states_of_another_dtype_are_converted_or_refused():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (1, 5))
    S = torch.randn(1, 4, 8, 8)
    expected = model(tokens, initial_states={0: S})
    torch.testing.assert_close(model(tokens, initial_states={0: S.double()}), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, initial_states={0: S.bfloat16()}),
                               model(tokens, initial_states={0: S.bfloat16().float()}), rtol=0, atol=0)
    assert model._cache_from_states({0: S.double()}, 1)[0].state.dtype == torch.float32
    with pytest.raises(TypeError, match=r"initial_states\[0\]: expected a floating-point tensor, got a tensor of "
                                        r"dtype torch.int64"):
        model._cache_from_states({0: S.long()}, 1)
    cache = model.make_cache()
    cache[0].state = S.long()
    with pytest.raises(ValueError, match=r"cache\[0\]\.state: expected a floating-point tensor"):
        model(tokens, cache=cache)
    cache[0].state = S.double()
    torch.testing.assert_close(model(tokens, cache=cache), expected, rtol=0, atol=0)
    assert cache[0].state.dtype == torch.float32


def test_positions_are_per_thread():
    model = tiny_gdn()
    a, b = torch.randint(0, 61, (1, 3)), torch.randint(0, 61, (1, 5))
    cache_b = model.make_cache()
    model(torch.tensor([[1, 2]]), cache=cache_b)
    # both forwards have set their positions before either hook reads them
    barrier = threading.Barrier(2, timeout=60)
    seen: dict[str, list[tuple[str, int, list[int]]]] = {"a": [], "b": []}
    errors = []

    def hook(x, hook):
        if hook.name == "hook_embed":
            barrier.wait()
        seen[threading.current_thread().name].append((hook.name, x.shape[1], model.positions.tolist()))

    def run(tokens, cache):
        try:
            model(tokens, cache=cache)
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)

    model.add_hook("hook_embed", hook)
    model.add_hook("blocks.1.hook_resid_post", hook)
    try:
        threads = [threading.Thread(target=run, args=(a, None), name="a"),
                   threading.Thread(target=run, args=(b, cache_b), name="b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        model.reset_hooks()
    assert not errors
    for name, length, positions in (("a", 3, [0, 1, 2]), ("b", 5, [2, 3, 4, 5, 6])):
        assert seen[name] == [("hook_embed", length, positions), ("blocks.1.hook_resid_post", length, positions)]
    model(torch.tensor([[1]]))
    assert model.positions.tolist() == [0]


def test_model_with_thread_local_positions_still_copies_and_pickles():
    model = tiny_gdn()
    tokens = torch.tensor([[1, 2, 3]])
    model(tokens)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.positions is None
        assert torch.equal(twin(tokens), model(tokens))
        assert twin.positions.tolist() == [0, 1, 2]
