"""Single-write substitution: does one SAE atom stand in for the native write at a firing?

At every firing ``t`` the state is replaced by ``S′ = S_t − Δ_nat + X`` for

- ``X = atom``: ``a A`` (``scale="coefficient"``) or ``‖Δ_nat‖_F A/‖A‖_F`` (``scale="match_norm"``);
- ``X = 0``: delete;
- ``X = random``: a fresh random rank-1 atom ``u wᵀ`` (``random="rank1"``), a random SAE atom that
  does not fire at ``t`` (``random="sae_atom"``), or an empirical resample (``random="empirical"``, the
  paper's Mamba-2 control, App. B): a rank-1 ``u wᵀ`` whose every coordinate is drawn from the same
  coordinate of the tested native updates' factors; always with the same Frobenius norm as the atom
  condition;

where ``Δ_nat`` is the net update (``replace="update"``: write + erase, so delete leaves the decayed
previous state) or the write alone (``replace="write"``: ``β k vᵀ``). Which atom stands in for the update:

- ``atom="dominant"``: ``A = A_{i*}``, ``i* = argmax_i a_i(S_t)``, coefficient ``a_{i*}(S_t)``;
- ``atom="rising"``: the atom the write switched on, ``i* = argmax_i [a_i(S_t) − a_i(S_t − Δ_nat)]``, with
  that rise as its coefficient. Where the state superposes many writes of similar size (associative
  recall: one association per pair) the dominant atom of ``S_t`` is usually another pair's, so only this
  choice asks whether *the write at t* is an atom;
- ``atom="feature"``: the firing feature's own atom ``A_f`` with its code ``a_f(S_t)``.

What a firing is: without ``features``, a position where some code is nonzero (for ``"rising"``: where
some code rises), one row per position, capped per substituted atom; ``atom="feature"`` makes every
(position, atom) pair with a nonzero code a firing. With ``features=[f, ...]`` a firing is a (position,
f) pair where ``f``'s code is nonzero (its rise, for ``"rising"``), capped per ``f``: the paper's
App. J loop "for each firing position t of feature i" (its 92.4% pools the firings of an 8-feature
exemplar pool, e.g. ``[412, 192, 97, 1361, 53, 63, 87, 1335]`` at Qwen3.5-0.8B L9 H4 in the reference
repository's scripts/clean_amplified_kl.py).

``rank1_atoms=True`` replaces every decoder atom by its best rank-1 approximation ``σ₁u₁v₁ᵀ`` first:
with a :class:`~recurrent_lens.sae.FlatSAE` and ``scale="match_norm"`` this is the paper's flat-SVD
baseline (a flat atom made write-shaped after the fact).

The forward continues from a branched cache and the next-token distribution at ``t + readout_offset``
(``readout="offset"``) or at the last position of the sequence (``readout="last"``, the paper's "final
output distribution") is compared with the native one by KL.

Where to read: the test is only informative at a readout that *needs* the update written at ``t``. At an
arbitrary ``t + 1`` (or at the end of a sequence) the prediction usually does not depend on the write at
``t`` and every condition gives KL ≈ 0. ``positions`` restricts the tested firings to chosen write
positions; on the toy task (``ToyTask(query_order="pairs")``) the protocol is
``positions=task.value_positions`` and ``readout_offset=task.recall_offset``: the write at value ``v_i``
is read at query ``q_i``, where the model must recall ``v_i``.

Implementation: the prefix is run once through a :class:`RecurrentCache`, one token group at a time;
at each firing position the cache is branched for all firings there and all four conditions (native,
atom, delete, random) in one batched call. The cost is one pass over the prefix plus one small batched
call per distinct firing position.

Examples use ``toy_model, toy_task = toy.load("gdn")`` (the trained toy Gated DeltaNet and its task)
and ``toy_sae = toy.load_sae("gdn")`` (its demo WriteSAE).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, SupportsIndex

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import (
    best_rank1, branch_logits, check_sae, check_tokens, frob, kl_divergence, native_run, unit, use_device,
)
from recurrent_lens.analysis.protocols import (
    PRESET, AtomChoice, KLDirection, RandomControl, Replace, Scale, SubstitutionOptions, SubstitutionReadout,
    SubstitutionSettings, documented, resolve,
)
from recurrent_lens.analysis.results import SubstitutionResult
from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.states.cells import as_index, parse_cell

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
    # drawn on the CPU generator, then moved: the same draws on every device
    u = keys.gather(0, torch.randint(0, n, keys.shape, generator=generator).to(keys.device))
    w = values.gather(0, torch.randint(0, n, values.shape, generator=generator).to(values.device))
    return u[:, :, None] * w[:, None, :]


def _eligible(shape: tuple[int, int], last_position: int, skip_positions: int, positions: Tensor | None,
              device: torch.device) -> Tensor:
    B, T = shape
    ok = torch.ones(B, T, dtype=torch.bool, device=device)
    ok[:, :skip_positions] = False
    ok[:, last_position + 1 :] = False
    if positions is not None:
        allowed = torch.zeros(T, dtype=torch.bool, device=device)
        allowed[positions] = True
        ok &= allowed
    return ok


def _cap(group: Tensor, limit: int | None, seed: int) -> Tensor:
    """Indices kept when at most ``limit`` rows per value of ``group`` are kept (a seeded random subset)."""
    if limit is None:
        return torch.arange(len(group))
    perm = torch.randperm(len(group), generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros(len(group), dtype=torch.bool)
    counts: dict[int, int] = {}
    for i, a in zip(perm.tolist(), group[perm].tolist()):
        if counts.get(a, 0) < limit:
            counts[a] = counts.get(a, 0) + 1
            keep[i] = True
    return keep.nonzero().flatten()


class _Firings(NamedTuple):
    """The tested firings, each ``[n]``: where (``batch``, ``pos``), the substituted ``atom`` and its ``coef``, and
    the firing ``feature``."""

    batch: Tensor
    pos: Tensor
    atom: Tensor
    coef: Tensor
    feature: Tensor


def _firings(scores: Tensor, *, atom: str, features: list[int] | None, max_firings_per_atom: int | None,
             last_position: int, skip_positions: int, seed: int, positions: Tensor | None) -> _Firings:
    """``(batch, pos, atom, coefficient, feature)`` of every firing (see the module docstring), sorted by
    position then batch."""
    B, T, F = scores.shape
    ok = _eligible((B, T), last_position, skip_positions, positions, scores.device)
    if features is None and atom != "feature":
        b, t = ((scores != 0).any(-1) & ok).nonzero(as_tuple=True)
        coef, chosen = scores[b, t].max(-1)
        feature = chosen
    else:
        cols = torch.arange(F, device=scores.device) if features is None else torch.tensor(features, dtype=torch.long,
                                                                                           device=scores.device)
        sub = scores[..., cols]
        b, t, j = ((sub != 0) & ok[..., None]).nonzero(as_tuple=True)
        feature = cols[j]
        if atom == "feature":
            chosen, coef = feature, sub[b, t, j]
        else:
            coef, chosen = scores[b, t].max(-1)
    keep = _cap(feature, max_firings_per_atom, seed)
    b, t, chosen, coef, feature = b[keep], t[keep], chosen[keep], coef[keep], feature[keep]
    order = torch.argsort((t * B + b) * F + feature)
    return _Firings(b[order], t[order], chosen[order], coef[order], feature[order])


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

    Example:
        >>> import torch
        >>> codes = torch.zeros(1, 4, 3); codes[0, 1, 2] = 0.5; codes[0, 3, 0] = 1.0
        >>> b, t, atom, coef = find_firings(codes, max_firings_per_atom=None, last_position=2)
        >>> t.tolist(), atom.tolist(), coef.tolist()
        ([1], [2], [0.5])
    """
    b, t, atom, coef, _ = _firings(codes, atom="dominant", features=None, max_firings_per_atom=max_firings_per_atom,
                                   last_position=last_position, skip_positions=skip_positions, seed=seed,
                                   positions=positions)
    return b, t, atom, coef


