"""The closed-form logit shift of a state perturbation (the paper's Eq. 1, App. A).

Perturb ``S_{t0} += ε A_i`` and read at ``t = t0 + readout_offset``. Ignoring the delta-rule cross
terms and the nonlinearity of the output map, the read changes by ``ε (G ⊙ A_i)ᵀ q_t`` with
``G = exp(Σ_{s=t0+1}^{t} g_s)`` the accumulated decay (a scalar per head or one value per key
channel, from ``hook_decay``), and the logit of ``tok`` by::

    Δℓ ≈ ε · ⟨W_U[tok], W_O^{(h)} (G ⊙ A_i)ᵀ q_t⟩   =   ε·G·(v_i·q_t)·⟨W_U[tok], W_O^{(h)} w_i⟩   (rank 1, scalar G)

``W_O^{(h)}`` is defined for every architecture as the Jacobian of the mixer's output (``hook_out``)
with respect to the head's read (``hook_read``) at position ``t`` — for a plain output projection it
is the head's slice of ``out_proj``; for gated or normalised outputs it is their linearisation at the
native read. ``readout="unembed"`` uses ``W_U`` directly (the paper's form); ``readout="final_norm"``
also linearises the final norm at the native residual, which makes the prediction exact to first order
for the last layer of a linear recurrence. ``tok`` is the argmax of ``W_U W_O^{(h)} w_i`` (``w_i``: the
atom's leading right singular vector).

How prediction and measurement are compared (``fit``):

- ``"none"``: the closed form as is (zero parameters);
- ``"cell"``: one least-squares slope through the origin per (atom, ε) cell;
- ``"context"``: the paper's "Empirical G" (App. A): one G per (prompt, feature, eval token) — here per
  (sequence, t0, atom) — fitted by least squares across the ε values, which replaces the closed form's
  G by the fitted one. R² is then computed per (atom, ε) cell from the fitted predictions; it measures
  how linear each context's shift is in ε and the sign/ratio structure of the closed form, not whether
  the formula's G is right.

``formula="table9"`` is the variant of the paper's Table 9 (Experiment C): the prediction
``Δ̂ = v_iᵀ S_t w_i · W_out vec(v_i w_iᵀ)``, read here as the perturbation ``ε c A_i`` with
``c = ⟨S_{t0}, A_i⟩_F / ‖A_i‖_F²`` (``v_iᵀ S_{t0} w_i`` for unit factors: ε times the atom's own
component of the state) and the prediction ``ε c`` times the closed form; Table 9 pairs it with
ε ∈ {0.25, 0.5, 0.75, 1.0}.

Examples use ``tiny_model``, ``tiny_sae``, ``tiny_tokens`` (a random one-layer Gated DeltaNet, a random WriteSAE on
its ``[8, 8]`` states and two random sequences; built as :mod:`recurrent_lens.analysis` shows).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, SupportsIndex

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import (
    branch_logits, check_sae, check_tokens, native_run, use_device,
)
from recurrent_lens.analysis.protocols import (
    PRESET, Fit, Formula, LogitShiftOptions, LogitShiftSettings, ShiftReadout, documented, resolve,
)
from recurrent_lens.analysis.results import LogitShiftResult
from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.states.cells import Cell, as_index, parse_cell


def unembedding(model: ModelLike) -> Tensor:
    """``W_U`` ``[d_vocab, d_model]`` (the embedding when tied)."""
    return (model.embed.weight if model.unembed is None else model.unembed.weight).detach().float()


class _OutputKnown(Exception):
    """Raised once the layer's output is captured: the rest of the forward is not needed."""


