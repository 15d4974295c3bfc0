"""build_dashboard against brute force: codes recomputed through hooks, sorted by hand, counted directly."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from recurrent_lens import HookedRecurrentModel, ModelConfig, toy
from recurrent_lens.analysis.logit_shift import output_jacobian, unembedding
from recurrent_lens.analysis.results import SubstitutionResult
from recurrent_lens.dashboard import Dashboard, build_dashboard
from recurrent_lens.sae import FlatSAE, WriteSAE
from recurrent_lens.states.cells import Cell

HOOK, HEAD = "blocks.1.mixer.hook_state", 0


@pytest.fixture(scope="module")
def toy_setup():
    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(12, seed=3)[0]
    return model, sae, tokens


@pytest.fixture(scope="module")
def codes(toy_setup):
    """Every code at every position, recomputed through run_with_cache on the SAE's hook: [n_seq, pos, n_f]."""
    model, sae, tokens = toy_setup
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK][:, :, HEAD])


@pytest.fixture(scope="module")
def dash(toy_setup):
    model, sae, tokens = toy_setup
    return build_dashboard(model, sae, tokens, n_examples=6, context=5, n_samples=8, batch_size=5, progress=False)


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


def test_batching_and_subsets_do_not_change_the_result(toy_setup, dash):
    model, sae, tokens = toy_setup
    feats = [5, 17, 1000]
    other = build_dashboard(model, sae, iter(list(tokens)), features=feats, n_examples=6, context=5, n_samples=8,
                            batch_size=4, progress=False)
    assert other.features == feats
    for i in feats:
        a, b = dash[i], other[i]
        assert (a.n_firings, a.histogram) == (b.n_firings, b.histogram)
        assert [(e.sequence, e.position) for e in a.top_examples] == [(e.sequence, e.position) for e in b.top_examples]
        torch.testing.assert_close(torch.tensor([e.activation for e in a.top_examples]),
                                   torch.tensor([e.activation for e in b.top_examples]), rtol=1e-5, atol=1e-7)


def test_stride_harvests_every_nth_position(toy_setup, codes):
    model, sae, tokens = toy_setup
    d = build_dashboard(model, sae, tokens, features=[0, 1, 2, 3], n_examples=4, context=3, stride=3,
                        progress=False)
    sub = codes[:, ::3]
    assert d.n_positions == sub.shape[0] * sub.shape[1]
    for f in d:
        assert f.n_firings == int((sub[:, :, f.feature] > 0).sum())
        for e in f.top_examples:
            assert e.position % 3 == 0
            computed = [a is not None for a in e.token_activations]
            lo = e.position - e.fire_index
            assert computed == [(lo + j) % 3 == 0 for j in range(len(computed))]


def test_key_and_query_tokens_are_mean_cosines(toy_setup, dash):
    model, sae, tokens = toy_setup
    names = ["blocks.1.mixer.hook_k", "blocks.1.mixer.hook_q"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for hook, attr in zip(names, ("key_tokens", "query_tokens")):
        vecs = cache[hook][:, :, HEAD].reshape(-1, model.cfg.d_k)
        ids = tokens.reshape(-1)
        seen = ids.unique()
        means = torch.stack([vecs[ids == t].double().mean(0) for t in seen]).float()
        means = means / means.norm(dim=1, keepdim=True)
        for i in (0, 17, 1000):
            v = sae.V_dec[i, 0] / sae.V_dec[i, 0].norm()
            cos = means @ v
            top = cos.topk(len(dash[i].key_tokens))
            assert [c for _, c in getattr(dash[i], attr)] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)


def test_promoted_tokens_follow_the_head_output_and_unembedding():
    """A random Gated DeltaNet (gated output norm) and a FlatSAE: the value side is the atoms' leading right
    singular vector, read through the head's output Jacobian averaged over every position of the data."""
    cfg = ModelConfig(architecture="gated_deltanet", d_model=24, n_layers=1, d_vocab=30, n_heads=2, d_k=6, d_v=4,
                      d_mlp=32)
    model = HookedRecurrentModel.from_config(cfg, seed=1).eval()
    tokens = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(0))
    sae = FlatSAE(6, 4, 5, k=2, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
    d = build_dashboard(model, sae, tokens, progress=False)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())  # the early stop leaves no hook behind
    J = output_jacobian(model, tokens, Cell("blocks.0.mixer.hook_state", 1)).mean((0, 1))
    atoms = sae.decoder_atoms().detach()
    for i in range(5):
        U, S, Vh = torch.linalg.svd(atoms[i])
        w = Vh[0] / Vh[0].norm()
        logits = unembedding(model) @ (J @ w)
        # the SVD's sign is the dashboard's own too: both flip v and w together
        want = logits.topk(len(d[i].promoted_tokens))
        assert [t for t, _ in d[i].promoted_tokens] == [f"<{j}>" for j in want.indices.tolist()]
        assert [x for _, x in d[i].promoted_tokens] == pytest.approx(want.values.tolist(), rel=1e-4, abs=1e-5)
        assert d[i].rank1_share == pytest.approx(float(S[0] ** 2 / S.pow(2).sum()), rel=1e-5)


