"""The paper's table on any model and SAE: substitution, population test, closed-form logit shift, install
dose-response and partition, under one protocol, each row beside the paper's number.

The paper's numbers are Qwen3.5-0.8B's (arXiv 2605.12770; layer 9 head 4 unless a row says otherwise).
:func:`reproduce` runs every analysis with ``protocol=...`` and returns a :class:`Reproduction`;
``recurrent-lens reproduce`` prints it, writes its CSV and plots it.

The example uses ``toy_model, toy_task = toy.load("gdn")`` and ``toy_sae = toy.load_sae("gdn")`` (the trained toy
Gated DeltaNet, its task and its demo WriteSAE).

Example:
    >>> from dataclasses import replace
    >>> from recurrent_lens.analysis import presets
    >>> from recurrent_lens.analysis.reproduce import reproduce
    >>> tokens = toy_task.make_batch(8, seed=10_000)[0]
    >>> quick = replace(presets("logit_shift")["paper"], n_atoms=2, positions_per_atom=20)
    >>> rep = reproduce(toy_model, toy_sae, "blocks.1.mixer.hook_state", 0, tokens, tokens[:, :18], protocol="paper",
    ...                 band=(17, 33), magnitudes=(3.0,), logit_shift=quick, population_atoms=4)
    >>> rep.table["claim"].tolist()[:2]
    ['substitution: atom beats delete', 'substitution: strict chain']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.analysis._common import bootstrap_ci, native_run, use_device, wilson_interval
from recurrent_lens.analysis.interventions import install_during_generation, targets_by_rank
from recurrent_lens.analysis.logit_shift import logit_shift_prediction
from recurrent_lens.analysis.partition import partition_atoms
from recurrent_lens.analysis.protocols import LogitShiftOptions, SubstitutionOptions, check_options, check_protocol
from recurrent_lens.analysis.substitution import substitution_test
from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.states.cells import parse_cell

PAPER_BAND = (100, 1000)
"""The paper's headline install class: targets ranked 100–1000 by the unmodified model (§4, App. I.6)."""

PAPER: dict[str, dict[str, Any]] = {
    "substitution: atom beats delete": dict(
        value=0.924, ci=(0.916, 0.931), n="4,851",
        note="L1/L9/L17 H4 pooled, the 8-feature exemplar pool (§3.2, Table 2, App. F.2); L9 alone 91.2% "
             "(n=1,851)"),
    "substitution: strict chain": dict(value=0.895, ci=None, n="4,851", note="atom < delete < random (§3.2)"),
    "substitution: median KL delete / atom": dict(value=2.70, ci=None, n="4,851",
                                                  note="ratio of per-column medians (Table 2)"),
    "substitution: median KL random / atom": dict(value=4.90, ci=None, n="4,851", note="Table 2"),
    "population: mean per-atom win rate": dict(
        value=0.898, ci=(0.881, 0.913), n="87 atoms, 2,426 firings",
        note="atoms with >= 5 of at most 30 firings each (App. F.2)"),
    "logit shift: median cell R^2": dict(
        value=0.983, ci=(0.977, 0.990), n="200 cells x 500", note="IQR; G fitted per context (App. A)"),
    "install: native inclusion": dict(value=0.333, ci=None, n="300", note="targets ranked 100-1000 (App. I.6)"),
    "install m=1.5: installed inclusion": dict(value=0.667, ci=None, n="300", note="ranks 100-1000 (§4)"),
    "install m=3: installed inclusion": dict(value=1.0, ci=None, n="300",
                                             note="ranks 100-1000 (Table 21); pooled over 4 classes 25.0% vs 8.3%"),
    "install m=6: installed inclusion": dict(value=float("nan"), ci=None, n="—",
                                             note="not reported for ranks 100-1000; pooled 16.7% (n=1,200)"),
    "partition: registers": dict(value=222, ci=None, n="316 alive", note="94 bundles, 1,732 dead (§3.1)"),
    "partition: delta BIC": dict(value=-296.0, ci=None, n="316 alive", note="L1 -6,774; L17 -390 (§3.1, §3.2)"),
    "partition: register median cos": dict(value=0.262, ci=None, n="222", note="Table 11"),
}
"""The paper's number for each claim: ``value``, ``ci`` (95% interval, or the IQR for R²), ``n`` and a note."""


