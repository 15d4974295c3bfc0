"""Mamba-2 against transformers' torch path, the mamba_ssm checkpoint layout, and recurrences written here."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tests.support.helpers import perturb_
from tests.support.tiny_arch_mamba2 import tiny_mamba2

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models.loading import CheckpointError, detect_architecture
from recurrent_lens.models.mamba2 import config_from_mamba_ssm

VOCAB = 112  # = 100 padded to a multiple of 16, as mamba_ssm pads it


def tiny_transformers_mamba2(seed: int = 0, **overrides):
    """A tiny random ``Mamba2ForCausalLM``: 4 heads in 2 groups, d_state 12 ≠ head_dim 16, tied head."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=12,
              n_groups=2, expand=2, conv_kernel=4, chunk_size=32, tie_word_embeddings=True,
              time_step_min=0.05, time_step_max=0.5)
    kw.update(overrides)
    torch.manual_seed(seed)
    return perturb_(Mamba2ForCausalLM(Mamba2Config(**kw)), 0.1, seed).eval()


def save_as_mamba_ssm(ref, path) -> None:
    """Re-save a transformers Mamba-2 in the layout of state-spaces/mamba2-*: a ``MambaConfig`` config.json
    and a ``pytorch_model.bin`` whose embedding key is ``backbone.embedding`` and whose tied head is stored."""
    c = ref.config
    config = {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": 100,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": 256},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, path / "pytorch_model.bin")


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    ref = tiny_transformers_mamba2()
    hf_dir, ssm_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ssm") / "mamba2"
    ref.save_pretrained(hf_dir)
    save_as_mamba_ssm(ref, ssm_dir)
    return ref, HookedRecurrentModel.from_pretrained(hf_dir), HookedRecurrentModel.from_pretrained(ssm_dir)


def test_logits_match_transformers_and_mamba_ssm_layout(mamba):
    ref, model, ssm_model = mamba
    assert model.cfg.n_key_heads == 2 and ssm_model.cfg.d_vocab == VOCAB
    tokens = torch.randint(0, VOCAB, (2, 83))
    with torch.no_grad():
        expected = ref(tokens).logits
        got, got_ssm = model(tokens), ssm_model(tokens)
    assert (got - expected).abs().max() < 1e-4
    assert (got_ssm - expected).abs().max() < 1e-4


def test_time_step_limit_and_untied_head_match_transformers(tmp_path):
    ref = tiny_transformers_mamba2(seed=1, time_step_limit=(0.1, 0.3), tie_word_embeddings=False)
    ref.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(tmp_path)
    assert model.unembed is not None
    tokens = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() < 1e-4
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mixer.hook_dt")
    dt = cache["blocks.0.mixer.hook_dt"]
    assert dt.min() >= 0.1 and dt.max() <= 0.3 and (dt == 0.3).any()


