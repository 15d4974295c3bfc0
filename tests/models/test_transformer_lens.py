"""TransformerLens' own tools on every architecture: short names and aliases, patching, ActivationCache
helpers, logit lens, test_prompt, the TL weights and cfg fields."""

import copy

import pandas as pd
import pytest
import torch
from tests.support.helpers import ARCHS, tiny_model
from transformer_lens import ActivationCache, patching
from transformer_lens.utilities import test_prompt as tl_test_prompt

from recurrent_lens.models.activation_cache import RecurrentActivationCache
from recurrent_lens.models.tl_compat import HookNameError

TARGET = 5


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(16)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    model = tiny_model(request.param)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, model.cfg.d_vocab, (2, 4), generator=g)
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + 7) % model.cfg.d_vocab
    logits, cache = model.run_with_cache(clean)
    return request.param, model, clean, corrupted, logits, cache


def metric(logits):
    return logits[:, -1, TARGET].sum()


# ---------------------------------------------------------------------------------------------- names


def test_short_names_resolve_by_layer_kind_and_each_activation_is_cached_once(arch):
    name, model, _, _, _, cache = arch
    assert isinstance(cache, ActivationCache) and isinstance(cache, RecurrentActivationCache)
    assert set(cache.keys()) <= set(model.hook_dict)
    assert not set(cache.keys()) & set(model.hook_aliases)
    for layer, kind in enumerate(model.cfg.layer_types):
        assert cache["attn_out", layer] is cache[f"blocks.{layer}.hook_mixer_out"]
        assert cache[f"blocks.{layer}.hook_attn_out"] is cache[f"blocks.{layer}.hook_mixer_out"]
        assert cache["scale", layer, "ln1"].shape == (2, 4, 1)
        if kind == "recurrent":
            for short in ("state", "write", "k", "q", "v", "read"):
                canonical = cache[f"blocks.{layer}.mixer.hook_{short}"]
                assert cache[short, layer] is canonical
                assert cache[f"blocks.{layer}.hook_{short}"] is canonical
                assert cache[f"blocks.{layer}.attn.hook_{short}"] is canonical
                assert f"blocks.{layer}.hook_{short}" in cache
            assert cache["state", layer].shape == (2, 4, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)
            with pytest.raises(HookNameError, match="recurrent layer: it has no softmax-attention heads"):
                cache["pattern", layer]
        else:
            for short in ("k", "q", "v", "z", "pattern"):
                assert cache[short, layer] is cache[f"blocks.{layer}.attn.hook_{short}"]
                assert cache[f"blocks.{layer}.hook_{short}"] is cache[f"blocks.{layer}.attn.hook_{short}"]
            with pytest.raises(HookNameError, match=f"layer {layer} is a softmax-attention layer, which has no "
                                                    "hook_state"):
                cache["state", layer]
            assert "blocks.1.hook_state" not in cache
    last = model.cfg.n_layers - 1
    assert cache["resid_post", -1] is cache[f"blocks.{last}.hook_resid_post"]
    if name == "qwen3_5_hybrid":
        assert cache["k", -1] is cache[f"blocks.{last}.attn.hook_k"]
    else:
        assert cache["state", -1] is cache[f"blocks.{last}.mixer.hook_state"]