def default_band(d_vocab: int) -> tuple[int, int]:
    """The install band: the paper's ``(100, 1000)`` when the vocabulary has more than 1,000 tokens, else
    the lower half of the ranks, ``(d_vocab // 2, d_vocab - 1)`` (ranks count the tokens above, 0 = top-1).

    Example:
        >>> default_band(248_320), default_band(34)
        ((100, 1000), (17, 33))
    """
    return PAPER_BAND if d_vocab > PAPER_BAND[1] else (d_vocab // 2, d_vocab - 1)


@dataclass(repr=False)
class Reproduction:
    """What :func:`reproduce` returns.

    Attributes:
        table: one row per claim: ``protocol``, ``claim``, ``value``, ``ci_low``, ``ci_high``, ``ci_kind``,
            ``n``, ``detail``, ``paper_value``, ``paper_ci``, ``paper_n``, ``paper_note``.
        results: the underlying analysis results by name (``substitution``, ``population``,
            ``logit_shift``, ``install`` (one per magnitude), ``partition``); a stage that raised holds its
            error message instead, and its rows say so.
    """

    table: pd.DataFrame
    results: dict[str, Any] = field(default_factory=dict)
    protocol: str = "ours"

    def to_pandas(self) -> pd.DataFrame:
        return self.table.copy()

    def report(self) -> str:
        """One line per claim: this run's number (95% CI or IQR, n) beside the paper's, and under it the
        run's details (medians, fits, install settings) when they change."""
        lines = [f"{'claim':<40} {'this run (' + self.protocol + ')':<40} paper"]
        shown = ""
        for r in self.table.itertuples():
            lines.append(f"{r.claim:<40} {_fmt_run(r):<40} {_fmt_paper(r)}")
            if r.detail and r.detail != shown:
                lines.append(f"    {r.detail}")
                shown = r.detail
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Reproduction(protocol={self.protocol!r})\n{self.report()}"


def _pct_like(claim: str) -> bool:
    return any(w in claim for w in ("beats", "chain", "win rate", "inclusion"))


def _num(claim: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if _pct_like(claim):
        return f"{100 * v:.1f}%"
    if "registers" in claim:
        return f"{int(v)}"
    if "KL" in claim:
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.3g}"
    return f"{v:.3g}"


def _fmt_run(r) -> str:
    text = _num(r.claim, r.value)
    if not math.isnan(r.ci_low):
        text += f" [{_num(r.claim, r.ci_low).rstrip('%')}, {_num(r.claim, r.ci_high)}]"
    return f"{text} (n={r.n})"


def _fmt_paper(r) -> str:
    text = _num(r.claim, r.paper_value)
    if isinstance(r.paper_ci, tuple):
        text += f" [{_num(r.claim, r.paper_ci[0]).rstrip('%')}, {_num(r.claim, r.paper_ci[1])}]"
    return f"{text} (n={r.paper_n}; {r.paper_note})"


def _row(protocol: str, claim: str, value: float | int, n: Any, detail: str = "", ci: tuple[float, float] | None = None,
         ci_kind: str = "") -> dict[str, Any]:
    p = PAPER.get(claim, dict(value=float("nan"), ci=None, n="—", note="not reported"))
    lo, hi = ci if ci is not None else (float("nan"), float("nan"))
    return dict(protocol=protocol, claim=claim, value=float(value), ci_low=float(lo), ci_high=float(hi),
                ci_kind=ci_kind if ci is not None else "", n=n, detail=detail, paper_value=p["value"],
                paper_ci=p["ci"], paper_n=p["n"], paper_note=p["note"])


def _failed(protocol: str, claims: Sequence[str], error: Exception) -> list[dict[str, Any]]:
    return [_row(protocol, c, float("nan"), 0, f"failed: {error}") for c in claims]


_SUBSTITUTION = ["substitution: atom beats delete", "substitution: strict chain",
                 "substitution: median KL delete / atom", "substitution: median KL random / atom"]
_PARTITION = ["partition: registers", "partition: delta BIC", "partition: register median cos"]


def _population_features(sae: SAELike, tokens: Tensor, model: ModelLike, hook_name: str, head: int,
                         skip_positions: int, n: int) -> list[int]:
    """The ``n`` atoms that fire most often on ``tokens`` (ties: lower index first)."""
    with torch.no_grad():
        codes = sae.encode(native_run(model, tokens, parse_cell(model, hook_name, head, kinds=("state",)))["state"])
        counts = (codes[:, skip_positions:] != 0).flatten(0, 1).sum(0)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[counts[order] > 0][:n].tolist()


def reproduce(model: ModelLike, sae: SAELike, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"],
              prompts: Int[Tensor, "prompts prompt_pos"], *, protocol: str = "paper",
              band: tuple[int, int] | None = None, magnitudes: Sequence[float] = (1.5, 3.0, 6.0),
              install_positions: Sequence[int] | None = None, substitution: SubstitutionOptions | None = None,
              substitution_positions: Sequence[int] | None = None, logit_shift: LogitShiftOptions | None = None,
              population_atoms: int = 155, skip_positions: int = 1, seed: int = 0, progress: bool = False,
              device: str | torch.device | None = None) -> Reproduction:
    """Run the paper's table under ``protocol`` on ``tokens`` (and ``prompts`` for the installs).

    Stages (each with ``protocol=protocol``, or the options given in its place):

    1. :func:`substitution_test` on ``tokens``: atom beats delete (Wilson CI), strict chain, KL ratios.
    2. the population test: the same with ``atom="feature"`` on the ``population_atoms`` atoms that fire
       most often (155 is App. F.2's pool size; its stratification by cosine class is not reproduced),
       averaged per atom with >= 5 firings (bootstrap CI over atoms).
    3. :func:`logit_shift_prediction`: median per-cell R² (IQR) under the protocol's fit (seed
       ``2026 + seed``).
    4. per magnitude, :func:`install_during_generation` on ``prompts`` with one target per prompt drawn by
       :func:`targets_by_rank` in ``band`` (default :func:`default_band`) at ``install_positions``
       (default: the last three prompt positions): native and installed target inclusion (Wilson CI).
    5. :func:`partition_atoms` on ``tokens``: registers, ΔBIC, register median cosine.

    A stage that raises ``ValueError`` (e.g. an SAE that never fires) gives rows with value NaN and the
    error in ``detail``; nothing is dropped silently.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: the SAE of ``hook_name``/``head``.
        hook_name: ``blocks.{l}.mixer.hook_state``.
        head: the head.
        tokens: ``[batch, pos]`` evaluation sequences.
        prompts: ``[n, P]`` install prompts.
        protocol: ``"paper"`` (default) or ``"ours"``.
        band: inclusive native-rank band of the install targets (ranks count the tokens above, 0 = top-1).
        magnitudes: install magnitudes ``m`` (the paper's 1.5, 3, 6).
        install_positions: absolute install positions (default ``[P - 3, P - 2, P - 1]``).
        substitution: the options of both substitution runs in place of the protocol's preset, e.g.
            ``replace(presets("substitution")[protocol], readout_offset=16)``; ``None``: the preset. Their
            ``skip_positions`` and ``seed`` are this function's, and the population test's ``atom`` is
            ``"feature"``.
        substitution_positions: the write positions both substitution runs test (their ``positions``, e.g. a
            task's value positions); ``None``: every position.
        logit_shift: the options of :func:`logit_shift_prediction` in place of the protocol's preset (its
            ``skip_positions`` and ``seed`` are this function's); ``None``: the preset.
        population_atoms: how many atoms the population test covers.
        skip_positions: leading positions no analysis edits (e.g. BOS).
        seed: seeds every draw.
        progress: show a progress bar over the stages.
        device: where every stage runs: ``model`` and ``sae`` are moved there (default: the model's device);
            tensors stay there until each result's table is built. An unknown or unavailable device raises
            ``ValueError`` naming ``device``.
    """
    check_protocol(protocol)
    check_options("substitution", substitution, SubstitutionOptions)
    check_options("logit_shift", logit_shift, LogitShiftOptions)
    use_device(model, sae, device)
    band = default_band(model.cfg.d_vocab) if band is None else tuple(band)
    P = prompts.shape[1]
    install_positions = list(install_positions) if install_positions is not None else [max(P - 3, 0), max(P - 2, 0),
                                                                                         P - 1]
    install_positions = sorted(set(install_positions))
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"band": band, "install_positions": install_positions}
    stages = tqdm(total=5, disable=not progress, desc=f"reproduce ({protocol})")

    stages.set_postfix_str("substitution")
    try:
        res = substitution_test(model, sae, hook_name, head, tokens, protocol=protocol, options=substitution,
                                positions=substitution_positions, skip_positions=skip_positions, seed=seed)
        results["substitution"] = res
        m, r = res.medians, res.median_ratios
        moved = int((res.rows["kl_delete"] > 0.1).sum())
        detail = (f"median KL atom {m['atom']:.3g} / delete {m['delete']:.3g} / random {m['random']:.3g}; "
                  f"deletion moves the readout by > 0.1 nats at {moved} of {res.n} firings")
        chain_ci = wilson_interval(int(res.rows["chain"].sum()), res.n)
        rows += [_row(protocol, _SUBSTITUTION[0], res.win_rate, res.n, detail, res.win_ci, "wilson95"),
                 _row(protocol, _SUBSTITUTION[1], res.chain_rate, res.n, "", chain_ci, "wilson95"),
                 _row(protocol, _SUBSTITUTION[2], r["delete"], res.n, detail),
                 _row(protocol, _SUBSTITUTION[3], r["random"], res.n, detail)]
    except ValueError as e:
        results["substitution"] = str(e)
        rows += _failed(protocol, _SUBSTITUTION, e)
    stages.update()

    stages.set_postfix_str("population")
    claim = "population: mean per-atom win rate"
    try:
        feats = _population_features(sae, tokens, model, hook_name, head, skip_positions, population_atoms)
        if not feats:
            raise ValueError("sae: no atom fires on tokens")
        res = substitution_test(model, sae, hook_name, head, tokens, protocol=protocol, options=substitution,
                                positions=substitution_positions, skip_positions=skip_positions, seed=seed,
                                atom="feature", features=feats)
        results["population"] = res
        per = res.per_atom(5)
        rates = [torch.tensor([float(v)], dtype=torch.float64) for v in per["win_rate"]]
        ci = bootstrap_ci(rates, lambda x: float(x.mean()), seed=seed) if rates else None
        value = float(per["win_rate"].mean()) if len(per) else float("nan")
        rows.append(_row(protocol, claim, value, f"{len(per)} atoms, {int(per['n'].sum())} firings",
                         f"atom='feature' on the {len(feats)} most often firing atoms; firing-level "
                         f"{100 * res.win_rate:.1f}% (n={res.n})", ci, "bootstrap95"))
    except ValueError as e:
        results["population"] = str(e)
        rows += _failed(protocol, [claim], e)
    stages.update()

    stages.set_postfix_str("logit shift")
    claim = "logit shift: median cell R^2"
    try:
        res = logit_shift_prediction(model, sae, hook_name, head, tokens, protocol=protocol, options=logit_shift,
                                     skip_positions=skip_positions, seed=2026 + seed)
        results["logit_shift"] = res
        s = res.summary()
        fits = ", ".join(f"{k} {v:.3g}" for k, v in s["median_cell_r2_by_fit"].items())
        rows.append(_row(protocol, claim, s["median_cell_r2"], f"{s['cells']} cells x "
                         f"{res.settings['positions_per_atom']}", f"fit {s['fit']}; by fit: {fits}",
                         s["cell_r2_iqr"], "IQR"))
    except ValueError as e:
        results["logit_shift"] = str(e)
        rows += _failed(protocol, [claim], e)
    stages.update()

    stages.set_postfix_str("install")
    claims = ["install: native inclusion"] + [f"install m={m:g}: installed inclusion" for m in magnitudes]
    try:
        targets = targets_by_rank(model, prompts, band, seed=seed)[:, 0]
        installs = {}
        for m in magnitudes:
            installs[float(m)] = install_during_generation(model, hook_name, head, prompts, positions=install_positions,
                                                           protocol=protocol, magnitude=float(m), target=targets)
        results["install"] = installs
        first = next(iter(installs.values()))
        where = f"band {band}, positions {install_positions}"
        rows.append(_row(protocol, claims[0], first.summary()["native_inclusion"], len(first.rows), where,
                         first.inclusion_ci("native_included"), "wilson95"))
        for m, c in zip(magnitudes, claims[1:]):
            res = installs[float(m)]
            s = res.summary()
            rows.append(_row(protocol, c, s["installed_inclusion"], len(res.rows),
                             f"{where}; first-step log p lift {s['first_step_logprob_lift']:+.3g}, rank improved "
                             f"{100 * s['rank_improved']:.0f}%", res.inclusion_ci(), "wilson95"))
    except ValueError as e:
        results["install"] = str(e)
        rows += _failed(protocol, claims, e)
    stages.update()

    stages.set_postfix_str("partition")
    try:
        res = partition_atoms(model, sae, hook_name, head, tokens, protocol=protocol, skip_positions=skip_positions,
                              seed=seed)
        results["partition"] = res
        s = res.summary()
        alive = f"{s['alive']} alive"
        detail = f"{s['bundles']} bundles, {s['dead']} dead"
        rows += [_row(protocol, _PARTITION[0], s["registers"], alive, detail),
                 _row(protocol, _PARTITION[1], s["delta_bic"], alive, detail),
                 _row(protocol, _PARTITION[2], s["register_median_cos"], s["registers"], detail)]
    except ValueError as e:
        results["partition"] = str(e)
        rows += _failed(protocol, _PARTITION, e)
    stages.update()
    stages.close()
    return Reproduction(pd.DataFrame(rows), results, protocol)


