"""Sparsity rules for the SAE family: TopK, BatchTopK, JumpReLU and Gated.

Every rule maps pre-activations ``[n, n_features]`` to non-negative codes. TopK and BatchTopK
also return the active (value, index) pairs, so the decoder can touch only those atoms.

Gradients follow the reference implementation (specs/WRITESAE.md §1.2-1.3):

- TopK / BatchTopK: no straight-through estimator; only the selected pre-activations get
  gradient (ReLU after selection).
- JumpReLU: ``a = z * 1[z > theta]`` with a rectangle-kernel straight-through estimator for the
  threshold, parameterised as ``log_threshold``.
- Gated: ``a = g * relu(mag)`` with ``g = sigmoid(gate / T)`` (``"soft"``, the reference), or a
  hard Heaviside gate whose backward pass uses the sigmoid's derivative (``"hard"``).

Example:
    >>> import torch
    >>> from recurrent_lens.sae.sparsity import topk
    >>> values, indices = topk(torch.tensor([[0.5, -1.0, 2.0, 0.1]]), k=2)
    >>> values.tolist(), indices.tolist()
    ([[2.0, 0.5]], [[2, 0]])
"""

import torch
from jaxtyping import Float, Int

__all__ = ["topk", "batch_topk", "jumprelu", "jumprelu_l0", "gated"]


def topk(
    pre: Float[torch.Tensor, "n n_features"], k: int
) -> tuple[Float[torch.Tensor, "n k"], Int[torch.Tensor, "n k"]]:
    """Keep the ``k`` largest raw pre-activations per row, then apply ReLU to them.

    A negative winner becomes a zero, so a row can have fewer than ``k`` non-zeros; ``k`` is
    clamped to ``n_features``.

    Example:
        >>> import torch
        >>> values, indices = topk(torch.tensor([[-3.0, -1.0, -2.0]]), k=2)
        >>> values.tolist(), indices.tolist()
        ([[0.0, 0.0]], [[1, 2]])
    """
    values, indices = pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)
    return values.relu(), indices


def batch_topk(
    pre: Float[torch.Tensor, "n n_features"], k: int
) -> tuple[Float[torch.Tensor, " m"], Int[torch.Tensor, " m"], Int[torch.Tensor, " m"]]:
    """Keep the ``k * n`` largest ReLU'd pre-activations over the whole batch.

    Returns ``(values, feature_index, sample_index)`` of the ``m = min(k * n, n * n_features)``
    kept entries, sorted by sample so that downstream segment sums stay cache friendly. Codes
    depend on batch composition; with ``n == 1`` this equals :func:`topk`.

    Example:
        >>> import torch
        >>> values, feat, sample = batch_topk(torch.tensor([[3.0, 0.0], [2.0, 1.0]]), k=1)
        >>> values.tolist(), feat.tolist(), sample.tolist()
        ([3.0, 2.0], [0, 0], [0, 1])
    """
    n, n_features = pre.shape
    flat = pre.relu().reshape(-1)
    values, flat_index = flat.topk(min(k * n, flat.numel()), sorted=False)
    flat_index, order = flat_index.sort()
    return values[order], flat_index % n_features, flat_index // n_features


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


class _HardGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, temperature):  # type: ignore[override]
        ctx.save_for_backward(gate)
        ctx.temperature = temperature
        return (gate > 0).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (gate,) = ctx.saved_tensors
        s = torch.sigmoid(gate / ctx.temperature)
        return grad_out * s * (1 - s) / ctx.temperature, None


def gated(
    gate: Float[torch.Tensor, "n n_features"],
    mag: Float[torch.Tensor, "n n_features"],
    temperature: float = 0.1,
    mode: str = "soft",
) -> tuple[Float[torch.Tensor, "n n_features"], Float[torch.Tensor, "n n_features"]]:
    """Gated activation: returns ``(acts, g)`` with ``acts = g * relu(mag)``.

    ``mode="soft"`` uses ``g = sigmoid(gate / temperature)`` as the reference does, so codes are
    rarely exactly zero. ``mode="hard"`` uses ``g = 1[gate > 0]`` in the forward pass and the soft
    gate's derivative in the backward pass, which gives exact zeros.

    Example:
        >>> import torch
        >>> acts, g = gated(torch.tensor([[-1.0, 1.0]]), torch.tensor([[2.0, 2.0]]), mode="hard")
        >>> acts.tolist()
        [[0.0, 2.0]]
    """
    if mode == "soft":
        g = torch.sigmoid(gate / temperature)
    elif mode == "hard":
        g = _HardGate.apply(gate, temperature)
    else:
        raise ValueError(f"gate mode must be 'soft' or 'hard', got {mode!r}")
    return g * mag.relu(), g