def test_a_hook_added_through_an_alias_fires_once_with_the_hook_points_name(arch):
    _, model, clean, _, _, _ = arch
    layer = model.cfg.recurrent_layers[0]
    calls = []

    def record(x, hook):
        calls.append(hook.name)

    for alias, canonical in [(f"blocks.{layer}.hook_state", f"blocks.{layer}.mixer.hook_state"),
                             (f"blocks.{layer}.hook_write", f"blocks.{layer}.mixer.hook_write"),
                             (f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.mixer.hook_k"),
                             (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mixer_out")]:
        calls.clear()
        model.run_with_hooks(clean, fwd_hooks=[(alias, record)])
        with model.hooks(fwd_hooks=[(alias, record)]):
            model(clean)
        model.add_hook(alias, record)
        model(clean)
        assert list(model.list_hooks(alias)) == [canonical] == list(model.list_hooks([alias]))
        model.reset_hooks()
        # a predicate that accepts both the name and its alias still hooks the point once
        model.run_with_hooks(clean, fwd_hooks=[(lambda n, a=alias, c=canonical: n in (a, c), record)])
        assert calls == [canonical] * 4
    model(clean)
    assert len(calls) == 4 and not model.list_hooks()


def test_names_filter_takes_aliases(arch):
    _, model, clean, _, _, full = arch
    layer = model.cfg.recurrent_layers[-1]
    _, cache = model.run_with_cache(clean, names_filter=f"blocks.{layer}.hook_state")
    assert list(cache.keys()) == [f"blocks.{layer}.mixer.hook_state"]
    torch.testing.assert_close(cache["state", layer], full["state", layer])
    _, cache = model.run_with_cache(clean, names_filter=[f"blocks.{layer}.hook_write", f"blocks.{layer}.attn.hook_v",
                                                         f"blocks.{layer}.mixer.hook_v"])
    assert sorted(cache.keys()) == [f"blocks.{layer}.mixer.hook_v", f"blocks.{layer}.mixer.hook_write"]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_attn_out"))
    assert sorted(cache.keys()) == sorted(f"blocks.{i}.hook_mixer_out" for i in range(model.cfg.n_layers))
    with pytest.raises(HookNameError, match="did you mean"):
        model.run_with_cache(clean, names_filter=["blocks.0.hook_resid_pree"])
    with pytest.raises(HookNameError, match="not in this cache; run_with_cache's names_filter left it out"):
        cache["state", layer]


def test_edits_through_aliases_equal_edits_through_the_hook_names(arch):
    _, model, clean, _, _, _ = arch
    layer = model.cfg.recurrent_layers[0]

    def zero_head(x, hook):
        x = x.clone()
        x[:, 1:3, 0] = 0
        return x

    for short in ("state", "write", "k"):
        by_alias = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.hook_{short}", zero_head)])
        by_name = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.mixer.hook_{short}", zero_head)])
        torch.testing.assert_close(by_alias, by_name, rtol=0, atol=0)
        assert (by_alias - model(clean)).abs().max() > 1e-4


def test_misnamed_hooks_say_why():
    model = tiny_model("qwen3_5_hybrid")
    with pytest.raises(HookNameError, match="layer 1 is a softmax-attention layer, which has no hook_state"):
        model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("blocks.1.hook_state", lambda x, hook: None)])
    with pytest.raises(HookNameError, match="layer 0 is a recurrent layer: it has no softmax-attention heads and "
                                            "no hook_pattern"):
        model.add_hook("blocks.0.attn.hook_pattern", lambda x, hook: None)
    with pytest.raises(HookNameError, match="layer 5 does not exist"):
        model.resolve_hook_name("blocks.5.hook_state")
    assert not model.list_hooks()
    mamba = tiny_model("mamba2")
    with pytest.raises(HookNameError, match=r"no MLP in this model \(d_mlp=0, cfg.attn_only=True\)"):
        mamba.resolve_hook_name("blocks.0.hook_mlp_out")
    with pytest.raises(TypeError, match="hook name: expected a string or a function"):
        mamba.add_hook(3, lambda x, hook: None)
    # an alias never shadows a real name, and SAE-spliced points keep their own names
    assert not set(model.hook_aliases) & set(model.hook_dict)


def test_aliases_survive_a_spliced_sae():
    from recurrent_lens.sae import WriteSAE

    model = tiny_model("gated_deltanet")
    sae = WriteSAE(8, 8, 6, k=2)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with model.saes([(sae, "blocks.1.mixer.hook_state", 2)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_state")
        assert model.resolve_hook_name("blocks.1.hook_state") == "blocks.1.mixer.hook_state"
    assert list(cache.keys()) == ["blocks.1.mixer.hook_state"]


# ---------------------------------------------------------------------------------------------- patching


def _manual_patch(model, corrupted, clean_cache, hook_name, setter, index):
    clean = clean_cache[hook_name]

    def hook(x, hook):
        return setter(x.clone(), index, clean)

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, hook)]))


