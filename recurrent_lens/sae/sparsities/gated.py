"""Gated: a gate path ``shared + b_gate`` and a magnitude path ``exp(r_mag) * shared + b_mag`` (SAELens's
``"gated"``, for the hard gate).

``a = g * relu(mag)`` with ``g = sigmoid(gate / T)`` (``"soft"``, the reference), or a hard Heaviside gate
whose backward pass uses the sigmoid's derivative (``"hard"``). The auxiliary loss is the gate's L1 plus
the MSE of decoding the gate with the decoder frozen.

Example:
    >>> import torch
    >>> acts, g = gated(torch.tensor([[-1.0, 1.0]]), torch.tensor([[2.0, 2.0]]), mode="hard")
    >>> acts.tolist()
    [[0.0, 2.0]]
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float

from recurrent_lens.sae.parts import Code, Directions
from recurrent_lens.sae.sparsities.base import Sparsity, SparsityOptions
from recurrent_lens.sae.sparsities.registry import register_sparsity

__all__ = ["gated", "GatedOptions", "Gated"]


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


@dataclass(frozen=True)
class GatedOptions(SparsityOptions):
    """The config fields of Gated."""

    gate_temperature: float = 0.1
    """Temperature ``T`` of the gate's sigmoid (the soft gate, and the hard gate's backward pass)."""
    gate_mode: str = "soft"
    """``"soft"`` sigmoid gate as in the reference, ``"hard"`` Heaviside gate with STE."""
    gated_sparsity_coef: float = 1e-3
    """Weight of the gate's L1."""
    gated_aux_coef: float = 1.0
    """Weight of the MSE of the gate decoded with the frozen decoder."""


class Gated(Sparsity):
    """A gate path ``shared + b_gate`` and a magnitude path ``exp(r_mag) * shared + b_mag``;
    ``hook_sae_acts_pre`` sees the magnitude path. The auxiliary loss is the gate's L1 plus the MSE of
    decoding the gate with the decoder frozen."""

    kind = "gated"
    Options = GatedOptions
    saelens_architecture = "gated"
    saelens_reads = ("gated",)

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

    def to_saelens(
        self, shift: Float[torch.Tensor, " n_features"]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.cfg.gate_mode != "hard":
            raise ValueError(
                f"format='saelens': SAELens's gated SAE uses a hard gate 1[gate > 0]; this SAE has "
                f"gate_mode={self.cfg.gate_mode!r} (sigmoid(gate / T)), which it cannot express. Only "
                "gate_mode='hard' converts exactly"
            )
        sae = self.sae
        return {}, {"b_gate": sae.b_gate - shift, "r_mag": sae.r_mag, "b_mag": sae.b_mag - sae.r_mag.exp() * shift}

    @classmethod
    def saelens_tensors(cls, architecture: str) -> tuple[str, ...]:
        return cls.feature_names

    @classmethod
    def from_saelens(
        cls, architecture: str, cfg_dict: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"sparsity": cls.kind, "gate_mode": "hard"}, {name: tensors[name] for name in cls.feature_names}


register_sparsity(Gated)
