"""The scan engine: chunked fast path and chunk-parallel materialisation against the token-by-token reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recurrent_lens.models.scan import DeltaRule, DPLRRule, LinearRule, RecurrenceInputs, recurrent_scan, replay, scan


def make_inputs(rule, B, T, H, dk, dv, *, seed=0, per_channel=False, with_beta=True, with_decay=True,
                requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    k = F.normalize(r(B, T, H, dk), dim=-1)
    decay = None
    if with_decay:
        decay = -torch.rand(B, T, H, dk, generator=g) if per_channel else -torch.rand(B, T, H, generator=g)
    extra = {}
    if isinstance(rule, DPLRRule):
        decay = -torch.rand(B, T, H, dk, generator=g) * 0.5
        extra = {"erase_key": F.normalize(r(B, T, H, dk), dim=-1), "a": torch.rand(B, T, H, dk, generator=g)}
    x = RecurrenceInputs(q=r(B, T, H, dk) * dk**-0.5, k=k, v=r(B, T, H, dv),
                         beta=torch.rand(B, T, H, generator=g) if with_beta else None, decay=decay, extra=extra)
    if requires_grad:
        x = x.map(lambda t: t.clone().requires_grad_(True))
    return x


def explicit_loop(rule, x, S0):
    """An independent loop written from each rule's equation S_t = M_t(S_{t-1}) + W_t, not from the engine."""
    B, T, H, dk, dv = x.shape
    S, states = S0.clone(), []
    beta = x.beta if x.beta is not None else torch.ones(B, T, H)
    for t in range(T):
        k, v = x.k[:, t], x.v[:, t]
        W = beta[:, t, :, None, None] * k[..., :, None] * v[..., None, :]
        if isinstance(rule, DPLRRule):
            kap = x.extra["erase_key"][:, t]
            erase = -((kap * x.extra["a"][:, t])[..., :, None]) * (kap[..., :, None] * S).sum(-2, keepdim=True)
            S = x.decay[:, t].exp()[..., None] * S + erase + W
        else:
            if x.decay is not None:
                d = x.decay[:, t].exp()
                S = S * (d[..., None, None] if d.dim() == 2 else d[..., None])
            if isinstance(rule, DeltaRule):
                S = S - beta[:, t, :, None, None] * k[..., :, None] * (k[..., :, None] * S).sum(-2, keepdim=True)
            S = S + W
        states.append(S)
    states = torch.stack(states, 1)
    return torch.einsum("bthkv,bthk->bthv", states, x.q), states


CASES = {
    "delta-gated": (DeltaRule(), {}),
    "delta-nodecay": (DeltaRule(), {"with_decay": False}),
    "linear-scalar": (LinearRule(), {}),
    "linear-channel": (LinearRule(), {"per_channel": True}),
    "linear-nobeta": (LinearRule(), {"with_beta": False, "per_channel": True}),
    "dplr": (DPLRRule(), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_all_forms_match_explicit_loop(case):
    rule, kw = CASES[case]
    x = make_inputs(rule, 2, 45, 3, 6, 5, **kw)
    S0 = torch.randn(2, 3, 6, 5)
    o_ref, states_ref = explicit_loop(rule, x, S0)
    for res in (recurrent_scan(rule, x, S0, keep_states=True), scan(rule, x, S0, chunk_size=8, keep_states=True)):
        torch.testing.assert_close(res.states, states_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.o, o_ref, atol=1e-5, rtol=1e-5)
    fast = scan(rule, x, S0, chunk_size=8)
    torch.testing.assert_close(fast.o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.final_state, states_ref[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_fast_path_gradients_match_reference(case):
    rule, kw = CASES[case]
    x = make_inputs(rule, 1, 21, 2, 4, 3, requires_grad=True, **kw)
    S0 = torch.randn(1, 2, 4, 3, requires_grad=True)
    leaves = [*x.tensors().values(), S0]
    w_o, w_s = torch.randn(1, 21, 2, 3), torch.randn(1, 2, 4, 3)

    def grads(res):
        loss = (res.o * w_o).sum() + (res.final_state * w_s).sum()
        return torch.autograd.grad(loss, leaves)

    ref = grads(recurrent_scan(rule, x, S0))
    for res in (scan(rule, x, S0, chunk_size=4), scan(rule, x, S0, chunk_size=4, keep_states=True)):
        for a, b in zip(grads(res), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), H=st.integers(1, 3), chunk=st.sampled_from([1, 2, 4, 7, 16, 64]),
       init=st.booleans(), case=st.sampled_from(sorted(CASES)), seed=st.integers(0, 10_000))
def test_property_chunked_equals_recurrent(T, H, chunk, init, case, seed):
    rule, kw = CASES[case]
    x = make_inputs(rule, 2, T, H, 4, 3, seed=seed, **kw)
    S0 = torch.randn(2, H, 4, 3) if init else torch.zeros(2, H, 4, 3)
    ref = recurrent_scan(rule, x, S0, keep_states=True)
    fast = scan(rule, x, S0, chunk_size=chunk)
    full = scan(rule, x, S0, chunk_size=chunk, keep_states=True)
    torch.testing.assert_close(fast.o, ref.o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast.final_state, ref.final_state, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full.states, ref.states, atol=2e-5, rtol=1e-5)


def test_replay_state_edit_carries_forward():
    rule = DeltaRule()
    x = make_inputs(rule, 1, 12, 2, 4, 3)
    S0 = torch.zeros(1, 2, 4, 3)
    ref = recurrent_scan(rule, x, S0, keep_states=True)
    X = torch.randn(4, 3)
    mask = torch.zeros(1, 12, 2, dtype=torch.bool)
    mask[0, 5, 1] = True
    values = ref.states.clone()
    values[0, 5, 1] = X
    states = replay(rule, x, S0, ref.states, state_edit=(mask, values))
    torch.testing.assert_close(states[:, :5], ref.states[:, :5], atol=0, rtol=0)
    torch.testing.assert_close(states[0, 5, 1], X)
    torch.testing.assert_close(states[0, 5:, 0], ref.states[0, 5:, 0], atol=1e-6, rtol=1e-6)  # other head untouched
    # S_6 = M_6(X) + W_6, computed by hand
    a, b, k, v = x.decay[0, 6, 1].exp(), x.beta[0, 6, 1], x.k[0, 6, 1], x.v[0, 6, 1]
    expected = a * (torch.eye(4) - b * torch.outer(k, k)) @ X + b * torch.outer(k, v)
    torch.testing.assert_close(states[0, 6, 1], expected, atol=1e-6, rtol=1e-6)


def test_chunks_cut_the_position_axis():
    x = RecurrenceInputs(q=torch.randn(2, 6, 3, 4), k=torch.randn(2, 6, 3, 4), v=torch.randn(2, 6, 3, 5),
                         beta=torch.rand(2, 6, 3))
    chunks = x.chunks(3)
    assert chunks.v.shape == (2, 2, 3, 3, 5) and chunks.beta.shape == (2, 2, 3, 3)
    assert torch.equal(chunks.v[1, 1, 2, 0], x.v[1, 3, 2]) and torch.equal(chunks.beta[0, 1, :, 2], x.beta[0, 5])
