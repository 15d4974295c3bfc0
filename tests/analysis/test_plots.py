"""The plots of a feature attribution: top writers and the implicit attention pattern."""

import pytest
import torch
from tests.support.analysis import FEATURES, POSITIONS, tokens_for
from tests.support.helpers import make_sae, tiny_model

from recurrent_lens.analysis import feature_attribution


def test_plots_show_the_terms():
    from recurrent_lens.analysis import plot_implicit_attention, plot_top_writers

    model = tiny_model("gla")
    tokens = tokens_for(model)
    sae = make_sae(model, "write")
    fa = feature_attribution(model, sae, tokens, POSITIONS, features=FEATURES)
    labels = [f"tok{int(t)}" for t in tokens[1]]
    ax = plot_top_writers(fa, labels, batch=1, position=0, feature=2, k=3)
    terms = fa.writes[1, 0, 2]
    top = sorted(terms.abs().topk(3).indices.tolist())
    heights = [p.get_height() for p in ax.patches]
    want = [float(terms[s]) for s in top] + [float(fa.initial[1, 0, 2]), float(fa.bias[1, 0, 2])]
    assert heights == pytest.approx(want)
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == [f"{s}: {labels[s]}" for s in top]
    with pytest.raises(ValueError, match=r"labels: expected one per position \(29\), got 3"):
        plot_top_writers(fa, labels[:3])
    alpha = model.implicit_attention(tokens, 1, heads=0)[0, 0]
    ax = plot_implicit_attention(alpha, labels)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("write position s", "read position t")
    assert ax.figure.axes[-1].get_ylabel() == "share of the read α[t, s]"  # the colour bar
    with pytest.raises(ValueError, match=r"expected a square \[t, s\] pattern and one label per position"):
        plot_implicit_attention(alpha[:5], labels)


def test_token_labels_are_the_ids_without_a_tokenizer_and_the_escaped_strings_with_one():
    from tests.support.helpers import word_tokenizer

    from recurrent_lens.analysis import token_labels

    model = tiny_model("gated_deltanet")
    assert token_labels(model, torch.tensor([[3, 0, 7]])) == ["3", "0", "7"]
    model.tokenizer = word_tokenizer(["<unk>", "<eos>", "the", "cat", "tab\there"])
    assert token_labels(model, torch.tensor([2, 3, 4, 1])) == ["the", "cat", "tab\\there", "<eos>"]
