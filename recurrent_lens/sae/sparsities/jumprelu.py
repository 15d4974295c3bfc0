"""JumpReLU: ``z * 1[z > exp(log_threshold)]`` with an L0 penalty (SAELens's ``"jumprelu"``; SAELens's ReLU
``"standard"`` SAEs load as JumpReLU with threshold 0).

The threshold learns through a rectangle-kernel straight-through estimator, parameterised as
``log_threshold``.

Example:
    >>> import torch
    >>> jumprelu(torch.tensor([[0.5, 2.0]]), torch.zeros(2), 1e-3).tolist()
    [[0.0, 2.0]]
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float

from recurrent_lens.sae.parts import Code, Directions
from recurrent_lens.sae.sparsities.base import Sparsity, SparsityOptions
from recurrent_lens.sae.sparsities.registry import register_sparsity

__all__ = ["jumprelu", "jumprelu_l0", "JumpReLUOptions", "JumpReLU"]


def _rect(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, log_threshold, bandwidth):  # type: ignore[override]
        threshold = log_threshold.exp()
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        h = ctx.bandwidth
        grad_z = grad_out * (z > threshold).to(z.dtype)
        # d/dtheta of z*H(z - theta) under the rectangle kernel is -(theta/h) rect((z-theta)/h);
        # the extra factor theta is the chain rule through theta = exp(log_threshold).
        grad_theta = -(threshold / h) * _rect((z - threshold) / h) * grad_out
        grad_log = (grad_theta * threshold).reshape(-1, z.shape[-1]).sum(0)
        return grad_z, grad_log, None


class _JumpL0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, log_threshold, bandwidth):  # type: ignore[override]
        threshold = log_threshold.exp()
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        h = ctx.bandwidth
        grad_log = (-(1.0 / h) * _rect((z - threshold) / h) * grad_out * threshold).reshape(-1, z.shape[-1]).sum(0)
        # The L0 penalty must not push pre-activations around; only the threshold learns from it.
        return None, grad_log, None


def jumprelu(
    z: Float[torch.Tensor, "n n_features"],
    log_threshold: Float[torch.Tensor, " n_features"],
    bandwidth: float,
) -> Float[torch.Tensor, "n n_features"]:
    """JumpReLU ``z * 1[z > exp(log_threshold)]`` with the rectangle-kernel STE.

    Gradients: ``da/dz = 1[z > theta]``; ``d/dlog_theta = sum_batch -(theta/h) rect((z-theta)/h)
    * g * theta``.

    Example:
        >>> import torch
        >>> jumprelu(torch.tensor([[0.5, 2.0]]), torch.zeros(2), 1e-3).tolist()
        [[0.0, 2.0]]
    """
    return _JumpReLU.apply(z, log_threshold, bandwidth)


def jumprelu_l0(
    z: Float[torch.Tensor, "n n_features"],
    log_threshold: Float[torch.Tensor, " n_features"],
    bandwidth: float,
) -> Float[torch.Tensor, "n n_features"]:
    """The indicator ``H(z - theta)`` whose sum is the L0 penalty, with the rectangle STE.

    It passes no gradient to ``z``; the threshold gets ``sum -(1/h) rect((z-theta)/h) g theta``.

    Example:
        >>> import torch
        >>> jumprelu_l0(torch.tensor([[0.5, 2.0]]), torch.zeros(2), 1e-3).tolist()
        [[0.0, 1.0]]
    """
    return _JumpL0.apply(z, log_threshold, bandwidth)


@dataclass(frozen=True)
class JumpReLUOptions(SparsityOptions):
    """The config fields of JumpReLU."""

    jumprelu_init_threshold: float = 1e-3
    """Initial threshold of every feature."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the straight-through estimator."""
    l0_coef: float = 1e-3
    """Weight of the L0 penalty."""


class JumpReLU(Sparsity):
    """``z * 1[z > exp(log_threshold)]`` with an L0 penalty; the threshold learns through the
    rectangle-kernel straight-through estimator."""

    kind = "jumprelu"
    Options = JumpReLUOptions
    saelens_architecture = "jumprelu"
    saelens_reads = ("standard", "jumprelu")

    feature_names: tuple[str, ...] = ("b_enc", "log_threshold")

    def build(self) -> None:
        cfg = self.cfg
        self._new("b_enc", self.sae.encoder.bias_init())
        self._new("log_threshold", torch.full((cfg.n_features,), math.log(cfg.jumprelu_init_threshold),
                                              dtype=cfg.torch_dtype))

    def activate(self, shared: Float[torch.Tensor, "n n_features"], lead: tuple[int, ...]) -> tuple[torch.Tensor, Code]:
        pre = self._hooked_pre(shared + self.sae.b_enc, lead)
        return pre, Code(jumprelu(pre, self.sae.log_threshold, self.cfg.jumprelu_bandwidth))

    def aux_loss(self, p: Any, dead: Bool[torch.Tensor, " n_features"]) -> Float[torch.Tensor, ""]:
        cfg = self.cfg
        return cfg.l0_coef * jumprelu_l0(p.pre, self.sae.log_threshold, cfg.jumprelu_bandwidth).sum(-1).mean()

    @torch.no_grad()
    def fold(self, norms: torch.Tensor) -> None:
        super().fold(norms)
        self.sae.log_threshold.add_(norms.log())

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        sae = self.sae
        sae.b_enc[idx] = 0.0
        sae.log_threshold[idx] = (sae.log_threshold[alive].mean() if alive.any()
                                  else math.log(self.cfg.jumprelu_init_threshold))

    def to_saelens(
        self, shift: Float[torch.Tensor, " n_features"]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"b_enc": self.sae.b_enc - shift, "threshold": self.sae.log_threshold.exp()}

    @classmethod
    def saelens_tensors(cls, architecture: str) -> tuple[str, ...]:
        return ("b_enc",) if architecture == "standard" else ("b_enc", "threshold")

    @classmethod
    def from_saelens(
        cls, architecture: str, cfg_dict: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        b_enc = tensors["b_enc"]
        if architecture == "standard":  # ReLU: threshold 0
            log_threshold = torch.full_like(b_enc, -math.inf)
        else:
            # SAELens keeps relu(z) * 1[z > threshold], so a threshold below 0 acts as 0 (log 0 = -inf).
            log_threshold = tensors["threshold"].clamp(min=0).log()
        return {"sparsity": cls.kind}, {"b_enc": b_enc, "log_threshold": log_threshold}


register_sparsity(JumpReLU)
