"""Edit semantics and execution-mode agreement, on every architecture.

An edit of a recurrence input carries through the recurrence; an edited state or erase term replaces the
quantity at its step and every later step is recomputed from it; an edited read changes that position only.
"""

import pytest
import torch
from tests.support.helpers import ARCHS, tiny_model

import recurrent_lens.models.mixer as mixer_module
from recurrent_lens.models.scan import recurrent_scan

T = 29
L0 = "blocks.0.mixer."


def quantities(model, tokens, layer=0):
    names = ["q", "k", "v", "beta", "decay", "write", "state", "read"]
    hooks = [f"blocks.{layer}.mixer.hook_{n}" for n in names]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks or "erase" in n or "hook_a" in n
                                    or "removal_key" in n)
    got = {n: cache[f"blocks.{layer}.mixer.hook_{n}"] for n in names if f"blocks.{layer}.mixer.hook_{n}" in cache}
    for extra in ("a", "removal_key"):
        name = f"blocks.{layer}.mixer.hook_{extra}"
        if name in cache:
            got[extra] = cache[name]
    return got


def transition(model, c, X, t):
    """M_t(X) + W_t per head, written from each architecture's transition M_t and write W_t, not from the engine."""
    mixer = model.blocks[0].mixer
    k, v = c["k"][:, t], c["v"][:, t]
    beta = c["beta"][:, t] if "beta" in c else torch.ones(k.shape[:2])
    W = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    if "removal_key" in c:  # RWKV-7: diag(e^w) X − (κ⊙a)(κᵀX) + k vᵀ
        kap, a = c["removal_key"][:, t], c["a"][:, t]
        erase = -(kap * a)[..., :, None] * torch.einsum("bhk,bhkv->bhv", kap, X)[..., None, :]
        return c["decay"][:, t].exp()[..., None] * X + erase + W
    if "decay" in c:
        d = c["decay"][:, t].exp()
        X = X * (d[..., None, None] if d.dim() == 2 else d[..., None])
    if mixer.rule.has_erase:  # delta rule: (I − β k kᵀ) α X
        X = X - beta[..., None, None] * k[..., :, None] * torch.einsum("bhk,bhkv->bhv", k, X)[..., None, :]
    return X + W


@pytest.fixture(params=sorted(ARCHS))
def model(request):
    return tiny_model(request.param)


def tokens_for(model, seed=0, T=T, B=2):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_zeroing_a_write_changes_exactly_later_positions(model):
    tokens = tokens_for(model)
    base = model(tokens)
    t = 11

    def zero_write(w, hook):
        w = w.clone()
        w[:, t] = 0
        return w

    out = model.run_with_hooks(tokens, fwd_hooks=[(L0 + "hook_write", zero_write)])
    diff = (out - base).abs().amax(-1)  # [batch, pos]
    assert diff[:, :t].max() < 1e-5
    assert (diff[:, t:] > 1e-4).all()


def test_setting_a_state_carries_forward(model):
    tokens = tokens_for(model)
    c = quantities(model, tokens)
    t, X = 7, torch.randn_like(c["state"][:, 0])
    reads = {}

    def set_state(S, hook):
        S = S.clone()
        S[:, t] = X
        return S

    def grab(o, hook):
        reads["o"] = o

    model.run_with_hooks(tokens, fwd_hooks=[(L0 + "hook_state", set_state), (L0 + "hook_read", grab)])
    expected_next = transition(model, c, X, t + 1)
    q = c["q"]
    # the difference of reads cancels any state-independent skip/bonus term
    d_read = reads["o"] - c["read"]
    torch.testing.assert_close(d_read[:, t], torch.einsum("bhkv,bhk->bhv", X - c["state"][:, t], q[:, t]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d_read[:, t + 1],
                               torch.einsum("bhkv,bhk->bhv", expected_next - c["state"][:, t + 1], q[:, t + 1]),
                               atol=1e-5, rtol=1e-4)
    assert d_read[:, :t].abs().max() < 1e-6


def test_patching_every_state_makes_reads_use_patched_states(model):
    a, b = tokens_for(model, 1), tokens_for(model, 2)
    donor = quantities(model, b)["state"]
    reads = {}

    def patch(S, hook):
        return donor.clone()

    def grab(o, hook):
        reads["o"] = o

    c = quantities(model, a)
    model.run_with_hooks(a, fwd_hooks=[(L0 + "hook_state", patch), (L0 + "hook_read", grab)])
    expected = c["read"] + torch.einsum("bthkv,bthk->bthv", donor - c["state"], c["q"])
    torch.testing.assert_close(reads["o"], expected, atol=1e-5, rtol=1e-4)


def test_in_place_state_edit_equals_returned_edit(model):
    tokens = tokens_for(model)
    X = torch.randn(model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)

    def in_place(S, hook):
        S[:, 4] = X

    def returned(S, hook):
        S = S.clone()
        S[:, 4] = X
        return S

    a = model.run_with_hooks(tokens, fwd_hooks=[(L0 + "hook_state", in_place)])
    b = model.run_with_hooks(tokens, fwd_hooks=[(L0 + "hook_state", returned)])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - model(tokens)).abs().max() > 1e-3