def test_block_patching_helpers(arch):
    name, model, clean, corrupted, logits, cache = arch
    n, T = model.cfg.n_layers, clean.shape[1]
    mid = patching.get_act_patch_resid_mid(model, corrupted, cache, metric)
    assert mid.shape == (n, T)
    torch.testing.assert_close(mid[0, 1], _manual_patch(model, corrupted, cache, "blocks.0.hook_resid_mid",
                                                        patching.layer_pos_patch_setter, [0, 1]))
    # patching every position of the embedding gives the clean run
    pre = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    torch.testing.assert_close(pre[0, 0], metric(logits))
    if name == "mamba2":
        with pytest.raises(HookNameError, match="no MLP in this model"):
            patching.get_act_patch_mlp_out(model, corrupted, cache, metric)
        with pytest.raises(HookNameError, match="no MLP in this model"):
            patching.get_act_patch_block_every(model, corrupted, cache, metric)
        attn = patching.get_act_patch_attn_out(model, corrupted, cache, metric)
        torch.testing.assert_close(attn[1, 2], _manual_patch(model, corrupted, cache, "blocks.1.hook_mixer_out",
                                                             patching.layer_pos_patch_setter, [1, 2]))
        return
    every = patching.get_act_patch_block_every(model, corrupted, cache, metric)
    assert every.shape == (3, n, T)
    torch.testing.assert_close(every[0], pre)
    for i, hook in ((1, "hook_mixer_out"), (2, "hook_mlp_out")):
        torch.testing.assert_close(every[i, 1, 2], _manual_patch(model, corrupted, cache, f"blocks.1.{hook}",
                                                                 patching.layer_pos_patch_setter, [1, 2]))
    torch.testing.assert_close(patching.get_act_patch_attn_out(model, corrupted, cache, metric), every[1])
    torch.testing.assert_close(patching.get_act_patch_mlp_out(model, corrupted, cache, metric), every[2])


@pytest.mark.parametrize("act", ["state", "write", "k", "v"])
def test_generic_patching_of_matrices_and_head_vectors(arch, act):
    name, model, clean, corrupted, logits, cache = arch
    H, layers = model.cfg.n_heads, model.cfg.recurrent_layers
    heads = pd.DataFrame([(layer, h) for layer in layers for h in range(H)], columns=["layer", "head"])
    by_head = patching.generic_activation_patch(model, corrupted, cache, metric,
                                                patching.layer_head_vector_patch_setter, act, index_df=heads)
    cells = pd.DataFrame([(layers[0], 1, H - 1), (layers[-1], 3, 0)], columns=["layer", "pos", "head"])
    by_pos = patching.generic_activation_patch(model, corrupted, cache, metric,
                                               patching.layer_pos_head_vector_patch_setter, act, index_df=cells)
    assert by_head.shape == (len(layers) * H,) and by_pos.shape == (2,)
    hook = f"blocks.{layers[-1]}.mixer.hook_{act}"
    torch.testing.assert_close(by_head[-1], _manual_patch(model, corrupted, cache, hook,
                                                          patching.layer_head_vector_patch_setter, [0, H - 1]))
    torch.testing.assert_close(by_pos[1], _manual_patch(model, corrupted, cache, hook,
                                                        patching.layer_pos_head_vector_patch_setter, [0, 3, 0]))
    # a patch that changes nothing is recognised as no edit
    same = patching.generic_activation_patch(model, clean, cache, metric, patching.layer_head_vector_patch_setter,
                                             act, index_df=heads.iloc[:1])
    torch.testing.assert_close(same[0], metric(logits))
    if name != "qwen3_5_hybrid":
        swept = patching.generic_activation_patch(model, corrupted, cache, metric,
                                                  patching.layer_head_vector_patch_setter, act,
                                                  index_axis_names=("layer", "head"))
        torch.testing.assert_close(swept.flatten(), by_head)


