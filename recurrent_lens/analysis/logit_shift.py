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
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import SupportsIndex

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import (
    Site, as_index, branch_logits, check_sae, check_tokens, native_run, parse_site,
)
from recurrent_lens.analysis.protocols import PRESET, LogitShiftSettings, check_protocol, resolve
from recurrent_lens.analysis.results import LogitShiftResult


def unembedding(model) -> Tensor:
    """``W_U`` ``[d_vocab, d_model]`` (the embedding when tied)."""
    return (model.embed.weight if model.unembed is None else model.unembed.weight).detach().float()


def output_jacobian(model, tokens: Int[Tensor, "batch pos"], site: Site) -> Float[Tensor, "batch pos d_model d_v"]:
    """``W_O^{(h)}`` at every position: ∂ hook_out / ∂ hook_read[head], by forward-mode products
    (double backward), one per value channel."""
    captured: dict[str, Tensor] = {}

    def grab_read(x, hook):
        captured["read"] = x.detach().requires_grad_(True)
        return captured["read"]

    def grab_out(x, hook):
        captured["out"] = x
        return x

    with torch.enable_grad():
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(site.hook("hook_read"), grab_read),
                                                                  (site.hook("hook_out"), grab_out)])
        read, out = captured["read"], captured["out"].float()
        dummy = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, read, dummy, create_graph=True)
        cols = []
        for j in range(read.shape[-1]):
            e = torch.zeros_like(read)
            e[:, :, site.head, j] = 1.0
            (col,) = torch.autograd.grad(g, dummy, e, retain_graph=True)
            cols.append(col.detach())
    return torch.stack(cols, -1)


def final_norm_jvp(model, resid: Float[Tensor, "n d_model"], direction: Float[Tensor, "n d_model"]) -> Tensor:
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