def read_output_graph(model: ModelLike, tokens: Int[Tensor, "batch pos"],
                      site: Cell) -> tuple[Tensor, Tensor, Tensor]:
    """``(read, g, dummy)`` for Jacobian-vector products of ``∂ hook_out / ∂ hook_read``: ``read`` is the
    layer's read as a leaf and ``g = Jᵀ·dummy`` is built with ``create_graph``, so the gradient of ``g`` with
    respect to ``dummy`` along ``e`` is ``J e`` (forward mode by double backward). The model runs only up to
    the layer's ``hook_out``. Call it, and take the products, under ``torch.enable_grad()``.

    Example:
        >>> cell = Cell("blocks.0.mixer.hook_state", 1)
        >>> with torch.enable_grad():
        ...     read, g, dummy = read_output_graph(tiny_model, tiny_tokens, cell)
        ...     e = torch.zeros_like(read); e[..., 1, 0] = 1.0
        ...     (column,) = torch.autograd.grad(g, dummy, e)
        >>> bool(torch.allclose(column, output_jacobian(tiny_model, tiny_tokens, cell)[..., 0], atol=1e-6))
        True
    """
    captured: dict[str, Tensor] = {}

    def grab_read(x, hook):
        captured["read"] = x.detach().requires_grad_(True)
        return captured["read"]

    def grab_out(x, hook):
        captured["out"] = x
        raise _OutputKnown

    try:
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(site.hook("hook_read"), grab_read),
                                                                  (site.hook("hook_out"), grab_out)])
    except _OutputKnown:
        pass
    read, out = captured["read"], captured["out"].float()
    dummy = torch.zeros_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, read, dummy, create_graph=True)
    return read, g, dummy


def output_jacobian(model: ModelLike, tokens: Int[Tensor, "batch pos"],
                    site: Cell) -> Float[Tensor, "batch pos d_model d_v"]:
    """``W_O^{(h)}`` at every position: ∂ hook_out / ∂ hook_read[head], by forward-mode products
    (double backward), one per value channel."""
    with torch.enable_grad():
        read, g, dummy = read_output_graph(model, tokens, site)
        cols = []
        for j in range(read.shape[-1]):
            e = torch.zeros_like(read)
            e[:, :, site.head, j] = 1.0
            (col,) = torch.autograd.grad(g, dummy, e, retain_graph=True)
            cols.append(col.detach())
    return torch.stack(cols, -1)


def final_norm_jvp(model: ModelLike, resid: Float[Tensor, "n d_model"],
                   direction: Float[Tensor, "n d_model"]) -> Tensor:
    """``J_{ln_final}(resid) · direction`` row by row."""
    with torch.enable_grad():
        r = resid.detach().float().requires_grad_(True)
        y = model.ln_final(r.to(model.embed.weight.dtype)).float()
        dummy = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, r, dummy, create_graph=True)
        (out,) = torch.autograd.grad(g, dummy, direction.float())
    return out


def _dominant_atoms(codes: Float[Tensor, "batch pos n_features"], n_atoms: int) -> list[int]:
    """Up to ``n_atoms`` atoms that have the largest code somewhere a code fires, most often first
    (ties: lower index first)."""
    fires = (codes > 0).any(-1)
    counts = torch.bincount(codes[fires].argmax(-1), minlength=codes.shape[-1])
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[counts[order] > 0][:n_atoms].tolist()


