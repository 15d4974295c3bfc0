"""The TransformerLens-facing API: ActivationCache, pos_slice, hooks(), tokenizer helpers, return types, repr."""

import pytest
import torch
from tests.support.helpers import tiny_gdn, tiny_qwen3_5, word_tokenizer
from transformer_lens import ActivationCache

from recurrent_lens import HookedRecurrentModel


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tok")
    tiny_qwen3_5(seed=3).save_pretrained(path)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(95)]
    word_tokenizer(words).save_pretrained(path)
    return HookedRecurrentModel.from_pretrained(path)


def test_run_with_cache_returns_activation_cache_with_position_slicing():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (2, 9))
    _, full = model.run_with_cache(tokens)
    assert isinstance(full, ActivationCache)
    _, last = model.run_with_cache(tokens, pos_slice=-1)
    _, first3 = model.run_with_cache(tokens, pos_slice=[0, 1, 2])
    for name in ["blocks.0.mixer.hook_state", "blocks.1.mixer.hook_q", "blocks.1.hook_resid_post",
                 "blocks.0.mixer.hook_beta"]:
        assert last[name].shape[1] == 1 and first3[name].shape[1] == 3
        torch.testing.assert_close(last[name][:, 0], full[name][:, -1])
        torch.testing.assert_close(first3[name], full[name][:, :3])
    assert last["blocks.0.mixer.hook_state"].shape == (2, 1, 4, 8, 8)


def test_remove_batch_dim_and_attention_pattern(with_tokenizer):
    model = with_tokenizer
    tokens = torch.randint(0, 97, (1, 7))
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True, pos_slice=-1)
    assert cache["blocks.0.mixer.hook_state"].shape == (1, 4, 8, 12)
    assert cache["blocks.3.attn.hook_pattern"].shape == (4, 1, 7)
    _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.3.attn.hook_pattern"][0]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 7))
    assert (pattern.triu(1) == 0).all()


def test_hooks_context_manager_and_return_types():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (1, 12))
    calls = []
    with model.hooks(fwd_hooks=[("blocks.1.mixer.hook_write", lambda w, hook: calls.append(hook.name))]):
        model(tokens)
    model(tokens)
    assert calls == ["blocks.1.mixer.hook_write"]
    logits, loss = model(tokens, return_type="both")
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    torch.testing.assert_close(loss, expected)
    assert model(tokens, return_type="loss", loss_per_token=True).shape == (1, 11)
    assert model(tokens, return_type=None) is None
    resid = model(tokens, stop_at_layer=1)
    assert resid.shape == (1, 12, 32)
    with pytest.raises((ValueError, TypeError), match="return_type"):  # TypeError: the suite's jaxtyping checks
        model(tokens, return_type="probs")


def test_backward_hooks_on_states():
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (1, 6))
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                    names_filter="blocks.0.mixer.hook_state")
    assert cache["blocks.0.mixer.hook_state_grad"].shape == (1, 6, 4, 8, 8)
    assert cache["blocks.0.mixer.hook_state_grad"].abs().sum() > 0


def test_tokenizer_helpers_and_text_generation(with_tokenizer):
    model = with_tokenizer
    tokens = model.to_tokens("w1 w2 w3")
    assert tokens.tolist() == [[3, 4, 5]]
    assert model.to_string(tokens[0]) == "w1 w2 w3"
    assert model.to_str_tokens("w1 w2") == ["w1", "w2"]
    torch.testing.assert_close(model("w1 w2 w3"), model(tokens))
    text = model.generate("w1 w2 w3", max_new_tokens=3, do_sample=False)
    assert isinstance(text, str) and text.startswith("w1 w2 w3")
    with pytest.raises(ValueError, match="different lengths"):
        model.to_tokens(["w1", "w1 w2"])


def test_no_tokenizer_error_and_repr():
    model = tiny_gdn()
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hello")
    assert "gated_deltanet" in repr(model) and "d_k=8" in repr(model)


def test_sampling_is_seeded():
    model = tiny_gdn()
    prompt = torch.randint(0, 61, (2, 4))
    a = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.7, seed=1)
    b = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.7, seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, do_sample=True, temperature=-1.0)
    assert torch.equal(model.generate(prompt, 4, temperature=0), model.generate(prompt, 4, do_sample=False))
