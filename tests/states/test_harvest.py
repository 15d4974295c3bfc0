"""Sampled per-step matrices (``states_at``, ``harvest``) against the full ``run_with_cache`` tensors."""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.support.helpers import ARCHS, tiny_model
from tests.support.threads import run_in_threads

T = 37  # not a multiple of any test chunk size: the last chunk is padded


@pytest.fixture(params=sorted(ARCHS), scope="module")
def model(request):
    m = tiny_model(request.param)
    m.cfg.chunk_size = 8
    return m


def tokens_for(model, B=3, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def random_positions(B, n, seed=1):
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)).argsort(-1)[:, :n]


def full(model, tokens, layer, what, hooks=()):
    name = f"blocks.{layer}.mixer.hook_{what}"
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    return cache[name]


@pytest.mark.parametrize("what", ["state", "write"])
def test_states_at_equals_cached_slices(model, what):
    tokens = tokens_for(model)
    layer = model.cfg.recurrent_layers[-1]
    pos = random_positions(3, 9)
    pos[0, :3] = torch.tensor([0, 7, T - 1])  # first position, a chunk's last position, the padded chunk
    heads = [model.cfg.n_heads - 1, 0]
    got = model.states_at(tokens, layer, pos, heads=heads, what=what)
    ref = full(model, tokens, layer, what)[torch.arange(3)[:, None], pos][:, :, heads]
    assert got.shape == (3, 9, 2, model.cfg.d_k, model.cfg.d_v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_harvest_many_cells_across_layers_in_one_pass(model):
    tokens = tokens_for(model, seed=3)
    pos = random_positions(3, 5, seed=4)
    layers = model.cfg.recurrent_layers
    cells = [(f"blocks.{l}.mixer.hook_{w}", h) for l in layers for w in ("state", "write") for h in (0, model.cfg.n_heads - 1)]
    forwards = []
    handle = model.embed.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = model.harvest(tokens, pos, cells)
    finally:
        handle.remove()
    assert len(forwards) == 1
    rows = torch.arange(3)[:, None]
    for name, head in cells:
        layer, what = model.matrix_site(name)
        ref = full(model, tokens, layer, what)[rows, pos][:, :, head]
        torch.testing.assert_close(out[name, head], ref, rtol=1e-5, atol=1e-6)


def test_upstream_edits_apply_as_in_a_forward(model):
    """Edits to an earlier layer's write and to this layer's value and write carry into the harvested states."""
    tokens = tokens_for(model, seed=5)
    layers = model.cfg.recurrent_layers
    layer = layers[-1]

    def scale(x, hook):
        return x * 1.5

    def zero_write(w, hook):
        w = w.clone()
        w[:, 4] = 0
        return w

    hooks = [(f"blocks.{layer}.mixer.hook_v", scale), (f"blocks.{layer}.mixer.hook_write", zero_write)]
    if len(layers) > 1:
        hooks.append((f"blocks.{layers[0]}.mixer.hook_write", zero_write))
    pos = random_positions(3, 6, seed=6)
    with model.hooks(fwd_hooks=hooks):
        got = model.states_at(tokens, layer, pos, heads=[1])
    ref = full(model, tokens, layer, "state", hooks)[torch.arange(3)[:, None], pos][:, :, [1]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    plain = model.states_at(tokens, layer, pos, heads=[1])
    assert not torch.allclose(got, plain)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_forms_the_full_state_tensor():
    model = tiny_model("gated_deltanet")
    model.cfg.chunk_size = 8
    B, L, c = 2, 96, model.cfg
    tokens = torch.randint(0, c.d_vocab, (B, L))
    every_state = B * L * c.n_heads * c.d_k * c.d_v
    with _LargestTensor() as watch:
        model.states_at(tokens, 1, torch.tensor([[3, 95], [50, 60]]), heads=[2])
    assert watch.largest < every_state / 3, (watch.largest, every_state)  # the largest is the conv input
    with _LargestTensor() as watch:
        model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_state")
    assert watch.largest >= every_state  # the check above can see a full tensor


def test_stop_at_layer_follows_transformer_lens():
    model = tiny_model("qwen3_5_hybrid")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    _, cache = model.run_with_cache(tokens)
    resid = model(tokens, stop_at_layer=1)
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"])
    out, partial = model.run_with_cache(tokens, stop_at_layer=1)
    torch.testing.assert_close(out, resid)
    assert "blocks.0.hook_resid_post" in partial and not any(k.startswith("blocks.1.") for k in partial.keys())
    torch.testing.assert_close(model(tokens, stop_at_layer=-1), resid)
    for bad in (3, -3):
        with pytest.raises(ValueError, match="stop_at_layer"):
            model(tokens, stop_at_layer=bad)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=1, cache=model.make_cache())


def test_harvest_stops_after_the_deepest_requested_layer():
    model = tiny_model("gated_deltanet")
    seen = []
    model.blocks[1].hook_resid_pre.add_hook(lambda x, hook: seen.append(1))
    try:
        model.states_at(torch.randint(0, 61, (1, 12)), 0, [3])
    finally:
        model.reset_hooks()
    assert seen == []


def test_bad_requests_are_refused():
    model = tiny_model("qwen3_5_hybrid")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    with pytest.raises(ValueError, match="recurrent layer"):
        model.states_at(tokens, 1, [0])
    with pytest.raises(ValueError, match="heads"):
        model.states_at(tokens, 0, [0], heads=[4])
    with pytest.raises(ValueError, match="positions: expected values in \\[0, 9\\)"):
        model.states_at(tokens, 0, [[0], [9]])
    with pytest.raises(ValueError, match="positions: expected shape"):
        model.states_at(tokens, 0, [[0, 1]])
    with pytest.raises(TypeError, match="positions"):
        model.states_at(tokens, 0, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="what"):
        model.states_at(tokens, 0, [0], what="erase")
    with pytest.raises(ValueError, match="hook_name"):
        model.harvest(tokens, [0], [("blocks.0.mixer.hook_read", 0)])
    with pytest.raises(ValueError, match="not a recurrent layer"):
        model.harvest(tokens, [0], [("blocks.1.mixer.hook_state", 0)])
    with pytest.raises(ValueError, match=r"head: expected an int in \[0, 4\)"):
        model.harvest(tokens, [0], [("blocks.0.mixer.hook_state", True)])
    model.blocks[0].mixer.hook_state.add_hook(lambda x, hook: x)
    try:
        with pytest.raises(ValueError, match="hook_state or hook_erase"):
            model.states_at(tokens, 0, [0])
    finally:
        model.reset_hooks()
    assert not hasattr(model.blocks[0].mixer, "harvest_request")  # requests never live on the mixer


RULE_CASES = ["linear_scalar", "linear_channel", "linear_none", "delta", "delta_no_decay"]
C, POS = 8, torch.tensor([[0, 7, 8, 20, 13], [3, 15, 16, 9, 1]])  # chunk size; positions in every chunk


def _rule_case(case: str, seed: int):
    """``(generator, inputs [2, 21, 3, ...], the leaves states depend on, rule)`` for one rule case."""
    from recurrent_lens.models.scan import DeltaRule, LinearRule, RecurrenceInputs

    g = torch.Generator().manual_seed(seed)
    B, L, H, dk, dv = 2, 21, 3, 5, 4
    k = torch.nn.functional.normalize(torch.randn(B, L, H, dk, generator=g), dim=-1)
    decay = {"linear_scalar": -torch.rand(B, L, H, generator=g), "linear_channel": -torch.rand(B, L, H, dk, generator=g),
             "delta": -torch.rand(B, L, H, generator=g)}.get(case)
    x = RecurrenceInputs(q=torch.randn(B, L, H, dk, generator=g), k=k, v=torch.randn(B, L, H, dv, generator=g),
                         beta=torch.rand(B, L, H, generator=g), decay=decay)
    leaves = [t.requires_grad_() for name, t in x.tensors().items() if name != "q"]  # states do not read q
    return g, x, leaves, DeltaRule() if case.startswith("delta") else LinearRule()


def _assert_same_with_gradients(fast, slow, leaves, g, grad_rtol: float) -> None:
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    direction = torch.randn(fast.shape, generator=g)
    g_fast = torch.autograd.grad((fast * direction).sum(), leaves, retain_graph=True)
    g_slow = torch.autograd.grad((slow * direction).sum(), leaves)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=1e-5)


