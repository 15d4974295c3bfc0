"""Tidy result objects returned by the analyses: one row per measurement plus the paper's statistics.

Every result has ``.to_pandas()`` (the per-measurement table), ``.summary()`` (a dict of the reported
statistics) and a readable ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any

import pandas as pd
import torch

from recurrent_lens.analysis._common import bootstrap_ci, wilcoxon_signed_rank, wilson_interval


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


class _Result:
    rows: pd.DataFrame
    title: str = "result"

    def to_pandas(self) -> pd.DataFrame:
        """The per-measurement table (a copy)."""
        return self.rows.copy()

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        lines += [f"  {k}: {_fmt(v)}" for k, v in self.summary().items()]
        return "\n".join(lines + [")"])


@dataclass(repr=False)
class SubstitutionResult(_Result):
    """Single-write substitution: KL of atom / delete / random vs native.

    Attributes:
        rows: one row per firing: ``batch``, ``pos``, ``feature`` (the atom whose firing it is),
            ``atom`` (the substituted atom), ``coefficient``, ``update_norm``, ``atom_cos`` (Frobenius
            cosine of the atom with the replaced update), ``kl_atom``, ``kl_delete``, ``kl_random``,
            ``win`` (atom < delete), ``chain`` (atom < delete < random).
        settings: the options the test ran with (a
            :class:`~recurrent_lens.analysis.protocols.SubstitutionSettings`; any mapping is accepted).
    """

    rows: pd.DataFrame
    settings: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def win_rate(self) -> float:
        return float(self.rows["win"].mean()) if self.n else float("nan")

    @property
    def win_ci(self) -> tuple[float, float]:
        return wilson_interval(int(self.rows["win"].sum()), self.n)

    @property
    def chain_rate(self) -> float:
        return float(self.rows["chain"].mean()) if self.n else float("nan")

    @property
    def medians(self) -> dict[str, float]:
        return {c: float(self.rows[f"kl_{c}"].median()) for c in ("atom", "delete", "random")}

    @property
    def median_ratios(self) -> dict[str, float]:
        """Median KLs relative to the atom's (the paper's ``1 : 2.70 : 4.90``)."""
        m = self.medians
        base = m["atom"] if m["atom"] > 0 else float("nan")
        return {c: v / base for c, v in m.items()}

    @property
    def _unit(self) -> str:
        return "feature" if "feature" in self.rows.columns else "atom"

    def per_atom(self, min_firings: int = 5) -> pd.DataFrame:
        """Per-atom means (atoms with at least ``min_firings`` firings), most frequent first.

        Grouped by the firing feature (the substituted atom unless ``features`` was given with
        ``atom="dominant"`` or ``"rising"``); the paper's population test averages these (App. F.2).
        """
        g = self.rows.groupby(self._unit)
        table = g.agg(n=("win", "size"), win_rate=("win", "mean"), chain_rate=("chain", "mean"),
                      kl_atom=("kl_atom", "mean"), kl_delete=("kl_delete", "mean"), kl_random=("kl_random", "mean"))
        return table[table["n"] >= min_firings].sort_values("n", ascending=False)

    def where_delete_matters(self, min_kl_delete: float = 0.1) -> "SubstitutionResult":
        """The firings whose deletion moves the readout by more than ``min_kl_delete`` nats.

        A conditional view, not the paper's statistic: where the next-token distribution barely depends
        on the update (deletion KL near 0), atom vs delete compares two numbers near rounding noise.
        """
        rows = self.rows[self.rows["kl_delete"] > min_kl_delete].reset_index(drop=True)
        if is_dataclass(self.settings):
            settings = replace(self.settings, min_kl_delete=min_kl_delete)
        else:
            settings = {**self.settings, "min_kl_delete": min_kl_delete}
        return SubstitutionResult(rows, settings, self.seconds)

    def atom_bootstrap_ci(self, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
        """95% interval of the win rate under a bootstrap that resamples whole features (the paper's
        "cluster-bootstrap by feature")."""
        groups = [torch.tensor(v.to_numpy(), dtype=torch.float64) for _, v in self.rows.groupby(self._unit)["win"]]
        return bootstrap_ci(groups, lambda x: float(x.mean()), n_boot, seed)

    def summary(self) -> dict[str, Any]:
        m, r = self.medians, self.median_ratios
        per_atom = self.per_atom()
        return {
            "protocol": self.settings.get("protocol", "ours"),
            "n": self.n,
            "atoms": int(self.rows["atom"].nunique()) if self.n else 0,
            "atom_beats_delete": self.win_rate,
            "wilson_95": self.win_ci,
            "strict_chain": self.chain_rate,
            "median_kl_atom": m["atom"],
            "median_kl_delete": m["delete"],
            "median_kl_random": m["random"],
            "median_atom_cos": float(self.rows["atom_cos"].median()) if self.n else float("nan"),
            "ratio_atom_delete_random": (1.0, r["delete"], r["random"]),
            "per_atom_mean_win (>=5 firings)": float(per_atom["win_rate"].mean()) if len(per_atom) else float("nan"),
            "settings": self.settings,
        }

    def report(self, min_kl_delete: float | None = 0.1) -> str:
        """A short human-readable table, with the line ``atom beats delete: XX.X% (n=N)``, plus the same
        rate over the firings whose deletion changes the readout by more than ``min_kl_delete`` nats."""
        lo, hi = self.win_ci
        m = self.medians
        r = self.median_ratios
        lines = [
            f"atom beats delete: {100 * self.win_rate:.1f}% (n={self.n})",
            f"  Wilson 95% CI:      [{100 * lo:.1f}, {100 * hi:.1f}]",
            f"  strict chain:       {100 * self.chain_rate:.1f}% (atom < delete < random)",
            f"  median KL           atom {m['atom']:.4g} | delete {m['delete']:.4g} | random {m['random']:.4g}",
            f"  ratio               1 : {r['delete']:.2f} : {r['random']:.2f}",
            f"  median cos(atom, update) {self.rows['atom_cos'].median():.3f}",
            f"  atoms               {self.rows['atom'].nunique()} ({len(self.per_atom())} with >= 5 firings)",
        ]
        if min_kl_delete is not None and self.n:
            sub = self.where_delete_matters(min_kl_delete)
            if sub.n:
                slo, shi = sub.win_ci
                lines.append(f"  where KL_delete > {min_kl_delete:g}: atom beats delete {100 * sub.win_rate:.1f}% "
                             f"[{100 * slo:.1f}, {100 * shi:.1f}] (n={sub.n}), strict chain {100 * sub.chain_rate:.1f}%")
            else:
                lines.append(f"  where KL_delete > {min_kl_delete:g}: no firing")
        return "\n".join(lines)


_FITS = ("none", "cell", "context")


@dataclass(repr=False)
class LogitShiftResult(_Result):
    """Closed-form logit shift vs measurement (the paper's Eq. 1 and App. A).

    Attributes:
        rows: one row per (atom, eps, firing): ``atom``, ``eps``, ``batch``, ``pos``, ``token``,
            ``predicted``, ``measured``.
        settings: the options (a :class:`~recurrent_lens.analysis.protocols.LogitShiftSettings`);
            ``settings["fit"]`` picks what :meth:`per_cell` and the summary's ``median_cell_r2`` use.
    """

    rows: pd.DataFrame
    settings: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def _r2(measured, predicted) -> float:
        ss_tot = float(((measured - measured.mean()) ** 2).sum())
        return 1.0 - float(((measured - predicted) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")

    @property
    def r2_zero_param(self) -> float:
        """Pooled ``1 − SS_res/SS_tot`` with the closed form as is (no fitted parameter)."""
        return self._r2(self.rows["measured"], self.rows["predicted"])

    @property
    def fit_scale(self) -> float:
        """Least-squares slope of measured on predicted through the origin."""
        p, m = self.rows["predicted"], self.rows["measured"]
        return float((p * m).sum() / (p * p).sum()) if float((p * p).sum()) > 0 else float("nan")

    @property
    def r2_one_param(self) -> float:
        """Pooled R² after the through-origin fit of one global scale."""
        return self._r2(self.rows["measured"], self.fit_scale * self.rows["predicted"])

    def _fit(self, fit: str | None) -> str:
        fit = self.settings.get("fit", "none") if fit is None else fit
        if fit not in _FITS:
            raise ValueError(f"fit: expected one of {_FITS}, got {fit!r}")
        return fit

    def fitted(self, fit: str | None = None) -> pd.Series:
        """The predictions after a least-squares slope through the origin per group: ``"none"`` (no
        fit), ``"cell"`` (per (atom, eps)) or ``"context"`` (per (atom, batch, pos), across the eps
        values: the paper's per-(prompt, feature, eval-token) G). ``None``: ``settings["fit"]``."""
        fit = self._fit(fit)
        r = self.rows
        if fit == "none":
            return r["predicted"].copy()
        keys = ["atom", "eps"] if fit == "cell" else ["atom", "batch", "pos"]
        pm = (r["predicted"] * r["measured"]).groupby([r[k] for k in keys]).transform("sum")
        pp = (r["predicted"] ** 2).groupby([r[k] for k in keys]).transform("sum")
        slope = (pm / pp.where(pp > 0)).fillna(0.0)
        return slope * r["predicted"]

    def per_cell(self, fit: str | None = None) -> pd.DataFrame:
        """R² per (atom, eps) cell of the measured shifts against :meth:`fitted` predictions."""
        pred = self.fitted(fit)
        rows = []
        for (atom, eps), g in self.rows.groupby(["atom", "eps"]):
            rows.append({"atom": atom, "eps": eps, "n": len(g), "r2": self._r2(g["measured"], pred[g.index])})
        return pd.DataFrame(rows, columns=["atom", "eps", "n", "r2"])

    def median_cell_r2(self, fit: str | None = None) -> float:
        """Median of :meth:`per_cell`'s R² (the paper's 0.983 is this with ``fit="context"``)."""
        cells = self.per_cell(fit)
        return float(cells["r2"].median()) if len(cells) else float("nan")

    def summary(self) -> dict[str, Any]:
        cells = self.per_cell()
        q = cells["r2"].quantile([0.25, 0.75]) if len(cells) else None
        return {
            "protocol": self.settings.get("protocol", "ours"),
            "n": len(self.rows),
            "cells": len(cells),
            "fit": self._fit(None),
            "median_cell_r2": float(cells["r2"].median()) if len(cells) else float("nan"),
            "cell_r2_iqr": (float(q.iloc[0]), float(q.iloc[1])) if q is not None else (float("nan"),) * 2,
            "median_cell_r2_by_fit": {f: self.median_cell_r2(f) for f in _FITS},
            "r2_zero_param": self.r2_zero_param,
            "r2_one_param": self.r2_one_param,
            "fit_scale": self.fit_scale,
            "settings": self.settings,
        }


@dataclass(repr=False)
class InterventionResult(_Result):
    """A cache intervention (erase or install) and its effect on one target token.

    Attributes:
        rows: one row per edited position: ``condition``, ``batch``, ``pos``, ``delta_logprob``,
            ``delta_logit``.
        target: the token id whose log-probability is tracked.
        settings: the options (an :class:`~recurrent_lens.analysis.protocols.EraseSettings` or
            :class:`~recurrent_lens.analysis.protocols.InstallSettings`).
    """

    rows: pd.DataFrame
    target: int = -1
    settings: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target}
        for cond, g in self.rows.groupby("condition", sort=False):
            d = torch.tensor(g["delta_logprob"].to_numpy())
            out[cond] = {"n": len(g), "median_delta_logprob": float(d.median()),
                         "frac_logit_up": float((torch.tensor(g["delta_logit"].to_numpy()) > 0).double().mean()),
                         "wilcoxon_p": wilcoxon_signed_rank(d)}
        out["settings"] = self.settings
        return out


@dataclass(repr=False)
class InstallResult(_Result):
    """Install during generation (the paper's §4 "Generation edit", App. I.6): native vs installed
    continuations.

    Attributes:
        rows: one row per prompt: ``target``, ``native_included``, ``installed_included``,
            ``native_first_logprob``, ``installed_first_logprob``, ``native_rank``, ``installed_rank``
            (rank of the target at the first step after the first install: the number of tokens with a
            higher probability, 0 = top-1), and the generated ``native`` / ``installed`` token lists.
        target: the token id, or ``-1`` when prompts have their own targets (the ``target`` column).
        settings: the options (a :class:`~recurrent_lens.analysis.protocols.GenerationInstallSettings`).
    """

    rows: pd.DataFrame
    target: int = -1
    settings: Mapping[str, Any] = field(default_factory=dict)

    def inclusion_ci(self, column: str = "installed_included") -> tuple[float, float]:
        """Wilson 95% interval of an inclusion rate (``"installed_included"`` or ``"native_included"``)."""
        return wilson_interval(int(self.rows[column].sum()), len(self.rows))

    def summary(self) -> dict[str, Any]:
        r = self.rows
        return {
            "protocol": self.settings.get("protocol", "ours"),
            "target": self.target,
            "n": len(r),
            "native_inclusion": float(r["native_included"].mean()),
            "installed_inclusion": float(r["installed_included"].mean()),
            "first_step_logprob_lift": float((r["installed_first_logprob"] - r["native_first_logprob"]).mean()),
            "rank_improved": float((r["installed_rank"] < r["native_rank"]).mean()),
            "median_rank_shift": float((r["native_rank"] - r["installed_rank"]).median()),
            "settings": self.settings,
        }


@dataclass(repr=False)
class PartitionResult(_Result):
    """Register/bundle partition (the paper's §3.1).

    Attributes:
        rows: one row per alive atom: ``atom``, ``n`` (firings), ``median_cos`` (median Frobenius cosine
            with the native update over its firings), ``score`` (the statistic the mixture is fitted
            on: ``median_cos``, or with ``statistic="mean_abs_cos_top50"`` the geometric mean of
            ``mean_abs_key_cos`` and ``mean_abs_value_cos``, also listed), ``label``.
        gmm: the fitted mixtures: ``{"one": (mu, sigma), "two": ((w1, mu1, s1), (w2, mu2, s2))}``.
        delta_bic: ``BIC₂ − BIC₁`` (negative: two components are preferred).
        settings: the options (a :class:`~recurrent_lens.analysis.protocols.PartitionSettings`).
    """

    rows: pd.DataFrame
    gmm: dict[str, Any] = field(default_factory=dict)
    delta_bic: float = float("nan")
    n_dead: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        r = self.rows
        reg = r["label"] == "register"
        score = r["score"] if "score" in r.columns else r["median_cos"]
        return {
            "protocol": self.settings.get("protocol", "ours"),
            "alive": len(r),
            "dead": self.n_dead,
            "registers": int(reg.sum()),
            "bundles": int((r["label"] == "bundle").sum()),
            "delta_bic": self.delta_bic,
            "register_median_cos": float(r.loc[reg, "median_cos"].median()) if len(r) else float("nan"),
            "register_median_score": float(score[reg].median()) if len(r) else float("nan"),
            "gmm": self.gmm,
            "settings": self.settings,
        }
