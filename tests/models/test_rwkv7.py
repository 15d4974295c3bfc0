"""RWKV-7 against fla's ``RWKV7ForCausalLM`` (torch-patched for CPU) and recurrences written here."""

import math

import pytest
import torch
from tests.support.fla_cpu import patch_fla_for_cpu
from safetensors.torch import load_file, save_file
from tests.support.tiny_arch_rwkv7 import FLA_VOCAB as VOCAB
from tests.support.tiny_arch_rwkv7 import tiny_fla_rwkv7, tiny_rwkv7

from recurrent_lens import HookedRecurrentModel
from recurrent_lens.models.rwkv7 import config_from_fla, map_fla_weight



@pytest.fixture(scope="module", params=[(True, None), (False, 128)], ids=["fuse_norm-dv16", "no_fuse_norm-dv32"])
def pair(request, tmp_path_factory):
    fuse_norm, value_dim = request.param
    with patch_fla_for_cpu():
        ref = tiny_fla_rwkv7(fuse_norm=fuse_norm, value_dim=value_dim)
    path = tmp_path_factory.mktemp("rwkv7")
    ref.save_pretrained(path)
    return ref, HookedRecurrentModel.from_pretrained(path), path


def test_logits_match_fla(pair):
    ref, model, _ = pair
    tokens = torch.randint(0, VOCAB, (2, 77))
    with torch.no_grad(), patch_fla_for_cpu():
        expected = ref(tokens).logits
    got = model(tokens)
    assert (got - expected).abs().max() < 1e-4


def fla_greedy(ref, prompt, max_new_tokens):
    """Greedy decoding through fla's own recurrent cache (``past_key_values``), one token per call.

    ``ref.generate`` cannot serve as the reference: under transformers 5.24 it hands the cache to the
    model as ``cache=``, which ``RWKV7ForCausalLM.forward`` ignores, so every decode step restarts from an
    empty state (checked: its second token equals a cache-less forward of the first)."""
    with torch.no_grad(), patch_fla_for_cpu():
        out = ref(prompt, use_cache=True)
        tokens, cache = [prompt], out.past_key_values
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = ref(nxt, past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1)


def test_greedy_generate_matches_fla_cached_decoding(pair):
    ref, model, _ = pair
    prompt = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), fla_greedy(ref, prompt, 12))


def test_older_x_x_checkpoint_loads(pair, tmp_path):
    """Older fla stores the six token-shift coefficients as one ``x_x`` [6, 1, 1, C]."""
    _, model, path = pair
    weights = load_file(path / "model.safetensors")
    for layer in range(3):
        prefix = f"model.layers.{layer}.attn."
        weights[prefix + "x_x"] = torch.stack([weights.pop(prefix + f"x_{c}")[0] for c in "rwkvag"])[:, None]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    old = HookedRecurrentModel.from_pretrained(tmp_path)
    for (name, p), (_, q) in zip(model.named_parameters(), old.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_prefill_then_decode_equals_full_forward():
    model = tiny_rwkv7()
    tokens = torch.randint(0, 61, (2, 40))
    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, :33], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(33, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def independent_recurrence(r, w, k, v, kappa, a):
    """BlinkDL's orientation, S′ = Sᵀ (V×K):
    S′_t = S′_{t-1}(diag(e^w) − κ̂(κ̂⊙a)ᵀ) + v kᵀ, o = S′ r. Returns the K×V states and the reads."""
    B, T, H, dk = k.shape
    S = torch.zeros(B, H, v.shape[-1], dk)
    states, reads = [], []
    for t in range(T):
        transition = torch.diag_embed(w[:, t].exp()) - kappa[:, t, :, :, None] * (kappa[:, t] * a[:, t])[:, :, None, :]
        S = S @ transition + v[:, t, :, :, None] * k[:, t, :, None, :]
        states.append(S.transpose(-1, -2))
        reads.append((S @ r[:, t, :, :, None])[..., 0])
    return torch.stack(states, 1), torch.stack(reads, 1)


MIXER_HOOKS = ["q", "k", "v", "decay", "a", "removal_key", "write", "erase", "state", "read", "bonus", "v_first"]


def mixer_cache(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.mixer.hook_{n}" for n in MIXER_HOOKS])
    return {n: cache[f"blocks.{layer}.mixer.hook_{n}"] for n in MIXER_HOOKS}


def test_hook_state_equals_independent_recurrence():
    model = tiny_rwkv7()
    tokens = torch.randint(0, 61, (2, 37))
    c = mixer_cache(model, tokens, layer=1)
    states, reads = independent_recurrence(c["q"], c["decay"], c["k"], c["v"], c["removal_key"], c["a"])
    torch.testing.assert_close(c["state"], states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["read"], reads, atol=1e-5, rtol=1e-5)
    r_k = model.blocks[1].mixer.r_k
    torch.testing.assert_close(c["bonus"], (c["q"] * c["k"] * r_k).sum(-1, keepdim=True) * c["v"])
    torch.testing.assert_close(c["removal_key"].norm(dim=-1), torch.ones(2, 37, 2), atol=1e-4, rtol=0)
    assert c["decay"].min() >= -math.exp(-0.5) and c["decay"].max() < 0
    assert not hasattr(model.blocks[0].mixer, "hook_beta")


def test_write_is_rank_one_and_update_decomposes():
    model = tiny_rwkv7()
    tokens = torch.randint(0, 61, (2, 23))
    c = mixer_cache(model, tokens, layer=2)
    torch.testing.assert_close(c["write"], c["k"][..., :, None] * c["v"][..., None, :])
    sv = torch.linalg.svdvals(c["write"])
    assert (sv[..., 1] <= 1e-5 * sv[..., 0]).all()
    prev = torch.cat([torch.zeros_like(c["state"][:, :1]), c["state"][:, :-1]], 1)
    decayed = c["decay"].exp()[..., None] * prev
    torch.testing.assert_close(decayed + c["erase"] + c["write"], c["state"], atol=1e-5, rtol=1e-5)
    read = torch.einsum("bthk,bthkv->bthv", c["removal_key"], prev)
    expected_erase = -(c["removal_key"] * c["a"])[..., :, None] * read[..., None, :]
    torch.testing.assert_close(c["erase"], expected_erase, atol=1e-6, rtol=1e-5)


def test_v_first_flows_from_layer_0():
    model = tiny_rwkv7()
    tokens = torch.randint(0, 61, (1, 19))
    first = mixer_cache(model, tokens, layer=0)
    for layer in (1, 2):
        torch.testing.assert_close(mixer_cache(model, tokens, layer)["v_first"], first["v"], atol=0, rtol=0)
    assert not hasattr(model.blocks[0].mixer, "v_lora") and hasattr(model.blocks[1].mixer, "v_lora")

    def zero(x, hook):
        return torch.zeros_like(x)

    base = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"]
    logits = model(tokens)
    # editing what layer 0 hands on changes later layers, not layer 0
    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_v_first", zero)]):
        edited_logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], base, atol=0, rtol=0)
    assert (edited_logits - logits).abs().max() > 1e-3