@pytest.mark.parametrize("case", RULE_CASES)
def test_closed_form_inside_a_chunk_equals_stepping_with_gradients(case):
    """``replay_at``'s closed form (linear and delta rules) against the token-by-token replay, values and grads."""
    from recurrent_lens.models.scan import Rule, boundary_scan, replay_at

    g, x, leaves, rule = _rule_case(case, 0)
    B, _, H, dk, dv = x.shape
    _, _, bounds = boundary_scan(rule, x, torch.zeros(B, H, dk, dv), C)

    class Stepping(type(rule)):
        def chunk_states(self, *args):
            return Rule.chunk_states(self, *args)

    fast = replay_at(rule, x, bounds, POS, C)
    slow = replay_at(Stepping(), x, bounds, POS, C)
    _assert_same_with_gradients(fast, slow, leaves, g, grad_rtol=1e-4)


@pytest.mark.parametrize("case", RULE_CASES)
def test_states_from_the_scans_update_values_equal_the_token_by_token_scan_with_gradients(case):
    """``boundary_scan(updates=True)`` + ``replay_at(updates=...)`` (no re-solve inside a chunk) against every
    state of the token-by-token reference, values and gradients through the whole computation."""
    from recurrent_lens.models.scan import boundary_scan, recurrent_scan, replay_at

    g, x, leaves, rule = _rule_case(case, 1)
    B, L, H, dk, dv = x.shape
    S0 = torch.randn(B, H, dk, dv, generator=g)
    _, _, bounds, u = boundary_scan(rule, x, S0, C, updates=True)
    assert u.shape == (B, L, H, dv)
    fast = replay_at(rule, x, bounds, POS, C, updates=u)
    states = recurrent_scan(rule, x, S0, keep_states=True).states
    slow = states[torch.arange(B)[:, None], POS]
    _assert_same_with_gradients(fast, slow, leaves, g, grad_rtol=1e-5)


