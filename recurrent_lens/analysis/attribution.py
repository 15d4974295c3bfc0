"""Which past writes built a feature's firing: SAE pre-activations split exactly over the writes.

Every SAE kind's pre-activation (``hook_sae_acts_pre``) is affine in the state it reads:
``pre_i(S) = scale_i <E_i, S - mean>_F + bias_i`` (WriteSAE ``E_i = v_i w_iᵀ``, Flat and Matrix a dense
``E_i`` on ``vec(S)``, Bilinear a sum of rank-1 terms; ``scale_i`` is Gated's ``exp(r_mag)``, else 1). With
``S_t = Φ_{0→t} S_0 + Σ_{s≤t} (Φ_{s→t} k̃_s) v_sᵀ`` (:mod:`recurrent_lens.models.attribution`), the term of
the write at ``s`` is ``scale_i (Φ_{s→t} k̃_s)ᵀ E_i v_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.models.attribution import capture, carried_writes, positions_by_step
from recurrent_lens.models.scan import boundary_scan, replay_at
from recurrent_lens.states.cells import Cell, check_positions, parse_cell

FEATURE_CHUNK_ELEMENTS = 1 << 24
"""Features are attributed in chunks whose ``E_i v_s`` terms (``[batch, feature, pos, d_k]``) stay under this many
elements (64 MiB in fp32), so that all of a large SAE's features fit."""


@dataclass
class FeatureAttribution:
    """SAE pre-activations at chosen positions split into one term per past write.

    ``writes.sum(-1) + initial + bias`` equals ``pre_activation`` (fp32 rounding apart), and zeroing the write
    at ``s`` through ``hook_write`` moves the pre-activation at ``t`` by ``-writes[..., s]``.

    Attributes:
        writes: ``[batch, pos, feature, write_pos]``, the term of each write (zero after the read position).
        initial: ``[batch, pos, feature]``, the term of the layer's initial state.
        bias: ``[batch, pos, feature]``, the SAE's bias and centring: ``bias_i - scale_i <E_i, mean>_F``.
        pre_activation: ``[batch, pos, feature]``, the SAE's pre-activation on the state at the position, from
            the model's own scan.
        positions: ``[batch, pos]``, the positions.
        features: ``[feature]``, the feature indices.
        hook_name: the hook the SAE reads (``blocks.{l}.mixer.hook_state`` or ``...hook_write``).
        head: the head it reads.
    """

    writes: Float[Tensor, "batch pos feature write_pos"]
    initial: Float[Tensor, "batch pos feature"]
    bias: Float[Tensor, "batch pos feature"]
    pre_activation: Float[Tensor, "batch pos feature"]
    positions: Int[Tensor, "batch pos"]
    features: Int[Tensor, " feature"]
    hook_name: str
    head: int

    def total(self) -> Float[Tensor, "batch pos feature"]:
        """``writes.sum(-1) + initial + bias``: the pre-activation rebuilt from its terms."""
        return self.writes.sum(-1) + self.initial + self.bias

    def top_writers(self, k: int = 5) -> tuple[Float[Tensor, "batch pos feature k"],
                                               Int[Tensor, "batch pos feature k"]]:
        """The ``k`` writes with the largest terms, ``(values, write positions)``, largest first."""
        return self.writes.topk(min(k, self.writes.shape[-1]), dim=-1)


def _cell(model: Any, sae: Any) -> Cell:
    metadata = sae.cfg.metadata
    hook_name, head = metadata.get("hook_name"), metadata.get("head")
    if hook_name is None or head is None:
        raise ValueError(f"sae.cfg.metadata: expected 'hook_name' and 'head' (the cell the SAE reads), "
                         f"got hook_name={hook_name!r}, head={head!r}")
    cell = parse_cell(model, hook_name, head, head_name="sae.cfg.metadata['head']")
    if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
        raise ValueError(f"sae: expected d_k={model.cfg.d_k}, d_v={model.cfg.d_v} (the model's state), "
                         f"got d_k={sae.cfg.d_k}, d_v={sae.cfg.d_v}")
    return cell


def _features(features: Any, n_features: int, device: torch.device) -> Tensor:
    if features is None:
        return torch.arange(n_features, device=device)
    f = torch.as_tensor([features] if isinstance(features, int) else features, device=device)
    if f.dtype.is_floating_point or f.dtype == torch.bool or f.dim() != 1 or not f.numel():
        raise ValueError(f"features: expected a feature index or a non-empty list of them, got {features!r}")
    if f.min() < 0 or f.max() >= n_features:
        raise ValueError(f"features: expected indices in [0, {n_features}), got min {int(f.min())} and "
                         f"max {int(f.max())}")
    return f.long()