def test_erase_edit_replaces_the_erase_term(model):
    if not model.blocks[0].mixer.rule.has_erase:
        pytest.skip("this architecture has no erase term")
    tokens = tokens_for(model)
    c = quantities(model, tokens)
    t, reads = 9, {}

    def no_erase(E, hook):
        E = E.clone()
        E[:, t] = 0
        return E

    model.run_with_hooks(tokens, fwd_hooks=[(L0 + "hook_erase", no_erase),
                                            (L0 + "hook_read", lambda o, hook: reads.update(o=o))])
    # without its erase, S_t = decay ⊙ S_{t-1} + W_t
    prev = c["state"][:, t - 1]
    d = c["decay"][:, t].exp() if "decay" in c else torch.ones(prev.shape[:2])
    S_t = prev * (d[..., None, None] if d.dim() == 2 else d[..., None]) + c["write"][:, t]
    torch.testing.assert_close(reads["o"][:, t] - c["read"][:, t],
                               torch.einsum("bhkv,bhk->bhv", S_t - c["state"][:, t], c["q"][:, t]),
                               atol=1e-5, rtol=1e-4)


def test_read_edit_changes_only_that_position(model):
    tokens = tokens_for(model)
    last = model.cfg.recurrent_layers[-1]
    name = f"blocks.{last}.hook_mixer_out"
    _, base = model.run_with_cache(tokens, names_filter=name)

    def zero_read(o, hook):
        o = o.clone()
        o[:, 6] = 0
        return o

    with model.hooks(fwd_hooks=[(f"blocks.{last}.mixer.hook_read", zero_read)]):
        _, edited = model.run_with_cache(tokens, names_filter=name)
    diff = (edited[name] - base[name]).abs().amax(-1)
    assert diff[:, 6].min() > 1e-4
    assert torch.cat([diff[:, :6], diff[:, 7:]], 1).max() < 1e-6


