"""TransformerLens and SAELens habits, one call each, on a hybrid (attention layers with fewer heads than the
recurrent ones, as in Qwen3.5-0.8B) and on a pure recurrent model (GLA).

Every entry of ``TL_HABITS`` and ``SAELENS_HABITS`` is one call a TransformerLens or SAELens user makes out of
habit, with a check of its answer; where a habit cannot apply (attention weights of a model without attention)
the check is the error that says why. SAELens entries skip without ``sae_lens`` (except under
``RECURRENT_LENS_REQUIRE_SAELENS=1``).
"""

import tempfile

import pytest
import torch
from tests.support.helpers import uneven_hybrid
from tests.support.helpers import tiny_model, word_tokenizer
from tests.support.saelens import sae_lens, standard_sae
from transformer_lens import FactoredMatrix, patching
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities import test_prompt as tl_test_prompt_fn

from recurrent_lens.sae import WriteSAE

TARGET = 5


def with_words(model):
    model.tokenizer = word_tokenizer(["<unk>", "<eos>"] + [f"w{i}" for i in range(model.cfg.d_vocab - 2)])
    return model.eval()


@pytest.fixture(scope="module", params=["hybrid", "gla"])
def ctx(request):
    model = with_words(uneven_hybrid() if request.param == "hybrid" else tiny_model("gla"))
    clean = model.to_tokens(["w1 w2 w3 w4 w5", "w6 w7 w8 w9 w10"])
    corrupted = clean.clone()
    corrupted[:, 0] = 40
    logits, cache = model.run_with_cache(clean)
    return dict(model=model, clean=clean, corrupted=corrupted, logits=logits, cache=cache)


def metric(logits):
    return logits[:, -1, TARGET].sum()


def has_attention(c):
    return bool(c["model"].attention_layers)


# ---------------------------------------------------------------------------------------------- TransformerLens


def run_with_cache(c):
    torch.testing.assert_close(c["logits"], c["model"](c["clean"]), rtol=1e-5, atol=1e-5)


def run_with_hooks(c):
    def zero(x, hook):
        return torch.zeros_like(x)

    out = c["model"].run_with_hooks(c["clean"], fwd_hooks=[("blocks.1.hook_resid_post", zero)])
    assert torch.allclose(out, out[:, :1, :].expand_as(out))


def hooks_context(c):
    seen = []
    with c["model"].hooks([(lambda name: name.endswith("hook_resid_pre"), lambda x, hook: seen.append(hook.name))]):
        c["model"](c["clean"])
    assert len(seen) == c["model"].cfg.n_layers


def add_hook_and_reset(c):
    model, seen = c["model"], []
    model.add_hook("blocks.0.hook_attn_out", lambda x, hook: seen.append(hook.name))
    model(c["clean"])
    model.reset_hooks()
    model(c["clean"])
    assert seen == ["blocks.0.hook_mixer_out"]


def get_caching_hooks(c):
    store, fwd, _ = c["model"].get_caching_hooks(names_filter="blocks.0.hook_resid_post")
    with c["model"].hooks(fwd):
        c["model"](c["clean"])
    torch.testing.assert_close(store["blocks.0.hook_resid_post"], c["cache"]["resid_post", 0])


def to_tokens(c):
    assert c["model"].to_tokens("w1 w2").tolist() == [[3, 4]]


def to_str_tokens(c):
    assert c["model"].to_str_tokens("w1 w2") == ["w1", "w2"]


def to_string(c):
    assert c["model"].to_string(c["clean"][0]) == "w1 w2 w3 w4 w5"


def to_single_token(c):
    assert c["model"].to_single_token("w3") == 5


def forward_loss(c):
    loss = c["model"](c["clean"], return_type="loss")
    expected = torch.nn.functional.cross_entropy(c["logits"][:, :-1].flatten(0, 1), c["clean"][:, 1:].flatten())
    torch.testing.assert_close(loss, expected)


def forward_both_per_token(c):
    logits, loss = c["model"](c["clean"], return_type="both", loss_per_token=True)
    assert loss.shape == (2, 4)
    torch.testing.assert_close(logits, c["logits"], rtol=1e-5, atol=1e-5)


def forward_prepend_bos(c):
    torch.testing.assert_close(c["model"](c["clean"], prepend_bos=False), c["logits"], rtol=1e-5, atol=1e-5)


