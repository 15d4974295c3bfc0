"""Run flash-linear-attention (fla) reference models on CPU in fp32.

fla's layers call Triton kernels (norms, gated norms, short convolutions, token shift, l2norm, the
SwiGLU of ``GatedMLP``, its activations and every recurrence op), which fail on a machine without a GPU
with ``RuntimeError: 0 active drivers``. :func:`patch_fla_for_cpu` swaps each of them for a plain torch
version for the duration of a ``with`` block, so a ``GatedDeltaNetForCausalLM``, ``DeltaNetForCausalLM``,
``GLAForCausalLM`` or ``RWKV7ForCausalLM`` runs ``forward`` and ``generate`` (with its cache) on CPU.
It also repairs one non-Triton problem: with transformers 5.24, fla's ``generate`` drops its cache
between steps (see :func:`_pass_cache_to_fla`).

The recurrences call fla's own pure-torch references (``naive_recurrent_gated_delta_rule``,
``delta_rule_recurrence``, ``naive_recurrent_gla``, ``dplr_recurrence``), after doing what the kernels
do around them: l2norm of q/k, grouped-value expansion, the in-kernel gate and β activations, the
scale and the transposed (``state_v_first``) cache layout.

Build the reference model *inside* the block when it uses fla's ``ACT2FN`` activations (GLA with
``fuse_norm=False``, RWKV-7's FFN): layers look those up once, in ``__init__``. Patches nest and are
undone, in reverse order, when the block exits.

Example::

    with patch_fla_for_cpu():
        ref = GatedDeltaNetForCausalLM(config).eval()
        logits = ref(tokens).logits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_MISSING = object()


def _combine(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """The pre-norm residual add fla fuses into its norms: returns (input to normalise, residual out)."""
    h = x.float() if residual is None else x.float() + residual.float()
    return h, (h if residual_in_fp32 else h.to(x.dtype))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    h, res = _combine(x, residual, residual_in_fp32)
    y = _affine(_rms(h, self.eps), self.weight, self.bias).to(x.dtype)
    return (y, res) if prenorm else y


def _layer_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    h, res = _combine(x, residual, residual_in_fp32)
    y = _affine(F.layer_norm(h, h.shape[-1:], eps=self.eps), self.weight, self.bias).to(x.dtype)
    return (y, res) if prenorm else y


def _group_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    h, res = _combine(x, residual, residual_in_fp32)
    groups = h.unflatten(-1, (self.num_groups, -1))
    if not self.is_rms_norm:
        groups = groups - groups.mean(-1, keepdim=True)
    y = _affine(_rms(groups, self.eps).flatten(-2), self.weight, self.bias).to(x.dtype)
    return (y, res) if prenorm else y


def _gated_rms_norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    h, res = _combine(x, residual, residual_in_fp32)
    y = _affine(_rms(h, self.eps), self.weight, self.bias)
    g = g.float()
    y = (y * (torch.sigmoid(g) if self.activation == "sigmoid" else F.silu(g))).to(x.dtype)
    return (y, res) if prenorm else y


def _short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                        cu_seqlens=None, **kwargs):
    """Depthwise causal conv over ``[B, T, D]``; ``cache`` ``[B, D, W]`` holds the last W inputs (newest last)."""
    if cu_seqlens is not None:
        raise NotImplementedError("patch_fla_for_cpu: ShortConvolution with cu_seqlens (padded batches) is not supported")
    if mask is not None:
        x = x * mask.unsqueeze(-1)
    B, T, D = x.shape
    W = self.kernel_size[0]
    prev = x.new_zeros(B, D, W) if cache is None else cache.to(x.dtype)
    full = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # [B, D, W + T]
    y = F.conv1d(full[..., 1:], self.weight, self.bias, groups=D).transpose(1, 2)
    if self.activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual
    new_cache = full[..., -W:]
    if cache is not None and T == 1 and not torch.is_grad_enabled():
        # fla updates a single-token decode cache in place; callers may rely on that
        cache.copy_(new_cache)
        new_cache = cache
    return y, (new_cache.contiguous() if output_final_state else None)


def _gated_mlp_forward(self, x, **kwargs):
    if self.hidden_act != "swish":
        raise NotImplementedError(f"patch_fla_for_cpu: GatedMLP hidden_act {self.hidden_act!r} (only 'swish')")
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _token_shift(x, cu_seqlens=None, cache=None, output_cache=False, chunk_indices=None):
    """``x_{t-1} − x_t`` with ``x_{-1}`` from ``cache`` ([B, D] or [B, 1, D]) or zero."""
    if cu_seqlens is not None:
        raise NotImplementedError("patch_fla_for_cpu: token_shift with cu_seqlens is not supported")
    B, _, D = x.shape
    prev = x.new_zeros(B, 1, D) if cache is None else cache.reshape(B, 1, D).to(x.dtype)
    delta = torch.cat([prev, x[:, :-1]], dim=1) - x
    return (delta, x[:, -1:].clone()) if output_cache else delta


def _l2_norm(x, eps=1e-6, output_dtype=None):
    y = x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def _no_varlen(cu_seqlens: Tensor | None, op: str) -> None:
    if cu_seqlens is not None:
        raise NotImplementedError(f"patch_fla_for_cpu: {op} with cu_seqlens (padded batches) is not supported")


def _rescale(q: Tensor, scale: float | None) -> Tensor:
    """fla's naive ops hard-code the d_k^-0.5 scale; fold any other scale into q."""
    return q if scale is None else q * (scale * q.shape[-1] ** 0.5)