@pytest.mark.parametrize("hook", ["hook_write", "hook_state", "hook_q", "hook_read"])
def test_shape_changing_edit_raises_naming_the_hook(model, hook):
    tokens = tokens_for(model)
    with pytest.raises(ValueError, match=f"blocks.0.mixer.{hook}.*shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(L0 + hook, lambda x, hook: x[..., :-1])])
    with pytest.raises(ValueError, match=f"blocks.0.mixer.{hook}.*dtype"):
        model.run_with_hooks(tokens, fwd_hooks=[(L0 + hook, lambda x, hook: x.double())])


def _use_reference_scan(monkeypatch):
    def reference(rule, x, S0, *, chunk_size=64, keep_states=False, writes=None):
        return recurrent_scan(rule, x, S0, writes=writes, keep_states=keep_states)

    monkeypatch.setattr(mixer_module, "scan", reference)


def test_fast_materialised_and_reference_agree_with_gradients(model, monkeypatch):
    tokens = tokens_for(model, T=37)

    def run(mode):
        model.zero_grad()
        if mode == "materialised":
            with model.hooks(fwd_hooks=[(n, lambda x, hook: None) for n in model.recurrent_hook_names()]):
                loss_logits = model(tokens)
        else:
            loss_logits = model(tokens)
        (loss_logits.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss_logits.detach(), grads

    fast = run("fast")
    materialised = run("materialised")
    _use_reference_scan(monkeypatch)
    reference = run("reference")
    for other in (materialised, fast):
        torch.testing.assert_close(other[0], reference[0], atol=1e-5, rtol=1e-5)
        assert other[1].keys() == reference[1].keys()
        for name in reference[1]:
            torch.testing.assert_close(other[1][name], reference[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_prefill_plus_decode_equals_full_forward(model):
    tokens = tokens_for(model, T=23)
    full = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, :15], cache=cache)]
    for t in range(15, 23):
        parts.append(model(tokens[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.seq_len == 23


def test_hooks_fire_on_every_decode_step_with_absolute_positions(model):
    prompt = tokens_for(model, T=5, B=1)
    seen = []

    def record(w, hook):
        seen.append((tuple(w.shape), model.positions.tolist()))

    with model.hooks(fwd_hooks=[(L0 + "hook_write", record)]):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert [p for _, p in seen] == [[0, 1, 2, 3, 4], [5], [6], [7], [8], [9]]
    assert seen[1][0][:2] == (1, 1)


def test_editing_a_write_during_decoding_changes_later_tokens(model):
    prompt = tokens_for(model, T=5, B=1)
    base = model.generate(prompt, max_new_tokens=12, do_sample=False)
    logits_seen = []

    def big_write(w, hook):
        if model.positions[0] == 6:
            return w * 0 + 3.0
        return w

    with model.hooks(fwd_hooks=[(L0 + "hook_write", big_write)]):
        cache = model.make_cache()
        model.generate(prompt, max_new_tokens=12, do_sample=False, cache=cache)
        logits_seen.append(cache[0].state.clone())
    base_cache = model.make_cache()
    model.generate(prompt, max_new_tokens=12, do_sample=False, cache=base_cache)
    assert (logits_seen[0] - base_cache[0].state).abs().max() > 1e-3
    assert base.shape == (1, 17)


def test_initial_states_and_final_states(model):
    tokens = tokens_for(model)
    cache = model.make_cache()
    model(tokens, cache=cache)
    c = quantities(model, tokens)
    torch.testing.assert_close(cache[0].state, c["state"][:, -1], atol=1e-5, rtol=1e-5)
    # starting a layer from a state equals a hook that adds that state's propagated effect: check the read
    S0 = torch.randn_like(cache[0].state)
    reads = {}
    model.run_with_hooks(tokens, initial_states={0: S0}, fwd_hooks=[(L0 + "hook_read", lambda o, hook: reads.update(o=o))])
    first = transition(model, c, S0, 0)
    torch.testing.assert_close(reads["o"][:, 0] - c["read"][:, 0],
                               torch.einsum("bhkv,bhk->bhv", first - c["state"][:, 0], c["q"][:, 0]),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="initial_states\\[0\\]: expected shape"):
        model(tokens, initial_states={0: S0[..., :-1]})


@pytest.mark.parametrize("hook", ["hook_q", "hook_write", "hook_state"])
def test_non_tensor_or_other_device_edit_raises_naming_the_hook(hook):
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model)
    for bad in (lambda x, hook: x.tolist(), lambda x, hook: x.detach().numpy()):
        with pytest.raises(TypeError, match=f"hook blocks.0.mixer.{hook}: .*torch.Tensor.*got (builtins.list|numpy)"):
            model.run_with_hooks(tokens, fwd_hooks=[(L0 + hook, bad)])
    with pytest.raises(ValueError, match=f"hook blocks.0.mixer.{hook}: .*device cpu, got meta"):
        model.run_with_hooks(tokens, fwd_hooks=[(L0 + hook, lambda x, hook: torch.empty_like(x, device="meta"))])


def test_writes_through_data_or_numpy_are_not_seen():
    """Unsupported and pinned down: they bypass the version counter, so the model runs unedited
    (while a cache holding the same tensor shows the write)."""
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model)
    name = L0 + "hook_state"
    base, _ = model.run_with_cache(tokens, names_filter=name)

    def via_data(S, hook):
        S.data[:, 4] = 0

    with model.hooks(fwd_hooks=[(name, via_data)]):
        out, cache = model.run_with_cache(tokens, names_filter=name)
    assert torch.equal(out, base)
    assert cache[name][:, 4].abs().max() == 0

    def via_numpy(S, hook):
        S.numpy()[:, 4] = 0

    with torch.no_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=[(name, via_numpy)])
    assert torch.equal(out, base)


def test_cache_in_the_same_run_as_a_state_edit_holds_the_hook_output(model):
    """A cache of hook_state shows the edited slice and the unedited recurrence after it, while the
    reads use the recomputed states."""
    tokens = tokens_for(model)
    c = quantities(model, tokens)
    t, X = 7, torch.randn_like(c["state"][:, 0])

    def set_state(S, hook):
        S = S.clone()
        S[:, t] = X
        return S

    with model.hooks(fwd_hooks=[(L0 + "hook_state", set_state)]):
        _, cache = model.run_with_cache(tokens, names_filter=[L0 + "hook_state", L0 + "hook_read"])
    cached = cache[L0 + "hook_state"]
    torch.testing.assert_close(cached[:, t], X, atol=0, rtol=0)
    torch.testing.assert_close(cached[:, t + 1:], c["state"][:, t + 1:], atol=0, rtol=0)
    used_next = transition(model, c, X, t + 1)
    d_read = cache[L0 + "hook_read"][:, t + 1] - c["read"][:, t + 1]
    expected = torch.einsum("bhkv,bhk->bhv", used_next - c["state"][:, t + 1], c["q"][:, t + 1])
    torch.testing.assert_close(d_read, expected, atol=1e-5, rtol=1e-4)
    assert (used_next - cached[:, t + 1]).abs().max() > 1e-3
