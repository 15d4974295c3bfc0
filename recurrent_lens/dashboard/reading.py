"""Reading a feature's atom: which keys write it, which queries read it, which tokens its value side promotes.

A decoder atom ``A_i`` ``[d_k, d_v]`` is read through its leading singular pair ``σ v wᵀ`` (for a rank-1
WriteSAE atom, exactly ``v_i w_iᵀ``): ``v`` lives in key space, ``w`` in value space. A write ``β k uᵀ`` adds
``β (k·v)(u·w)`` to the atom's component, and a query ``q`` reads ``(q·v) w`` out of it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis.logit_shift import read_output_graph
from recurrent_lens.states.cells import Cell

_FEATURE_CHUNK = 1024
_CHANNEL_GROUP = 16
_VOCAB_CHUNK = 1 << 15


@torch.no_grad()
def atom_directions(sae, features: Int[Tensor, " n"]) -> tuple[Float[Tensor, "n d_k"], Float[Tensor, "n d_v"],
                                                             Float[Tensor, " n"]]:
    """Unit key-side ``v``, value-side ``w`` and the share ``σ₁² / ‖A‖_F²`` of each atom held by that pair.

    The pair's signs are those of the decoder's factors for a rank-1 factored SAE; otherwise of the SVD
    (a joint sign flip of ``v`` and ``w`` leaves the atom unchanged, and both readings below flip together).

    Example:
        >>> from recurrent_lens.sae import FlatSAE
        >>> sae = FlatSAE(4, 3, 5)
        >>> v, w, share = atom_directions(sae, torch.tensor([0, 2]))
        >>> tuple(v.shape), tuple(w.shape), bool(((share > 0) & (share <= 1 + 1e-6)).all())
        ((2, 4), (2, 3), True)
    """
    cfg = sae.cfg
    if cfg.decoder == "factored" and cfg.rank == 1:
        v, w = sae.V_dec[features, 0].float(), sae.W_dec[features, 0].float()
        share = torch.ones(len(features))
    else:
        all_atoms = sae.decoder_atoms()
        vs, ws, shares = [], [], []
        for chunk in features.split(_FEATURE_CHUNK):
            U, S, Vh = torch.linalg.svd(all_atoms[chunk.to(all_atoms.device)].float())
            vs.append(U[:, :, 0])
            ws.append(Vh[:, 0, :])
            shares.append(S[:, 0] ** 2 / S.pow(2).sum(1).clamp(min=1e-30))
        v, w, share = torch.cat(vs), torch.cat(ws), torch.cat(shares)
    # In place: indexing by ``features`` (or the SVD) made these copies, and a second pair would double them.
    v.div_(v.norm(dim=1, keepdim=True).clamp(min=1e-12))
    w.div_(w.norm(dim=1, keepdim=True).clamp(min=1e-12))
    return v.cpu(), w.cpu(), share.cpu()


def top_aligned(directions: Float[Tensor, "n d"], means: Float[Tensor, "n_ids d"], ids: Int[Tensor, " n_ids"],
                n_top: int) -> tuple[Int[Tensor, "n k"], Float[Tensor, "n k"]]:
    """For each direction, the ``n_top`` token ids whose (unit) mean vector has the largest cosine with it.

    Example:
        >>> ids, cos = top_aligned(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.6, 0.8]]),
        ...                        torch.tensor([5, 9]), n_top=1)
        >>> ids.tolist(), [round(c, 3) for c in cos[0].tolist()]
        ([[9]], [0.6])
    """
    k = min(n_top, len(ids))
    out_ids, out_cos = [], []
    for chunk in directions.split(_FEATURE_CHUNK):
        cos, idx = (chunk @ means.T).topk(k, dim=1)
        out_ids.append(ids[idx])
        out_cos.append(cos)
    return torch.cat(out_ids), torch.cat(out_cos)


def mean_output_jacobian(model, site: Cell, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "d_model d_v"]:
    """``E_t[∂ hook_out_t / ∂ hook_read_t[head]]`` over every position of ``tokens``.

    The output at ``t`` depends on the read at ``t`` alone, so the mean is one Jacobian-vector product per value
    channel through the output path (batched calls of 16 channels), summed over positions: the per-position
    Jacobians are never stored. The forward stops at the layer's ``hook_out``.

    Example:
        >>> from recurrent_lens.analysis.logit_shift import output_jacobian
        >>> cell = Cell("blocks.0.mixer.hook_state", 1)
        >>> J = mean_output_jacobian(tiny_model, cell, tiny_tokens)
        >>> tuple(J.shape), bool(torch.allclose(J, output_jacobian(tiny_model, tiny_tokens, cell).mean((0, 1)),
        ...                                     atol=1e-6))
        ((32, 8), True)
    """
    with torch.enable_grad():
        read, g, dummy = read_output_graph(model, site=site, tokens=tokens)
        cols = []
        # Channels in groups: one batched call per group keeps the transient tensors at a few times the output's.
        for group in torch.arange(read.shape[-1]).split(_CHANNEL_GROUP):
            e = read.new_zeros(len(group), *read.shape)
            e[torch.arange(len(group)), :, :, site.head, group] = 1.0
            (col,) = torch.autograd.grad(g, dummy, e, is_grads_batched=True, retain_graph=True)
            cols.append(col.sum((1, 2)))
    return torch.cat(cols).T / (tokens.shape[0] * tokens.shape[1])


@torch.no_grad()
def value_readout(model, site: Cell, sample: Int[Tensor, "batch pos"]) -> Float[Tensor, "d_vocab d_v"]:
    """``W_U · E_t[∂ hook_out_t / ∂ hook_read_t[head]]``: value space to direct logits, the output path
    (gated output norm, projection) linearised by its Jacobian averaged over the positions of ``sample``.

    The Jacobian of a gated RMSNorm at position ``t`` is ``diag(act(g_t) ⊙ γ) (I − r̂_t r̂_tᵀ) / rms_t`` (up to
    the norm's ε, ``r̂_t`` the unit read); averaging it keeps each position's gate and scale instead of replacing
    them by one mean value. The final norm is left out, as in the closed-form logit shift's
    ``readout="unembed"``: it rescales every logit of a position by the same positive factor, so the ranking
    of tokens does not depend on it.

    Example:
        >>> tuple(value_readout(tiny_model, Cell("blocks.0.mixer.hook_state", 0), tiny_tokens).shape)  # [d_vocab, d_v]
        (50, 8)
    """
    J = mean_output_jacobian(model, site, sample)
    W_U = (model.embed.weight if model.unembed is None else model.unembed.weight).detach()
    # By rows: an fp32 copy of a large vocabulary's whole W_U (1 GiB for Qwen3.5's) is never made.
    return torch.cat([rows.float() @ J.to(rows.device) for rows in W_U.split(_VOCAB_CHUNK)])


def logit_extremes(readout: Float[Tensor, "d_vocab d_v"], w: Float[Tensor, "n d_v"],
                   n_top: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token ids and logit effects of the ``n_top`` most promoted and most suppressed tokens per ``w``.

    Example:
        >>> up, up_v, down, down_v = logit_extremes(torch.eye(3), torch.tensor([[0.5, -1.0, 0.0]]), n_top=1)
        >>> up.tolist(), down.tolist(), up_v.tolist(), down_v.tolist()
        ([[0]], [[1]], [[0.5]], [[-1.0]])
    """
    k = min(n_top, readout.shape[0])
    up_i, up_v, down_i, down_v = [], [], [], []
    readout = readout.cpu()
    for chunk in w.split(_FEATURE_CHUNK):
        logits = chunk @ readout.T
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        up_i.append(top.indices)
        up_v.append(top.values)
        down_i.append(bottom.indices)
        down_v.append(bottom.values)
    return torch.cat(up_i), torch.cat(up_v), torch.cat(down_i), torch.cat(down_v)
