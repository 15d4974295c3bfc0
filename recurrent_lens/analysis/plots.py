"""Figures of write attribution: an implicit-attention heatmap and a feature firing's top writers.

Each function draws into the ``ax`` it is given (a pyplot or notebook axes) or, without one, into a new
:class:`matplotlib.figure.Figure` of its own, so that the caller's pyplot state and backend are left alone.
Both return the axes; ``ax.figure.savefig(path)`` saves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from recurrent_lens.analysis.attribution import FeatureAttribution

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    # imported here: matplotlib costs every import of the package ~0.2 s and only these functions draw
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained").subplots()


def plot_implicit_attention(alpha: Float[Tensor, "t s"], labels: Sequence[str] | None = None, *,
                            ax: Axes | None = None, title: str | None = None,
                            colorbar_label: str = "share of the read α[t, s]") -> Axes:
    """A heatmap of one head's pattern ``[t, s]`` (from ``implicit_attention``, or a softmax pattern to compare),
    reads down and writes across, with token labels and a colour bar centred on 0 (implicit attention can be
    negative: a write that the later transitions turned against the read).

    Args:
        alpha: ``[t, s]`` pattern.
        labels: one label per position (e.g. ``model.to_str_tokens``); ``None`` numbers the positions.
        ax: axes to draw into (``None``: a new figure).
        title: the axes' title.
        colorbar_label: the colour bar's label.

    Returns:
        The axes.

    Example:
        >>> a = tiny_model.implicit_attention(tiny_tokens, 0, heads=0)[0, 0]
        >>> ax = plot_implicit_attention(a, [str(int(t)) for t in tiny_tokens[0]], title="layer 0, head 0")
        >>> ax.get_xlabel(), len(ax.get_yticklabels())
        ('write position s', 8)
    """
    alpha = alpha.detach().float().cpu()
    T = alpha.shape[0]
    labels = [str(i) for i in range(T)] if labels is None else list(labels)
    if len(labels) != T or tuple(alpha.shape) != (T, T):
        raise ValueError(f"alpha, labels: expected a square [t, s] pattern and one label per position, got "
                         f"alpha {tuple(alpha.shape)} and {len(labels)} labels")
    ax = _axes(ax, (1.6 + 0.28 * T, 1.2 + 0.26 * T))
    limit = max(float(alpha.abs().max()), 1e-12)
    image = ax.imshow(alpha.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ticks = [f"{i}: {label}" for i, label in enumerate(labels)]
    ax.set_xticks(range(T), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(T), ticks, fontsize=7)
    ax.set_xlabel("write position s")
    ax.set_ylabel("read position t")
    ax.figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    if title is not None:
        ax.set_title(title)
    return ax


def plot_top_writers(fa: FeatureAttribution, labels: Sequence[str], *, batch: int = 0, position: int = 0,
                     feature: int = 0, k: int = 10, ax: Axes | None = None) -> Axes:
    """A bar chart of the ``k`` writes with the largest terms (by magnitude) in one feature firing, in sequence
    order, plus the initial-state and bias terms, each bar labelled with its position and token and coloured by
    its sign; the title gives the pre-activation they sum to.

    Args:
        fa: a :class:`~recurrent_lens.analysis.FeatureAttribution`.
        labels: one label per position of the sequence ``batch`` (e.g. ``model.to_str_tokens``).
        batch: the sequence.
        position: index into ``fa.positions[batch]`` (not the position itself).
        feature: index into ``fa.features`` (not the feature itself).
        k: how many writes to show.
        ax: axes to draw into (``None``: a new figure).

    Returns:
        The axes.

    Example:
        >>> from recurrent_lens.analysis import feature_attribution
        >>> from recurrent_lens.sae import WriteSAE
        >>> sae = WriteSAE(8, 8, 16, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 0})
        >>> fa = feature_attribution(tiny_model, sae, tiny_tokens, [6], features=[3])
        >>> ax = plot_top_writers(fa, [str(int(t)) for t in tiny_tokens[0]], k=4)
        >>> len(ax.patches), ax.get_ylabel()
        (6, 'term of the pre-activation')
    """
    if len(labels) != fa.writes.shape[-1]:
        raise ValueError(f"labels: expected one per position ({fa.writes.shape[-1]}), got {len(labels)}")
    terms = fa.writes[batch, position, feature].detach().float().cpu()
    t = int(fa.positions[batch, position])
    top = terms[: t + 1].abs().topk(min(k, t + 1)).indices.sort().values.tolist()
    names = [f"{s}: {labels[s]}" for s in top] + ["initial state", "bias"]
    values = [float(terms[s]) for s in top] + [float(fa.initial[batch, position, feature]),
                                               float(fa.bias[batch, position, feature])]
    ax = _axes(ax, (1.5 + 0.45 * len(names), 3.6))
    colours = ["tab:red" if v >= 0 else "tab:blue" for v in values]
    ax.bar(range(len(names)), values, color=colours, edgecolor=["none"] * len(top) + ["black"] * 2)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("write (position: token)")
    ax.set_ylabel("term of the pre-activation")
    pre = float(fa.pre_activation[batch, position, feature])
    ax.set_title(f"feature {int(fa.features[feature])} at {t}: {labels[t]!r}, pre-activation {pre:.3g}")
    return ax


def token_labels(model: Any, tokens: Tensor) -> list[str]:
    """Readable labels for one sequence's tokens: the tokenizer's strings, or the ids without a tokenizer."""
    tokens = torch.as_tensor(tokens).reshape(-1)
    if getattr(model, "tokenizer", None) is None:
        return [str(int(t)) for t in tokens]
    return [repr(s)[1:-1] for s in model.to_str_tokens(tokens)]


__all__ = ["plot_implicit_attention", "plot_top_writers", "token_labels"]
