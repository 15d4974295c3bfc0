"""Write attribution (``write_contributions``, ``implicit_attention``) against the model's own reads and states.

References are independent of the attribution engine: ``hook_read`` and ``hook_state`` from forwards in each
execution mode (the chunked fast path; materialised states), and forwards with a write deleted through
``hook_write`` (the token-by-token path) or through ``hook_v`` (the chunked path).
"""

import pytest
import torch
from tests.support.helpers import ARCHS, tiny_model
from tests.support.threads import run_in_threads

from recurrent_lens.models.attribution import capture

T = 37  # longer than the chunk size and not a multiple of it


@pytest.fixture(params=sorted(ARCHS), scope="module")
def model(request):
    m = tiny_model(request.param)
    m.cfg.chunk_size = 8
    return m


def tokens_for(model, B=2, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_rel(got, want, scale):
    """Equal within 1e-5 of the largest magnitude of ``scale`` (fp32 rounding of the quantities compared)."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(scale.abs().max()))


def run(model, tokens, layer, hooks=(), materialise=False, initial_state=None):
    """``hook_read`` (and ``hook_state`` when materialised) of ``layer`` under ``hooks``."""
    names = [f"blocks.{layer}.mixer.hook_read"] + ([f"blocks.{layer}.mixer.hook_state"] if materialise else [])
    with model.hooks(fwd_hooks=list(hooks)):
        if initial_state is None:
            _, cache = model.run_with_cache(tokens, names_filter=names)
        else:
            _, cache = model.run_with_cache(tokens, names_filter=names, initial_states={layer: initial_state})
    return cache[names[0]]


def zero_at(s, what="write"):
    def hook(x, hook):
        x = x.clone()
        x[:, s] = 0
        return x
    return hook


MODES = ["chunked", "materialised"]


@pytest.mark.parametrize("mode", MODES)
def test_contributions_sum_to_the_read(model, mode):
    tokens = tokens_for(model)
    layer = model.cfg.recurrent_layers[-1]
    pos = torch.tensor([[0, 7, 8, T - 1, 20], [3, 3, 36, 15, 0]])
    heads = [model.cfg.n_heads - 1, 0]
    c = model.write_contributions(tokens, layer, pos, heads=heads)
    assert c.writes.shape == (2, 5, 2, T, model.cfg.d_v) and c.heads == heads
    read = run(model, tokens, layer, materialise=mode == "materialised")
    ref = read[torch.arange(2)[:, None], pos][:, :, heads]
    assert_rel(c.total(), ref, ref)
    assert c.initial.eq(0).all()
    later = torch.arange(T)[None, None, None, :] > pos[:, :, None, None]
    assert c.writes.masked_select(later[..., None]).eq(0).all()  # causal
    if model.cfg.architecture == "mamba2":  # D·x is the extra, outside the state
        D = model.blocks[layer].mixer.D.float().reshape(model.cfg.n_heads, -1)[heads]
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_v")
        v = cache[f"blocks.{layer}.mixer.hook_v"][torch.arange(2)[:, None], pos][:, :, heads]
        assert_rel(c.extra, D * v, ref)
    else:
        assert c.extra.eq(0).all()


def test_all_positions_by_default_and_initial_state(model):
    tokens = tokens_for(model, seed=1)
    layer = model.cfg.recurrent_layers[0]
    cfg = model.cfg
    S0 = torch.randn(2, cfg.n_heads, cfg.d_k, cfg.d_v, generator=torch.Generator().manual_seed(2))
    c = model.write_contributions(tokens, layer, initial_state=S0)
    assert c.read_positions.tolist() == [list(range(T))] * 2
    ref = run(model, tokens, layer, initial_state=S0)
    assert_rel(c.total(), ref, ref)
    assert c.initial.abs().amax() > 1e-3 * ref.abs().amax()
    # the initial term is the read of S0 alone: a run from S0 with every write deleted
    deleted = run(model, tokens, layer, [(f"blocks.{layer}.mixer.hook_write", lambda w, hook: torch.zeros_like(w))],
                  initial_state=S0)
    assert_rel(c.initial + c.extra, deleted, ref)


@pytest.mark.parametrize("mode", ["write, token by token", "write, materialised", "value, chunked"])
def test_deleting_a_write_moves_the_read_by_minus_its_contribution(model, mode):
    tokens = tokens_for(model, seed=3)
    layer = model.cfg.recurrent_layers[-1]
    c = model.write_contributions(tokens, layer)
    clean = run(model, tokens, layer)
    for s in (0, 8, 23):
        if mode == "value, chunked":
            # v_s enters the state only through W_s, so zeroing it deletes W_s on the chunked fast path;
            # Mamba-2's D·x_s also reads it, at t = s only: compare later reads
            deleted = run(model, tokens, layer, [(f"blocks.{layer}.mixer.hook_v", zero_at(s))])
            after = slice(s + 1, None)
        else:
            deleted = run(model, tokens, layer, [(f"blocks.{layer}.mixer.hook_write", zero_at(s))],
                          materialise=mode == "write, materialised")
            after = slice(None)
        assert_rel((deleted - clean)[:, after], -c.writes[:, after, :, s], clean)


def test_transition_matches_the_models_states(model):
    """``S_t = A_t S_{t-1} + W_t`` with ``A_t`` from ``rule.transition`` and states, writes from the forward."""
    tokens = tokens_for(model, seed=4)
    layer = model.cfg.recurrent_layers[-1]
    names = [f"blocks.{layer}.mixer.hook_state", f"blocks.{layer}.mixer.hook_write"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    S, W = cache[names[0]], cache[names[1]]
    x = capture(model, tokens, layer).inputs
    rule = model.blocks[layer].mixer.rule
    for t in (1, 9, T - 1):
        moved = rule.transition(S[:, t - 1].transpose(-1, -2), x.at(t)).transpose(-1, -2)
        assert_rel(moved + W[:, t], S[:, t], S[:, t])


def test_implicit_attention(model):
    tokens = tokens_for(model, seed=5)
    layer = model.cfg.recurrent_layers[-1]
    heads = [1, 0]
    a = model.implicit_attention(tokens, layer, heads=heads)
    assert a.shape == (2, 2, T, T)
    assert a.triu(1).eq(0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, T), rtol=0, atol=1e-5)
    c = model.write_contributions(tokens, layer, heads=heads)
    # the state part of the read, from the contributions (test_contributions_sum_to_the_read ties them to
    # hook_read; hook_read − D·x would lose digits where Mamba-2's D·x dominates)
    o = c.writes.sum(-2).transpose(1, 2)  # [B, H, T, d_v]
    ref = torch.einsum("bthsv,bhtv->bhts", c.writes, o) / o.pow(2).sum(-1)[..., None]
    assert_rel(a, ref, ref)


def test_implicit_attention_against_deletions():
    """α[t, s] = −⟨Δo_t, o_t⟩/‖o_t‖² for the forward with write s deleted, on the delta rule."""
    model = tiny_model("gated_deltanet")
    model.cfg.chunk_size = 8
    tokens = tokens_for(model, B=1, seed=6)[:, :17]
    a = model.implicit_attention(tokens, 1, heads=2)[0, 0]
    clean = run(model, tokens, 1)[0, :, 2]
    for s in range(17):
        delta = run(model, tokens, 1, [("blocks.1.mixer.hook_write", zero_at(s))])[0, :, 2] - clean
        ref = -(delta * clean).sum(-1) / clean.pow(2).sum(-1)
        assert_rel(a[:, s], ref, a)


def test_clear_errors():
    model = tiny_model("qwen3_5_hybrid")
    tokens = tokens_for(model)
    with pytest.raises(ValueError, match=r"layer: expected a recurrent layer \[0\], got 1"):
        model.write_contributions(tokens, 1)
    with pytest.raises(ValueError, match=r"layer: expected a recurrent layer \[0\], got 5"):
        model.implicit_attention(tokens, 5)
    with pytest.raises(ValueError, match=r"heads \(layer 0\): expected a head index or a list of head indices in "
                                         r"\[0, 4\), got \[4\]"):
        model.write_contributions(tokens, 0, heads=[4])
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 37\)"):
        model.write_contributions(tokens, 0, read_positions=[37])
    with pytest.raises(ValueError, match=r"hooks on hook_state"):
        with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_state", lambda x, hook: x)]):
            model.implicit_attention(tokens, 0)


def test_write_contributions_from_two_threads_on_one_model():
    """The capture request travels in each call's own forward, never on the mixer: two threads on one model,
    each with its own tokens and read positions, get bitwise what the same calls give alone."""
    model = tiny_model("gated_deltanet")
    model.cfg.chunk_size = 8
    layer = model.cfg.recurrent_layers[-1]
    calls = [(tokens_for(model, seed=1), torch.tensor([[5, 30], [0, 36]])),
             (tokens_for(model, seed=2), torch.tensor([[12], [20]]))]
    alone = [model.write_contributions(tokens, layer, read_positions=pos) for tokens, pos in calls]
    got: dict[int, list] = {0: [], 1: []}

    def worker(i):
        tokens, pos = calls[i]
        for _ in range(20):
            got[i].append(model.write_contributions(tokens, layer, read_positions=pos))

    errors = run_in_threads(2, worker)
    assert not errors, errors
    for i, want in enumerate(alone):
        assert len(got[i]) == 20
        for c in got[i]:
            assert c.heads == want.heads and torch.equal(c.read_positions, want.read_positions)
            for name in ("writes", "initial", "extra"):
                assert torch.equal(getattr(c, name), getattr(want, name)), (i, name)
    assert not hasattr(model.blocks[layer].mixer, "capture_request")  # requests never live on the mixer