def test_substitution_win_rates_per_feature(toy_setup):
    model, sae, tokens = toy_setup
    rows = pd.DataFrame({"feature": [3, 3, 3, 9], "win": [True, False, True, False], "chain": [False] * 4})
    d = build_dashboard(model, sae, tokens[:2], features=[3, 9, 10], n_examples=2, progress=False,
                        substitution=SubstitutionResult(rows))
    assert d[3].substitution == {"win_rate": pytest.approx(2 / 3), "n": 3}
    assert d[9].substitution == {"win_rate": 0.0, "n": 1}
    assert d[10].substitution is None
    assert d.to_frame().loc[3, "win_rate"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="substitution: expected a SubstitutionResult"):
        build_dashboard(model, sae, tokens[:2], features=[3], progress=False, substitution=rows)


def test_dataset_path_source(toy_setup, tmp_path):
    model, sae, tokens = toy_setup
    path = tmp_path / "ids.npy"
    np.save(path, tokens.numpy().astype(np.int32))
    a = build_dashboard(model, sae, str(path), features=[5, 6], n_examples=3, progress=False, max_sequences=7)
    b = build_dashboard(model, sae, tokens[:7], features=[5, 6], n_examples=3, progress=False)
    assert a.meta["n_sequences"] == 7
    assert [f.summary() for f in a] == [f.summary() for f in b]


def test_errors_name_argument_expected_and_actual(toy_setup):
    model, sae, tokens = toy_setup
    with pytest.raises(ValueError, match=r"features: expected feature indices in \[0, 2048\).*\[2048\]"):
        build_dashboard(model, sae, tokens, features=[1, 2048], progress=False)
    with pytest.raises(ValueError, match=r"sae: reads \[d_k, d_v\] = \[8, 8\] states.*\[16, 16\]"):
        build_dashboard(model, WriteSAE(8, 8, 4, metadata={"hook_name": HOOK, "head": 0}), tokens, progress=False)
    with pytest.raises(ValueError, match="pass hook_name= and head="):
        build_dashboard(model, WriteSAE(16, 16, 4), tokens, progress=False)
    with pytest.raises(ValueError, match=r"head: expected an int in \[0, 2\)"):
        build_dashboard(model, sae, tokens, head=5, progress=False)
    with pytest.raises(ValueError, match="n_examples: expected an int >= 1, got 0"):
        build_dashboard(model, sae, tokens, n_examples=0, progress=False)
    with pytest.raises(ValueError, match=r"data: expected token ids \[n_seq, ctx\], got shape \(34,\)"):
        build_dashboard(model, sae, tokens[0], progress=False)


