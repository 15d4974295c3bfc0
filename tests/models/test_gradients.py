"""Gradients through every hook kind on every recurrent architecture.

The reference is a finite difference of the loss under an additive forward-hook edit ``x + εD``,
against the ``run_with_cache(..., incl_bwd=True)`` gradient contracted with ``D``. For ``hook_state``
and ``hook_erase`` the edit is one step ``t`` (an edit of several steps replaces each of them), so the
gradient must be the total derivative through every later step. Those checks run in fp64 (see
:func:`fp64`) so that they can be tight; fp32 checks compare independent gradient paths instead.
"""

from contextlib import contextmanager

import pytest
import torch
from tests.support.helpers import tiny_model

import recurrent_lens.models.mixer as mixer_module
from recurrent_lens.models.scan import DeltaRule, DPLRRule, LinearRule, RecurrenceInputs, recurrent_scan, replay
from recurrent_lens.sae import WriteSAE, saes

ARCHS = ["gated_deltanet", "delta_net", "gla", "mamba2", "rwkv7"]
KINDS = ["q", "k", "v", "beta", "decay", "write", "erase", "state", "read"]
ABSENT = {"delta_net": {"decay"}, "gla": {"beta", "erase"}, "mamba2": {"erase"}, "rwkv7": {"beta"}}
RESIDUAL = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_mixer_out", "blocks.0.hook_resid_mid",
            "blocks.0.hook_resid_post", "blocks.1.mixer.hook_state"]
