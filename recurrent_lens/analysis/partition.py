"""Register/bundle partition of SAE atoms (the paper's §3.1, Fig. 2a).

``statistic="median_cos_gmm"``: for every firing of atom ``i`` (its code on ``S_t`` is positive) take the
Frobenius cosine between the atom and the native update at ``t`` (for rank-1 atoms and updates this is
``cos(v_i, k̂_t)·cos(w_i, δ_t)``); each atom's median over its firings is its score.

``statistic="mean_abs_cos_top50"`` (the reference repository's experiments/analysis/memory_alignment.py):
over the atom's 50 largest activations, the mean ``|cos|`` of its key factor with the update's key
factor and of its value factor with the update's value factor, combined as their geometric mean. The
factors are the leading singular vectors (for a rank-1 atom ``v_i w_iᵀ`` and a rank-1 update ``k̂ δᵀ``
exactly ``v_i, w_i`` and ``k̂, δ`` up to sign, which ``|cos|`` ignores).

1- and 2-component 1-D Gaussian mixtures are fitted to the alive atoms' scores (EM written here);
``ΔBIC = BIC₂ − BIC₁``. When two components are preferred (ΔBIC < 0), *registers* are the atoms assigned
to the higher-mean component; otherwise the operational threshold ``tau`` (0.05) splits them.

Examples use ``tiny_model``, ``tiny_sae``, ``tiny_tokens`` (a random one-layer Gated DeltaNet, a random WriteSAE on
its ``[8, 8]`` states and two random sequences; built as :mod:`recurrent_lens.analysis` shows).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.analysis._common import check_sae, check_tokens, frob, native_run, unit, use_device
from recurrent_lens.analysis.protocols import (
    PRESET, PartitionOptions, PartitionSettings, Replace, Statistic, documented, resolve,
)
from recurrent_lens.analysis.results import PartitionResult
from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.states.cells import parse_cell

TOP_N = 50
"""Activations per atom of ``statistic="mean_abs_cos_top50"`` (the reference's ``top_n``)."""


def _normal_logpdf(x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)


def fit_gmm_1d(x: Tensor, n_components: int, n_iter: int = 500) -> tuple[Tensor, Tensor, Tensor, float]:
    """EM for a 1-D Gaussian mixture. Returns ``(weights, means, sigmas, log_likelihood)``.

    Deterministic: the means start at evenly spaced quantiles of ``x`` from 25% to 75% (the median for one
    component), the sigmas at its standard deviation and the weights equal.

    Example:
        >>> import torch
        >>> x = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(0)) * 0.1,
        ...                1 + torch.randn(200, generator=torch.Generator().manual_seed(1)) * 0.1])
        >>> w, mu, s, ll = fit_gmm_1d(x, 2)
        >>> [round(float(m), 1) + 0.0 for m in mu.sort().values]  # + 0.0 turns -0.0 into 0.0
        [0.0, 1.0]
    """
    x = x.double().flatten()
    n = len(x)
    if n < n_components:
        raise ValueError(f"x: expected at least {n_components} values, got {n}")
    floor = max(float(x.std()) * 1e-3, 1e-9) if n > 1 else 1e-9
    qs = torch.linspace(0.25, 0.75, n_components, dtype=torch.float64) if n_components > 1 else torch.tensor([0.5], dtype=torch.float64)
    mu = torch.quantile(x, qs)
    sigma = torch.full((n_components,), max(float(x.std()), floor) if n > 1 else 1.0, dtype=torch.float64)
    w = torch.full((n_components,), 1.0 / n_components, dtype=torch.float64)
    ll_old = -math.inf
    for _ in range(n_iter):
        logp = _normal_logpdf(x[:, None], mu, sigma) + torch.log(w)
        ll = float(torch.logsumexp(logp, 1).sum())
        r = (logp - torch.logsumexp(logp, 1, keepdim=True)).exp()
        nk = r.sum(0).clamp_min(1e-12)
        w = nk / n
        mu = (r * x[:, None]).sum(0) / nk
        sigma = ((r * (x[:, None] - mu) ** 2).sum(0) / nk).sqrt().clamp_min(floor)
        if abs(ll - ll_old) < 1e-10 * max(1.0, abs(ll)):
            break
        ll_old = ll
    logp = _normal_logpdf(x[:, None], mu, sigma) + torch.log(w)
    return w, mu, sigma, float(torch.logsumexp(logp, 1).sum())


def _leading_factors(x: Tensor) -> tuple[Tensor, Tensor]:
    """Unit leading left and right singular vectors of each matrix in ``[..., m, n]``."""
    U, _, Vh = torch.linalg.svd(x)
    return U[..., :, 0], Vh[..., 0, :]


@documented("partition")
def partition_atoms(model: ModelLike, sae: SAELike, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"], *,
                    protocol: str = "ours", options: PartitionOptions | None = None, statistic: Statistic = PRESET,
                    replace: Replace = PRESET, max_firings_per_atom: int | None = PRESET, min_firings: int = PRESET,
                    tau: float = PRESET, skip_positions: int = PRESET, seed: int = PRESET, progress: bool = False,
                    device: str | torch.device | None = None) -> PartitionResult:
    """Split alive atoms into registers (aligned with the native update where they fire) and bundles.

    The top-50 statistic always uses each atom's 50 largest activations; the Gaussian mixtures are
    deterministic.

    Args:
        progress: show a progress bar over the alive atoms.
        device: where it runs: ``model`` and ``sae`` are moved there (default: the model's device); its
            tensors stay there until the result table is built. An unknown or unavailable device raises
            ``ValueError`` naming ``device``.

    Example:
        >>> from recurrent_lens.analysis import partition_atoms
        >>> result = partition_atoms(tiny_model, tiny_sae, "blocks.0.mixer.hook_state", 0, tiny_tokens)
        >>> s = result.summary()
        >>> s["alive"] + s["dead"], s["registers"] + s["bundles"] == s["alive"]
        (16, True)
        >>> partition_atoms(tiny_model, tiny_sae, "blocks.0.mixer.hook_state", 0, tiny_tokens,
        ...                 protocol="paper").settings.statistic
        'median_cos_gmm'
    """
    opts, overrides = _partition_options(protocol, options, dict(
        statistic=statistic, replace=replace, max_firings_per_atom=max_firings_per_atom, min_firings=min_firings,
        tau=tau, skip_positions=skip_positions, seed=seed))
    use_device(model, sae, device)
    site = parse_cell(model, hook_name, head, kinds=("state",))
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, 1)
    native = native_run(model, tokens, site)
    codes = _firing_codes(sae, native["state"], opts.skip_positions)
    atoms = sae.decoder_atoms().detach().float()
    table = _score_atoms(codes, atoms, native[opts.replace].float(), top50=opts.statistic == "mean_abs_cos_top50",
                         cap=opts.max_firings_per_atom, min_firings=opts.min_firings, seed=opts.seed,
                         progress=progress)
    labels, gmm, delta_bic = _split_registers(table["score"], opts.tau)
    table["label"] = labels
    settings = PartitionSettings(protocol=protocol, hook_name=hook_name, head=head, **vars(opts), overrides=overrides)
    return PartitionResult(table, gmm, delta_bic, atoms.shape[0] - len(table), settings)


