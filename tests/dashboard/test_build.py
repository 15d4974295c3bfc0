"""build_dashboard: batching, subsets and strides, its data sources (tensors, token files, text through the
model's tokenizer), substitution win rates, every architecture, and errors that name the argument."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tests.support.dashboard import HOOK

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.analysis.results import SubstitutionResult
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.sae import WriteSAE


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