PER_STEP = ("hook_state", "hook_erase")
B, T = 2, 20  # T crosses the tiny models' chunk boundary (16)
STEPS = (0, 9, T - 1)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def fp64():
    """Run fp64 models entirely in fp64: the library computes recurrences, gates and norms in fp32
    through ``Tensor.float()``, which this promotes to fp64 while active."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "float", lambda self, *args, **kwargs: self.double(*args, **kwargs))
        yield


def hook_names(model):
    mixer = [f"blocks.0.mixer.hook_{k}" for k in KINDS if k not in ABSENT.get(model.cfg.architecture, ())]
    return mixer + RESIDUAL


def tokens_for(model, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def directions(name, x, seed=1):
    """Random directions ``D`` on the scale of ``x``: the whole tensor for inputs, one step at a time
    for per-step matrices."""
    D = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype) * x.square().mean().sqrt()
    if not name.endswith(PER_STEP):
        return [D]
    out = []
    for t in STEPS:
        Dt = torch.zeros_like(D)
        Dt[:, t] = D[:, t]
        out.append(Dt)
    return out


def finite_difference(model, tokens, name, D, hooks=(), h=1e-5):
    """d loss / dε of ``x + εD`` at ``name`` (fourth-order central stencil), after ``hooks``."""

    def loss(eps):
        with torch.no_grad():
            fwd = [*hooks, (name, lambda x, hook: x + eps * D)]
            return model.run_with_hooks(tokens, return_type="loss", fwd_hooks=fwd).item()

    return (8 * (loss(h) - loss(-h)) - (loss(2 * h) - loss(-2 * h))) / (12 * h)


def assert_matches(fd, exact, what):
    assert abs(fd - exact) <= 1e-6 * max(abs(exact), 1e-2), f"{what}: finite difference {fd}, gradient {exact}"


@pytest.fixture(scope="module", params=ARCHS)
def fp64_run(request):
    """A tiny fp64 model, its tokens and one ``incl_bwd`` cache of every hook under test."""
    with fp64():
        model = tiny_model(request.param).double()
        tokens = tokens_for(model)
        names = hook_names(model)
        assert all(n in model.hook_dict for n in names), sorted(set(names) - set(model.hook_dict))
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)
    return model, tokens, cache


@pytest.mark.parametrize("name", [f"blocks.0.mixer.hook_{k}" for k in KINDS] + RESIDUAL)
def test_cached_gradient_matches_finite_differences(fp64_run, name):
    model, tokens, cache = fp64_run
    if name not in hook_names(model):
        assert name not in model.hook_dict
        pytest.skip(f"{model.cfg.architecture} has no {name}")
    with fp64():
        for D in directions(name, cache[name]):
            exact = float((cache[name + "_grad"] * D).sum())
            assert_matches(finite_difference(model, tokens, name, D), exact, name)


def test_gradients_with_edits_in_the_same_run(fp64_run):
    """With a state edit (one batch row, step 5) and an erase edit (step 8) in the run, a per-step
    gradient is the derivative for adding εD to the quantity the step actually used. After an edit, a
    hook edit ``x + εD`` would instead replace the slice by the *unedited* value plus εD, so the
    reference is an additive write edit at that step (it adds to the used state); the replaced state
    slice, whose used value is the hook's own, is checked directly."""
    model, tokens, _ = fp64_run
    state, erase, write = (f"blocks.0.mixer.hook_{k}" for k in ("state", "erase", "write"))
    has_erase = erase in model.hook_dict
    with fp64():
        g = torch.Generator().manual_seed(2)
        X = 0.3 * torch.randn(model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v, generator=g, dtype=torch.float64)

        def set_state(S, hook):
            S = S.clone()
            S[0, 5] = X
            return S

        def no_erase(E, hook):
            E = E.clone()
            E[:, 8] = 0
            return E

        edits = [(state, set_state)] + ([(erase, no_erase)] if has_erase else [])
        names = ["blocks.0.mixer.hook_q", write, state] + ([erase] if has_erase else [])
        with model.hooks(fwd_hooks=edits):
            _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)

        def exact(name, D):
            return float((cache[name + "_grad"] * D).sum())

        for t in (2, 5, 8, 12):  # before, at and after the edits
            D = torch.zeros_like(cache[write])
            D[:, t] = torch.randn(D[:, t].shape, generator=g, dtype=D.dtype) * cache[write].square().mean().sqrt()
            D_unreplaced = D.clone()
            D_unreplaced[0, 5] = 0  # the replaced state slice: a write there has no effect
            fd, fd_unreplaced = (finite_difference(model, tokens, write, d, hooks=edits) for d in (D, D_unreplaced))
            assert_matches(fd, exact(write, D), f"{write} at {t}")
            assert_matches(fd_unreplaced, exact(state, D_unreplaced), f"{state} at {t}")
            if has_erase:
                assert_matches(fd, exact(erase, D), f"{erase} at {t}")
        D = torch.zeros_like(cache[state])
        D[0, 5] = torch.randn(D[0, 5].shape, generator=g, dtype=D.dtype)
        assert_matches(finite_difference(model, tokens, state, D, hooks=edits), exact(state, D), "replaced slice")
        for D in directions("blocks.0.mixer.hook_q", cache["blocks.0.mixer.hook_q"]):
            assert_matches(finite_difference(model, tokens, "blocks.0.mixer.hook_q", D, hooks=edits),
                           exact("blocks.0.mixer.hook_q", D), "hook_q")