@documented("logit_shift")
def logit_shift_prediction(
    model: ModelLike,
    sae: SAELike,
    hook_name: str,
    head: int,
    tokens: Int[Tensor, "batch pos"],
    atoms: Sequence[SupportsIndex] | None = None,
    eps: Sequence[float] = PRESET,
    *,
    protocol: str = "ours",
    options: LogitShiftOptions | None = None,
    n_atoms: int = PRESET,
    positions_per_atom: int = PRESET,
    fit: Fit = PRESET,
    formula: Formula = PRESET,
    readout_offset: int = PRESET,
    readout: ShiftReadout = PRESET,
    skip_positions: int = PRESET,
    seed: int = PRESET,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> LogitShiftResult:
    """Closed-form vs measured logit shifts of ``S_{t0} += ε A_i``.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE on ``[d_k, d_v]`` states of ``hook_name``/``head`` (only its encoder and decoder
            atoms are used).
        hook_name: ``blocks.{l}.mixer.hook_state``.
        head: the head the SAE reads.
        tokens: ``[batch, pos]`` sequences.
        atoms: SAE atom indices to perturb (default: the ``n_atoms`` atoms most often dominant on ``tokens``,
            counted at positions ``>= skip_positions`` where some code fires).
        progress: show a progress bar over perturbed positions.
        device: where it runs: ``model`` and ``sae`` are moved there (default: the model's device); its
            tensors stay there until the result table is built. An unknown or unavailable device raises
            ``ValueError`` naming ``device``.

    Returns:
        A :class:`~recurrent_lens.analysis.results.LogitShiftResult` with zero- and one-parameter R² and
        the per-cell R² under every fit; its ``settings`` (a
        :class:`~recurrent_lens.analysis.protocols.LogitShiftSettings`) hold the atoms used.

    Example:
        >>> from recurrent_lens.analysis import logit_shift_prediction
        >>> result = logit_shift_prediction(tiny_model, tiny_sae, "blocks.0.mixer.hook_state", 0, tiny_tokens,
        ...                                 eps=(0.1, 1.0), n_atoms=2, positions_per_atom=3)
        >>> len(result.settings["atoms"]), len(result.to_pandas())  # 2 atoms x 2 eps x 3 positions
        (2, 12)
        >>> paper = logit_shift_prediction(tiny_model, tiny_sae, "blocks.0.mixer.hook_state", 0, tiny_tokens,
        ...                                protocol="paper", n_atoms=2, positions_per_atom=3)
        >>> paper.settings.fit, paper.settings.overrides
        ('context', ('n_atoms', 'positions_per_atom'))
    """
    opts, overrides = _logit_shift_options(protocol, options, dict(
        eps=eps, n_atoms=n_atoms, positions_per_atom=positions_per_atom, fit=fit, formula=formula, readout=readout,
        readout_offset=readout_offset, skip_positions=skip_positions, seed=seed))
    readout_offset, skip_positions, seed = opts.readout_offset, opts.skip_positions, opts.seed
    use_device(model, sae, device)
    site = parse_cell(model, hook_name, head, kinds=("state",))
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, readout_offset + 1)
    per_seq = _contexts_per_sequence(tokens.shape[1], readout_offset, skip_positions)
    atoms = _check_atoms(atoms, sae.cfg.n_features)
    native = native_run(model, tokens, site)
    atoms = _atoms_to_perturb(sae, native, atoms, opts.n_atoms, skip_positions)
    contexts = _draw_contexts(atoms, tokens.shape[0], per_seq, opts.positions_per_atom, skip_positions, seed,
                              tokens.device)
    prediction = _closed_form(model, sae, tokens, site, native, atoms, contexts, formula=opts.formula,
                              readout=opts.readout, readout_offset=readout_offset)
    eps_list = [float(e) for e in opts.eps]
    measured = _measured_shifts(model, tokens, site, contexts, prediction, eps_list, readout_offset, progress)
    settings = LogitShiftSettings(protocol=protocol, hook_name=hook_name, head=head, atoms=atoms,
                                  **{**vars(opts), "eps": eps_list}, overrides=overrides)
    return LogitShiftResult(_logit_shift_rows(contexts, prediction, eps_list, measured), settings)


def _logit_shift_options(protocol: str, options: LogitShiftOptions | None,
                         given: dict[str, Any]) -> tuple[LogitShiftOptions, tuple[str, ...]]:
    """The options of ``protocol`` (or ``options``) with the explicitly given ones winning, each checked; and the
    overrides."""
    opts, overrides = resolve("logit_shift", protocol, given, options)
    eps, n_atoms, positions_per_atom, fit = opts.eps, opts.n_atoms, opts.positions_per_atom, opts.fit
    if not eps:
        raise ValueError("eps: expected at least one perturbation size")
    if fit == "context" and len(set(float(e) for e in eps)) < 2:
        raise ValueError(f"eps: fit='context' fits one G per context across the eps values, so it needs at least "
                         f"two distinct values, got {list(eps)}")
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 1:
        raise ValueError(f"n_atoms: expected a positive integer, got {n_atoms!r}")
    if isinstance(positions_per_atom, bool) or not isinstance(positions_per_atom, int) or positions_per_atom < 1:
        raise ValueError(f"positions_per_atom: expected a positive integer, got {positions_per_atom!r}")
    return opts, overrides


