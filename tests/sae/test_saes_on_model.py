"""SAELens SAE objects on our model (add_sae, run_with_saes, run_with_cache_with_saes, reset_saes) and
SAELens' own ActivationsStore and run_evals streaming from it.

Tests that need ``sae_lens`` skip without it, except under ``RECURRENT_LENS_REQUIRE_SAELENS=1``.
"""

import pytest
import torch
from tests.support.helpers import uneven_hybrid
from tests.support.helpers import tiny_model, word_tokenizer
from tests.support.saelens import sae_lens, standard_sae

from recurrent_lens.sae import WriteSAE

TOKENS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


@pytest.fixture
def model():
    return uneven_hybrid()


def replaced(model, hook_name, fn):
    """Logits with ``fn`` applied at ``hook_name`` by an ordinary hook: the independent reference."""
    return model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, lambda x, hook: fn(x))])


def test_a_saelens_sae_splices_into_the_residual_with_saelens_names(model):
    sae = standard_sae(32, "blocks.1.hook_resid_post")
    clean = model(TOKENS)
    model.add_sae(sae)
    spliced = model(TOKENS)
    model.reset_saes()
    expected = replaced(model, "blocks.1.hook_resid_post", lambda x: sae(x))
    torch.testing.assert_close(spliced, expected)
    logits, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae])
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               sae.encode(cache["blocks.1.hook_resid_post.hook_sae_input"]))
    assert not [n for n in model.hook_dict if "sae" in n] and "hook_sae_acts_post" in sae.hook_dict
    with_error = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True)
    torch.testing.assert_close(with_error, clean, rtol=1e-5, atol=1e-5)
    assert sae.use_error_term is False


def test_mixer_out_and_per_head_reads(model):
    mixer = standard_sae(32, "blocks.2.hook_mixer_out")
    torch.testing.assert_close(model.run_with_saes(TOKENS, saes=[mixer]),
                               replaced(model, "blocks.2.hook_mixer_out", lambda x: mixer(x)))
    # all heads of hook_read, flattened head-major as SAELens flattens hook_z
    flat = standard_sae(4 * 8, "blocks.0.mixer.hook_read")
    torch.testing.assert_close(model.run_with_saes(TOKENS, saes=[flat]),
                               replaced(model, "blocks.0.mixer.hook_read", lambda x: flat(x.flatten(-2)).view(x.shape)))
    one = standard_sae(8, "blocks.0.mixer.hook_read", head=2)

    def head_2(x):
        x = x.clone()
        x[:, :, 2] = one(x[:, :, 2])
        return x

    torch.testing.assert_close(model.run_with_saes(TOKENS, saes=[one]), replaced(model, "blocks.0.mixer.hook_read",
                                                                                  head_2))
    # the attention layer's heads (2 of them) through the TransformerLens alias of hook_z
    z = standard_sae(8, "blocks.1.attn.hook_z")
    logits = model.run_with_saes(TOKENS, saes=[(z, "blocks.1.attn.hook_z", 1)])
    assert logits.shape == (2, 5, model.cfg.d_vocab)


def test_ours_and_saelens_together_and_previous_saes_come_back(model):
    ours = WriteSAE(8, 8, 32, k=4, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
    theirs = standard_sae(32, "blocks.1.hook_resid_post")
    other = standard_sae(32, "blocks.1.hook_resid_post", seed=1)
    model.add_sae(theirs)
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[ours, other])
    assert "blocks.0.mixer.hook_state.saes.h1.hook_sae_acts_post" in cache
    torch.testing.assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               other.encode(cache["blocks.1.hook_resid_post.hook_sae_input"]))
    assert model.hook_dict["blocks.1.hook_resid_post"].sae is theirs
    assert "blocks.0.mixer.hook_state.saes.h1.hook_sae_acts_post" not in model.hook_dict
    model.reset_saes("blocks.1.hook_resid_post")
    assert type(model.hook_dict["blocks.1.hook_resid_post"]).__name__ == "HookPoint"


def test_refusals_name_why(model):
    with pytest.raises(ValueError, match="matrix hook .*SAELens SAEs read vectors"):
        model.add_sae(standard_sae(64), "blocks.0.mixer.hook_state")
    with pytest.raises(ValueError, match="the SAE reads d_in=16, but this hook's activation"):
        model.run_with_saes(TOKENS, saes=[standard_sae(16, "blocks.1.hook_resid_post")])
    with pytest.raises(ValueError, match="head: 'blocks.1.attn.hook_z' has heads \\[0, 2\\), got 2"):
        model.add_sae(standard_sae(8), "blocks.1.attn.hook_z", head=2)
    with pytest.raises(ValueError, match="hook_name: not given, and the SAE's cfg.metadata has none"):
        model.add_sae(standard_sae(32))
    with pytest.raises(TypeError, match="expected a recurrent_lens.sae.SAE or a SAELens SAE"):
        model.add_sae(torch.nn.Linear(2, 2), "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="head: our SAEs attach to one head"):
        model.add_sae(WriteSAE(8, 8, 32, k=4), "blocks.0.mixer.hook_state")
    assert not [n for n in model.hook_dict if "sae" in n]


def test_saelens_activations_store_and_run_evals_use_the_model():
    sl = sae_lens()
    datasets = pytest.importorskip("datasets")
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    model = tiny_model("gla").eval()
    model.tokenizer = word_tokenizer(["<unk>", "<eos>"] + [f"w{i}" for i in range(model.cfg.d_vocab - 2)])
    sae = standard_sae(model.cfg.d_model, "blocks.1.hook_resid_post")
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = 6, False
    rows = torch.randint(2, model.cfg.d_vocab, (16, 6))
    store = sl.ActivationsStore.from_sae(model, sae, dataset=datasets.Dataset.from_dict({"tokens": rows.tolist()}),
                                         store_batch_size_prompts=4, train_batch_size_tokens=12,
                                         n_batches_in_buffer=2, device="cpu")
    batch = store.get_batch_tokens()
    acts = store.get_activations(batch)
    _, cache = model.run_with_cache(batch)
    torch.testing.assert_close(acts.view(cache["resid_post", 1].shape), cache["resid_post", 1])
    assert store.next_batch().shape == (12, model.cfg.d_model)
    config = EvalConfig(n_eval_reconstruction_batches=1, n_eval_sparsity_variance_batches=1, compute_kl=True,
                        compute_ce_loss=True)
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), config)
    perf = metrics["model_performance_preservation"]
    assert all(torch.isfinite(torch.tensor(v)) for v in perf.values())
    assert perf["ce_loss_with_sae"] != perf["ce_loss_without_sae"]