@pytest.mark.parametrize("arch", ARCHS)
def test_state_and_erase_gradients_equal_the_write_gradient_fp32(arch):
    """All three add to the state at t, so their total derivatives agree; the write gradient comes
    from a different path (explicit writes through the token loop, no state hook)."""
    model = tiny_model(arch)
    tokens = tokens_for(model)
    grads = {}
    for kind in ("write", "state", "erase"):
        name = f"blocks.0.mixer.hook_{kind}"
        if name in model.hook_dict:
            _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=name)
            grads[kind] = cache[name + "_grad"]
    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_state", lambda S, hook: None)]):  # materialised states
        name = "blocks.0.mixer.hook_write"
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=name)
        grads["write, states observed"] = cache[name + "_grad"]
    write = grads.pop("write")
    assert write.abs().amax((0, 2, 3, 4))[:-1].min() > 0  # every step but the last (no loss there)
    for kind, grad in grads.items():
        torch.testing.assert_close(grad, write, rtol=1e-5, atol=1e-5 * float(write.abs().max()), msg=kind)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_hooks_leave_forward_values_bitwise(arch):
    """Backward hooks on per-step matrices change no forward number: the loss and the residual stream
    equal those of the same run with forward cache hooks only."""
    model = tiny_model(arch)
    tokens = tokens_for(model)
    out = "blocks.1.hook_resid_post"
    mixer = [n for n in model.hook_dict if n.startswith("blocks.0.mixer.hook_") and n.split("_")[-1] in KINDS]
    for names in (mixer, ["blocks.0.mixer.hook_write"]):
        base, cache = model.run_with_cache(tokens, return_type="loss", names_filter=[*names, out])
        with_grads, grad_cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                                      names_filter=[*names, out])
        assert torch.equal(with_grads, base)
        assert torch.equal(grad_cache[out], cache[out])
    # a cached or differentiated write alone keeps the fast path's numbers
    assert torch.equal(with_grads, model(tokens, return_type="loss"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["v", "write", "erase", "state"])
def test_differentiable_noop_edit_gets_the_total_derivative(arch, kind):
    model = tiny_model(arch)
    name = f"blocks.0.mixer.hook_{kind}"
    if name not in model.hook_dict:
        pytest.skip(f"{arch} has no {name}")
    tokens = tokens_for(model)
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=name)
    base = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, lambda x, hook: None)])
    delta = torch.zeros_like(cache[name], requires_grad=True)
    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, lambda x, hook: x + delta)])
    assert torch.equal(loss, base)
    loss.backward()
    assert delta.grad is not None
    grad = cache[name + "_grad"]
    torch.testing.assert_close(delta.grad, grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))


def test_no_replay_without_edits_or_gradients(monkeypatch):
    """The cheap paths stay cheap: a no-op edit under no_grad, or a cache hook, never replays."""
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model)

    def fail(*args, **kwargs):
        raise AssertionError("replay ran")

    monkeypatch.setattr(mixer_module, "replay", fail)
    monkeypatch.setattr(mixer_module, "recurrent_scan", fail)
    names = [f"blocks.0.mixer.hook_{k}" for k in ("write", "erase", "state")]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, lambda x, hook: x + 0) for n in names])
    model.run_with_cache(tokens, names_filter=names)


def sae_for(model, seed=0):
    torch.manual_seed(seed)
    return WriteSAE(model.cfg.d_k, model.cfg.d_v, 32, k=4)


SAE_HOOK = "blocks.1.mixer.hook_state"
ACTS = f"{SAE_HOOK}.saes.h2.hook_sae_acts_post"


def test_sae_error_term_feature_gradients_fp32():
    """SAELens workflow: with use_error_term the output is unchanged and d loss / d acts_post is the
    state's total gradient read through each feature's atom."""
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model)
    base, _ = model.run_with_cache(tokens, return_type="loss", names_filter=SAE_HOOK)
    sae = sae_for(model)
    with saes(model, [(sae, SAE_HOOK, 2)], use_error_term=True):
        spliced, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                              names_filter=[ACTS, SAE_HOOK])
    assert torch.equal(spliced, base)
    grad = cache[ACTS + "_grad"]
    atoms = sae.decode(torch.eye(32)).detach() - sae.decode(torch.zeros(32)).detach()  # [n_features, d_k, d_v]
    expected = torch.einsum("bpkv,fkv->bpf", cache[SAE_HOOK + "_grad"][:, :, 2], atoms)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_sae_error_term_feature_gradient_matches_finite_differences():
    with fp64():
        model = tiny_model("gated_deltanet").double()
        tokens = tokens_for(model)
        sae = sae_for(model).double()
        with saes(model, [(sae, SAE_HOOK, 2)], use_error_term=True):
            _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=ACTS)
            for D in directions(SAE_HOOK, cache[ACTS]):
                exact = float((cache[ACTS + "_grad"] * D).sum())
                assert_matches(finite_difference(model, tokens, ACTS, D), exact, ACTS)


