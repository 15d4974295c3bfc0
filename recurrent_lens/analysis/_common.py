"""Shared machinery of the analyses: cache branching, statistics (cells are parsed by
:func:`recurrent_lens.states.cells.parse_cell`).

Everything here works through the shared hook vocabulary (``blocks.{l}.mixer.hook_*``), ``model.cfg``
and :class:`~recurrent_lens.models.cache.RecurrentCache`; nothing depends on the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.models.cache import RecurrentCache
from recurrent_lens.states.cells import Cell

def check_tokens(model: ModelLike, tokens: Tensor, min_len: int = 2) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"tokens: expected integer ids of shape [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] < min_len:
        raise ValueError(f"tokens: expected at least {min_len} positions, got {tokens.shape[1]}")
    return tokens.long().to(model.embed.weight.device)


def use_device(model: ModelLike, sae: SAELike, device: str | torch.device | None) -> torch.device:
    """Move ``model`` and ``sae`` to ``device`` (``None``: the model's device, moving the SAE there) and return it;
    an unknown or unavailable device is refused by name before anything moves.

    Example (the toy GDN and its demo SAE):
        >>> use_device(toy_model, toy_sae, "cpu")
        device(type='cpu')
        >>> use_device(toy_model, toy_sae, "gpu")
        Traceback (most recent call last):
        ...
        ValueError: device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu'
    """
    if device is None:
        device = model.embed.weight.device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: expected a device this machine has, got {str(device)!r} "
                         f"({torch.cuda.device_count()} CUDA device(s))")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: expected a cpu, cuda or mps device, got {str(device)!r}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: expected a device this machine has, got {str(device)!r} (MPS is not available)")
    model.to(device)
    sae.to(device)
    return device


def check_sae(sae: SAELike, model: ModelLike) -> None:
    if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
        raise ValueError(f"sae: expects (d_k, d_v) = ({sae.cfg.d_k}, {sae.cfg.d_v}), the model's states are "
                         f"({model.cfg.d_k}, {model.cfg.d_v})")


@torch.no_grad()
def native_run(model: ModelLike, tokens: Tensor, site: Cell) -> dict[str, Tensor]:
    """States, net updates (write + erase), writes, keys and queries of one head at every position.

    Returns tensors ``[batch, pos, ...]`` of that head: ``state``, ``write``, ``update`` (``write`` plus
    ``erase`` where the architecture has one), ``k``, ``v``, ``q`` and ``decay`` (``None`` without decay),
    plus ``logits`` ``[batch, pos, d_vocab]``.
    """
    names = [site.hook(n) for n in ("hook_state", "hook_write", "hook_erase", "hook_k", "hook_v", "hook_q",
                                    "hook_decay")]
    names = [n for n in names if n in model.hook_dict]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    h = site.head
    out = {"logits": logits, "state": cache[site.hook("hook_state")][:, :, h],
           "write": cache[site.hook("hook_write")][:, :, h], "k": cache[site.hook("hook_k")][:, :, h],
           "v": cache[site.hook("hook_v")][:, :, h], "q": cache[site.hook("hook_q")][:, :, h]}
    erase = site.hook("hook_erase")
    out["update"] = out["write"] + cache[erase][:, :, h] if erase in cache.cache_dict else out["write"]
    decay = site.hook("hook_decay")
    out["decay"] = cache[decay][:, :, h] if decay in cache.cache_dict else None
    return out


def select_batch(cache: RecurrentCache, index: Tensor) -> RecurrentCache:
    """A new cache holding rows ``index`` of every tensor (rows may repeat)."""
    out = RecurrentCache(len(cache))
    out.seq_len = cache.seq_len
    for src, dst in zip(cache.layers, out.layers):
        for name in ("state", "conv", "key", "value"):
            t = getattr(src, name)
            setattr(dst, name, None if t is None else t.index_select(0, index))
        dst.extra = {k: v.index_select(0, index) for k, v in src.extra.items()}
    return out


@torch.no_grad()
def branch_logits(model: ModelLike, tokens: Tensor, site: Cell, rows: Tensor, positions: Tensor,
                  edit: Callable[[Tensor, Tensor], Tensor], readout_offset: int | None,
                  progress: bool = False, desc: str = "branch") -> Tensor:
    """Logits after replacing the head's state at chosen positions, read ``readout_offset`` tokens later.

    For each firing ``(rows[i], positions[i])`` the prefix up to and including ``positions[i]`` runs once
    (one cache shared by every firing at that position); the head's state ``S_t`` is then replaced by
    each of ``edit(S_t [n, d_k, d_v], firing_index [n]) -> [C, n, d_k, d_v]``'s ``C`` candidates, the
    next ``readout_offset`` tokens are fed from branched copies of the cache, and the last logits are
    returned as ``[C, n_firings, d_vocab]`` (fp32). This is the cache-based continuation: the edit is
    seen first by the token at ``t + 1``. ``readout_offset=None`` reads at the last position of the
    sequence instead (every later token is fed; positions must be ``< pos - 1``).
    """
    T = tokens.shape[1]
    if readout_offset is None:
        if len(positions) and int(positions.max()) >= T - 1:
            raise ValueError(f"positions: every position must be < {T - 1} to be read at the last position {T - 1}")
    elif readout_offset < 1:
        raise ValueError(f"readout_offset: expected >= 1 (the edit is read by later tokens), got {readout_offset}")
    elif len(positions) and int(positions.max()) + readout_offset >= T:
        raise ValueError(f"positions: every position + readout_offset must be < {T} (sequence length)")
    out: Tensor | None = None
    cache = model.make_cache()
    done = 0
    order = sorted(set(positions.tolist()))
    for t in tqdm(order, disable=not progress, desc=desc):
        if t + 1 > done:
            model(tokens[:, done : t + 1], cache=cache)
            done = t + 1
        idx = (positions == t).nonzero().squeeze(1)
        b = rows[idx]
        S = cache[site.layer].state[b, site.head]
        cand = edit(S, idx)
        C, n = cand.shape[:2]
        branch = select_batch(cache, b.repeat(C))
        state = branch[site.layer].state.clone()
        state[:, site.head] = cand.reshape(C * n, *cand.shape[2:]).to(state.dtype)
        branch[site.layer].state = state
        stop = T if readout_offset is None else t + 1 + readout_offset
        logits = model(tokens[b, t + 1 : stop].repeat(C, 1), cache=branch)[:, -1].float()
        if out is None:
            out = logits.new_zeros(C, len(rows), logits.shape[-1])
        out[:, idx] = logits.view(C, n, -1)
    if out is None:
        raise ValueError("positions: no firing to evaluate")
    return out


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``KL(p ‖ q)`` over the last axis from logits, in fp32 (clamped at 0 against rounding)."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default).

    Example:
        >>> lo, hi = wilson_interval(90, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.826, 0.945)
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def wilcoxon_signed_rank(x: Tensor) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``median(x) = 0`` (normal approximation
    with tie correction; zeros dropped, as scipy's default ``zero_method='wilcox'``)."""
    x = x.double().flatten()
    x = x[x != 0]
    n = len(x)
    if n == 0:
        return 1.0
    a = x.abs()
    order = a.argsort()
    ranks = torch.empty(n, dtype=torch.float64)
    sorted_a = a[order]
    i = 0
    tie_term = 0.0
    while i < n:
        j = i
        while j + 1 < n and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        c = j - i + 1
        tie_term += c**3 - c
        i = j + 1
    w_plus = float(ranks[x > 0].sum())
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - tie_term / 48
    if var <= 0:
        return 1.0
    z = (w_plus - mean) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


def bootstrap_ci(groups: list[Tensor], stat: Callable[[Tensor], float], n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``stat`` over a cluster bootstrap (resampling whole groups)."""
    if not groups:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_boot):
        pick = torch.randint(0, len(groups), (len(groups),), generator=g)
        vals.append(stat(torch.cat([groups[i] for i in pick.tolist()])))
    v = torch.tensor(vals)
    return (float(v.quantile(0.025)), float(v.quantile(0.975)))


def unit(x: Tensor, dim: int = -1) -> Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def best_rank1(x: Tensor) -> Tensor:
    """The best rank-1 approximation ``σ₁u₁v₁ᵀ`` of each matrix in ``[..., m, n]`` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(x)
    return S[..., :1, None] * U[..., :, :1] * Vh[..., :1, :]


def frob(x: Tensor) -> Tensor:
    """Frobenius norm over the last two axes."""
    return x.flatten(-2).norm(dim=-1)


__all__ = ["native_run", "select_batch", "branch_logits", "kl_divergence",
           "wilson_interval", "wilcoxon_signed_rank", "bootstrap_ci", "unit", "frob", "best_rank1", "check_tokens",
           "check_sae"]