def _partition_options(protocol: str, options: PartitionOptions | None,
                       given: dict[str, Any]) -> tuple[PartitionOptions, tuple[str, ...]]:
    """The options of ``protocol`` (or ``options``) with the explicitly given ones winning, each checked; and the
    overrides."""
    opts, overrides = resolve("partition", protocol, given, options)
    cap = opts.max_firings_per_atom
    if cap is not None and cap < 1:
        raise ValueError(f"max_firings_per_atom: expected >= 1 or None, got {cap}")
    return opts, overrides


@torch.no_grad()
def _firing_codes(sae: SAELike, states: Tensor, skip_positions: int) -> Tensor:
    """The SAE codes of ``states`` ``[batch, pos, n_features]``, zero at the first ``skip_positions``."""
    codes = sae.encode(states)
    codes[:, :skip_positions] = 0
    return codes


@torch.no_grad()
def _score_atoms(codes: Tensor, atoms: Tensor, updates: Tensor, *, top50: bool, cap: int | None, min_firings: int,
                 seed: int, progress: bool) -> pd.DataFrame:
    """One row per atom that fires at least ``min_firings`` times: its firings ``n``, ``median_cos``, the
    top-50 factor cosines (``top50``) and its ``score``; the per-atom subsamples share one seeded stream."""
    atom_factors = _leading_factors(atoms) if top50 else None
    g = torch.Generator().manual_seed(seed)
    rows = []
    fired = codes > 0
    firing_atoms = fired.flatten(0, 1).any(0).nonzero().flatten().tolist()
    for i in tqdm(firing_atoms, disable=not progress, desc="partition"):
        b, t = fired[..., i].nonzero(as_tuple=True)
        if len(b) < min_firings:
            continue
        factors = None if atom_factors is None else (atom_factors[0][i], atom_factors[1][i])
        rows.append(_score_atom(i, b, t, codes[..., i], atoms[i], updates, factors, cap, g))
    columns = ["atom", "n", "median_cos"] + (["mean_abs_key_cos", "mean_abs_value_cos"] if top50 else []) + ["score"]
    return pd.DataFrame(rows, columns=columns)