RULES = {
    "linear": (LinearRule(), False),
    "delta": (DeltaRule(), False),
    "dplr": (DPLRRule(), True),
}


@pytest.mark.parametrize("case", sorted(RULES))
def test_replay_gradcheck(case):
    """replay's straight-through form is a smooth function of every input (fp64 autograd.gradcheck),
    with an edited slice, an erase edit and a prefix before the first edit."""
    rule, dplr = RULES[case]
    Bq, Tq, H, dk, dv = 1, 5, 2, 3, 2
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    q, k, v = rand(Bq, Tq, H, dk), rand(Bq, Tq, H, dk, scale=0.5), rand(Bq, Tq, H, dv)
    decay = rand(Bq, Tq, H, dk, scale=0.1) if dplr else rand(Bq, Tq, H, scale=0.1)
    beta = None if dplr else rand(Bq, Tq, H, scale=0.5)
    extra = {"erase_key": rand(Bq, Tq, H, dk, scale=0.5), "a": rand(Bq, Tq, H, dk, scale=0.5)} if dplr else {}
    S0 = rand(Bq, H, dk, dv)
    edited = rand(Bq, Tq, H, dk, dv)  # values of the edited slices
    erase_values = rand(Bq, Tq, H, dk, dv)
    state_mask = torch.zeros(Bq, Tq, H, dtype=torch.bool)
    state_mask[0, 2, 1] = True
    erase_mask = torch.zeros(Bq, Tq, H, dtype=torch.bool)
    erase_mask[0, 3, 0] = True

    def run(q, k, v, decay, S0, edited, erase_values, *rest):
        beta = rest[0] if rest and not dplr else None
        ex = dict(zip(("erase_key", "a"), rest)) if dplr else {}
        x = RecurrenceInputs(q=q, k=k, v=v, beta=beta, decay=decay, extra=ex)
        ref = recurrent_scan(rule, x, S0, keep_states=True)
        states = torch.where(state_mask[..., None, None], edited, ref.states)
        erases = torch.where(erase_mask[..., None, None], erase_values, ref.erases) if rule.has_erase else None
        return replay(rule, x, S0, ref.states, state_edit=(state_mask, states, ref.states),
                      erase_edit=None if erases is None else (erase_mask, erases, ref.erases))

    rest = (extra["erase_key"], extra["a"]) if dplr else (beta,)
    assert torch.autograd.gradcheck(run, (q, k, v, decay, S0, edited, erase_values, *rest), fast_mode=True)


def test_replay_straight_through_gives_the_write_gradient():
    """At an unedited step, the gradient reaching a straight-through state equals the one reaching
    an explicit write at that step, and the forward values are the unedited states bitwise."""
    rule = DeltaRule()
    g = torch.Generator().manual_seed(1)
    x = RecurrenceInputs(q=torch.randn(1, 6, 2, 3, generator=g), k=torch.randn(1, 6, 2, 3, generator=g) * 0.5,
                         v=torch.randn(1, 6, 2, 4, generator=g), beta=torch.rand(1, 6, 2, generator=g),
                         decay=-torch.rand(1, 6, 2, generator=g))
    S0 = torch.zeros(1, 2, 3, 4)
    ref = recurrent_scan(rule, x, S0, keep_states=True)
    values = ref.states.clone().requires_grad_()
    mask = torch.zeros(1, 6, 2, dtype=torch.bool)
    states = replay(rule, x, S0, ref.states, state_edit=(mask, values, ref.states))
    assert torch.equal(states, ref.states)
    weights = torch.randn(states.shape, generator=g)
    (states * weights).sum().backward()
    writes = x.write().requires_grad_()
    (recurrent_scan(rule, x, S0, writes=writes, keep_states=True).states * weights).sum().backward()
    torch.testing.assert_close(values.grad, writes.grad, rtol=1e-6, atol=1e-6)
