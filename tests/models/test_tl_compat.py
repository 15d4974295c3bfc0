"""TransformerLens' attention weights, per-head patching and stacking on hybrids, checked against the
model's own activations and TransformerLens' own patching functions."""

import pytest
import torch
from tests.support.helpers import tiny_gdn, tiny_model, uneven_hybrid
from transformer_lens import FactoredMatrix, patching

from recurrent_lens.models.attention import apply_rope
from recurrent_lens.models.tl_compat import HookNameError


def metric(logits):
    return logits[:, -1, 5].sum()


@pytest.fixture(scope="module")
def hybrid():
    model = tiny_model("qwen3_5_hybrid").eval()
    clean = torch.tensor([[7, 8, 9, 10], [3, 4, 5, 6]])
    corrupted = clean.clone()
    corrupted[:, 0] = 11
    _, cache = model.run_with_cache(clean)
    return model, clean, corrupted, cache


def manual(model, corrupted, cache, hook_name, index):
    """Patch ``index`` = (pos | None, head) of ``hook_name`` by hand."""
    pos, head = index
    clean = cache[hook_name]

    def hook(x, hook):
        x = x.clone()
        where = (slice(None), slice(None) if pos is None else pos, head)
        x[where] = clean[where]
        return x

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, hook)]))


def test_attention_weights_reproduce_the_layers_own_activations(hybrid):
    model, clean, _, cache = hybrid
    attn = model.blocks[1].attn
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.d_head
    x = cache["blocks.1.ln1.hook_normalized"]
    assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (H, model.cfg.d_model, D)
    assert attn.W_O.shape == (H, D, model.cfg.d_model) and attn.b_Q.shape == (H, D) and attn.b_O.shape == (32,)
    positions = torch.arange(clean.shape[1])
    q = torch.einsum("bpm,hmd->bphd", x, attn.W_Q) + attn.b_Q
    q = apply_rope(attn.q_norm(q), positions, model.cfg.rotary_dim, model.cfg.rope_theta)
    torch.testing.assert_close(q, cache["q", 1], rtol=1e-5, atol=1e-5)
    k = apply_rope(attn.k_norm(torch.einsum("bpm,hmd->bphd", x, attn.W_K) + attn.b_K), positions,
                   model.cfg.rotary_dim, model.cfg.rope_theta)
    # TransformerLens' GQA expansion: query head h reads key/value head h // (H / Hkv)
    torch.testing.assert_close(k, cache["k", 1].repeat_interleave(H // Hkv, dim=2), rtol=1e-5, atol=1e-5)
    v = torch.einsum("bpm,hmd->bphd", x, attn.W_V) + attn.b_V
    torch.testing.assert_close(v, cache["v", 1].repeat_interleave(H // Hkv, dim=2), rtol=1e-5, atol=1e-5)
    out = torch.einsum("bphd,hdm->bpm", cache["z", 1] * cache["blocks.1.attn.hook_gate"], attn.W_O) + attn.b_O
    torch.testing.assert_close(out, cache["attn_out", 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.W_Q[0], attn.W_Q)
    assert model.attention_layers == [1] and model.W_O.shape == (1, H, D, 32)
    ov = FactoredMatrix(model.W_V[0], model.W_O[0])
    assert ov.shape == (H, 32, 32)
    torch.testing.assert_close(model.OV.AB[0], ov.AB)
    torch.testing.assert_close(model.QK.AB[0], attn.W_Q @ attn.W_K.transpose(-2, -1))


def test_model_without_attention_refuses_stacked_weights():
    model = tiny_model("gla")
    with pytest.raises(NotImplementedError, match="W_Q: this model has no softmax-attention layer"):
        model.W_Q
    with pytest.raises(NotImplementedError, match="OV: this model has no softmax-attention layer"):
        model.OV


def test_tl_head_out_patching_matches_manual_patches_per_layer_kind(hybrid):
    model, _, corrupted, cache = hybrid
    by_pos = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    all_pos = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    assert by_pos.shape == (2, 4, 4) and all_pos.shape == (2, 4)
    # layer 0 is recurrent: its heads are hook_read's; layer 1's are the attention heads' hook_z
    torch.testing.assert_close(by_pos[0, 2, 3], manual(model, corrupted, cache, "blocks.0.mixer.hook_read", (2, 3)))
    torch.testing.assert_close(by_pos[1, 3, 1], manual(model, corrupted, cache, "blocks.1.attn.hook_z", (3, 1)))
    torch.testing.assert_close(all_pos[0, 1], manual(model, corrupted, cache, "blocks.0.mixer.hook_read", (None, 1)))
    torch.testing.assert_close(all_pos[1, 2], manual(model, corrupted, cache, "blocks.1.attn.hook_z", (None, 2)))
    assert not torch.allclose(all_pos, all_pos[0, 0])


def test_uneven_head_counts_sweep_each_layers_own_heads():
    model = uneven_hybrid()
    clean = torch.tensor([[7, 8, 9, 10]])
    corrupted = torch.tensor([[11, 8, 9, 10]])
    _, cache = model.run_with_cache(clean)
    with pytest.raises(IndexError, match="layer 1 has 2 heads.*cfg.n_heads=4.*head_index_df"):
        patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    index = model.head_index_df()
    assert index.groupby("layer").size().to_dict() == {0: 4, 1: 2, 2: 4}
    out = patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_head_vector_patch_setter,
                                            "z", index_df=index)
    assert out.shape == (10,)
    row = index.index[(index.layer == 1) & (index["head"] == 1)][0]
    torch.testing.assert_close(out[row], manual(model, corrupted, cache, "blocks.1.attn.hook_z", (None, 1)))
    row = index.index[(index.layer == 2) & (index["head"] == 3)][0]
    torch.testing.assert_close(out[row], manual(model, corrupted, cache, "blocks.2.mixer.hook_read", (None, 3)))
    per_pos = model.head_index_df(pos=4, layers=[1])
    assert list(per_pos.columns) == ["layer", "pos", "head_index"] and len(per_pos) == 8
    with pytest.raises(ValueError, match="layers: expected layer indices in \\[0, 3\\), got \\[3\\]"):
        model.head_index_df(layers=[3])


def test_stack_head_results_are_each_heads_write(hybrid):
    model, clean, _, cache = hybrid
    stack, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels == [f"L1H{h}" for h in range(4)] + ["remainder"]
    torch.testing.assert_close(stack.sum(0), cache["resid_post", 1], rtol=1e-5, atol=1e-5)

    def drop_head_2(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with model.hooks([("blocks.1.attn.hook_z", drop_head_2)]):
        _, dropped = model.run_with_cache(clean)
    torch.testing.assert_close(cache["attn_out", 1] - dropped["attn_out", 1], stack[2], rtol=1e-5, atol=1e-5)
    assert cache.stack_head_results(layer=1).shape == (0, 2, 4, 32)
    last = cache.stack_head_results(pos_slice=-1, apply_ln=True)
    assert last.shape == (4, 2, 32)
    _, no_gate = model.run_with_cache(clean, names_filter=["blocks.1.attn.hook_z"])
    with pytest.raises(KeyError, match="need 'blocks.1.attn.hook_gate'"):
        no_gate.stack_head_results()
    _, recurrent = tiny_model("gla").run_with_cache(clean)
    with pytest.raises(NotImplementedError, match="layers are all recurrent"):
        recurrent.stack_head_results()


def test_stack_activation_on_a_hybrid_stacks_the_layers_that_have_it():
    model = uneven_hybrid()
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    states, layers = cache.stack_activation("state", return_layers=True)
    assert layers == [0, 2] and states.shape == (2, 1, 3, 4, 8, 8)
    torch.testing.assert_close(states[1], cache["state", 2])
    assert cache.stack_activation("pattern").shape == (1, 1, 2, 3, 3)
    assert cache.stack_activation("resid_post").shape == (3, 1, 3, 32)
    assert cache.stack_activation("state", layer=1).shape == (1, 1, 3, 4, 8, 8)
    torch.testing.assert_close(cache.stack_activation("read", layers=[2])[0], cache["read", 2])
    with pytest.raises(HookNameError, match="layer 1 is a softmax-attention layer, which has no hook_state"):
        cache.stack_activation("state", layers=[1])
    with pytest.raises(HookNameError, match="no layer before 2 has 'pattern'"):
        tiny_model("gla").run_with_cache(torch.tensor([[1, 2, 3]]))[1].stack_activation("pattern")


# ---------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def talker():
    from tests.support.helpers import word_tokenizer

    model = tiny_gdn()
    model.tokenizer = word_tokenizer(["<unk>", "<eos>"] + [f"w{i}" for i in range(59)])
    return model


def test_generate_answers_in_the_inputs_kind(talker):
    text = talker.generate("w1 w2", max_new_tokens=3, stop_at_eos=False, do_sample=False)
    assert isinstance(text, str) and text.startswith("w1 w2 w")
    texts = talker.generate(["w1 w2"], max_new_tokens=3, stop_at_eos=False, do_sample=False)
    assert texts == [text]
    tokens = talker.generate(talker.to_tokens("w1 w2"), max_new_tokens=3, stop_at_eos=False, do_sample=False)
    assert isinstance(tokens, torch.Tensor) and talker.to_string(tokens[0]) == text
    assert talker.generate("w1 w2", 3, False, return_type="tokens", do_sample=False).shape == (1, 5)
    assert talker.generate(tokens, 1, return_type="str", do_sample=False).startswith(text)
    with pytest.raises(ValueError, match="return_type: expected 'input', 'str' or 'tokens', got 'list'"):
        talker.generate("w1", return_type="list")


def test_generate_samples_by_default_and_matches_a_manual_sampler(talker):
    prompt = torch.tensor([[3, 4, 5]])
    sampled = talker.generate(prompt, 4, stop_at_eos=False, seed=3)
    assert torch.equal(sampled, talker.generate(prompt, 4, stop_at_eos=False, seed=3))
    g = torch.Generator().manual_seed(3)
    seq = prompt
    for _ in range(4):
        probs = talker(seq)[:, -1].softmax(-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], 1)
    assert torch.equal(sampled, seq)
    assert torch.equal(talker.generate(prompt, 4, temperature=0), talker.generate(prompt, 4, do_sample=False))
    assert torch.equal(talker.generate(prompt, 4, stop_at_eos=False, seed=3, use_past_kv_cache=False), sampled)


def test_generate_frequency_penalty_is_subtracted_per_occurrence(talker):
    prompt = torch.tensor([[3, 3, 5]])
    out = talker.generate(prompt, 1, top_k=1, freq_penalty=100.0, stop_at_eos=False)
    logits = talker(prompt)[:, -1]
    logits[0, 3] -= 200.0
    logits[0, 5] -= 100.0
    assert int(out[0, -1]) == int(logits.argmax())


@pytest.mark.parametrize("kwargs", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(freq_penalty=1.0)])
def test_greedy_refuses_sampling_options(talker, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"do_sample=False decodes greedily, but {{'{name}'.*only apply when sampling"):
        talker.generate(torch.tensor([[1, 2]]), 2, do_sample=False, **kwargs)
    with pytest.raises(ValueError, match="continuing from a cache needs use_past_kv_cache=True"):
        talker.generate(torch.tensor([[1, 2]]), 2, cache=talker.make_cache(), use_past_kv_cache=False)
