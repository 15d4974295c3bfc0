"""Register/bundle partition of SAE atoms (specs/WRITESAE.md §4(d)).

For every firing of atom ``i`` (its code on ``S_t`` is positive) take the Frobenius cosine between the
atom and the native update at ``t`` (for rank-1 atoms and updates this is ``cos(v_i, k̂_t)·cos(w_i, δ_t)``);
each atom's median over its firings is its alignment. 1- and 2-component 1-D Gaussian mixtures are
fitted to the alive atoms' medians (EM written here); ``ΔBIC = BIC₂ − BIC₁``. When two components are
preferred (ΔBIC < 0), *registers* are the atoms assigned to the higher-mean component; otherwise the
operational threshold ``tau`` (0.05) splits them.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.analysis._common import check_sae, check_tokens, frob, native_run, parse_site
from recurrent_lens.analysis.results import PartitionResult


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


def partition_atoms(model, sae, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"], *,
                    replace: str = "update", max_firings_per_atom: int | None = 200, min_firings: int = 1,
                    tau: float = 0.05, skip_positions: int = 0, seed: int = 0,
                    progress: bool = False) -> PartitionResult:
    """Split alive atoms into registers (aligned with the native update where they fire) and bundles.

    Args:
        replace: compare with the net update (``"update"``, default) or the write (``"write"``).
        max_firings_per_atom: cosines per atom (seeded subsample; ``None``: all).
        min_firings: atoms with fewer firings count as dead.
        tau: threshold used when one Gaussian is preferred.
        skip_positions: ignore firings at the first positions (e.g. BOS).
        seed: seeds the per-atom subsample of firings (the mixtures are deterministic).
        progress: show a progress bar over the alive atoms.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import WriteSAE
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
        ...                   n_heads=2, d_k=8, d_v=8, d_mlp=64)
        >>> model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
        >>> _ = torch.manual_seed(0)
        >>> sae = WriteSAE(8, 8, 16, k=2)
        >>> tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        >>> result = partition_atoms(model, sae, "blocks.0.mixer.hook_state", 0, tokens)
        >>> s = result.summary()
        >>> s["alive"] + s["dead"], s["registers"] + s["bundles"] == s["alive"]
        (16, True)
    """
    if replace not in ("update", "write"):
        raise ValueError(f"replace: expected 'update' or 'write', got {replace!r}")
    site = parse_site(model, hook_name, head)
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, 1)
    native = native_run(model, tokens, site)
    with torch.no_grad():
        codes = sae.encode(native["state"])
        codes[:, :skip_positions] = 0
        atoms = sae.decoder_atoms().detach().float()
        upd = native[replace].float()
        g = torch.Generator().manual_seed(seed)
        rows = []
        fired = codes > 0
        firing_atoms = fired.flatten(0, 1).any(0).nonzero().flatten().tolist()
        for i in tqdm(firing_atoms, disable=not progress, desc="partition"):
            b, t = fired[..., i].nonzero(as_tuple=True)
            if len(b) < min_firings:
                continue
            if max_firings_per_atom is not None and len(b) > max_firings_per_atom:
                keep = torch.randperm(len(b), generator=g)[:max_firings_per_atom]
                b, t = b[keep], t[keep]
            U = upd[b, t]
            cos = (U * atoms[i]).flatten(-2).sum(-1) / (frob(U) * frob(atoms[i])).clamp_min(1e-12)
            rows.append({"atom": i, "n": int(fired[..., i].sum()), "median_cos": float(cos.median())})
    table = pd.DataFrame(rows, columns=["atom", "n", "median_cos"])
    n_dead = atoms.shape[0] - len(table)
    gmm: dict = {}
    delta_bic = float("nan")
    labels = ["register" if c > tau else "bundle" for c in table["median_cos"]]
    if len(table) >= 4:
        x = torch.tensor(table["median_cos"].to_numpy())
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
    table["label"] = labels
    settings = dict(hook_name=hook_name, head=head, replace=replace, max_firings_per_atom=max_firings_per_atom,
                    min_firings=min_firings, tau=tau, skip_positions=skip_positions, seed=seed)
    return PartitionResult(table, gmm, delta_bic, n_dead, settings)
