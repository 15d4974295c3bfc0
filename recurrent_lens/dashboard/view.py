"""What :func:`~recurrent_lens.dashboard.build_dashboard` returns: per-feature records and the :class:`Dashboard`."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from recurrent_lens.dashboard.render import feature_fragment, write_site


@dataclass
class Example:
    """One firing of a feature and the tokens around it.

    ``tokens``, ``token_ids`` and ``token_activations`` (the feature's code at each token; ``None`` where the
    pass did not compute it, with a ``stride``) cover ``position ± context`` clipped to the sequence, and
    ``tokens[fire_index]`` is the token at ``position``. ``sequence`` indexes the data in the order given.
    ``writers`` (top examples only, where attribution applies; see
    :func:`~recurrent_lens.dashboard.build_dashboard`): ``{"top": [{"position", "token", "contribution"}, ...],
    "other_writes", "initial", "bias", "pre_activation"}``, ``top`` sorted by ``|contribution|``, the terms
    summing to ``pre_activation``. :meth:`to_dict` writes every field but a ``writers`` of ``None``.
    """

    sequence: int
    position: int
    activation: float
    tokens: list[str]
    token_ids: list[int]
    token_activations: list[float | None]
    fire_index: int
    writers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["writers"] is None:
            del d["writers"]
        return d


@dataclass
class FeatureData:
    """Everything one feature's view shows (see :func:`~recurrent_lens.dashboard.build_dashboard`).

    Token lists are ``(token, value)`` pairs: cosines for ``key_tokens``/``query_tokens``, direct logit
    effects per unit of ``w`` for ``promoted_tokens``/``suppressed_tokens``.
    """

    feature: int
    density: float
    n_firings: int
    max_activation: float
    mean_activation: float
    histogram: dict[str, list[float]]
    top_examples: list[Example]
    quantile_samples: list[dict[str, Any]]
    key_tokens: list[tuple[str, float]] = field(default_factory=list)
    query_tokens: list[tuple[str, float]] = field(default_factory=list)
    promoted_tokens: list[tuple[str, float]] = field(default_factory=list)
    suppressed_tokens: list[tuple[str, float]] = field(default_factory=list)
    rank1_share: float = 1.0
    substitution: dict[str, float] | None = None

    def top_tokens(self, n: int = 5) -> list[str]:
        """The most frequent firing tokens among the top examples."""
        counts = collections.Counter(e.tokens[e.fire_index] for e in self.top_examples)
        return [t for t, _ in counts.most_common(n)]

    def summary(self) -> dict[str, Any]:
        """The feature's row of the index table (``features.json``)."""
        return {"feature": self.feature, "density": self.density, "n_firings": self.n_firings,
                "max_activation": self.max_activation, "mean_activation": self.mean_activation,
                "top_tokens": self.top_tokens(), "promoted": [t for t, _ in self.promoted_tokens[:3]],
                "win_rate": None if self.substitution is None else self.substitution["win_rate"]}

    def to_dict(self) -> dict[str, Any]:
        """The feature's full record (``feature_{i}.json``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["top_examples"] = [e.to_dict() for e in self.top_examples]
        d["quantile_samples"] = [{**band, "examples": [e.to_dict() for e in band["examples"]]}
                                 for band in self.quantile_samples]
        for name in ("key_tokens", "query_tokens", "promoted_tokens", "suppressed_tokens"):
            d[name] = [[t, v] for t, v in d[name]]
        return d


class Dashboard:
    """Feature dashboards of one SAE: index it by feature (``dash[5]``), show a view inline (:meth:`show`), get
    the table (:meth:`to_frame`) or write the static site (:meth:`save`).

    Example:
        >>> from recurrent_lens.dashboard import build_dashboard
        >>> dash = build_dashboard(toy_model, toy_sae, toy_task.make_batch(8, seed=1)[0], features=[3, 7],
        ...                        n_examples=3, progress=False)
        >>> list(dash.to_frame().index), dash.features
        ([3, 7], [3, 7])
        >>> dash[4]
        Traceback (most recent call last):
        ...
        KeyError: 'feature: expected one of the 2 collected features [3, 7], got 4'
    """

    def __init__(self, records: Sequence[FeatureData], meta: dict[str, Any]) -> None:
        self.records = records
        self.meta = meta
        # build_dashboard's records know their features without being built; a plain list is asked
        self._features = list(getattr(records, "features", None) or [f.feature for f in records])
        self._slot = {f: j for j, f in enumerate(self._features)}

    @property
    def features(self) -> list[int]:
        """The collected feature indices, in collection order."""
        return list(self._features)

    @property
    def n_positions(self) -> int:
        """Positions whose codes were computed (the denominator of every density)."""
        return self.meta["n_positions"]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> FeatureData:
        try:
            return self.records[self._slot[int(i)]]
        except (KeyError, TypeError, ValueError):
            shown = self.features if len(self) <= 10 else f"{self.features[:10]}..."
            raise KeyError(f"feature: expected one of the {len(self)} collected features {shown}, got {i!r}") from None

    def to_frame(self) -> pd.DataFrame:
        """One row per feature, indexed by feature: density, firings, max/mean activation, top tokens, the
        most promoted tokens, the substitution win rate (``NaN`` without one)."""
        rows = [f.summary() for f in self.records]
        frame = pd.DataFrame(rows, columns=["feature", "density", "n_firings", "max_activation", "mean_activation",
                                            "top_tokens", "promoted", "win_rate"])
        return frame.astype({"win_rate": float}).set_index("feature")

    def html(self, i: int) -> str:
        """The view of feature ``i`` as an HTML fragment with its own styles (what :meth:`show` displays)."""
        return feature_fragment(self[i], self.meta)

    def show(self, i: int):
        """Display the view of feature ``i`` inline in a notebook (an ``IPython.display.HTML``)."""
        from IPython.display import HTML

        return HTML(self.html(i))

    def save(self, out_dir: str | os.PathLike) -> str:
        """Write the static site to ``out_dir`` (replacing a dashboard already there); returns the path of its
        ``index.html``. See :func:`recurrent_lens.dashboard.render.write_site`."""
        return write_site(self, out_dir)

    def __repr__(self) -> str:
        m = self.meta
        return (f"Dashboard({len(self)} features of {m['sae_kind']} at {m['hook_name']} head {m['head']}, "
                f"{m['n_sequences']} sequences x {m['context_length']} positions)")
