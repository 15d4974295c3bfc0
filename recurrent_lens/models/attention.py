"""Softmax attention for the full-attention layers of hybrid stacks (Qwen3.5).

Qwen3.5's layout: ``q_proj`` packs, per head, the query and a sigmoid output gate; per-head
``q_norm``/``k_norm`` with (1+w) weights; RoPE on the first ``rotary_dim`` dimensions of each head
(rotate-half style; text-only M-RoPE reduces to this); GQA; ``o_proj(attn ⊙ sigmoid(gate))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import RMSNorm
from recurrent_lens.models.mixer import ForwardContext, fire, hook_active


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x`` ``[batch, pos, head, d_head]`` by absolute position."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=x.device) / rotary_dim))
    freqs = positions.to(x.device, torch.float32)[:, None] * inv_freq  # [pos, rotary_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class Attention(nn.Module):
    """Causal softmax attention with GQA, partial RoPE, q/k norms and an optional output gate.

    Hook points, in execution order::

        hook_q        [batch, pos, head, d_head]      after q_norm and RoPE
        hook_k        [batch, pos, kv_head, d_head]   after k_norm and RoPE (new tokens only)
        hook_v        [batch, pos, kv_head, d_head]
        hook_pattern  [batch, head, q_pos, k_pos]     softmax probabilities
        hook_z        [batch, pos, head, d_head]      attention output per head, before the gate
        hook_gate     [batch, pos, head, d_head]      sigmoid(gate) (only with attn_output_gate)
        hook_out      [batch, pos, d_model]

    TransformerLens' weights, in its layouts, computed from the projections on each access (read
    them; edit ``q_proj``/``k_proj``/``v_proj``/``o_proj`` to change the layer): ``W_Q``, ``W_K``, ``W_V`` ``[head, d_model, d_head]``,
    ``W_O`` ``[head, d_head, d_model]``, ``b_Q``, ``b_K``, ``b_V`` ``[head, d_head]``, ``b_O``
    ``[d_model]`` (zeros: the projections have no bias). Keys and values are expanded from
    ``n_kv_heads`` to ``n_heads`` as TransformerLens does for grouped-query attention (query head
    ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``). Two differences from a GPT-2 head:
    ``W_Q`` and ``W_K`` act before ``q_norm``/``k_norm`` and RoPE, and ``W_O`` acts on
    ``hook_z * hook_gate`` when the layer has an output gate, so a head's result is
    ``(z * gate)[h] @ W_O[h]`` (what ``ActivationCache.stack_head_results`` stacks).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, Hkv, D = cfg.n_attn_heads, cfg.n_kv_heads, cfg.d_head_attn
        self.n_heads, self.n_kv_heads, self.d_head = H, Hkv, D
        self.q_proj = nn.Linear(cfg.d_model, H * D * (2 if cfg.attn_output_gate else 1), bias=False)
        self.k_proj = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.d_model, bias=False)
        one_plus = cfg.norm == "rms_one_plus"
        self.q_norm = RMSNorm(D, cfg.norm_eps, one_plus=one_plus)
        self.k_norm = RMSNorm(D, cfg.norm_eps, one_plus=one_plus)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        if cfg.attn_output_gate:
            self.hook_gate = HookPoint()  # [batch, pos, head, d_head]
        self.hook_out = HookPoint()  # [batch, pos, d_model]

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        """Query weights (the query half of ``q_proj``, without the output gate's half)."""
        H, D = self.n_heads, self.d_head
        return self.q_proj.weight.view(H, -1, self.cfg.d_model)[:, :D].transpose(1, 2)

    def _expanded(self, proj: nn.Linear) -> Tensor:
        per_kv = proj.weight.view(self.n_kv_heads, self.d_head, self.cfg.d_model).transpose(1, 2)
        return per_kv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        """Key weights, expanded to one per query head."""
        return self._expanded(self.k_proj)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        """Value weights, expanded to one per query head."""
        return self._expanded(self.v_proj)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """Output weights: ``o_proj`` split by the head whose (gated) ``z`` it reads."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, self.cfg.d_model)

    def _zero_bias(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.o_proj.weight.dtype, device=self.o_proj.weight.device)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        """Zeros: ``q_proj`` has no bias."""
        return self._zero_bias(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        """Zeros: ``k_proj`` has no bias."""
        return self._zero_bias(self.n_heads, self.d_head)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        """Zeros: ``v_proj`` has no bias."""
        return self._zero_bias(self.n_heads, self.d_head)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """Zeros: ``o_proj`` has no bias."""
        return self._zero_bias(self.cfg.d_model)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per head as TransformerLens' ``FactoredMatrix`` (before q/k norms and RoPE)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per head as TransformerLens' ``FactoredMatrix`` (without the output gate)."""
        return FactoredMatrix(self.W_V, self.W_O)

    def head_results(self, z: Float[Tensor, "*lead head d_head"],
                     gate: Float[Tensor, "*lead head d_head"] | None) -> Float[Tensor, "*lead head d_model"]:
        """Each head's write to the residual stream from cached ``hook_z`` and ``hook_gate`` (``None``
        without an output gate); summed over heads it is ``hook_out``."""
        if gate is not None:
            z = z * gate
        return torch.einsum("...hd,hdm->...hm", z.to(self.o_proj.weight.dtype), self.W_O)

    def forward(self, x: Tensor, cache: LayerCache | None = None, ctx: ForwardContext | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        positions = torch.arange(T, device=x.device) if ctx is None or ctx.positions is None else ctx.positions
        qg = self.q_proj(x).view(B, T, H, -1)
        q, gate = (qg[..., :D], qg[..., D:]) if self.cfg.attn_output_gate else (qg, None)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(B, T, Hkv, D))
        v = self.v_proj(x).view(B, T, Hkv, D)
        if self.cfg.rotary_dim:
            q = apply_rope(q, positions, self.cfg.rotary_dim, self.cfg.rope_theta)
            k = apply_rope(k, positions, self.cfg.rotary_dim, self.cfg.rope_theta)
        q, k, v = fire(self.hook_q, q), fire(self.hook_k, k), fire(self.hook_v, v)
        if cache is not None:
            if cache.key is not None:
                k = torch.cat([cache.key.transpose(1, 2), k], dim=1)
                v = torch.cat([cache.value.transpose(1, 2), v], dim=1)
            cache.key, cache.value = k.transpose(1, 2), v.transpose(1, 2)
        S = k.shape[1]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        if hook_active(self.hook_pattern):
            kh, vh = kh.repeat_interleave(H // Hkv, dim=1), vh.repeat_interleave(H // Hkv, dim=1)
            scores = (qh @ kh.transpose(-1, -2)).float() * D**-0.5
            pattern = fire(self.hook_pattern, scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype))
            z = pattern @ vh
        else:
            z = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=D**-0.5, enable_gqa=H != Hkv)
        z = fire(self.hook_z, z.transpose(1, 2))
        if gate is not None:
            z = z * fire(self.hook_gate, torch.sigmoid(gate))
        return fire(self.hook_out, self.o_proj(z.reshape(B, T, H * D)))