def _contexts_per_sequence(n_positions: int, readout_offset: int, skip_positions: int) -> int:
    """How many perturbation positions ``t0`` each sequence offers (``skip_positions <= t0 < pos - readout_offset``)."""
    per_seq = n_positions - readout_offset - skip_positions
    if per_seq < 1:
        raise ValueError(f"tokens: no eligible position in {n_positions} positions (readout_offset {readout_offset}, "
                         f"skip_positions {skip_positions})")
    return per_seq


def _check_atoms(atoms: Sequence[SupportsIndex] | None, n_features: int) -> list[int] | None:
    """``atoms`` as a list of ``int`` atom indices (``None`` stays ``None``)."""
    if atoms is None:
        return None
    if len(atoms) == 0:
        raise ValueError("atoms: expected at least one atom index (or None for the dominant atoms)")
    bad = [a for a in atoms if as_index(a, n_features) is None]
    if bad:
        raise ValueError(f"atoms: expected integer indices in [0, {n_features}), got {bad}")
    return [operator.index(a) for a in atoms]


@torch.no_grad()
def _atoms_to_perturb(sae: SAELike, native: dict[str, Tensor], atoms: list[int] | None, n_atoms: int,
                      skip_positions: int) -> list[int]:
    """The given atoms, or else the ``n_atoms`` most often dominant ones; refuses an SAE that never fires."""
    if atoms is not None:
        return atoms
    atoms = _dominant_atoms(sae.encode(native["state"][:, skip_positions:]), n_atoms)
    if not atoms:
        raise ValueError(f"sae: no atom fires on tokens (positions >= skip_positions = {skip_positions}), "
                         f"so none is dominant; pass atoms explicitly")
    return atoms


class _Contexts(NamedTuple):
    """The perturbed rows, each ``[n]``: sequence ``batch``, position ``t0``, ``slot`` (index into the atoms
    list) and ``atom`` (the atom's index)."""

    batch: Tensor
    t0: Tensor
    slot: Tensor
    atom: Tensor