def stop_at_layer(c):
    torch.testing.assert_close(c["model"](c["clean"], stop_at_layer=1), c["cache"]["resid_pre", 1])


def generate_str(c):
    out = c["model"].generate("w1 w2", max_new_tokens=3, stop_at_eos=False, seed=0)
    assert isinstance(out, str) and out.startswith("w1 w2 ")


def generate_list(c):
    out = c["model"].generate(["w1 w2"], max_new_tokens=2, stop_at_eos=False, seed=0)
    assert isinstance(out, list) and len(out) == 1


def generate_greedy_tokens(c):
    out = c["model"].generate(c["clean"], max_new_tokens=1, do_sample=False)
    assert torch.equal(out[:, -1], c["logits"][:, -1].argmax(-1))


def generate_contradiction(c):
    with pytest.raises(ValueError, match="do_sample=False decodes greedily, but {'temperature': 0.5}"):
        c["model"].generate(c["clean"], do_sample=False, temperature=0.5)


def accumulated_resid(c):
    stack, labels = c["cache"].accumulated_resid(apply_ln=True, return_labels=True)
    torch.testing.assert_close(c["model"].unembed(stack[-1]), c["logits"], rtol=1e-5, atol=1e-5)
    assert labels[-1] == "final_post"


def decompose_resid(c):
    stack = c["cache"].decompose_resid()
    torch.testing.assert_close(stack.sum(0), c["cache"]["resid_post", -1], rtol=1e-5, atol=1e-5)


def logit_attrs(c):
    attrs = c["cache"].logit_attrs(c["cache"].decompose_resid(), torch.tensor(TARGET))
    torch.testing.assert_close(attrs.sum(0), c["logits"][..., TARGET], rtol=1e-4, atol=1e-4)


def stack_resid(c):
    assert c["cache"].stack_activation("resid_post").shape == (c["model"].cfg.n_layers, 2, 5, 32)


def stack_state(c):
    states, layers = c["cache"].stack_activation("state", return_layers=True)
    assert layers == c["model"].cfg.recurrent_layers and states.shape[0] == len(layers)


def stack_head_results(c):
    if not has_attention(c):
        with pytest.raises(NotImplementedError, match="layers are all recurrent"):
            c["cache"].stack_head_results()
        return
    stack, labels = c["cache"].stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[:2] == ["L1H0", "L1H1"] and labels[-1] == "remainder"
    torch.testing.assert_close(stack.sum(0), c["cache"]["resid_post", -1], rtol=1e-5, atol=1e-5)


def short_names(c):
    layer = c["model"].cfg.recurrent_layers[-1]
    assert c["cache"]["state", layer] is c["cache"][f"blocks.{layer}.mixer.hook_state"]
    assert c["cache"]["z", layer] is c["cache"][f"blocks.{layer}.mixer.hook_read"]


def remove_batch_dim(c):
    _, one = c["model"].run_with_cache(c["clean"][:1], remove_batch_dim=True)
    assert one["resid_post", 0].shape == (5, 32)


def batch_slice(c):
    assert c["cache"].apply_slice_to_batch_dim([1])["resid_post", 0].shape == (1, 5, 32)


def patch_resid_pre(c):
    out = patching.get_act_patch_resid_pre(c["model"], c["corrupted"], c["cache"], metric)
    assert out.shape == (c["model"].cfg.n_layers, 5)
    torch.testing.assert_close(out[0, 0], metric(c["logits"]), rtol=1e-4, atol=1e-4)


def patch_attn_out(c):
    assert patching.get_act_patch_attn_out(c["model"], c["corrupted"], c["cache"], metric).shape == (
        c["model"].cfg.n_layers, 5)


def patch_block_every(c):
    assert patching.get_act_patch_block_every(c["model"], c["corrupted"], c["cache"], metric).shape == (
        3, c["model"].cfg.n_layers, 5)


def patch_head_out_all_pos(c):
    model = c["model"]
    if set(model.heads_per_layer) != {model.cfg.n_heads}:
        with pytest.raises(IndexError, match="Pass index_df=model.head_index_df"):
            patching.get_act_patch_attn_head_out_all_pos(model, c["corrupted"], c["cache"], metric)
        return
    out = patching.get_act_patch_attn_head_out_all_pos(model, c["corrupted"], c["cache"], metric)
    assert out.shape == (model.cfg.n_layers, model.cfg.n_heads)