def test_boundary_scan_reports_no_update_values_where_it_steps():
    """Edited writes (and rules without a chunked form) step token by token: no update values, and
    ``replay_at`` ignores update values when writes are given."""
    from recurrent_lens.models.scan import DeltaRule, RecurrenceInputs, boundary_scan, replay_at

    g = torch.Generator().manual_seed(2)
    B, L, H, d, chunk = 1, 10, 2, 3, 4
    x = RecurrenceInputs(q=torch.randn(B, L, H, d, generator=g), k=torch.randn(B, L, H, d, generator=g),
                         v=torch.randn(B, L, H, d, generator=g), beta=torch.rand(B, L, H, generator=g))
    writes = torch.randn(B, L, H, d, d, generator=g)
    o, final, bounds, u = boundary_scan(DeltaRule(), x, torch.zeros(B, H, d, d), chunk, writes=writes, updates=True)
    assert u is None
    pos = torch.tensor([[2, 9]])
    _, _, _, u_native = boundary_scan(DeltaRule(), x, torch.zeros(B, H, d, d), chunk, updates=True)
    with_u = replay_at(DeltaRule(), x, bounds, pos, chunk, writes=writes, updates=u_native)
    torch.testing.assert_close(with_u, replay_at(DeltaRule(), x, bounds, pos, chunk, writes=writes), rtol=0, atol=0)


def test_states_at_and_harvest_from_several_threads_on_one_model():
    """Concurrent calls without hooks each get their own positions and heads, bitwise as when run alone."""
    model = tiny_model("gated_deltanet")
    model.cfg.chunk_size = 8
    layers = model.cfg.recurrent_layers
    H = model.cfg.n_heads
    tokens = tokens_for(model, B=2, seed=5)
    calls = []
    for i in range(80):
        pos = random_positions(2, 1 + i % 6, seed=100 + i)
        if i % 2:
            calls.append(("states_at", pos, [i % H], layers[i % len(layers)]))
        else:
            calls.append(("harvest", pos, [(f"blocks.{layers[i % len(layers)]}.mixer.hook_state", (i // 2) % H),
                                           (f"blocks.{layers[0]}.mixer.hook_write", 0)], None))

    def run(call):
        kind, pos, heads, layer = call
        if kind == "states_at":
            return {"s": model.states_at(tokens, layer, pos, heads=heads)}
        return model.harvest(tokens, pos, heads)

    alone = [run(c) for c in calls]
    got: dict[int, dict] = {}

    def worker(t):
        for i in range(t, len(calls), 4):
            got[i] = run(calls[i])

    errors = run_in_threads(4, worker)
    assert not errors, errors
    wrong = [i for i in range(len(calls)) if got[i].keys() != alone[i].keys()
             or any(got[i][k].shape != alone[i][k].shape or not torch.equal(got[i][k], alone[i][k]) for k in alone[i])]
    assert not wrong, f"{len(wrong)} of {len(calls)} concurrent calls differ from the same call run alone"


def test_ragged_positions_and_non_integer_heads_name_the_argument(monkeypatch):
    import jaxtyping

    # as a user calls it: the test run's type checker would refuse these arguments before the model's own checks
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    model = tiny_model("gated_deltanet")
    tokens = tokens_for(model, B=2)
    cell = [("blocks.0.mixer.hook_state", 0)]
    for call in (lambda: model.states_at(tokens, 0, [[1, 2], [3]]), lambda: model.harvest(tokens, [[1], [2, 3]], cell)):
        with pytest.raises(ValueError, match=r"positions: expected one list of positions per sequence, all of one "
                                             r"length, got rows of lengths \[\d, \d\]"):
            call()
    with pytest.raises(TypeError, match="positions: expected integer positions"):
        model.states_at(tokens, 0, [["a"]])
    for heads in ("two", 1.5, ["two"], [0, 1.0], True):
        with pytest.raises(ValueError, match=re.escape(f"heads (state): expected a head index or a list of head "
                                                       f"indices in [0, {model.cfg.n_heads}), got {heads!r}")):
            model.states_at(tokens, 0, [1], heads=heads)
