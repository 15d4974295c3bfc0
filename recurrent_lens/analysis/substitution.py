"""Single-write substitution (specs/WRITESAE.md §4(a), Decisions 5–7).

At every firing ``t`` the state is replaced by ``S′ = S_t − Δ_nat + X`` for

- ``X = atom``: ``a_{i*} A_{i*}`` (``scale="coefficient"``) or ``‖Δ_nat‖_F A_{i*}/‖A_{i*}‖_F``
  (``scale="match_norm"``);
- ``X = 0``: delete;
- ``X = random``: a fresh random rank-1 atom ``u wᵀ`` (``random="rank1"``), a random SAE atom that
  does not fire at ``t`` (``random="sae_atom"``), or an empirical resample (``random="empirical"``, the
  paper's Mamba-2 control): a rank-1 ``u wᵀ`` whose every coordinate is drawn from the same coordinate of
  the tested native updates' factors; always with the same Frobenius norm as the atom condition;

where ``Δ_nat`` is the net update (``replace="update"``: write + erase, so delete leaves the decayed
previous state) or the write alone (``replace="write"``). Which atom stands in for the update:

- ``atom="dominant"`` (the paper's protocol): a firing is a position where the code ``a(S_t)`` is nonzero,
  ``i* = argmax_i a_i(S_t)`` and its coefficient is ``a_{i*}(S_t)``;
- ``atom="rising"``: the atom the write switched on, ``i* = argmax_i [a_i(S_t) − a_i(S_t − Δ_nat)]``, with
  that rise as its coefficient; a firing is a position where some code rises. Where the state
  superposes many writes of similar size (associative recall: one association per pair) the dominant
  atom of ``S_t`` is usually another pair's, so only this choice asks whether *the write at t* is an atom.

``rank1_atoms=True`` replaces every decoder atom by its best rank-1 approximation ``σ₁u₁v₁ᵀ`` first:
with a :class:`~recurrent_lens.sae.FlatSAE` and ``scale="match_norm"`` this is the paper's flat-SVD
baseline (a flat atom made write-shaped after the fact).

The forward continues from a branched cache and the next-token distribution at ``t + readout_offset`` is
compared with the native one by KL.

Where to read: the test is only informative at a readout that *needs* the update written at ``t`` (the
paper reads at the first token that needs the edited state). At an arbitrary ``t + 1`` the prediction
usually does not depend on the write at ``t`` and every condition gives KL ≈ 0. ``positions`` restricts
the tested firings to chosen write positions; on the toy task (``ToyTask(query_order="pairs")``) the
protocol is ``positions=task.value_positions`` and ``readout_offset=task.recall_offset``: the write at
value ``v_i`` is read at query ``q_i``, where the model must recall ``v_i``.

Implementation: the prefix is run once through a :class:`RecurrentCache`, one token group at a time;
at each firing position the cache is branched for all firings there and all four conditions (native,
atom, delete, random) in one batched call of ``readout_offset`` tokens. The cost is one pass over the
prefix plus one small batched call per distinct firing position.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import (
    best_rank1, branch_logits, check_sae, check_tokens, frob, kl_divergence, native_run, parse_site, unit,
)
from recurrent_lens.analysis.results import SubstitutionResult

_REPLACE = ("update", "write")
_SCALE = ("coefficient", "match_norm")
_RANDOM = ("rank1", "sae_atom", "empirical")
_KL = ("native_to_condition", "condition_to_native")
_ATOM = ("dominant", "rising")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def empirical_resample(updates: Float[Tensor, "n d_k d_v"], generator: torch.Generator) -> Float[Tensor, "n d_k d_v"]:
    """Random rank-1 matrices ``u wᵀ`` resampled coordinate by coordinate from ``updates``' own factors.

    Each update's best rank-1 factors ``√σ₁ u₁`` and ``√σ₁ v₁`` (signs fixed so that the key factor sums to
    ``>= 0``; SVD signs are arbitrary) form two pools; coordinate ``j`` of a sample's key factor is
    coordinate ``j`` of a random update's key factor, and likewise for the value factor. The samples keep
    every coordinate's empirical distribution but none of the pairing between coordinates.

    Example:
        >>> import torch
        >>> U = torch.randn(5, 4, 1) * torch.randn(5, 1, 3)
        >>> R = empirical_resample(U, torch.Generator().manual_seed(0))
        >>> R.shape, bool((torch.linalg.matrix_rank(R) <= 1).all())
        (torch.Size([5, 4, 3]), True)
    """
    U, S, Vh = torch.linalg.svd(updates.float())
    root = S[:, :1].sqrt()
    keys, values = U[:, :, 0] * root, Vh[:, 0, :] * root
    sign = torch.where(keys.sum(-1, keepdim=True) < 0, -1.0, 1.0)
    keys, values = keys * sign, values * sign
    n = len(updates)
    u = keys.gather(0, torch.randint(0, n, keys.shape, generator=generator))
    w = values.gather(0, torch.randint(0, n, values.shape, generator=generator))
    return u[:, :, None] * w[:, None, :]


@torch.no_grad()
def find_firings(codes: Tensor, *, max_firings_per_atom: int | None, last_position: int, skip_positions: int = 0,
                 seed: int = 0, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Positions where a code fires, their dominant atom and its coefficient, capped per atom.

    Args:
        codes: ``[batch, pos, n_features]`` SAE codes (or any per-atom scores; zero means "not firing").
        max_firings_per_atom: keep at most this many (a seeded random subset) per dominant atom.
        last_position: only positions ``<= last_position`` are eligible.
        skip_positions: the first positions are not eligible.
        seed: seeds the per-atom subsample.
        positions: if given, a 1-D tensor of the only eligible positions (in every sequence).

    Returns:
        ``(batch, pos, atom, coefficient)``, each ``[n]``, sorted by position.
    """
    B, T, _ = codes.shape
    fires = (codes != 0).any(-1)
    fires[:, :skip_positions] = False
    fires[:, last_position + 1 :] = False
    if positions is not None:
        allowed = torch.zeros(T, dtype=torch.bool)
        allowed[positions] = True
        fires &= allowed
    b, t = fires.nonzero(as_tuple=True)
    coef, atom = codes[b, t].max(-1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(b), generator=g)
    if max_firings_per_atom is not None:
        keep = torch.zeros(len(b), dtype=torch.bool)
        counts: dict[int, int] = {}
        for i, a in zip(perm.tolist(), atom[perm].tolist()):
            if counts.get(a, 0) < max_firings_per_atom:
                counts[a] = counts.get(a, 0) + 1
                keep[i] = True
        b, t, atom, coef = b[keep], t[keep], atom[keep], coef[keep]
    order = torch.argsort(t * B + b)
    return b[order], t[order], atom[order], coef[order]