def patch_head_out_by_pos_index_df(c):
    index = c["model"].head_index_df(pos=5)
    out = patching.generic_activation_patch(c["model"], c["corrupted"], c["cache"], metric,
                                            patching.layer_pos_head_vector_patch_setter, "z", index_df=index)
    assert out.shape == (len(index),) and len(index) == 5 * sum(c["model"].heads_per_layer)


def patch_head_out_by_pos(c):
    model = c["model"]
    if set(model.heads_per_layer) != {model.cfg.n_heads}:
        with pytest.raises(IndexError, match="has 2 heads"):
            patching.get_act_patch_attn_head_out_by_pos(model, c["corrupted"], c["cache"], metric)
        return
    assert patching.get_act_patch_attn_head_out_by_pos(model, c["corrupted"], c["cache"], metric).shape == (
        model.cfg.n_layers, 5, model.cfg.n_heads)


def attention_weights(c):
    model = c["model"]
    if not has_attention(c):
        with pytest.raises(NotImplementedError, match="no softmax-attention layer"):
            model.W_O
        return
    assert model.W_Q.shape == model.W_K.shape == (1, 2, 32, 8) and model.b_O.shape == (1, 32)


def qk_circuit(c):
    if not has_attention(c):
        return
    attn = c["model"].blocks[1].attn
    qk = FactoredMatrix(attn.W_Q, attn.W_K.transpose(-2, -1))
    assert qk.shape == (2, 32, 32) and qk.AB.shape == (2, 32, 32)


def unembed_weights(c):
    torch.testing.assert_close(c["model"].W_U, c["model"].unembed.weight.T)
    assert c["model"].W_E.shape == (c["model"].cfg.d_vocab, 32)


def residual_directions(c):
    assert c["model"].tokens_to_residual_directions("w3").shape == (32,)


def tl_test_prompt(c):
    tl_test_prompt_fn("w1 w2", "w3", c["model"], prepend_bos=False, print_details=False)


def act_names(c):
    assert c["model"].resolve_hook_name(get_act_name("z", 0)) == "blocks.0.mixer.hook_read"


def list_hooks(c):
    c["model"].add_hook("blocks.0.hook_resid_post", lambda x, hook: None)
    assert list(c["model"].list_hooks("blocks.0.hook_resid_post")) == ["blocks.0.hook_resid_post"]
    c["model"].reset_hooks()


def our_sae_run_with_saes(c):
    model = c["model"]
    layer = model.cfg.recurrent_layers[0]
    sae = WriteSAE(model.cfg.d_k, model.cfg.d_v, 16, k=4,
                   metadata={"hook_name": f"blocks.{layer}.mixer.hook_state", "head": 1})
    out = model.run_with_saes(c["clean"], saes=[sae], use_error_term=True)
    torch.testing.assert_close(out, c["logits"], rtol=1e-4, atol=1e-4)
    _, cache = model.run_with_cache_with_saes(c["clean"], saes=[sae])
    assert cache[f"blocks.{layer}.mixer.hook_state.saes.h1.hook_sae_acts_post"].shape == (2, 5, 16)
    assert not [n for n in model.hook_dict if "sae" in n]


TL_HABITS = [run_with_cache, run_with_hooks, hooks_context, add_hook_and_reset, get_caching_hooks, to_tokens,
             to_str_tokens, to_string, to_single_token, forward_loss, forward_both_per_token, forward_prepend_bos,
             stop_at_layer, generate_str, generate_list, generate_greedy_tokens, generate_contradiction,
             accumulated_resid, decompose_resid, logit_attrs, stack_resid, stack_state, stack_head_results,
             short_names, remove_batch_dim, batch_slice, patch_resid_pre, patch_attn_out, patch_block_every,
             patch_head_out_all_pos, patch_head_out_by_pos_index_df, patch_head_out_by_pos, attention_weights,
             qk_circuit, unembed_weights, residual_directions, tl_test_prompt, act_names, list_hooks,
             our_sae_run_with_saes]


@pytest.mark.parametrize("habit", TL_HABITS, ids=lambda f: f.__name__)
def test_transformer_lens_habit(ctx, habit):
    habit(ctx)


# ---------------------------------------------------------------------------------------------- SAELens