def test_hybrid_head_sweeps_stop_with_a_clear_error_and_work_per_layer_kind():
    model = tiny_model("qwen3_5_hybrid")
    clean = torch.tensor([[7, 8, 9, 10]])
    corrupted = torch.tensor([[11, 8, 9, 10]])
    _, cache = model.run_with_cache(clean)
    with pytest.raises(HookNameError, match="layer 1 is a softmax-attention layer, which has no hook_state"):
        patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_head_vector_patch_setter,
                                          "state", index_axis_names=("layer", "head"))
    with pytest.raises(AttributeError, match="n_key_value_heads: this hybrid's hook_k/hook_v have 4 heads"):
        patching.get_act_patch_attn_head_k_all_pos(model, corrupted, cache, metric)
    kv = pd.DataFrame([(1, h) for h in range(model.cfg.n_kv_heads)], columns=["layer", "head"])
    out = patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_head_vector_patch_setter,
                                            "k", index_df=kv)
    torch.testing.assert_close(out[1], _manual_patch(model, corrupted, cache, "blocks.1.attn.hook_k",
                                                     patching.layer_head_vector_patch_setter, [1, 1]))


# ---------------------------------------------------------------------------------------------- ActivationCache


def test_accumulated_resid_and_logit_lens_reproduce_the_logits(arch):
    _, model, clean, _, logits, cache = arch
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == [f"{i}_pre" for i in range(model.cfg.n_layers)] + ["final_post"]
    torch.testing.assert_close(stack[-1] @ model.W_U + model.b_U, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.unembed(stack[-1]), logits, rtol=1e-5, atol=1e-5)
    if not hasattr(cache, "logit_lens"):
        pytest.skip("TransformerLens < 4 has no ActivationCache.logit_lens (accumulated_resid checked above)")
    lens = cache.logit_lens(targets=TARGET)
    assert lens.labels == labels and lens.values.shape == (len(labels), 2, 1)
    torch.testing.assert_close(lens.values[-1, :, 0], logits[:, -1, TARGET], rtol=1e-5, atol=1e-5)
    ranks = lens.rank_trajectory()
    assert ranks[-1].tolist() == (logits[:, -1] > logits[:, -1, TARGET:TARGET + 1]).sum(-1).tolist()
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    run = logit_lens(model, clean, targets=TARGET)  # runs the model and checks ln_final -> W_U reproduces it
    torch.testing.assert_close(run.values, lens.values)


def test_decompose_resid_sums_to_the_residual_and_logit_attrs_to_the_logit(arch):
    _, model, _, _, logits, cache = arch
    resid, labels = cache.decompose_resid(return_labels=True)
    n = model.cfg.n_layers
    expect = ["embed"] + [f"{i}_{part}" for i in range(n)
                          for part in (("attn_out",) if model.cfg.attn_only else ("attn_out", "mlp_out"))]
    assert labels == expect
    torch.testing.assert_close(resid.sum(0), cache["resid_post", -1], rtol=1e-5, atol=1e-5)
    mid = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 1], rtol=1e-5, atol=1e-5)
    attrs = cache.logit_attrs(resid, torch.tensor(TARGET))
    assert attrs.shape == (len(labels), 2, 4)
    # LayerNorm's bias adds a constant to every logit that no component carries (TransformerLens' b_U)
    bias = model.ln_final.bias @ model.W_U if model.cfg.normalization_type == "LN" else torch.zeros(61)
    torch.testing.assert_close(attrs.sum(0) + bias[TARGET], logits[..., TARGET], rtol=1e-5, atol=1e-5)
    diff = cache.logit_attrs(resid, torch.tensor(TARGET), incorrect_tokens=torch.tensor(TARGET + 1))
    torch.testing.assert_close(diff.sum(0) + bias[TARGET] - bias[TARGET + 1],
                               logits[..., TARGET] - logits[..., TARGET + 1], rtol=1e-5, atol=1e-5)


