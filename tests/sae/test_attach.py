"""Splicing SAEs into a tiny Gated DeltaNet's matrix hooks."""

import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.sae import FlatSAE, WriteSAE, add_sae, reset_saes, saes
from recurrent_lens.sae.attach import SAEHookPoint

HOOK = "blocks.1.mixer.hook_state"


@pytest.fixture(scope="module")
def model():
    return tiny_gdn(seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def sae_for(model, seed=0, **kw):
    torch.manual_seed(seed)
    return WriteSAE(model.cfg.d_k, model.cfg.d_v, 32, k=4, **kw)


def test_error_term_leaves_logits_and_state_unchanged(model, tokens):
    base, base_cache = model.run_with_cache(tokens, names_filter=HOOK)
    sae = sae_for(model)
    with saes(model, [(sae, HOOK, 2)], use_error_term=True):
        spliced, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(HOOK))
        assert f"{HOOK}.saes.h2.hook_sae_acts_post" in model.hook_dict
    assert (spliced - base).abs().max() <= 1e-6
    # The spliced state itself is bitwise the model's state.
    assert torch.equal(cache[HOOK], base_cache[HOOK])
    assert cache[f"{HOOK}.saes.h2.hook_sae_acts_post"].shape == (2, 12, 32)
    assert cache[f"{HOOK}.saes.h2.hook_sae_error"].shape == (2, 12, model.cfg.d_k, model.cfg.d_v)
    assert f"{HOOK}.saes.h2.hook_sae_acts_post" not in model.hook_dict
    assert type(model.hook_dict[HOOK]) is not SAEHookPoint


def test_splice_replaces_only_the_chosen_head(model, tokens):
    _, clean = model.run_with_cache(tokens, names_filter=HOOK)
    sae = sae_for(model)
    with saes(model, [(sae, HOOK, 1)]):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (HOOK, "blocks.0.mixer.hook_state"))
    assert (logits - model(tokens)).abs().max() > 1e-3
    S = clean[HOOK]
    torch.testing.assert_close(cache[HOOK][:, :, 1], sae.reconstruct(S[:, :, 1]))
    for h in (0, 2, 3):
        torch.testing.assert_close(cache[HOOK][:, :, h], S[:, :, h])


def test_latent_edit_with_error_term_shifts_by_decoded_delta(model, tokens):
    sae = sae_for(model)
    clean_logits, clean = model.run_with_cache(tokens, names_filter=HOOK)

    def boost(acts, hook):
        acts = acts.clone()
        acts[:, 3, 5] += 2.0
        return acts

    with saes(model, [(sae, HOOK, 0)], use_error_term=True):
        model.add_hook(f"{HOOK}.saes.h0.hook_sae_acts_post", boost)
        logits, cache = model.run_with_cache(tokens, names_filter=HOOK)
        model.reset_hooks()
    delta = cache[HOOK][:, 3, 0] - clean[HOOK][:, 3, 0]
    atom = torch.outer(sae.V_dec[5, 0], sae.W_dec[5, 0]).detach()
    torch.testing.assert_close(delta, 2.0 * atom.expand_as(delta), rtol=1e-4, atol=1e-5)
    # Earlier positions are untouched; the edited state carries forward to later logits.
    torch.testing.assert_close(logits[:, :3], clean_logits[:, :3], rtol=0, atol=1e-6)
    assert (logits[:, 4:] - clean_logits[:, 4:]).abs().max() > 1e-4


def test_reset_restores_original_hookpoint_and_its_hooks(model, tokens):
    original = model.hook_dict[HOOK]
    seen = []
    original.add_hook(lambda x, hook: seen.append(hook.name), is_permanent=True)
    sae = sae_for(model)
    add_sae(model, sae, HOOK, 0)
    add_sae(model, sae_for(model, 1), HOOK, 3)
    wrapper = model.hook_dict[HOOK]
    assert isinstance(wrapper, SAEHookPoint) and sorted(wrapper.saes) == ["h0", "h3"]
    model(tokens)
    assert seen == [HOOK]  # the original's hooks still fire while SAEs are attached
    reset_saes(model)
    assert model.hook_dict[HOOK] is original
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    model(tokens)
    assert len(seen) == 2
    model.reset_hooks(including_permanent=True)


def test_attach_errors_name_argument_expected_and_actual(model):
    sae = sae_for(model)
    with pytest.raises(ValueError, match=r"head: expected an int in \[0, 4\).*got 7"):
        add_sae(model, sae, HOOK, 7)
    with pytest.raises(ValueError, match=r"sae: .*d_k=8, d_v=8.*d_k=4, d_v=8"):
        add_sae(model, WriteSAE(4, 8, 16), HOOK, 0)
    with pytest.raises(ValueError, match="hook_name: 'blocks.1.hook_resid_post' is not a matrix hook"):
        add_sae(model, sae, "blocks.1.hook_resid_post", 0)
    with pytest.raises(ValueError, match="hook_name: unknown hook 'blocks.9.mixer.hook_state'"):
        add_sae(model, sae, "blocks.9.mixer.hook_state", 0)
    assert not any(isinstance(m, SAEHookPoint) for m in model.modules())


def test_write_hook_and_model_methods(model, tokens):
    sae = FlatSAE(model.cfg.d_k, model.cfg.d_v, 16, k=4)
    base = model(tokens)
    model.add_sae(sae, "blocks.0.mixer.hook_write", 2, use_error_term=True)
    assert (model(tokens) - base).abs().max() <= 1e-6
    model.reset_saes()
    with model.saes([(sae, "blocks.0.mixer.hook_write", 2)]):
        assert (model(tokens) - base).abs().max() > 1e-4


def test_attachment_goes_through_the_public_splice():
    """A subclass that changes ``splice`` changes what the model sees: attach uses nothing else."""
    class Zeroing(WriteSAE):
        def splice(self, x, use_error_term=False):
            return torch.zeros_like(x)

    model = tiny_gdn(seed=0)
    tokens = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(0))
    hook = "blocks.0.mixer.hook_state"
    with saes(model, [(Zeroing(8, 8, 16, k=2), hook, 1)]):
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    assert not cache[hook][:, :, 1].any() and cache[hook][:, :, 0].any()