def plot(rep: Reproduction, path: str) -> str:
    """Save a 2 x 2 figure of ``rep`` (substitution KLs, cell R², install dose-response, partition scores)."""
    # matplotlib costs every import of the package ~0.2 s and only this function draws; its own Figure,
    # not pyplot, so the caller's backend (a notebook's) is left as it was
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5))
    ax = fig.subplots(2, 2)
    res = rep.results.get("substitution")
    a = ax[0, 0]
    if hasattr(res, "rows"):
        floor = 1e-9
        x, y = res.rows["kl_delete"].clip(lower=floor), res.rows["kl_atom"].clip(lower=floor)
        a.scatter(x, y, s=6, alpha=0.5, c=np.where(res.rows["win"], "tab:blue", "tab:red"))
        lim = [floor, max(float(x.max()), float(y.max()), 1e-8)]
        a.plot(lim, lim, "k--", lw=0.8)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_title(f"substitution: atom beats delete {100 * res.win_rate:.1f}% (n={res.n}); paper 92.4%")
    a.set_xlabel("KL delete")
    a.set_ylabel("KL atom")
    res = rep.results.get("logit_shift")
    a = ax[0, 1]
    if hasattr(res, "rows"):
        for fit, colour in (("cell", "tab:grey"), ("context", "tab:blue")):
            r2 = res.per_cell(fit)["r2"].clip(lower=-1)
            a.hist(r2, bins=np.linspace(-1, 1, 41), alpha=0.5, color=colour, label=f"fit {fit}")
        a.axvline(0.983, color="k", ls="--", lw=0.8, label="paper 0.983")
        a.legend()
        a.set_title(f"logit shift: median cell R² {res.summary()['median_cell_r2']:.3g} (fit {res.summary()['fit']})")
    a.set_xlabel("R² per (atom, eps) cell (clipped at -1)")
    installs = rep.results.get("install")
    a = ax[1, 0]
    if isinstance(installs, dict) and installs:
        ms = sorted(installs)
        a.plot(ms, [installs[m].summary()["installed_inclusion"] for m in ms], "o-", label="installed")
        a.plot(ms, [installs[m].summary()["native_inclusion"] for m in ms], "o--", color="tab:grey", label="native")
        a.plot([1.5, 3.0], [0.667, 1.0], "k*", ms=10, label="paper, ranks 100-1000")
        a.axhline(0.333, color="k", ls=":", lw=0.8, label="paper native 33.3%")
        a.set_xscale("log")
        a.set_xticks(ms, [f"{m:g}" for m in ms])
        a.minorticks_off()
        a.set_ylim(-0.02, 1.02)
        a.legend()
        a.set_title(f"install: target in continuation (band {rep.results['band']})")
    a.set_xlabel("magnitude m")
    res = rep.results.get("partition")
    a = ax[1, 1]
    if hasattr(res, "rows") and len(res.rows):
        for label, colour in (("register", "tab:blue"), ("bundle", "tab:grey")):
            a.hist(res.rows.loc[res.rows["label"] == label, "score"], bins=30, alpha=0.6, color=colour, label=label)
        a.legend()
        s = res.summary()
        a.set_title(f"partition: {s['registers']} registers / {s['bundles']} bundles, ΔBIC {s['delta_bic']:.3g}")
    a.set_xlabel("atom score (median cos with the update)")
    fig.suptitle(f"protocol = {rep.protocol}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


__all__ = ["reproduce", "Reproduction", "plot", "default_band", "PAPER", "PAPER_BAND"]