def sl_add_sae_resid(c):
    model, sae = c["model"], standard_sae(32, "blocks.1.hook_resid_post")
    model.add_sae(sae, use_error_term=True)
    try:
        torch.testing.assert_close(model(c["clean"]), c["logits"], rtol=1e-4, atol=1e-4)
    finally:
        model.reset_saes()


def sl_run_with_saes(c):
    sae = standard_sae(32, "blocks.1.hook_resid_post")
    out = c["model"].run_with_saes(c["clean"], saes=[sae])
    expected = c["model"].run_with_hooks(c["clean"], fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: sae(x))])
    torch.testing.assert_close(out, expected)


def sl_run_with_cache_with_saes(c):
    sae = standard_sae(32, "blocks.0.hook_mixer_out")
    _, cache = c["model"].run_with_cache_with_saes(c["clean"], saes=[sae])
    torch.testing.assert_close(cache["blocks.0.hook_mixer_out.hook_sae_acts_post"],
                               sae.encode(cache["blocks.0.hook_mixer_out.hook_sae_input"]))


def sl_reset_saes(c):
    c["model"].add_sae(standard_sae(32, "blocks.0.hook_resid_post"))
    c["model"].reset_saes()
    assert not [n for n in c["model"].hook_dict if "sae" in n]


def sl_per_head_read(c):
    cfg = c["model"].cfg
    sae = standard_sae(cfg.d_v, "blocks.0.mixer.hook_read")
    sae.cfg.metadata.hook_head_index = 1
    assert c["model"].run_with_saes(c["clean"], saes=[sae]).shape == c["logits"].shape


def sl_flat_heads_read(c):
    cfg = c["model"].cfg
    sae = standard_sae(cfg.n_heads * cfg.d_v, "blocks.0.mixer.hook_read")
    _, cache = c["model"].run_with_cache_with_saes(c["clean"], saes=[sae], use_error_term=True)
    torch.testing.assert_close(cache["blocks.0.mixer.hook_read.hook_sae_input"],
                               c["cache"]["read", 0].flatten(-2))


def sl_refuses_matrix_hook(c):
    with pytest.raises(ValueError, match="is a matrix hook"):
        c["model"].add_sae(standard_sae(32, "blocks.0.mixer.hook_state"))


def sl_activations_store(c):
    sl = sae_lens()
    datasets = pytest.importorskip("datasets")
    sae = standard_sae(32, "blocks.1.hook_resid_post")
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = 5, False
    rows = torch.randint(2, c["model"].cfg.d_vocab, (8, 5)).tolist()
    store = sl.ActivationsStore.from_sae(c["model"], sae, dataset=datasets.Dataset.from_dict({"tokens": rows}),
                                         store_batch_size_prompts=4, train_batch_size_tokens=10,
                                         n_batches_in_buffer=2, device="cpu")
    assert store.next_batch().shape == (10, 32)
    c["store"] = store


def sl_run_evals(c):
    sae_lens()
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    if "store" not in c:
        sl_activations_store(c)
    sae = standard_sae(32, "blocks.1.hook_resid_post")
    metrics, _ = run_evals(sae, c["store"], c["model"], ActivationScaler(),
                           EvalConfig(n_eval_reconstruction_batches=1, n_eval_sparsity_variance_batches=1,
                                      compute_kl=True, compute_ce_loss=True))
    assert metrics["model_performance_preservation"]["ce_loss_without_sae"] > 0


def sl_load_our_export(c):
    sl = sae_lens()
    cfg = c["model"].cfg
    ours = WriteSAE(cfg.d_k, cfg.d_v, 16, k=4, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 0})
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d, format="saelens")
        theirs = sl.SAE.load_from_disk(d)
    assert theirs.cfg.d_in == cfg.d_k * cfg.d_v


SAELENS_HABITS = [sl_add_sae_resid, sl_run_with_saes, sl_run_with_cache_with_saes, sl_reset_saes, sl_per_head_read,
                  sl_flat_heads_read, sl_refuses_matrix_hook, sl_activations_store, sl_run_evals, sl_load_our_export]


@pytest.mark.parametrize("habit", SAELENS_HABITS, ids=lambda f: f.__name__)
def test_saelens_habit(ctx, habit):
    habit(ctx)


def test_there_are_at_least_45_habits():
    assert len(TL_HABITS) + len(SAELENS_HABITS) >= 45
