"""The recurrent cache: all-or-nothing updates, copies, and caches of another batch size or model shape refused."""

import inspect

import pytest
import torch
from tests.support.cache import assert_same, snapshot
from tests.support.helpers import build, tiny_gdn, tiny_model

from recurrent_lens import HookedRecurrentModel


ARCHS = ["gated_deltanet", "mamba2", "delta_net", "gla", "gla_conv", "rwkv7", "qwen3_5_hybrid"]


def boom(x, hook):
    raise RuntimeError(f"boom in {hook.name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_failed_forward_leaves_cache_bit_identical_and_continuation_exact(arch):
    model = build(arch)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
    cache, reference = model.make_cache(), model.make_cache()
    model(tokens[:, :4], cache=cache)
    model(tokens[:, :4], cache=reference)
    snap = snapshot(cache)
    kinds = {name for _, name in snap[1]}
    assert "state" in kinds and ("conv" in kinds) == (arch not in ("gla", "rwkv7"))
    assert ("key" in kinds) == (arch == "qwen3_5_hybrid") and ("extra['attn_shift']" in kinds) == (arch == "rwkv7")
    # after layer 1's mixer has updated its cache, and after every layer has
    for name in ("blocks.1.hook_mixer_out", "ln_final.hook_normalized"):
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_hooks(tokens[:, 4:6], cache=cache, fwd_hooks=[(name, boom)])
        assert_same(cache, snap)
    with pytest.raises(ValueError, match="return_type: expected 'logits', 'loss', 'both' or None, got 'logit'"):
        inspect.unwrap(HookedRecurrentModel.forward)(model, tokens[:, 4:6], cache=cache, return_type="logit")
    assert_same(cache, snap)
    layer0 = cache[0]
    logits = model(tokens[:, 4:], cache=cache)
    assert torch.equal(logits, model(tokens[:, 4:], cache=reference))
    assert_same(cache, snapshot(reference))
    assert cache[0] is layer0 and cache.seq_len == 7
    torch.testing.assert_close(logits, model(tokens)[:, 4:], rtol=1e-5, atol=1e-5)


def test_clone_copies_tensors_of_a_cache_built_with_grad():
    model = tiny_gdn()
    cache = model.make_cache()
    model(torch.tensor([[1, 2, 3]]), cache=cache)  # not under no_grad: the states are not graph leaves
    twin = cache.clone()
    assert twin[0].state is not cache[0].state and torch.equal(twin[0].state, cache[0].state)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_of_another_batch_size_is_refused(arch):
    model = build(arch)
    cache = model.make_cache()
    model(torch.randint(0, model.cfg.d_vocab, (2, 3)), cache=cache)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match=r"cache: holds batch size 2 .* but the tokens have batch size 1"):
        model(torch.tensor([[1]]), cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, cache=cache)
    assert_same(cache, snap)


def test_cache_of_another_model_shape_is_refused():
    tokens = torch.tensor([[1, 2, 3]])
    small = tiny_gdn(n_layers=2).make_cache()
    tiny_gdn(n_layers=2)(tokens, cache=small)
    with pytest.raises(ValueError, match=r"cache: built for 2 layers, but the model has 3 \(n_layers\)"):
        tiny_gdn(n_layers=3)(tokens, cache=small)
    big = tiny_gdn(n_layers=3).make_cache()
    with pytest.raises(ValueError, match=r"cache: built for 3 layers, but the model has 2"):
        tiny_gdn(n_layers=2)(tokens, cache=big)
    for field, value in (("d_v", 4), ("d_k", 4), ("n_heads", 2)):
        other = tiny_gdn(n_layers=2, **{field: value, "n_key_heads": 2})
        with pytest.raises(ValueError, match=r"cache\[0\]\.state: expected shape \(1, "):
            other(tokens, cache=small)
    hybrid = build("qwen3_5_hybrid")
    with pytest.raises(ValueError, match=r"cache\[1\]\.state: layer 1 is an attention layer"):
        hybrid(tokens, cache=small)
    hybrid_cache = hybrid.make_cache()
    hybrid(tokens, cache=hybrid_cache)
    with pytest.raises(ValueError, match=r"cache\[1\]\.key: layer 1 is recurrent"):
        tiny_gdn(n_layers=2)(tokens, cache=hybrid_cache)
    fewer_kv = tiny_model("qwen3_5_hybrid").cfg
    fewer_kv.n_kv_heads = 1
    with pytest.raises(ValueError, match=r"cache\[1\]\.key: expected shape \(1, 1, 3, 8\)"):
        HookedRecurrentModel.from_config(fewer_kv)(tokens, cache=hybrid_cache)
    hybrid_cache[1].key = hybrid_cache[1].key[:, :, :2]
    with pytest.raises(ValueError, match=r"cache\[1\]\.key: expected shape \(1, 2, 3, 8\)"):
        hybrid(tokens, cache=hybrid_cache)
    small[0].conv = small[0].conv[:, :-1]
    with pytest.raises(ValueError, match=r"cache\[0\]\.conv: expected shape \(1, 64, 3\)"):
        tiny_gdn(n_layers=2)(tokens, cache=small)
    gla = build("gla")
    stray = gla.make_cache()
    stray[0].conv = torch.zeros(1, 64, 3)
    with pytest.raises(ValueError, match=r"cache\[0\]\.conv: layer 0 has no short convolution"):
        gla(tokens, cache=stray)