def _draw_contexts(atoms: list[int], batch: int, per_seq: int, positions_per_atom: int, skip_positions: int,
                   seed: int, device: torch.device) -> _Contexts:
    """Up to ``positions_per_atom`` distinct random ``(sequence, t0)`` pairs per atom, one seeded stream (drawn
    on the CPU, so the same on every device), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(batch * per_seq, generator=g)[:positions_per_atom] for _ in atoms]
    pick = torch.cat(picks)
    slot = torch.arange(len(atoms)).repeat_interleave(len(picks[0]))
    contexts = _Contexts(pick // per_seq, pick % per_seq + skip_positions, slot, torch.tensor(atoms)[slot])
    return _Contexts(*(c.to(device) for c in contexts))


class _Prediction(NamedTuple):
    """The closed form of every row: the read ``token``, its predicted logit shift per unit ε (``unit_shift``)
    and the state perturbation per unit ε (``step``, ``[n, d_k, d_v]``)."""

    token: Tensor
    unit_shift: Tensor
    step: Tensor


@torch.no_grad()
def _closed_form(model: ModelLike, sae: SAELike, tokens: Tensor, site: Cell, native: dict[str, Tensor],
                 atoms: list[int], contexts: _Contexts, *, formula: str, readout: str,
                 readout_offset: int) -> _Prediction:
    """Eq. 1 at every row (``formula="table9"``: scaled by the state's component on the atom)."""
    all_atoms = sae.decoder_atoms().detach().float()
    b, t0, slot = contexts.batch, contexts.t0, contexts.slot
    t = t0 + readout_offset
    A = all_atoms[contexts.atom]  # [n, d_k, d_v]
    if formula == "table9":
        S0 = native["state"][b, t0].float()
        coef = (S0 * A).sum((-2, -1)) / (A * A).sum((-2, -1)).clamp_min(1e-12)
    else:
        coef = torch.ones(len(b), device=b.device)
    G = _accumulated_decay(native["decay"], b, t0, t, A.shape[1])
    q = native["q"][b, t].float()
    d_read = torch.einsum("nk,nkv->nv", G * q, A)  # read change per unit ε
    J = output_jacobian(model, tokens, site)[b, t]  # [n, d_model, d_v]
    out_dir = torch.einsum("nmv,nv->nm", J, d_read)
    # one SVD per atom, not per row; w₁ keeps the SVD's sign (flipping u₁ and w₁ leaves σ₁u₁w₁ᵀ as is)
    w_lead = torch.linalg.svd(all_atoms[atoms]).Vh[:, 0][slot]
    lead_dir = torch.einsum("nmv,nv->nm", J, w_lead)
    W_U = unembedding(model)
    if readout == "final_norm":
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        _, cache = model.run_with_cache(tokens, names_filter=last)
        resid = cache[last][b, t]
        out_dir = final_norm_jvp(model, resid, out_dir)
        lead_dir = final_norm_jvp(model, resid, lead_dir)
    tok = (lead_dir @ W_U.T).argmax(-1)
    return _Prediction(tok, coef * (out_dir * W_U[tok]).sum(-1), coef[:, None, None] * A)


def _accumulated_decay(decay: Tensor | None, b: Tensor, t0: Tensor, t: Tensor, d_k: int) -> Tensor:
    """``G = exp(Σ_{s=t0+1}^{t} g_s)`` of every row, ``[n, d_k]`` (ones without decay)."""
    if decay is None:
        return torch.ones(len(b), d_k, device=b.device)
    cum = torch.cat([decay.new_zeros(decay.shape[0], 1, *decay.shape[2:]), decay.float().cumsum(1)], 1)
    G = (cum[b, t + 1] - cum[b, t0 + 1]).exp()  # sum of g over t0+1..t
    return G[:, None].expand(-1, d_k) if G.dim() == 1 else G


def _measured_shifts(model: ModelLike, tokens: Tensor, site: Cell, contexts: _Contexts, prediction: _Prediction,
                     eps: list[float], readout_offset: int, progress: bool) -> Tensor:
    """The measured logit shift of each row's token at every ε, ``[n_eps, n]``."""
    step = prediction.step

    def edit(S: Tensor, idx: Tensor) -> Tensor:
        return torch.stack([S] + [S + e * step[idx].to(S.dtype) for e in eps])

    logits = branch_logits(model, tokens, site, contexts.batch, contexts.t0, edit, readout_offset, progress=progress,
                           desc="logit shift")
    sel = logits.gather(-1, prediction.token[None, :, None].expand(len(eps) + 1, -1, 1))[..., 0]
    return sel[1:] - sel[:1]


def _logit_shift_rows(contexts: _Contexts, prediction: _Prediction, eps: list[float], measured: Tensor) -> pd.DataFrame:
    """One row per (ε, perturbed context), ε by ε."""
    where = {"atom": contexts.atom.cpu().numpy(), "batch": contexts.batch.cpu().numpy(),
             "pos": contexts.t0.cpu().numpy(), "token": prediction.token.cpu().numpy()}
    frames = []
    for i, e in enumerate(eps):
        frames.append(pd.DataFrame({"atom": where["atom"], "eps": e, "batch": where["batch"], "pos": where["pos"],
                                    "token": where["token"], "predicted": (e * prediction.unit_shift).cpu().numpy(),
                                    "measured": measured[i].cpu().numpy()}))
    return pd.concat(frames, ignore_index=True)
