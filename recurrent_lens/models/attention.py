"""Softmax attention for the full-attention layers of hybrid stacks (Qwen3.5).

Qwen3.5's layout: ``q_proj`` packs, per head, the query and a sigmoid output gate; per-head
``q_norm``/``k_norm`` with (1+w) weights; RoPE on the first ``rotary_dim`` dimensions of each head
(rotate-half style; text-only M-RoPE reduces to this); GQA; ``o_proj(attn ⊙ sigmoid(gate))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