def substitution_test(
    model,
    sae,
    hook_name: str,
    head: int,
    tokens: Int[Tensor, "batch pos"],
    *,
    replace: str = "update",
    scale: str = "coefficient",
    random: str = "rank1",
    readout_offset: int = 1,
    kl: str = "native_to_condition",
    max_firings_per_atom: int | None = 30,
    skip_positions: int = 0,
    positions: Sequence[int] | Int[Tensor, " n"] | None = None,
    atom: str = "dominant",
    rank1_atoms: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> SubstitutionResult:
    """Atom vs delete vs random substitution of the native update at every firing.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE on ``[d_k, d_v]`` states of ``hook_name``/``head`` (not attached; only its encoder
            and decoder atoms are used).
        hook_name: ``blocks.{l}.mixer.hook_state``.
        head: the head the SAE reads.
        tokens: ``[batch, pos]`` sequences.
        replace: ``"update"`` (write + erase, default) or ``"write"``: what ``Δ_nat`` removes.
        scale: ``"coefficient"`` (``a_{i*} A_{i*}``) or ``"match_norm"`` (``‖Δ_nat‖_F`` times the unit atom).
        random: ``"rank1"`` (fresh random ``u wᵀ``), ``"sae_atom"`` (a random non-firing SAE atom) or
            ``"empirical"`` (per-coordinate resample of the native updates' rank-1 factors).
        readout_offset: read the distribution at ``t + readout_offset`` (>= 1).
        kl: ``"native_to_condition"`` (KL(p_native ‖ p_cond)) or ``"condition_to_native"``.
        max_firings_per_atom: cap per dominant atom (``None``: no cap).
        skip_positions: ignore the first positions (e.g. BOS).
        positions: test only firings at these write positions (same in every sequence; each must be
            ``< pos - readout_offset``); ``None`` (default): every position. Use it to pair each write
            with the readout that needs it, e.g. ``task.value_positions`` with
            ``readout_offset=task.recall_offset`` on the toy task.
        atom: ``"dominant"`` (``argmax a(S_t)``, default) or ``"rising"`` (``argmax`` of the code's rise
            ``a(S_t) − a(S_t − Δ_nat)``, coefficient = the rise); see the module docstring.
        rank1_atoms: use each atom's best rank-1 approximation (the flat-SVD baseline with a flat SAE).
        seed: seeds the firing subsample and the random controls.
        progress: show a progress bar over positions.

    Returns:
        A :class:`~recurrent_lens.analysis.results.SubstitutionResult`.

    Example: the toy protocol on the toy GDN with the demo's WriteSAE.

        >>> from recurrent_lens import toy
        >>> from recurrent_lens.analysis import substitution_test
        >>> model, task = toy.load("gdn", progress=False)
        >>> sae = toy.load_sae("gdn", progress=False)
        >>> tokens, _ = task.make_batch(16, seed=10_000)
        >>> result = substitution_test(model, sae, "blocks.1.mixer.hook_state", 0, tokens, atom="rising",
        ...                            positions=task.value_positions, readout_offset=task.recall_offset)
        >>> result.n, result.win_rate > 0.7, result.medians["atom"] < result.medians["delete"]
        (128, True, True)
    """
    _choice("replace", replace, _REPLACE)
    _choice("scale", scale, _SCALE)
    _choice("random", random, _RANDOM)
    _choice("kl", kl, _KL)
    _choice("atom", atom, _ATOM)
    if max_firings_per_atom is not None and max_firings_per_atom < 1:
        raise ValueError(f"max_firings_per_atom: expected >= 1 or None, got {max_firings_per_atom}")
    site = parse_site(model, hook_name, head)
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, readout_offset + 1)
    last_position = tokens.shape[1] - 1 - readout_offset
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if len(positions) == 0 or int(positions.min()) < 0 or int(positions.max()) > last_position:
            raise ValueError(f"positions: expected a non-empty list of positions in [0, {last_position}] "
                             f"(sequence length {tokens.shape[1]} minus readout_offset {readout_offset}), "
                             f"got {positions.tolist()}")
    start = time.perf_counter()
    native = native_run(model, tokens, site)
    delta_all = native[replace]
    with torch.no_grad():
        codes = sae.encode(native["state"])
        scores = codes if atom == "dominant" else (codes - sae.encode(native["state"] - delta_all)).clamp_min(0)
        b, t, chosen, coef = find_firings(scores, max_firings_per_atom=max_firings_per_atom,
                                          last_position=last_position, skip_positions=skip_positions, seed=seed,
                                          positions=positions)
        if len(b) == 0:
            raise ValueError("tokens: the SAE never fires on these tokens at eligible positions")
        atoms = sae.decoder_atoms().detach().float()
        if rank1_atoms:
            atoms = best_rank1(atoms)
        dk, dv = atoms.shape[-2:]
        delta = delta_all[b, t].float()  # [n, d_k, d_v]
        A = atoms[chosen]
        if scale == "coefficient":
            X_atom = coef[:, None, None].float() * A
        else:
            X_atom = frob(delta)[:, None, None] * A / frob(A).clamp_min(1e-12)[:, None, None]
        g = torch.Generator().manual_seed(seed + 1)
        if random == "rank1":
            u = unit(torch.randn(len(b), dk, generator=g))
            w = unit(torch.randn(len(b), dv, generator=g))
            R = u[:, :, None] * w[:, None, :]
        elif random == "sae_atom":
            active = codes[b, t] != 0
            others = torch.rand(len(b), atoms.shape[0], generator=g).masked_fill(active, -1.0)
            R = atoms[others.argmax(-1)]
        else:
            R = empirical_resample(delta, g)
        X_random = frob(X_atom)[:, None, None] * R / frob(R).clamp_min(1e-12)[:, None, None]

    def edit(S: Tensor, idx: Tensor) -> Tensor:
        base = S - delta[idx].to(S.dtype)
        return torch.stack([S, base + X_atom[idx], base, base + X_random[idx]])

    logits = branch_logits(model, tokens, site, b, t, edit, readout_offset, progress=progress, desc="substitution")
    nat = logits[0]
    if kl == "native_to_condition":
        kls = [kl_divergence(nat, logits[c]) for c in (1, 2, 3)]
    else:
        kls = [kl_divergence(logits[c], nat) for c in (1, 2, 3)]
    rows = pd.DataFrame({
        "batch": b.numpy(), "pos": t.numpy(), "atom": chosen.numpy(), "coefficient": coef.float().numpy(),
        "update_norm": frob(delta).numpy(),
        "atom_cos": ((A * delta).sum((-2, -1)) / (frob(A) * frob(delta)).clamp_min(1e-12)).numpy(),
        "kl_atom": kls[0].numpy(), "kl_delete": kls[1].numpy(), "kl_random": kls[2].numpy(),
    })
    rows["win"] = rows["kl_atom"] < rows["kl_delete"]
    rows["chain"] = rows["win"] & (rows["kl_delete"] < rows["kl_random"])
    settings = dict(hook_name=hook_name, head=head, replace=replace, scale=scale, random=random,
                    readout_offset=readout_offset, kl=kl, max_firings_per_atom=max_firings_per_atom,
                    skip_positions=skip_positions,
                    positions=None if positions is None else positions.tolist(), atom=atom,
                    rank1_atoms=rank1_atoms, seed=seed)
    return SubstitutionResult(rows, settings, time.perf_counter() - start)