def test_hook_scale_is_the_norms_divisor_and_apply_ln_to_stack_uses_it(arch):
    _, model, clean, _, _, cache = arch
    layer = 1
    x = cache["resid_pre", layer]
    centred = x - x.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else x
    scale = (centred.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps).sqrt()
    torch.testing.assert_close(cache[f"blocks.{layer}.ln1.hook_scale"], scale, rtol=1e-6, atol=1e-6)
    normed = cache.apply_ln_to_stack(x[None], layer)[0]
    torch.testing.assert_close(normed, centred / scale)
    torch.testing.assert_close(cache.accumulated_resid(layer=layer, apply_ln=True)[-1], centred / scale)
    # firing the norms' scales leaves the logits bitwise unchanged
    fired, _ = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_scale"))
    assert torch.equal(fired, model(clean))
    # editing the scale changes what the norm divides by
    before = cache[f"blocks.{layer}.ln1.hook_normalized"]
    seen = {}

    def double(s, hook):
        return s * 2

    def grab(y, hook):
        seen["y"] = y.detach()

    model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.ln1.hook_scale", double),
                                           (f"blocks.{layer}.ln1.hook_normalized", grab)])
    bias = model.blocks[layer].ln1.bias if hasattr(model.blocks[layer].ln1, "bias") else 0.0
    torch.testing.assert_close(seen["y"] - bias, (before - bias) / 2, rtol=1e-5, atol=1e-6)


def test_softmax_only_helpers_raise_and_neuron_results_need_mlps(arch):
    _, model, _, _, _, cache = arch
    for helper in (cache.get_full_resid_decomposition, cache.compute_head_results):
        with pytest.raises(NotImplementedError, match="needs per-head attention results"):
            helper()
    if not model.cfg.has_attention:
        with pytest.raises(NotImplementedError, match="layers are all recurrent"):
            cache.stack_head_results()
    with pytest.raises(NotImplementedError, match="read cache\\['state', layer\\]"):
        cache.compute_ssm_state()
    if model.cfg.attn_only:
        with pytest.raises(ValueError, match="no MLP in this model"):
            cache.stack_neuron_results(1)
        return
    neurons = cache.stack_neuron_results(1)
    assert neurons.shape == (model.cfg.d_mlp, 2, 4, model.cfg.d_model)
    torch.testing.assert_close(neurons.sum(0), cache["mlp_out", 0], rtol=1e-5, atol=1e-5)


def test_cache_slicing_keeps_the_aliases(arch):
    _, model, _, _, _, cache = arch
    first = cache.apply_slice_to_batch_dim(0)
    assert isinstance(first, RecurrentActivationCache) and not first.has_batch_dim
    torch.testing.assert_close(first["resid_pre", 1], cache["resid_pre", 1][0])
    assert first["attn_out", 0].shape == (4, model.cfg.d_model)


# ---------------------------------------------------------------------------------------------- tokens, weights


def test_test_prompt_and_tokenizer_helpers(arch, capsys):
    _, model, _, _, _, _ = arch
    model = copy.copy(model)
    model.tokenizer = word_tokenizer()
    tl_test_prompt("w1 w2 w3", "w4", model, prepend_bos=True, top_k=3)
    out = capsys.readouterr().out
    assert "Tokenized prompt: ['<bos>', 'w1', 'w2', 'w3']" in out and "Tokenized answer: ['w4']" in out
    assert "Top 2th token" in out and "Ranks of the answer tokens" in out
    tl_test_prompt("w1 w2", ["w4", "w5"], model, prepend_bos=False, print_details=False)
    assert model.to_tokens("w1 w2", prepend_bos=True).tolist() == [[1, 5, 6]]
    assert model.to_tokens("w1 w2").tolist() == [[5, 6]]
    assert model.to_tokens(["w1 w2", "w3"], padding_side="right").tolist() == [[5, 6], [7, 3]]
    assert model.to_tokens(["w1 w2", "w3"], padding_side="left", prepend_bos=True).tolist() == [[1, 5, 6], [3, 1, 7]]
    with pytest.raises(ValueError, match="different lengths"):
        model.to_tokens(["w1 w2", "w3"])
    with pytest.raises(ValueError, match="padding_side: expected"):
        model.to_tokens("w1", padding_side="middle")
    assert model.to_str_tokens("w1 w2", prepend_bos=True) == ["<bos>", "w1", "w2"]
    assert model.to_str_tokens(["w1 w2", "w3"], padding_side="right") == [["w1", "w2"], ["w3", "<pad>"]]
    assert model.to_str_tokens(torch.tensor([[5, 6]])) == ["w1", "w2"]
    with pytest.raises(ValueError, match="one sequence of ids"):
        model.to_str_tokens(torch.tensor([[5, 6], [5, 6]]))
    assert model.to_string(torch.tensor(5)) == "w1"
    assert model.to_single_token("w3") == 7
    with pytest.raises(ValueError, match="single token"):
        model.to_single_token("w1 w2")
    torch.testing.assert_close(model.tokens_to_residual_directions("w3"), model.tokens_to_residual_directions(7))


