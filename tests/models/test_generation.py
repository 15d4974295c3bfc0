"""Decoding: seeded sampling, the sampling arguments ``generate`` and ``sample_next`` refuse or allow, and a
``generate`` that raises midway leaving the cache it was passed as it was."""

import pytest
import torch
from tests.support.cache import assert_same, snapshot
from tests.support.helpers import build, tiny_gdn

from recurrent_lens.models.generation import sample_next


def test_sampling_is_seeded():
    model = tiny_gdn()
    prompt = torch.randint(0, 61, (2, 4))
    a = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.7, seed=1)
    b = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.7, seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, do_sample=True, temperature=-1.0)
    assert torch.equal(model.generate(prompt, 4, temperature=0), model.generate(prompt, 4, do_sample=False))


def test_generate_that_raises_midway_leaves_passed_cache_as_it_was():
    model = build("qwen3_5_hybrid")
    prompt = torch.randint(0, model.cfg.d_vocab, (2, 5))
    cache = model.make_cache()
    model(prompt[:, :3], cache=cache)
    reference = cache.clone()
    snap = snapshot(cache)
    calls = []

    def fail_on_third_step(x, hook):
        calls.append(x.shape[1])
        if len(calls) == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", fail_on_third_step)]):
            model.generate(prompt[:, 3:], max_new_tokens=6, do_sample=False, cache=cache)
    assert calls == [2, 1, 1]
    assert_same(cache, snap)
    out = model.generate(prompt[:, 3:], max_new_tokens=6, do_sample=False, cache=cache)
    assert torch.equal(out, model.generate(prompt[:, 3:], max_new_tokens=6, do_sample=False, cache=reference))
    assert cache.seq_len == 3 + 2 + 5
    assert_same(cache, snapshot(reference))


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k: expected None or an int >= 1, got 0"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), r"top_p: expected None or a number in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(temperature=float("nan")), "temperature: expected a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature: expected a finite number"),
    (dict(temperature=-0.5), "temperature: expected >= 0 when sampling"),
])
def test_bad_sampling_arguments_are_refused_before_anything_runs(kwargs, match):
    model = tiny_gdn()
    cache = model.make_cache()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=True, cache=cache, **kwargs)
    assert cache.seq_len == 0 and cache[0].state is None
    with pytest.raises(ValueError, match=match):
        sample_next(torch.zeros(1, 5), do_sample=True, **kwargs)


def test_edge_sampling_arguments_are_allowed():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample_next(logits, do_sample=True, top_p=1.0, generator=torch.Generator().manual_seed(0)).shape == (1,)
    assert int(sample_next(logits, do_sample=True, top_k=1)) == 1
    assert int(sample_next(logits, do_sample=True, top_k=10)) in (0, 1, 2)
