"""Sparsity rules for the SAE family: TopK, BatchTopK, JumpReLU and Gated, as functions and as the
SAE parts that use them (:class:`TopK`, :class:`BatchTopK`, :class:`JumpReLU`, :class:`Gated`).

Every rule maps pre-activations ``[n, n_features]`` to non-negative codes. TopK and BatchTopK
also return the active (value, index) pairs, so the decoder can touch only those atoms.

A sparsity part owns the encoder biases (``b_enc``; JumpReLU adds ``log_threshold``; Gated has
``b_gate``, ``r_mag`` and ``b_mag`` instead), applies its rule, and defines the auxiliary loss that
training adds to the MSE: the dead-feature loss (TopK, BatchTopK), the L0 penalty (JumpReLU) or
the gate losses (Gated).

Gradients follow the reference implementation:

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

import math
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

from recurrent_lens.sae import parts
from recurrent_lens.sae.parts import Code, Directions, FixedCode, Part, SegmentCode

__all__ = ["topk", "batch_topk", "jumprelu", "jumprelu_l0", "gated", "Sparsity", "TopK", "BatchTopK", "JumpReLU",
           "Gated"]


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


# ---------------------------------------------------------------------------------------- parts


class Sparsity(Part):
    """Biases, the ``hook_sae_acts_pre`` hook and a sparsity rule: ``shared = <E_i, x>`` -> codes."""

    def activate(self, shared: Float[torch.Tensor, "n n_features"], lead: tuple[int, ...]) -> tuple[torch.Tensor, Code]:
        """Returns ``(pre, code)``, both 2-D; ``pre`` is what ``hook_sae_acts_pre`` saw (reshaped to
        ``lead``) and returned."""
        raise NotImplementedError

    def pre_affine(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(scale, bias)`` with ``pre = scale * shared + bias`` (``scale`` ``None`` for 1), as :meth:`activate`
        forms it before ``hook_sae_acts_pre``."""
        return None, self.sae.b_enc

    def _hooked_pre(self, pre: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        n_f = self.cfg.n_features
        return self.sae.hook_sae_acts_pre(pre.view(*lead, n_f)).reshape(-1, n_f)

    def aux_loss(self, p: Any, dead: Bool[torch.Tensor, " n_features"]) -> Float[torch.Tensor, ""]:
        """The term training adds to the MSE for the pass ``p`` (a :class:`~recurrent_lens.sae.SAEPass`)
        given the dead-feature mask."""
        raise NotImplementedError

    @torch.no_grad()
    def fold(self, norms: torch.Tensor) -> None:
        """Rescale the biases (and threshold) of feature ``i`` by ``norms[i]``."""
        self.sae.b_enc.mul_(norms)


class TopK(Sparsity):
    """The ``k`` largest raw pre-activations per sample, ReLU'd; dead features learn from the auxiliary
    loss (the residual reconstructed by the ``k_aux`` largest dead pre-activations)."""

    kind = "topk"

    feature_names: tuple[str, ...] = ("b_enc",)

    def build(self) -> None:
        self._new("b_enc", self.sae.encoder.bias_init())

    def _select(self, pre: torch.Tensor) -> Code:
        values, indices = topk(pre, self.cfg.k)
        return FixedCode(pre.new_zeros(pre.shape).scatter(1, indices, values), values, indices)

    def activate(self, shared: Float[torch.Tensor, "n n_features"], lead: tuple[int, ...]) -> tuple[torch.Tensor, Code]:
        pre = self._hooked_pre(shared + self.sae.b_enc, lead)
        return pre, self._select(pre)

    def aux_loss(self, p: Any, dead: Bool[torch.Tensor, " n_features"]) -> Float[torch.Tensor, ""]:
        cfg = self.cfg
        k_aux = cfg.k_aux
        if parts.on_host(dead):
            # Counting the dead costs nothing here: no work while none is dead, and no more features
            # selected than are dead (the reference's min(k_aux, n_dead)).
            n_dead = int(dead.sum())
            if n_dead == 0:
                return p.x.new_zeros(())
            k_aux = min(k_aux, n_dead)
        # Elsewhere the count would wait for the device: alive features are masked to -inf, and any
        # of them still picked (fewer dead than k_aux) becomes 0 after the ReLU.
        values, indices = topk(p.pre.masked_fill(~dead, float("-inf")), k_aux)
        aux_hat = self.sae.decoder.decode_sparse(values, indices) + self.sae.b_dec.reshape(-1)
        aux = (aux_hat - (p.x - p.x_hat.detach())).pow(2).mean()
        return cfg.aux_coef * aux * dead.any().to(aux.dtype)

    def check_fold(self) -> None:
        raise NotImplementedError(
            f"fold_W_dec_norm: not output-preserving for sparsity={self.kind!r} (scaling the "
            "pre-activations changes which features are selected)"
        )

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        self.sae.b_enc[idx] = 0.0

    def describe(self) -> str:
        return f"{self.kind}(k={self.cfg.k})"


class BatchTopK(TopK):
    """The ``k * n`` largest ReLU'd pre-activations over the batch (the same rule at inference)."""

    kind = "batchtopk"

    def _select(self, pre: torch.Tensor) -> Code:
        values, indices, sample = batch_topk(pre, self.cfg.k)
        return SegmentCode(pre.new_zeros(pre.shape).index_put((sample, indices), values), values, indices, sample)


class JumpReLU(Sparsity):
    """``z * 1[z > exp(log_threshold)]`` with an L0 penalty; the threshold learns through the
    rectangle-kernel straight-through estimator."""

    kind = "jumprelu"

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


class Gated(Sparsity):
    """A gate path ``shared + b_gate`` and a magnitude path ``exp(r_mag) * shared + b_mag``;
    ``hook_sae_acts_pre`` sees the magnitude path. The auxiliary loss is the gate's L1 plus the MSE of
    decoding the gate with the decoder frozen."""

    kind = "gated"

    feature_names: tuple[str, ...] = ("b_gate", "r_mag", "b_mag")

    def build(self) -> None:
        for name in self.feature_names:
            self._new(name, self._zeros(self.cfg.n_features))

    def activate(self, shared: Float[torch.Tensor, "n n_features"], lead: tuple[int, ...]) -> tuple[torch.Tensor, Code]:
        cfg, sae = self.cfg, self.sae
        gate = shared + sae.b_gate
        scale, bias = self.pre_affine()
        pre = self._hooked_pre(scale * shared + bias, lead)
        acts, g = gated(gate, pre, cfg.gate_temperature, cfg.gate_mode)
        return pre, Code(acts, extra={"gate": g})

    def pre_affine(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.sae.r_mag.exp(), self.sae.b_mag

    def aux_loss(self, p: Any, dead: Bool[torch.Tensor, " n_features"]) -> Float[torch.Tensor, ""]:
        cfg, sae = self.cfg, self.sae
        g = p.code.extra["gate"]
        gate_hat = sae.decoder.decode_dense(g, detach=True) + sae.b_dec.detach().reshape(-1)
        return cfg.gated_sparsity_coef * g.sum(-1).mean() + cfg.gated_aux_coef * (gate_hat - p.x).pow(2).mean()

    def check_fold(self) -> None:
        if self.cfg.gate_mode != "hard":
            raise NotImplementedError(
                f"fold_W_dec_norm: not output-preserving for gate_mode={self.cfg.gate_mode!r} (the soft gate "
                "sigmoid(gate / T) is not scale invariant); only gate_mode='hard' can be folded"
            )

    @torch.no_grad()
    def fold(self, norms: torch.Tensor) -> None:
        self.sae.b_gate.mul_(norms)
        self.sae.b_mag.mul_(norms)

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        for name in self.feature_names:
            getattr(self.sae, name)[idx] = 0.0