def test_default_prepend_bos_and_a_tokenizer_without_bos():
    model = tiny_model("gla")
    model.tokenizer = word_tokenizer()
    model.cfg.default_prepend_bos = True
    assert model.to_tokens("w1").tolist() == [[1, 5]]
    assert model.to_tokens("w1", prepend_bos=False).tolist() == [[5]]
    model.cfg.default_prepend_bos = None
    model.tokenizer.bos_token = None
    with pytest.raises(ValueError, match="this tokenizer has none"):
        model.to_tokens("w1", prepend_bos=True)


def test_unembedding_weights_and_residual_directions(arch):
    _, model, clean, _, logits, _ = arch
    assert model.W_E is model.embed.weight and model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)
    assert model.b_U.shape == (model.cfg.d_vocab,) and not model.b_U.any()
    if model.cfg.tie_embeddings:
        assert model.W_U.data_ptr() == model.embed.weight.data_ptr()
        assert not any(k.startswith("unembed") for k in model.state_dict())
        twin = copy.deepcopy(model)
        assert twin.unembed.weight is twin.embed.weight and twin.unembed.weight is not model.embed.weight
        torch.testing.assert_close(twin(clean), logits)
    w = model.ln_final.weight
    fold = 1 + w if model.cfg.norm == "rms_one_plus" else w
    dirs = model.tokens_to_residual_directions(torch.tensor([[TARGET, 2]]))
    assert dirs.shape == (1, 2, model.cfg.d_model)
    torch.testing.assert_close(dirs[0, 0], model.W_U[:, TARGET] * fold)
    assert model.tokens_to_residual_directions(torch.tensor([TARGET])).shape == (model.cfg.d_model,)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 61\)"):
        model.tokens_to_residual_directions(61)
    with pytest.raises(TypeError, match="tokens"):
        model.tokens_to_residual_directions(torch.tensor([1.0, 2.0]))


def test_cfg_fields_transformer_lens_reads(arch):
    name, model, _, _, _, _ = arch
    cfg = model.cfg
    assert cfg.normalization_type == {"rwkv7": "LN"}.get(name, "RMS")
    assert cfg.attn_only == (name == "mamba2") and cfg.d_vocab_out == cfg.d_vocab
    assert cfg.act_fn == {"mamba2": None, "rwkv7": "relu2"}.get(name, "silu")
    assert cfg.gated_mlp == (cfg.act_fn == "silu")
    assert cfg.positional_embedding_type == ("rotary" if name == "qwen3_5_hybrid" else "none")
    assert cfg.d_head == (cfg.d_head_attn if name == "qwen3_5_hybrid" else cfg.d_v)
    assert cfg.use_attn_result is False and cfg.default_prepend_bos is None and cfg.n_ctx is None
    assert cfg.model_name == cfg.architecture == cfg.original_architecture
    assert cfg.device == "cpu" and cfg.n_heads > 0 and cfg.d_mlp >= 0
    if name == "qwen3_5_hybrid":
        with pytest.raises(AttributeError, match="no single count fits every layer"):
            _ = cfg.n_key_value_heads
    else:
        assert cfg.n_key_value_heads is None
    assert all(block.hook_out_is_single_residual_stream for block in model.blocks)


def test_cfg_checks_and_names():
    from recurrent_lens import ModelConfig

    base = {"architecture": "gla", "d_model": 16, "n_layers": 1, "d_vocab": 20, "n_heads": 2, "d_k": 4, "d_v": 4}
    with pytest.raises(ValueError, match="n_ctx: expected None or a positive int, got 0"):
        ModelConfig(**base, n_ctx=0)
    with pytest.raises((TypeError, ValueError), match="default_prepend_bos"):
        ModelConfig(**base, default_prepend_bos="yes")
    assert ModelConfig(**base, source="/ckpts/fla-hub/gla-340M/").model_name == "gla-340M"
    cfg = ModelConfig(**base, n_ctx=2048, default_prepend_bos=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