def test_dashboard_api_and_site(dash, tmp_path):
    assert repr(dash) == "Dashboard(2048 features of WriteSAE at blocks.1.mixer.hook_state head 0, " \
                         "12 sequences x 34 positions)"
    frame = dash.to_frame()
    assert len(frame) == 2048 and frame.index.name == "feature"
    with pytest.raises(KeyError, match="feature: expected one of the 2048 collected features"):
        dash[2048]
    i = int(frame["density"].idxmax())
    shown = dash.show(i)
    assert f'data-feature="{i}"' in shown.data and 'class="tok fire"' in shown.data
    # the inline view's styles touch only its own elements, not the notebook's
    css = shown.data.split("<style>")[1].split("</style>")[0]
    rules = [r.split("{")[0] for r in css.split("}") if "{" in r]
    assert rules and all(".rl-" in r or "#rl-" in r for r in rules)

    sub = Dashboard([dash[i], dash[3]], dash.meta)
    index = sub.save(tmp_path / "site")
    site = tmp_path / "site"
    assert index == str(site / "index.html")
    listed = json.loads((site / "data" / "features.json").read_text())
    assert [r["feature"] for r in listed] == [i, 3] and listed[0]["density"] == dash[i].density
    js = (site / "data" / "features.js").read_text()
    assert json.loads(js.split("=", 1)[1].strip().rstrip(";")) == listed
    record = json.loads((site / "data" / f"feature_{i}.json").read_text())
    acts = [e["activation"] for e in record["top_examples"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == dash[i].top_examples[0].activation
    assert set(record["top_examples"][0]) >= {"sequence", "position", "activation", "tokens", "token_activations"}
    assert (site / "features" / f"feature_{i}.html").is_file()

    # an earlier dashboard is replaced whole; anything else is refused
    Dashboard([dash[3]], dash.meta).save(site)
    assert sorted(p.name for p in (site / "data").iterdir()) == ["feature_3.json", "features.js", "features.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="neither empty nor a dashboard"):
        sub.save(other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_token_strings_are_escaped(toy_setup, dash):
    model, sae, tokens = toy_setup
    i = int(dash.to_frame()["density"].idxmax())
    names = ["<b>bold</b>", 'say "hi"\n'] + [f"t{j}" for j in range(2, model.cfg.d_vocab)]
    d = build_dashboard(model, sae, tokens, features=[i], n_examples=2, token_strings=names, progress=False)
    page = d.html(i)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "say &quot;hi&quot;↵" in page


@pytest.mark.parametrize("architecture", ["gated_deltanet", "mamba2", "rwkv7", "delta_net", "gla"])
def test_every_architecture(architecture):
    """Random two-layer models of each architecture, d_k != d_v: the pass, the readings and the counts hold."""
    cfg = ModelConfig(architecture=architecture, d_model=32, n_layers=2, d_vocab=20, n_heads=2, d_k=8, d_v=4)
    model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
    tokens = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(1))
    hook = "blocks.1.mixer.hook_state"
    sae = WriteSAE(8, 4, 16, k=3, metadata={"hook_name": hook, "head": 1})
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    d = build_dashboard(model, sae, tokens, n_examples=3, context=2, batch_size=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())  # the SAE is left as it was
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        codes = sae.encode(cache[hook][:, :, 1])
    for f in d:
        assert f.n_firings == int((codes[:, :, f.feature] > 0).sum())
        if f.top_examples:
            e = f.top_examples[0]
            assert e.activation == pytest.approx(float(codes[:, :, f.feature].max()), rel=1e-5)
        assert len(f.key_tokens) == len(f.query_tokens) == 10 and len(f.promoted_tokens) == 10
        assert all(math.isfinite(v) for _, v in f.key_tokens + f.query_tokens + f.promoted_tokens)


def test_text_dataset_with_the_models_tokenizer(toy_setup, tmp_path, monkeypatch):
    """A .txt corpus read through data.open_tokens; the examples' strings come from the model's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, sae, _ = toy_setup
    words = ["<eos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "home"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    monkeypatch.setattr(model, "tokenizer", PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>"))
    path = tmp_path / "docs.txt"
    path.write_text("the cat sat on a mat\nthe dog ran home\n" * 20)
    d = build_dashboard(model, sae, str(path), context_length=12, features=list(range(64)), n_examples=2,
                        context=3, progress=False)
    # each pair of lines is 6 + 4 words and two separators: 20 windows of 12 tokens
    assert d.meta["n_sequences"] == 20 and d.meta["context_length"] == 12
    fired = [e for f in d for e in f.top_examples]
    assert fired and all(set(e.tokens) <= set(words) for e in fired)
    with pytest.raises(ValueError, match="context_length"):
        build_dashboard(model, sae, str(path), features=[0], progress=False)


def _pre_at(model, sae, tokens, sequence, position, feature, hooks=()):
    """The SAE's own pre-activation of ``feature`` on the cached state of its cell at one position."""
    name, head = sae.cfg.metadata["hook_name"], sae.cfg.metadata["head"]
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens[sequence: sequence + 1], names_filter=name)
        return float(sae.autoencode(cache[name][0, position, head][None]).pre[0, feature])


def test_writers_sum_to_the_pre_activation_stored(dash, toy_setup):
    model, sae, tokens = toy_setup
    assert dash.meta["writers"] == "top 5 by |contribution| per top example"
    checked = 0
    for f in [f for f in dash if f.top_examples][::9]:
        for e in f.top_examples:
            w = e.writers
            contributions = [x["contribution"] for x in w["top"]]
            total = sum(contributions) + w["other_writes"] + w["initial"] + w["bias"]
            assert total == pytest.approx(w["pre_activation"], rel=1e-5, abs=1e-6)
            assert w["pre_activation"] == pytest.approx(_pre_at(model, sae, tokens, e.sequence, e.position,
                                                                f.feature), rel=1e-5, abs=1e-6)
            # top-k of the pre-activations: the activation is the pre-activation where the feature is kept
            assert e.activation == pytest.approx(w["pre_activation"], rel=1e-5)
            assert [abs(c) for c in contributions] == sorted(map(abs, contributions), reverse=True)
            assert len(w["top"]) == min(5, e.position + 1) and w["initial"] == 0
            for x in w["top"]:
                assert 0 <= x["position"] <= e.position
                assert x["token"] == f"<{int(tokens[e.sequence, x['position']])}>"
            checked += 1
    assert checked > 50
    record = dash[dash.features[0]].to_dict()
    assert all("writers" in e for e in record["top_examples"])
    assert all("writers" not in e for band in record["quantile_samples"] for e in band["examples"])


def test_top_writer_equals_deleting_its_write():
    """A random model: zeroing the top writer's write through ``hook_write`` moves the pre-activation at the
    firing by exactly minus its contribution; with as many writers as positions nothing is left over."""
    cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=2, d_vocab=40, n_heads=2, d_k=8, d_v=6,
                      d_mlp=48)
    model = HookedRecurrentModel.from_config(cfg, seed=3).eval()
    tokens = torch.randint(0, 40, (6, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    hook, head = "blocks.1.mixer.hook_state", 1
    sae = FlatSAE(8, 6, 24, k=4, metadata={"hook_name": hook, "head": head})
    with torch.no_grad():
        sae.mean.normal_()
        sae.b_enc.normal_(0, 0.3)
    d = build_dashboard(model, sae, tokens, n_examples=3, n_writers=16, batch_size=4, progress=False)
    checked = 0
    for f in d:
        for e in f.top_examples:
            w = e.writers
            assert len(w["top"]) == e.position + 1 and w["other_writes"] == 0
            total = sum(x["contribution"] for x in w["top"]) + w["initial"] + w["bias"]
            assert total == pytest.approx(w["pre_activation"], rel=1e-5, abs=1e-6)
            s = w["top"][0]["position"]

            def zero(x, hook, s=s):
                x = x.clone()
                x[:, s, head] = 0
                return x

            clean = _pre_at(model, sae, tokens, e.sequence, e.position, f.feature)
            deleted = _pre_at(model, sae, tokens, e.sequence, e.position, f.feature,
                              [("blocks.1.mixer.hook_write", zero)])
            assert deleted - clean == pytest.approx(-w["top"][0]["contribution"], abs=1e-5 * max(1.0, abs(clean)))
            checked += 1
    assert checked >= 10


def test_writers_do_not_depend_on_how_the_calls_are_grouped(toy_setup, dash, monkeypatch):
    import recurrent_lens.dashboard.writers as writers

    model, sae, tokens = toy_setup
    firing = [f.feature for f in dash if f.top_examples][:6]
    args = dict(features=firing, n_examples=4, context=2, progress=False)
    one = build_dashboard(model, sae, tokens, batch_size=12, **args)
    monkeypatch.setattr(writers, "CALL_ELEMENTS", 1)  # one (sequence, position, feature) per call
    many = build_dashboard(model, sae, tokens, batch_size=3, **args)
    for a, b in zip(one, many):
        assert len(a.top_examples) == len(b.top_examples) > 0
        for x, y in zip(a.top_examples, b.top_examples):
            assert [t["position"] for t in x.writers["top"]] == [t["position"] for t in y.writers["top"]]
            assert [t["contribution"] for t in x.writers["top"]] == pytest.approx(
                [t["contribution"] for t in y.writers["top"]], rel=1e-5, abs=1e-6)
            assert x.writers["pre_activation"] == pytest.approx(y.writers["pre_activation"], rel=1e-5)


def test_writers_left_out_where_attribution_does_not_apply(toy_setup, dash):
    model, sae, tokens = toy_setup
    busiest = int(dash.to_frame()["density"].idxmax())
    other = WriteSAE(16, 16, 8, k=2, metadata={"hook_name": HOOK, "head": 1})
    d = build_dashboard(model, other, tokens[:4], head=0, progress=False)
    assert d.meta["writers"] == f"sae.cfg.metadata names {HOOK} head 1, the dashboard reads {HOOK} head 0"
    off = build_dashboard(model, sae, tokens[:4], features=[busiest], n_writers=0, progress=False)
    assert off.meta["writers"] == "n_writers=0"
    for dash_ in (d, off):
        f = next(f for f in dash_ if f.top_examples)
        assert all(e.writers is None for e in f.top_examples)
        assert all("writers" not in e for e in f.to_dict()["top_examples"])
        assert 'class="writer' not in dash_.html(f.feature)
    with pytest.raises(ValueError, match="n_writers: expected an int >= 0, got -1"):
        build_dashboard(model, sae, tokens, n_writers=-1, progress=False)
