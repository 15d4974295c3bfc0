"""The streaming statistics against brute force: top examples, context windows, densities, histograms and
quantile samples, each checked against the codes recomputed through hooks."""

import math

import torch


def test_top_examples_equal_brute_force(dash, codes):
    n_pos = codes.shape[1]
    checked = 0
    for f in dash:
        column = codes[:, :, f.feature].reshape(-1)
        n_fire = int((column > 0).sum())
        assert len(f.top_examples) == min(6, n_fire)
        if n_fire == 0:
            continue
        values, order = column.sort(descending=True)
        got = [e.activation for e in f.top_examples]
        torch.testing.assert_close(torch.tensor(got), values[: len(got)], rtol=1e-5, atol=1e-7)
        assert got == sorted(got, reverse=True)
        for e in f.top_examples:
            # each example sits where the recomputed code has its value
            assert math.isclose(e.activation, float(codes[e.sequence, e.position, f.feature]), rel_tol=1e-5,
                                abs_tol=1e-7)
        if len(set(values[: len(got) + 1].tolist())) == len(got) + 1:  # no tie at the cut: positions are unique
            want = {(int(i) // n_pos, int(i) % n_pos) for i in order[: len(got)]}
            assert {(e.sequence, e.position) for e in f.top_examples} == want
        checked += 1
    assert checked > 100


def test_context_windows_hold_tokens_and_codes(dash, codes, toy_setup):
    tokens = toy_setup[2]
    T = tokens.shape[1]
    for f in dash.records[:64]:
        for e in f.top_examples + [x for band in f.quantile_samples for x in band["examples"]]:
            lo, hi = max(0, e.position - 5), min(T, e.position + 6)
            assert e.token_ids == tokens[e.sequence, lo:hi].tolist()
            assert e.fire_index == e.position - lo
            assert e.token_activations[e.fire_index] == e.activation
            torch.testing.assert_close(torch.tensor(e.token_activations), codes[e.sequence, lo:hi, f.feature],
                                       rtol=1e-5, atol=1e-6)


def test_density_histogram_and_max_equal_direct_counts(dash, codes):
    assert dash.n_positions == codes.shape[0] * codes.shape[1]
    fires = (codes > 0).flatten(0, 1)
    for f in dash:
        col = codes[:, :, f.feature]
        assert f.n_firings == int(fires[:, f.feature].sum())
        assert f.density == f.n_firings / dash.n_positions
        assert sum(f.histogram["counts"]) == f.n_firings
        if f.n_firings:
            assert math.isclose(f.max_activation, float(col.max()), rel_tol=1e-5, abs_tol=1e-7)
            assert math.isclose(f.mean_activation, float(col[col > 0].double().mean()), rel_tol=1e-5, abs_tol=1e-7)
            edges = f.histogram["edges"]
            assert edges[0] <= float(col[col > 0].min()) and float(col.max()) < edges[-1]


def test_quantile_samples_are_distinct_firings(dash, codes):
    for f in dash.records[:200]:
        samples = [e for band in f.quantile_samples for e in band["examples"]]
        assert len(samples) == min(8, f.n_firings)
        assert len({(e.sequence, e.position) for e in samples}) == len(samples)
        for e in samples:
            assert math.isclose(e.activation, float(codes[e.sequence, e.position, f.feature]), rel_tol=1e-5,
                                abs_tol=1e-7)
        acts = [e.activation for e in samples]
        assert acts == sorted(acts, reverse=True)  # bands strongest first, each sorted
