"""Reliability of the model's entry points: all-or-nothing cache updates, refused cache misuse, token
inputs (empty, integer dtypes, lists), sampling arguments, ``conv_kernel=0`` and per-thread positions."""

from __future__ import annotations

import copy
import inspect
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from tests.support.helpers import tiny_gdn, tiny_model
from tests.support.tiny_arch_fla import tiny_delta_net, tiny_gla
from tests.support.tiny_arch_mamba2 import tiny_mamba2

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models.generation import sample_next
from recurrent_lens.models.components import ShortConv

ARCHS = ["gated_deltanet", "mamba2", "delta_net", "gla", "gla_conv", "rwkv7", "qwen3_5_hybrid"]


def build(arch: str, seed: int = 0) -> HookedRecurrentModel:
    if arch == "gla_conv":
        return tiny_gla(seed, use_short_conv=True)
    return tiny_model(arch, seed)


def snapshot(cache) -> tuple[int, dict[tuple[int, str], torch.Tensor]]:
    return cache.seq_len, {(l, name): t.clone() for l, layer in enumerate(cache.layers)
                           for name, t in layer.tensors().items()}


def assert_same(cache, snap) -> None:
    seq_len, tensors = snap
    now = snapshot(cache)[1]
    assert cache.seq_len == seq_len
    assert now.keys() == tensors.keys()
    for key, t in tensors.items():
        assert now[key].dtype == t.dtype and torch.equal(now[key], t), key


def boom(x, hook):
    raise RuntimeError(f"boom in {hook.name}")


# ---------------------------------------------------------------------------------------- 1. atomic cache
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


def test_clone_copies_tensors_of_a_cache_built_with_grad():
    model = tiny_gdn()
    cache = model.make_cache()
    model(torch.tensor([[1, 2, 3]]), cache=cache)  # not under no_grad: the states are not graph leaves
    twin = cache.clone()
    assert twin[0].state is not cache[0].state and torch.equal(twin[0].state, cache[0].state)


# ---------------------------------------------------------------------------------------- 2. cache misuse
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


# ---------------------------------------------------------------------------------------- 3. inputs
class ListTokenizer:
    """Whitespace words → ids ``w{i}`` → i; the empty string tokenizes to no ids."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_empty_inputs_are_refused_clearly():
    model = tiny_gdn()
    model.tokenizer = ListTokenizer()
    for bad in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long),
                torch.zeros(0, dtype=torch.long), [[]], [[], []]):
        with pytest.raises(ValueError, match="tokens: expected at least one sequence of at least one token"):
            model(bad)
        with pytest.raises(ValueError, match="at least one"):
            model.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="tokens: expected at least one token id, got an empty list"):
        model([])
    with pytest.raises(ValueError, match="the text tokenized to no tokens"):
        model("")
    with pytest.raises(ValueError, match="the text tokenized to no tokens"):
        model.generate("", max_new_tokens=2)
    assert model.generate("w1 w2", max_new_tokens=2).startswith("w1 w2 w")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_integer_dtypes_are_token_ids(dtype):
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (2, 5))
    assert torch.equal(model(tokens.to(dtype)), model(tokens))
    assert torch.equal(model.generate(tokens.to(dtype), max_new_tokens=2, do_sample=False),
                       model.generate(tokens, max_new_tokens=2, do_sample=False))


def test_lists_of_ids_are_tokens_and_lists_of_str_are_text():
    model = tiny_gdn()
    model.tokenizer = ListTokenizer()
    assert torch.equal(model([1, 2, 3]), model(torch.tensor([[1, 2, 3]])))
    assert torch.equal(model([[1, 2], [3, 4]]), model(torch.tensor([[1, 2], [3, 4]])))
    assert torch.equal(model(["w1 w2", "w3 w4"]), model(torch.tensor([[1, 2], [3, 4]])))
    out = model.generate([[1, 2], [3, 4]], max_new_tokens=2, do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, model.generate(torch.tensor([[1, 2], [3, 4]]), 2, do_sample=False))
    assert isinstance(model.generate(["w1 w2"], max_new_tokens=2), list)
    with pytest.raises(ValueError, match=r"rows of equal length, got lengths \[2, 1\]"):
        model([[1, 2], [3]])
    tokens_fn = inspect.unwrap(HookedRecurrentModel._tokens)  # the test-time annotation check samples one item
    with pytest.raises(TypeError, match="only str .* got a list of int, str"):
        tokens_fn(model, [1, "w2"])
    with pytest.raises(TypeError, match=r"int token ids in every row, got 'w2'"):
        tokens_fn(model, [[1, "w2"]])
    with pytest.raises(TypeError, match="got a list of bool"):
        model([True, False])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 61\)"):
        model([1, 61])


def test_non_integer_tensors_are_refused():
    model = tiny_gdn()
    tokens_fn = inspect.unwrap(HookedRecurrentModel._tokens)  # past the test-time annotation check
    with pytest.raises(TypeError, match=r"expected integer token ids, got a tensor of dtype torch.bool \(a bool"):
        tokens_fn(model, torch.tensor([[True, False]]))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        tokens_fn(model, torch.tensor([[1.0, 2.0]]))


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


# ---------------------------------------------------------------------------------------- 4. conv_kernel=0
def _no_conv(arch: str) -> HookedRecurrentModel:
    if arch == "gated_deltanet":
        return tiny_gdn(conv_kernel=0)
    if arch == "mamba2":
        return tiny_mamba2(conv_kernel=0)
    cfg = build(arch).cfg
    cfg.conv_kernel = 0
    if arch == "gla":
        cfg.options = {**cfg.options, "use_short_conv": True}
    return HookedRecurrentModel.from_config(cfg, seed=0).eval()


def _pre_conv(arch: str, mixer, x: torch.Tensor) -> torch.Tensor:
    """What the short conv would have convolved: the hooked channels must be exactly its activation."""
    if arch == "mamba2":
        m = mixer.d_mlp_slice
        return mixer.in_proj(x).split([m, m, mixer.d_ssm, mixer.conv_dim, mixer.cfg.n_heads], dim=-1)[3]
    return mixer.in_proj_qkv(x)


@pytest.mark.parametrize("arch", ["gated_deltanet", "delta_net", "mamba2", "gla"])
def test_conv_kernel_zero_means_no_short_convolution(arch):
    model = _no_conv(arch)
    assert not any(isinstance(m, ShortConv) for m in model.modules())
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    full, acts = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.mixer.hook_"))
    mixer = model.blocks[0].mixer
    pre = _pre_conv(arch, mixer, acts["blocks.0.mixer.hook_in"])
    expected = pre if arch == "gla" else F.silu(pre)  # GLA applies SiLU only with its conv
    torch.testing.assert_close(acts["blocks.0.mixer.hook_conv"], expected, rtol=0, atol=0)
    # prefill + one token at a time through the cache equals the full forward
    cache = model.make_cache()
    steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert all(layer.conv is None for layer in cache.layers)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    out = model.generate(tokens[:, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(model(out[:, :-1])[:, 3:].argmax(-1), out[:, 4:])


def test_conv_kernel_must_not_be_negative():
    with pytest.raises(ValueError, match="conv_kernel: expected >= 0 .* got -1"):
        ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=10, n_heads=2, d_k=4, d_v=4,
                    conv_kernel=-1)
    with pytest.raises(ValueError, match="kernel: expected >= 1"):
        ShortConv(8, 0)


# ---------------------------------------------------------------------------------------- 5. threads
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