def test_greedy_generate_matches_transformers(mamba):
    ref, model, _ = mamba
    prompt = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_prefill_then_decode_equals_full_forward():
    model = tiny_mamba2()
    tokens = torch.randint(0, 61, (2, 45))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache()
        steps = [model(tokens[:, :35], cache=cache)]
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(35, 45)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_hooks_equal_an_independent_recurrence():
    model = tiny_mamba2(n_layers=1)
    mixer = model.blocks[0].mixer
    H, G, N, P = 4, 2, 6, 8
    tokens = torch.randint(0, 61, (2, 37))
    names = ["conv", "dt", "q", "k", "v", "beta", "decay", "write", "state", "read"]
    logits_fast = model(tokens)
    logits, cache = model.run_with_cache(tokens, names_filter=[f"blocks.0.mixer.hook_{n}" for n in names])
    torch.testing.assert_close(logits, logits_fast, atol=1e-5, rtol=1e-5)
    c = {n: cache[f"blocks.0.mixer.hook_{n}"] for n in names}
    q, k, v, beta, g = c["q"], c["k"], c["v"], c["beta"], c["decay"]
    # q, k, v are C, B, x of the conv output; head h reads group h // (H / G)
    x, B, C = c["conv"].split([H * P, G * N, G * N], dim=-1)
    group = torch.arange(H) // (H // G)
    torch.testing.assert_close(k, B.reshape(2, 37, G, N)[:, :, group])
    torch.testing.assert_close(q, C.reshape(2, 37, G, N)[:, :, group])
    torch.testing.assert_close(v, x.reshape(2, 37, H, P))
    A = -mixer.A_log.detach().exp()
    torch.testing.assert_close(beta, c["dt"])
    torch.testing.assert_close(g, c["dt"] * A)
    # mamba's own orientation: h [head_dim × d_state], h_t = exp(ΔA) h + Δ x Bᵀ, y = h C + D x
    h = torch.zeros(2, H, P, N)
    D = mixer.D.detach()[:, None]
    for t in range(37):
        h = h * g[:, t].exp()[..., None, None] + beta[:, t, :, None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        torch.testing.assert_close(c["state"][:, t], h.transpose(-1, -2), atol=1e-5, rtol=1e-5)
        y = torch.einsum("bhpn,bhn->bhp", h, q[:, t]) + D * v[:, t]
        torch.testing.assert_close(c["read"][:, t], y, atol=1e-5, rtol=1e-5)
    write = c["write"]
    torch.testing.assert_close(write, beta[..., None, None] * k[..., :, None] * v[..., None, :])
    assert (torch.linalg.matrix_rank(write.flatten(0, 2)) <= 1).all()
    # the D skip is part of the read: removing it changes the read by exactly D·x
    o_no_skip = torch.einsum("bthkv,bthk->bthv", c["state"], q)
    torch.testing.assert_close(c["read"] - o_no_skip, D * v, atol=1e-5, rtol=1e-5)


def test_editing_dt_changes_write_and_decay_together():
    model = tiny_mamba2(n_layers=1)
    tokens = torch.randint(0, 61, (1, 20))

    def zero_dt(dt, hook):
        dt[:, 7] = 0.0  # Δ = 0: no decay and no write, so S_7 = S_6
        return dt

    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.mixer.hook_state", "blocks.0.mixer.hook_decay"])
    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_dt", zero_dt)]):
        _, edited = model.run_with_cache(tokens, names_filter=["blocks.0.mixer.hook_state",
                                                               "blocks.0.mixer.hook_decay"])
    S, S_edit = cache["blocks.0.mixer.hook_state"], edited["blocks.0.mixer.hook_state"]
    torch.testing.assert_close(S_edit[:, :7], S[:, :7])
    torch.testing.assert_close(S_edit[:, 7], S_edit[:, 6])
    assert (S_edit[:, 7] - S[:, 7]).abs().max() > 1e-3
    assert (edited["blocks.0.mixer.hook_decay"][:, 7] == 0).all()


def reference_mixer(mixer, u: torch.Tensor) -> torch.Tensor:
    """Mamba-2's mixer written from its equations with mamba's [head_dim × d_state] state, a
    token loop, an explicit causal conv and explicit group indexing."""
    cfg, opts = mixer.cfg, mixer.cfg.options
    H, G, N, P = cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v
    Bsz, T, _ = u.shape
    d_inner = opts.get("d_inner", H * P)
    m = d_inner - H * P
    z0, x0, z, xBC, dt = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias).split(
        [m, m, H * P, H * P + 2 * G * N, H], dim=-1)
    w = mixer.conv1d.weight[:, 0]
    K = w.shape[-1]
    padded = F.pad(xBC, (0, 0, K - 1, 0))
    conv = sum(padded[:, i:i + T] * w[:, i] for i in range(K))
    if mixer.conv1d.bias is not None:
        conv = conv + mixer.conv1d.bias
    x, B, C = F.silu(conv).split([H * P, G * N, G * N], dim=-1)
    x, B, C = x.reshape(Bsz, T, H, P), B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N)
    delta = F.softplus(dt + mixer.dt_bias).clamp(*opts.get("time_step_limit", (0.0, math.inf)))
    A = -mixer.A_log.exp()
    D = mixer.D.reshape(H, -1)
    h, ys = torch.zeros(Bsz, H, P, N), []
    for t in range(T):
        Bt = torch.stack([B[:, t, hd // (H // G)] for hd in range(H)], 1)
        Ct = torch.stack([C[:, t, hd // (H // G)] for hd in range(H)], 1)
        write = delta[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None]
        h = torch.exp(delta[:, t] * A)[..., None, None] * h + write
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct) + D * x[:, t])
    y = torch.stack(ys, 1).reshape(Bsz, T, H * P)
    before = opts.get("norm_before_gate", False)
    if not before:
        y = y * F.silu(z)
    yg = y.reshape(Bsz, T, G, -1)
    y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)).reshape(Bsz, T, -1) * mixer.norm.weight
    if before:
        y = y * F.silu(z)
    if m:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)


@pytest.mark.parametrize("options", [
    {},
    {"d_inner": 48, "D_has_hdim": True},
    {"norm_before_gate": True, "proj_bias": True, "conv_bias": False},
    {"time_step_limit": (0.2, 0.6)},
])
def test_mixer_variants_match_reference(options):
    model = tiny_mamba2(n_layers=1, options=options)
    mixer = model.blocks[0].mixer
    u = torch.randn(2, 37, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixer(u), reference_mixer(mixer, u), atol=1e-5, rtol=1e-5)
        cache = model.make_cache()
        tokens = torch.randint(0, 61, (1, 20))
        steps = [model(tokens[:, :15], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(15, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), model(tokens), atol=1e-5, rtol=1e-5)


def test_mamba_ssm_config_detection_and_refusals():
    base = {"d_model": 64, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
            "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    assert detect_architecture(base).name == "mamba2"
    cfg = config_from_mamba_ssm(base)
    assert (cfg.d_vocab, cfg.n_heads, cfg.d_k, cfg.d_v, cfg.n_key_heads) == (50288, 2, 128, 64, 1)
    with pytest.raises(ValueError, match="Mamba-1"):
        config_from_mamba_ssm({**base, "ssm_cfg": {}})
    with pytest.raises(ValueError, match="d_intermediate"):
        config_from_mamba_ssm({**base, "d_intermediate": 128})
    with pytest.raises(ValueError, match="attn_layer_idx"):
        config_from_mamba_ssm({**base, "attn_layer_idx": [1]})
    with pytest.raises(CheckpointError, match="unknown model_type"):
        detect_architecture({"d_model": 64, "n_layer": 2})


def test_mamba2_370m_parameter_count_on_meta():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    ssm_config = {"d_model": 1024, "d_intermediate": 0, "n_layer": 48, "vocab_size": 50277,
                  "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                  "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                  "tie_embeddings": True}
    cfg = config_from_mamba_ssm(ssm_config)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_v, cfg.d_k, cfg.n_key_heads, cfg.d_vocab) == \
        (48, 1024, 32, 64, 128, 1, 50288)
    with torch.device("meta"):
        ours = HookedRecurrentModel(cfg)
        theirs = Mamba2ForCausalLM(Mamba2Config(
            vocab_size=50288, hidden_size=1024, num_hidden_layers=48, num_heads=32, head_dim=64, state_size=128,
            n_groups=1, expand=2, conv_kernel=4, tie_word_embeddings=True))
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert 360e6 < n_ours < 375e6
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