def feature_attribution(model: Any, sae: Any, tokens: Any, positions: Tensor | Sequence[Any],
                        features: int | Sequence[int] | Tensor | None = None, *,
                        initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
                        progress: bool | None = None) -> FeatureAttribution:
    """Split an SAE's pre-activations at ``positions`` into one term per past write of its layer.

    The SAE's cell comes from ``sae.cfg.metadata`` (``hook_name``, ``head``). On ``hook_state`` the state is
    the sum of every past write carried through the run's transitions, so each write gets its exact term. On
    ``hook_write`` the SAE reads the write at ``t`` alone: that write carries the whole state-dependent part and
    every other term is zero (kept, so the identity and the deletion check read the same for both hooks).
    Other hooks are refused. Runs under ``torch.no_grad``; the forward stops at the SAE's layer. Memory beyond
    the forward: ``[batch, n, pos, d_k]`` carried keys at the read positions, one chunk of features'
    ``[batch, feature, pos, d_k]`` encoder rows applied to the values (:data:`FEATURE_CHUNK_ELEMENTS`), and the
    result.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE of any kind whose ``cfg.metadata`` names its cell.
        tokens: ``[batch, pos]`` token ids.
        positions: ``[batch, n]`` or ``[n]`` read positions.
        features: a feature index, a list of them, or ``None`` for all.
        initial_state: ``[batch, head, d_k, d_v]``, the layer's state before the first token (every head, as
            the forward's ``initial_states``).
        progress: show a progress bar (``None``: for long sequences).

    Returns:
        A :class:`FeatureAttribution`.

    Example:
        >>> import torch
        >>> from recurrent_lens.analysis import feature_attribution
        >>> from recurrent_lens.sae import FlatSAE
        >>> sae = FlatSAE(8, 8, 16, k=2, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
        >>> fa = feature_attribution(tiny_model, sae, tiny_tokens, [2, 7], features=[0, 5])
        >>> tuple(fa.writes.shape)
        (2, 2, 2, 8)
        >>> bool(torch.allclose(fa.total(), fa.pre_activation, atol=1e-5))
        True
    """
    cell = _cell(model, sae)
    hook_name, head, layer, what = cell.hook_name, cell.head, cell.layer, cell.kind
    with torch.no_grad():
        tokens = model._tokens(tokens)
        B, T = tokens.shape
        pos = check_positions(positions, B, T, model.embed.weight.device)
        device = pos.device
        feats = _features(features, sae.cfg.n_features, device)
        got = capture(model, tokens, layer, initial_state)
        x = got.inputs.map(lambda t: t[:, :, [head]])
        n, F = pos.shape[1], len(feats)
        rows = torch.arange(B, device=device)[:, None]
        if what == "state":
            rule, chunk = model.blocks[layer].mixer.rule, model.cfg.chunk_size
            S0 = got.initial_state[:, [head]]
            # Every read position's carried keys Φ_{s→t} k̃_s, then any number of features in chunks
            keys_at = x.k.new_zeros(B, n, T, x.k.shape[-1])
            initial_at = None if initial_state is None else x.k.new_zeros(B, n, x.v.shape[-1], x.k.shape[-1])
            hits = positions_by_step(pos)
            for t, keys, init in carried_writes(rule, x, None if initial_state is None else S0, list(hits), progress):
                r, slots = hits[t]
                keys_at[r, slots, : t + 1] = keys[r, 0]
                if init is not None:
                    initial_at[r, slots] = init[r, 0]
            # The reference: the states themselves, from the chunked scan the model runs, at the positions.
            _, _, bounds, u = boundary_scan(rule, x, S0, chunk, updates=True)
            states = replay_at(rule, x, bounds, pos, chunk, updates=u)[:, :, 0]  # [B, n, d_k, d_v]
        else:
            key, value = x.write_key()[rows, pos, 0], x.v[rows, pos, 0]  # [B, n, d_k], [B, n, d_v]
        scale, bias = sae.pre_activation_affine()
        writes = x.v.new_zeros(B, n, F, T)
        initial = x.v.new_zeros(B, n, F)
        bias = bias[feats].float()
        pre = x.v.new_zeros(B, n, F)
        step = max(1, FEATURE_CHUNK_ELEMENTS // max(1, B * T * x.k.shape[-1]))
        for lo in range(0, F, step):
            part = slice(lo, lo + step)
            E = sae.encoder_atoms(feats[part]).float()  # [f, d_k, d_v]
            if scale is not None:  # Gated's magnitude path: fold its scale into the rows
                E = E * scale[feats[part]].float()[:, None, None]
            bias[part] -= torch.einsum("fkv,kv->f", E, sae.mean.float())
            if what == "write":
                here = torch.einsum("bnk,fkv,bnv->bnf", key, E, value)
                writes[:, :, part].scatter_(-1, pos[:, :, None, None].expand_as(here[..., None]), here[..., None])
                pre[:, :, part] = here
            else:
                # E_i v_s for every write: with the carried keys, each term is one dot product
                Ev = torch.einsum("fkv,bsv->bfsk", E, x.v[:, :, 0])
                writes[:, :, part] = torch.einsum("bnsk,bfsk->bnfs", keys_at, Ev)
                if initial_at is not None:
                    initial[:, :, part] = torch.einsum("bnvk,fkv->bnf", initial_at, E)
                pre[:, :, part] = torch.einsum("bnkv,fkv->bnf", states, E)
        pre += bias
    return FeatureAttribution(writes, initial, bias.expand(B, n, F).clone(), pre, pos, feats, hook_name, head)


__all__ = ["FeatureAttribution", "feature_attribution"]