def test_edited_removal_key_reaches_the_erase_term():
    model = tiny_rwkv7(n_layers=1)
    tokens = torch.randint(0, 61, (1, 15))

    def zero(x, hook):
        return torch.zeros_like(x)

    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_removal_key", zero)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mixer.hook_erase")
    assert cache["blocks.0.mixer.hook_erase"].abs().max() == 0


def test_real_size_parameters_match_fla_on_meta(monkeypatch):
    """RWKV-7-1.5B (fla-hub/rwkv7-1.5B-world's config): same parameter count as fla, and every checkpoint key lands on a
    parameter slice of its shape."""
    from fla.layers.rwkv7 import RWKV7Attention
    from fla.models import RWKV7Config, RWKV7ForCausalLM
    from fla.models.rwkv7.modeling_rwkv7 import RWKV7FeedForward
    from transformers.initialization import no_init_weights

    # fla's initialisers loop over every channel in Python; they do not change any shape
    monkeypatch.setattr(RWKV7Attention, "_initialize_weights", lambda self, module: None)
    monkeypatch.setattr(RWKV7FeedForward, "_initialize_weights", lambda self, module: None)
    cfg = RWKV7Config(hidden_size=2048, num_hidden_layers=24, head_dim=64, decay_low_rank_dim=96,
                      a_low_rank_dim=96, v_low_rank_dim=64, gate_low_rank_dim=256, vocab_size=65536,
                      intermediate_size=8192, fuse_norm=True, norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("meta"), no_init_weights():
        ref = RWKV7ForCausalLM(cfg)
    ours_cfg = config_from_fla(cfg.to_dict())
    with torch.device("meta"):
        model = HookedRecurrentModel(ours_cfg)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_ref == 1_527_404_544
    assert ours_cfg.options["group_norm_eps"] == pytest.approx(6.4e-4)
    params = dict(model.named_parameters())
    for name, p in ref.state_dict().items():
        target = map_fla_weight(name, ours_cfg)
        dst = params[target.name] if target.rows is None else params[target.name][target.rows]
        src = p if target.transform is None else target.transform(p)
        assert src.shape == dst.shape, name


def test_unknown_settings_are_refused():
    base = dict(model_type="rwkv7", hidden_size=64, num_hidden_layers=2, vocab_size=10, head_dim=16)
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_fla({**base, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="value_dim"):
        config_from_fla({**base, "value_dim": [64, 128]})
    with pytest.raises(ValueError, match="v_first"):
        tiny_rwkv7().blocks[1].mixer(torch.zeros(1, 3, 32), None, {})