def logit_shift_prediction(
    model,
    sae,
    hook_name: str,
    head: int,
    tokens: Int[Tensor, "batch pos"],
    atoms: Sequence[SupportsIndex] | None = None,
    eps: Sequence[float] = PRESET,
    *,
    protocol: str = "ours",
    n_atoms: int = PRESET,
    positions_per_atom: int = PRESET,
    fit: str = PRESET,
    formula: str = PRESET,
    readout_offset: int = PRESET,
    readout: str = PRESET,
    skip_positions: int = 0,
    seed: int = 2026,
    progress: bool = False,
) -> LogitShiftResult:
    """Closed-form vs measured logit shifts of ``S_{t0} += ε A_i``.

    Every option marked *(protocol)* defaults to the choice of ``protocol``; an option passed explicitly
    wins over the preset (``result.settings.overrides`` lists those that differ from it).

    ``protocol="ours"`` (the default): ``eps=(0.1, 0.3, 1.0, 3.0)``, ``n_atoms=10``,
    ``positions_per_atom=50``, ``fit='none'``, ``formula='closed_form'``, ``readout='unembed'``,
    ``readout_offset=1``: Eq. 1 with no fitted parameter, as §3.2 describes it.

    ``protocol="paper"`` (arXiv 2605.12770):

    - ``fit='context'``: App. A ("Empirical G") fits G "numerically: one scalar per (prompt, feature,
      eval-token) triple, recovered by least squares", which contradicts §3.2's "no fitted parameters"
      (``fit='none'``); the reported median R² = 0.983 is the fitted one.
    - ``eps=(0.1, 0.3, 1.0, 3.0)``, ``n_atoms=50``, ``positions_per_atom=500``: App. A's population audit,
      50 × 4 (atom, ε) cells with 500 prompts each.
    - ``formula='closed_form'`` (Eq. 1). Table 9 (Experiment C) states a variant,
      ``v_iᵀ S_t w_i · W_out vec(v_i w_iᵀ)`` with ε ∈ {0.25, 0.5, 0.75, 1.0}: ``formula='table9'``.
    - ``readout='unembed'`` (Eq. 1's ``W_U[tok]``), ``readout_offset=1`` (App. A leaves the horizon open).
    - the seed 2026 is Table 9's (also this function's default under both protocols).

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE on ``[d_k, d_v]`` states of ``hook_name``/``head`` (only its encoder and decoder
            atoms are used).
        hook_name: ``blocks.{l}.mixer.hook_state``.
        head: the head the SAE reads.
        tokens: ``[batch, pos]`` sequences.
        atoms: SAE atom indices to perturb (default: the ``n_atoms`` atoms most often dominant on ``tokens``).
        eps: *(protocol)* perturbation sizes ε.
        protocol: ``"ours"`` (default) or ``"paper"``: the preset of every *(protocol)* option.
        n_atoms: *(protocol)* with ``atoms=None``, how many atoms to take: the atoms that have the largest
            code at least once (positions ``>= skip_positions`` where some code fires), most often dominant
            first; fewer when fewer are ever dominant. Unused when ``atoms`` is given.
        positions_per_atom: *(protocol)* random ``(sequence, t0)`` pairs per atom (seeded).
        fit: *(protocol)* ``"none"``, ``"cell"`` or ``"context"`` (see the module docstring): what
            ``result.per_cell()`` and the summary's ``median_cell_r2`` use. ``"context"`` needs two or
            more ε. Every fit stays available on the result.
        formula: *(protocol)* ``"closed_form"`` (perturb by ``ε A_i``) or ``"table9"`` (perturb by
            ``ε c A_i``, ``c`` the state's projection on the atom; see the module docstring).
        readout_offset: *(protocol)* read at ``t0 + readout_offset`` (>= 1).
        readout: *(protocol)* ``"unembed"`` (W_U, the paper's form) or ``"final_norm"`` (W_U after the
            final norm's Jacobian).
        skip_positions: neither perturb at nor count dominance on the first positions (e.g. BOS).
        seed: seeds the ``(sequence, t0)`` draws. The default, 2026, is the paper's audit seed (Table 9),
            unlike the other analyses' 0.
        progress: show a progress bar over perturbed positions.

    Returns:
        A :class:`~recurrent_lens.analysis.results.LogitShiftResult` with zero- and one-parameter R² and
        the per-cell R² under every fit; its ``settings`` (a
        :class:`~recurrent_lens.analysis.protocols.LogitShiftSettings`) hold the atoms used.

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
        >>> result = logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 0, tokens, eps=(0.1, 1.0),
        ...                                 n_atoms=2, positions_per_atom=3)
        >>> len(result.settings["atoms"]), len(result.to_pandas())  # 2 atoms x 2 eps x 3 positions
        (2, 12)
        >>> paper = logit_shift_prediction(model, sae, "blocks.0.mixer.hook_state", 0, tokens, protocol="paper",
        ...                                n_atoms=2, positions_per_atom=3)
        >>> paper.settings.fit, paper.settings.overrides
        ('context', ('n_atoms', 'positions_per_atom'))
    """
    check_protocol(protocol)
    opts, overrides = resolve("logit_shift", protocol, dict(
        eps=eps, n_atoms=n_atoms, positions_per_atom=positions_per_atom, fit=fit, formula=formula,
        readout=readout, readout_offset=readout_offset))
    eps, n_atoms, positions_per_atom = opts["eps"], opts["n_atoms"], opts["positions_per_atom"]
    fit, formula, readout, readout_offset = opts["fit"], opts["formula"], opts["readout"], opts["readout_offset"]
    if readout not in ("unembed", "final_norm"):
        raise ValueError(f"readout: expected 'unembed' or 'final_norm', got {readout!r}")
    if fit not in ("none", "cell", "context"):
        raise ValueError(f"fit: expected 'none', 'cell' or 'context', got {fit!r}")
    if formula not in ("closed_form", "table9"):
        raise ValueError(f"formula: expected 'closed_form' or 'table9', got {formula!r}")
    if not eps:
        raise ValueError("eps: expected at least one perturbation size")
    if fit == "context" and len(set(float(e) for e in eps)) < 2:
        raise ValueError(f"eps: fit='context' fits one G per context across the eps values, so it needs at least "
                         f"two distinct values, got {list(eps)}")
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 1:
        raise ValueError(f"n_atoms: expected a positive integer, got {n_atoms!r}")
    if isinstance(positions_per_atom, bool) or not isinstance(positions_per_atom, int) or positions_per_atom < 1:
        raise ValueError(f"positions_per_atom: expected a positive integer, got {positions_per_atom!r}")
    site = parse_site(model, hook_name, head)
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, readout_offset + 1)
    B, T = tokens.shape
    per_seq = T - readout_offset - skip_positions
    if per_seq < 1:
        raise ValueError(f"tokens: no eligible position in {T} positions (readout_offset {readout_offset}, "
                         f"skip_positions {skip_positions})")
    if atoms is not None:
        if len(atoms) == 0:
            raise ValueError("atoms: expected at least one atom index (or None for the dominant atoms)")
        bad = [a for a in atoms if as_index(a, sae.cfg.n_features) is None]
        if bad:
            raise ValueError(f"atoms: expected integer indices in [0, {sae.cfg.n_features}), got {bad}")
        atoms = [operator.index(a) for a in atoms]
    native = native_run(model, tokens, site)
    with torch.no_grad():
        all_atoms = sae.decoder_atoms().detach().float()
        if atoms is None:
            atoms = _dominant_atoms(sae.encode(native["state"][:, skip_positions:]), n_atoms)
            if not atoms:
                raise ValueError(f"sae: no atom fires on tokens (positions >= skip_positions = {skip_positions}), "
                                 f"so none is dominant; pass atoms explicitly")
        g = torch.Generator().manual_seed(seed)
        picks = [torch.randperm(B * per_seq, generator=g)[:positions_per_atom] for _ in atoms]
        pick = torch.cat(picks)
        b, t0 = pick // per_seq, pick % per_seq + skip_positions
        slot = torch.arange(len(atoms)).repeat_interleave(len(picks[0]))  # row -> index into atoms
        atom = torch.tensor(atoms)[slot]
        t = t0 + readout_offset
        A = all_atoms[atom]  # [n, d_k, d_v]
        if formula == "table9":
            S0 = native["state"][b, t0].float()
            coef = (S0 * A).sum((-2, -1)) / (A * A).sum((-2, -1)).clamp_min(1e-12)
        else:
            coef = torch.ones(len(b))
        decay = native["decay"]
        if decay is None:
            G = torch.ones(len(b), A.shape[1])
        else:
            cum = torch.cat([decay.new_zeros(B, 1, *decay.shape[2:]), decay.float().cumsum(1)], 1)
            G = (cum[b, t + 1] - cum[b, t0 + 1]).exp()  # sum of g over t0+1..t
            G = G[:, None].expand(-1, A.shape[1]) if G.dim() == 1 else G
        q = native["q"][b, t].float()
        d_read = torch.einsum("nk,nkv->nv", G * q, A)  # read change per unit ε
        J = output_jacobian(model, tokens, site)[b, t]  # [n, d_model, d_v]
        out_dir = torch.einsum("nmv,nv->nm", J, d_read)
        # one SVD per atom, not per row; w₁ keeps the SVD's sign (flipping u₁ and w₁ leaves σ₁u₁w₁ᵀ as is)
        w_lead = torch.linalg.svd(all_atoms[atoms]).Vh[:, 0][slot]
        lead_dir = torch.einsum("nmv,nv->nm", J, w_lead)
        W_U = unembedding(model)
        if readout == "final_norm":
            _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
            resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][b, t]
            out_dir = final_norm_jvp(model, resid, out_dir)
            lead_dir = final_norm_jvp(model, resid, lead_dir)
        tok = (lead_dir @ W_U.T).argmax(-1)
        unit_pred = coef * (out_dir * W_U[tok]).sum(-1)
        eps_list = [float(e) for e in eps]
        step = coef[:, None, None] * A

    def edit(S: Tensor, idx: Tensor) -> Tensor:
        return torch.stack([S] + [S + e * step[idx].to(S.dtype) for e in eps_list])

    logits = branch_logits(model, tokens, site, b, t0, edit, readout_offset, progress=progress, desc="logit shift")
    sel = logits.gather(-1, tok[None, :, None].expand(len(eps_list) + 1, -1, 1))[..., 0]
    measured = sel[1:] - sel[:1]  # [n_eps, n]
    frames = []
    for i, e in enumerate(eps_list):
        frames.append(pd.DataFrame({"atom": atom.numpy(), "eps": e, "batch": b.numpy(), "pos": t0.numpy(),
                                    "token": tok.numpy(), "predicted": (e * unit_pred).numpy(),
                                    "measured": measured[i].numpy()}))
    settings = LogitShiftSettings(
        protocol=protocol, hook_name=hook_name, head=head, atoms=atoms, eps=eps_list, n_atoms=n_atoms,
        fit=fit, formula=formula, readout=readout, readout_offset=readout_offset,
        positions_per_atom=positions_per_atom, skip_positions=skip_positions, seed=seed, overrides=overrides)
    return LogitShiftResult(pd.concat(frames, ignore_index=True), settings)