@documented("substitution")
def substitution_test(
    model: ModelLike,
    sae: SAELike,
    hook_name: str,
    head: int,
    tokens: Int[Tensor, "batch pos"],
    *,
    protocol: str = "ours",
    options: SubstitutionOptions | None = None,
    replace: Replace = PRESET,
    scale: Scale = PRESET,
    random: RandomControl = PRESET,
    readout: SubstitutionReadout = PRESET,
    readout_offset: int | None = PRESET,
    kl: KLDirection = PRESET,
    max_firings_per_atom: int | None = PRESET,
    skip_positions: int = PRESET,
    positions: Sequence[int] | Int[Tensor, " n"] | None = None,
    atom: AtomChoice = PRESET,
    features: Sequence[SupportsIndex] | None = None,
    rank1_atoms: bool = PRESET,
    seed: int = PRESET,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> SubstitutionResult:
    """Atom vs delete vs random substitution of the native update at every firing.

    The paper's 92.4% (n = 4,851) pools the firings of an 8-feature exemplar pool at L1, L9 and L17 head 4
    (L9 alone: 91.2%, n = 1,851): pass them as ``features``. Its 89.8% population test (App. F.2) is
    ``features`` = the alive atoms with a 30-firing cap, averaged per atom (``result.per_atom()``).
    Why the dominant atom fails on associative-recall states (the toys): see the module docstring.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE on ``[d_k, d_v]`` states of ``hook_name``/``head`` (not attached; only its encoder
            and decoder atoms are used).
        hook_name: ``blocks.{l}.mixer.hook_state``.
        head: the head the SAE reads.
        tokens: ``[batch, pos]`` sequences.
        positions: test only firings at these write positions (same in every sequence; each must be
            ``< pos - readout_offset``); ``None`` (default): every position. Use it to pair each write
            with the readout that needs it, e.g. ``task.value_positions`` with
            ``readout_offset=task.recall_offset`` on the toy task.
        features: test only the firings of these atoms (see the module docstring); ``None``: all.
        progress: show a progress bar over positions.
        device: where it runs: ``model`` and ``sae`` are moved there (default: the model's device); its
            tensors stay there until the result table is built. An unknown or unavailable device raises
            ``ValueError`` naming ``device``.

    Returns:
        A :class:`~recurrent_lens.analysis.results.SubstitutionResult`; its ``settings`` are a
        :class:`~recurrent_lens.analysis.protocols.SubstitutionSettings`.

    Example: the toy protocol on the toy GDN with the demo's WriteSAE, then the paper's protocol.

        >>> from recurrent_lens.analysis import substitution_test
        >>> tokens, _ = toy_task.make_batch(16, seed=10_000)
        >>> result = substitution_test(toy_model, toy_sae, "blocks.1.mixer.hook_state", 0, tokens, atom="rising",
        ...                            positions=toy_task.value_positions, readout_offset=toy_task.recall_offset)
        >>> result.n, result.win_rate > 0.7, result.medians["atom"] < result.medians["delete"]
        (128, True, True)
        >>> paper = substitution_test(toy_model, toy_sae, "blocks.1.mixer.hook_state", 0, tokens, protocol="paper")
        >>> paper.settings.replace, paper.settings.readout, paper.settings.overrides
        ('write', 'last', ())
    """
    opts, overrides = _substitution_options(protocol, options, dict(
        replace=replace, scale=scale, random=random, readout=readout, readout_offset=readout_offset, kl=kl,
        max_firings_per_atom=max_firings_per_atom, skip_positions=skip_positions, atom=atom, rank1_atoms=rank1_atoms,
        seed=seed))
    use_device(model, sae, device)
    site = parse_cell(model, hook_name, head, kinds=("state",))
    check_sae(sae, model)
    features = _check_features(features, sae.cfg.n_features)
    tokens, positions, last_position = _readout_window(model, tokens, positions, opts.readout, opts.readout_offset)
    start = time.perf_counter()
    native = native_run(model, tokens, site)
    codes, firings = _substitution_firings(
        sae, native, replace=opts.replace, atom=opts.atom, features=features, cap=opts.max_firings_per_atom,
        last_position=last_position, skip_positions=opts.skip_positions, seed=opts.seed, positions=positions)
    conditions = _substitution_conditions(sae, native[opts.replace], codes, firings, scale=opts.scale,
                                          random=opts.random, rank1_atoms=opts.rank1_atoms, seed=opts.seed)
    logits = branch_logits(model, tokens, site, firings.batch, firings.pos, conditions.edit, opts.readout_offset,
                           progress=progress, desc="substitution")
    rows = _substitution_rows(firings, conditions, _condition_kls(logits, opts.kl))
    settings = SubstitutionSettings(
        protocol=protocol, hook_name=hook_name, head=head, **vars(opts),
        positions=None if positions is None else positions.tolist(), features=features, overrides=overrides)
    return SubstitutionResult(rows, settings, time.perf_counter() - start)


def _substitution_options(protocol: str, options: SubstitutionOptions | None,
                          given: dict[str, Any]) -> tuple[SubstitutionOptions, tuple[str, ...]]:
    """The options of ``protocol`` (or ``options``) with the explicitly given ones winning, each checked; and the
    overrides."""
    opts, overrides = resolve("substitution", protocol, given, options)
    readout, readout_offset, cap = opts.readout, opts.readout_offset, opts.max_firings_per_atom
    if readout == "last" and readout_offset is not None:
        raise ValueError(f"readout_offset: applies to readout='offset' only, got {readout_offset} with readout='last' "
                         f"(the protocol {protocol!r} reads at the last position unless readout='offset' is passed)")
    if readout == "offset" and readout_offset is None:
        raise ValueError("readout_offset: expected an int >= 1 with readout='offset', got None")
    if cap is not None and cap < 1:
        raise ValueError(f"max_firings_per_atom: expected >= 1 or None, got {cap}")
    return opts, overrides


def _check_features(features: Sequence[SupportsIndex] | None, n_features: int) -> list[int] | None:
    """``features`` as sorted distinct atom indices (``None`` stays ``None``)."""
    if features is None:
        return None
    bad = [f for f in features if as_index(f, n_features) is None]
    if len(features) == 0 or bad:
        raise ValueError(f"features: expected a non-empty list of atom indices in [0, {n_features}), got "
                         f"{list(features) if not bad else bad}")
    return sorted({int(f) for f in features})


def _readout_window(model: ModelLike, tokens: Tensor, positions: Sequence[int] | Tensor | None, readout: str,
                    readout_offset: int | None) -> tuple[Tensor, Tensor | None, int]:
    """``(tokens, positions, last_position)``: the checked tokens, the checked write positions as a tensor, and
    the last write position the readout still sees."""
    gap = 1 if readout == "last" else readout_offset
    tokens = check_tokens(model, tokens, gap + 1)
    last_position = tokens.shape[1] - 1 - gap
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if len(positions) == 0 or int(positions.min()) < 0 or int(positions.max()) > last_position:
            where = f"readout_offset {readout_offset}" if readout == "offset" else "the last-position readout"
            raise ValueError(f"positions: expected a non-empty list of positions in [0, {last_position}] "
                             f"(sequence length {tokens.shape[1]}, {where}), got {positions.tolist()}")
    return tokens, positions, last_position


@torch.no_grad()
def _substitution_firings(sae: SAELike, native: dict[str, Tensor], *, replace: str, atom: str,
                          features: list[int] | None, cap: int | None, last_position: int, skip_positions: int,
                          seed: int, positions: Tensor | None) -> tuple[Tensor, _Firings]:
    """The SAE codes of the native states and the firings to test; refuses tokens without one."""
    codes = sae.encode(native["state"])
    scores = (codes - sae.encode(native["state"] - native[replace])).clamp_min(0) if atom == "rising" else codes
    firings = _firings(scores, atom=atom, features=features, max_firings_per_atom=cap, last_position=last_position,
                       skip_positions=skip_positions, seed=seed, positions=positions)
    if len(firings.batch) == 0:
        which = "" if features is None else f" (features {features})"
        raise ValueError(f"tokens: the SAE never fires{which} on these tokens at eligible positions")
    return codes, firings


@dataclass(frozen=True)
class _Conditions:
    """The substituted matrices of every firing: ``S′ = S_t − delta + X`` for ``X`` = ``x_atom``, 0 (delete) or
    ``x_random``; ``atom`` is the unscaled substituted atom (each ``[n, d_k, d_v]``)."""

    delta: Tensor
    atom: Tensor
    x_atom: Tensor
    x_random: Tensor

    def edit(self, S: Tensor, idx: Tensor) -> Tensor:
        """The four candidates (native, atom, delete, random) of the states ``S`` of firings ``idx``."""
        base = S - self.delta[idx].to(S.dtype)
        return torch.stack([S, base + self.x_atom[idx], base, base + self.x_random[idx]])


@torch.no_grad()
def _substitution_conditions(sae: SAELike, delta_all: Tensor, codes: Tensor, firings: _Firings, *, scale: str,
                             random: str, rank1_atoms: bool, seed: int) -> _Conditions:
    """The native update, the scaled atom and the random control at every firing."""
    atoms = sae.decoder_atoms().detach().float()
    if rank1_atoms:
        atoms = best_rank1(atoms)
    delta = delta_all[firings.batch, firings.pos].float()  # [n, d_k, d_v]
    A = atoms[firings.atom]
    if scale == "coefficient":
        x_atom = firings.coef[:, None, None].float() * A
    else:
        x_atom = frob(delta)[:, None, None] * A / frob(A).clamp_min(1e-12)[:, None, None]
    R = _random_matrices(random, atoms, codes[firings.batch, firings.pos] != 0, delta, seed)
    x_random = frob(x_atom)[:, None, None] * R / frob(R).clamp_min(1e-12)[:, None, None]
    return _Conditions(delta, A, x_atom, x_random)


def _random_matrices(random: str, atoms: Tensor, active: Tensor, delta: Tensor, seed: int) -> Tensor:
    """One random control matrix per firing (any norm): ``random``'s draw from a generator seeded ``seed + 1``;
    ``active`` ``[n, n_features]`` marks the atoms firing there (never drawn by ``"sae_atom"``)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = len(delta)
    dk, dv = atoms.shape[-2:]
    if random == "rank1":
        u = unit(torch.randn(n, dk, generator=g).to(delta.device))
        w = unit(torch.randn(n, dv, generator=g).to(delta.device))
        return u[:, :, None] * w[:, None, :]
    if random == "sae_atom":
        others = torch.rand(n, atoms.shape[0], generator=g).to(active.device).masked_fill(active, -1.0)
        return atoms[others.argmax(-1)]
    return empirical_resample(delta, g)


def _condition_kls(logits: Tensor, kl: str) -> list[Tensor]:
    """KL of the atom, delete and random conditions (``logits[1:]``) against the native readout (``logits[0]``)."""
    nat = logits[0]
    if kl == "native_to_condition":
        return [kl_divergence(nat, logits[c]) for c in (1, 2, 3)]
    return [kl_divergence(logits[c], nat) for c in (1, 2, 3)]


def _substitution_rows(firings: _Firings, conditions: _Conditions, kls: list[Tensor]) -> pd.DataFrame:
    """One row per firing: where, which atom, the update's size and cosine, the three KLs and the verdicts."""
    A, delta = conditions.atom, conditions.delta
    columns = {
        "batch": firings.batch, "pos": firings.pos, "feature": firings.feature, "atom": firings.atom,
        "coefficient": firings.coef.float(), "update_norm": frob(delta),
        "atom_cos": (A * delta).sum((-2, -1)) / (frob(A) * frob(delta)).clamp_min(1e-12),
        "kl_atom": kls[0], "kl_delete": kls[1], "kl_random": kls[2],
    }
    # the one move off the model's device: the table is built from the finished tensors
    rows = pd.DataFrame({name: t.cpu().numpy() for name, t in columns.items()})
    rows["win"] = rows["kl_atom"] < rows["kl_delete"]
    rows["chain"] = rows["win"] & (rows["kl_delete"] < rows["kl_random"])
    return rows