def _gated_delta_rule(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
                      use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                      cu_seqlens=None, gk=None, gv=None, **kwargs):
    """``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` on top of fla's naive recurrence."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    _no_varlen(cu_seqlens, "gated_delta_rule")
    if gk is not None or gv is not None:
        raise NotImplementedError("patch_fla_for_cpu: gated_delta_rule with gk/gv is not supported")
    q, k = q.float(), k.float()
    if use_qk_l2norm_in_kernel:
        q, k = _l2_norm(q), _l2_norm(k)
    groups = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    beta = torch.ones_like(v[..., 0], dtype=torch.float32) if beta is None else beta.float()
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
    g = torch.zeros_like(beta) if g is None else g.float()
    if use_gate_in_kernel:
        raw = g if dt_bias is None else g + dt_bias.float()
        g = -A_log.float().exp() * F.softplus(raw)
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, S = naive_recurrent_gated_delta_rule(_rescale(q, scale), k, v.float(), beta, g,
                                            initial_state=initial_state, output_final_state=output_final_state)
    if S is not None and state_v_first:
        S = S.transpose(-1, -2).contiguous()
    return o.to(v.dtype), S


def _delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                use_qk_l2norm_in_kernel=False, **kwargs):
    """``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` on top of fla's ``delta_rule_recurrence``."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    _no_varlen(cu_seqlens, "delta_rule")
    q, k = q.float(), k.float()
    if use_qk_l2norm_in_kernel:
        q, k = _l2_norm(q), _l2_norm(k)
    beta = torch.ones_like(v[..., 0], dtype=torch.float32) if beta is None else beta.float()
    o, S = delta_rule_recurrence(*(t.transpose(1, 2) for t in (_rescale(q, scale), k, v.float(), beta)),
                                 initial_state=None if initial_state is None else initial_state.float(),
                                 output_final_state=output_final_state)
    return o.transpose(1, 2).to(v.dtype), S


def _gla(q, k, v, g=None, gk=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
         state_v_first=False, **kwargs):
    """``chunk_gla`` / ``fused_recurrent_gla`` / ``fused_chunk_gla`` (``g=`` or ``gk=``) on ``naive_recurrent_gla``."""
    from fla.ops.gla.naive import naive_recurrent_gla

    _no_varlen(cu_seqlens, "gla")
    gk = g if gk is None else gk
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, S = naive_recurrent_gla(_rescale(q.float(), scale), k.float(), v.float(), gk.float(),
                               initial_state=initial_state, output_final_state=output_final_state)
    if S is not None and state_v_first:
        S = S.transpose(-1, -2).contiguous()
    return o.to(v.dtype), S


def _rwkv7(r, w, k, v, a=None, b=None, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None,
           kk=None, **kwargs):
    """``chunk_rwkv7`` (``a=−κ, b=κ⊙a``) and ``fused_mul_recurrent_rwkv7`` (``kk=κ, a=a``) on ``dplr_recurrence``.

    The two ops name their arguments differently: with ``kk`` given, ``a`` is the in-context rate.
    """
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    _no_varlen(cu_seqlens, "rwkv7")
    if kk is not None:
        a, b = -kk, kk * a
    r = _rescale(r.float(), scale)
    o, S = dplr_recurrence(*(t.transpose(1, 2).float() for t in (r, k, v, a, b, w)),
                           initial_state=None if initial_state is None else initial_state.float(),
                           output_final_state=output_final_state)
    return o.transpose(1, 2).to(v.dtype), S


def _k_update(k, a, ka, *args, **kwargs):
    from fla.ops.rwkv7.fused_k_update import k_update_ref

    return k_update_ref(k, a, ka)


def _pass_cache_to_fla(prepare: Any) -> Any:
    """transformers 5.24's ``generate`` hands the cache to the model as ``cache=``, but fla 0.6's models only
    read ``past_key_values=`` and silently drop the other, so every decode step would start from an empty
    state (on GPU as well). Rename it so that fla's ``generate`` really decodes with its cache."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        if inputs.get("cache") is not None and inputs.get("past_key_values") is None:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    return prepare_inputs_for_generation


def _sqrelu(x: Tensor) -> Tensor:
    return F.relu(x).square()


def _targets() -> list[tuple[Any, str, Any]]:
    """(owner, attribute or dict key, replacement) for every Triton-only piece."""
    import fla.layers.delta_net as delta_net
    import fla.layers.gated_deltanet as gated_deltanet
    import fla.layers.gla as gla
    import fla.layers.rwkv7 as rwkv7
    import fla.models.rwkv7.modeling_rwkv7 as modeling_rwkv7
    import fla.modules.activations.ops as activations
    from fla.models.generation_utils import FLAGenerationMixin
    from fla.modules import FusedRMSNormGated, GatedMLP, GroupNorm, LayerNorm, RMSNorm, ShortConvolution
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    return [
        (RMSNorm, "forward", _rms_norm_forward),
        (LayerNorm, "forward", _layer_norm_forward),
        (GroupNorm, "forward", _group_norm_forward),
        (FusedRMSNormGated, "forward", _gated_rms_norm_forward),
        (ShortConvolution, "forward", _short_conv_forward),
        (GatedMLP, "forward", _gated_mlp_forward),
        (activations.ACT2FN, "swish", F.silu),
        (activations.ACT2FN, "silu", F.silu),
        (activations.ACT2FN, "sigmoid", torch.sigmoid),
        (activations.ACT2FN, "logsigmoid", F.logsigmoid),
        (activations.ACT2FN, "sqrelu", _sqrelu),
        (FLAGenerationMixin, "prepare_inputs_for_generation",
         _pass_cache_to_fla(FLAGenerationMixin.__dict__["prepare_inputs_for_generation"])),
        (gated_deltanet.GatedDeltaNet, "_use_fused_qkv_conv", lambda self, *a, **k: False),
        (gated_deltanet, "chunk_gated_delta_rule", _gated_delta_rule),
        (gated_deltanet, "fused_recurrent_gated_delta_rule", _gated_delta_rule),
        (delta_net, "chunk_delta_rule", _delta_rule),
        (delta_net, "fused_recurrent_delta_rule", _delta_rule),
        (gla, "chunk_gla", _gla),
        (gla, "fused_recurrent_gla", _gla),
        (gla, "fused_chunk_gla", _gla),
        (rwkv7, "chunk_rwkv7", _rwkv7),
        (rwkv7, "fused_mul_recurrent_rwkv7", _rwkv7),
        (rwkv7, "token_shift", _token_shift),
        (modeling_rwkv7, "token_shift", _token_shift),
        (rwkv7, "l2_norm", _l2_norm),
        (rwkv7, "fused_addcmul_rwkv7", torch_addcmul_rwkv7),
        (rwkv7, "fused_k_rwkv7", _k_update),
        (rwkv7, "gate_output_correction", gate_output_correction_ref),
    ]


def _get(owner: Any, name: str) -> Any:
    if isinstance(owner, dict):
        return owner.get(name, _MISSING)
    return owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)


def _set(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, dict):
        if value is _MISSING:
            owner.pop(name, None)
        else:
            owner[name] = value
    elif value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextmanager
def patch_fla_for_cpu() -> Iterator[None]:
    """Replace fla's Triton-only pieces with torch versions inside a ``with`` block; restore them after."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, name, replacement in _targets():
            saved.append((owner, name, _get(owner, name)))
            _set(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(saved):
            _set(owner, name, original)