def _score_atom(i: int, b: Tensor, t: Tensor, acts: Tensor, atom: Tensor, updates: Tensor,
                factors: tuple[Tensor, Tensor] | None, cap: int | None, g: torch.Generator) -> dict[str, Any]:
    """The row of atom ``i`` firing at ``(b, t)`` with codes ``acts`` ``[batch, pos]``; ``factors``: the atom's
    unit key and value factors (the top-50 statistic) or ``None``."""
    row: dict[str, Any] = {"atom": i, "n": len(b)}
    if factors is not None:
        top = acts[b, t].argsort(descending=True, stable=True)[:TOP_N]
        key, value = _leading_factors(updates[b[top], t[top]])
        row["mean_abs_key_cos"] = float((unit(key) @ factors[0]).abs().mean())
        row["mean_abs_value_cos"] = float((unit(value) @ factors[1]).abs().mean())
    if cap is not None and len(b) > cap:
        keep = torch.randperm(len(b), generator=g)[:cap]
        b, t = b[keep], t[keep]
    U = updates[b, t]
    cos = (U * atom).flatten(-2).sum(-1) / (frob(U) * frob(atom)).clamp_min(1e-12)
    row["median_cos"] = float(cos.median())
    row["score"] = (math.sqrt(row["mean_abs_key_cos"] * row["mean_abs_value_cos"]) if factors is not None
                    else row["median_cos"])
    return row


def _split_registers(scores: pd.Series, tau: float) -> tuple[list[str], dict, float]:
    """``(labels, gmm, delta_bic)``: the two-component mixture's split where ΔBIC < 0 (four or more atoms),
    else the threshold ``tau``; ``gmm`` and ``delta_bic`` stay empty and NaN under four atoms."""
    gmm: dict = {}
    delta_bic = float("nan")
    labels = ["register" if c > tau else "bundle" for c in scores]
    if len(scores) >= 4:
        x = torch.tensor(scores.to_numpy())
        w1, m1, s1, ll1 = fit_gmm_1d(x, 1)
        w2, m2, s2, ll2 = fit_gmm_1d(x, 2)
        n = len(x)
        delta_bic = (5 * math.log(n) - 2 * ll2) - (2 * math.log(n) - 2 * ll1)
        gmm = {"one": (float(m1[0]), float(s1[0])),
               "two": tuple((float(w2[j]), float(m2[j]), float(s2[j])) for j in range(2))}
        if delta_bic < 0:
            logp = _normal_logpdf(x[:, None], m2, s2) + torch.log(w2)
            high = int(m2.argmax())
            labels = ["register" if int(c) == high else "bundle" for c in logp.argmax(1)]
    return labels, gmm, delta_bic
