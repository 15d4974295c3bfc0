"""TopK: the ``k`` largest raw pre-activations per sample, ReLU'd (SAELens's ``"topk"``).

No straight-through estimator: only the selected pre-activations get gradient (ReLU after selection). Dead
features learn from the auxiliary loss, the residual reconstructed by the ``k_aux`` largest dead
pre-activations.

Example:
    >>> import torch
    >>> values, indices = topk(torch.tensor([[0.5, -1.0, 2.0, 0.1]]), k=2)
    >>> values.tolist(), indices.tolist()
    ([[2.0, 0.5]], [[2, 0]])
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

from recurrent_lens.sae import parts
from recurrent_lens.sae.parts import Code, Directions, FixedCode
from recurrent_lens.sae.sparsities.base import AT_LEAST_0, AT_LEAST_1, Sparsity, SparsityOptions
from recurrent_lens.sae.sparsities.registry import register_sparsity

__all__ = ["topk", "TopKOptions", "TopK"]


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


@dataclass(frozen=True)
class TopKOptions(SparsityOptions):
    """The config fields of TopK and BatchTopK.

    Example:
        >>> TopKOptions().resolved(n_features=16).k, TopKOptions().resolved(n_features=64).k
        (16, 32)
    """

    k: int | None = field(default=None, metadata=AT_LEAST_1)
    """Active features per sample (TopK) or average per sample (BatchTopK); ``None``: 32, or every feature
    of a dictionary smaller than that. A ``k`` above ``n_features`` is refused rather than clamped, so the
    config never says more than the SAE does."""
    k_aux: int = field(default=256, metadata=AT_LEAST_0)
    """Features used by the dead-feature auxiliary loss."""
    aux_coef: float = 1.0
    """Weight of the dead-feature auxiliary loss (the reference code uses 1.0)."""

    def resolved(self, n_features: int) -> "TopKOptions":
        if self.k is not None:
            return self
        return TopKOptions(k=min(32, n_features), k_aux=self.k_aux, aux_coef=self.aux_coef)

    def check(self, cfg: Any) -> None:
        if self.k > cfg.n_features:
            raise ValueError(f"k: expected at most n_features={cfg.n_features} active features for "
                             f"sparsity={cfg.sparsity!r}, got {self.k}")


class TopK(Sparsity):
    """The ``k`` largest raw pre-activations per sample, ReLU'd; dead features learn from the auxiliary
    loss (the residual reconstructed by the ``k_aux`` largest dead pre-activations)."""

    kind = "topk"
    Options = TopKOptions
    saelens_architecture = "topk"
    saelens_reads = ("topk",)

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

    def to_saelens(
        self, shift: Float[torch.Tensor, " n_features"]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg = self.cfg
        return ({"k": min(cfg.k, cfg.n_features), "rescale_acts_by_decoder_norm": False},
                {"b_enc": self.sae.b_enc - shift})

    @classmethod
    def from_saelens(
        cls, architecture: str, cfg_dict: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        k, d_sae = cfg_dict.get("k"), cfg_dict["d_sae"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{cfg_path}: k: expected a positive int, got {k!r}")
        if k > d_sae:
            raise ValueError(f"{cfg_path}: k: expected at most d_sae={d_sae} (a TopK SAE keeps k of its d_sae "
                             f"features), got {k}")
        if cfg_dict.get("rescale_acts_by_decoder_norm"):
            # SAELens scales pre-activations by the decoder norms and divides the codes by them before
            # decoding; folding the norms into W_enc, b_enc and W_dec gives the same codes and output.
            # A zero decoder row stays zero (SAELens would divide 0 by 0): its feature's pre-activation is
            # 0, as SAELens ranks it, and it decodes to nothing.
            norms = tensors["W_dec"].norm(dim=-1)
            divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
            tensors.update(W_enc=tensors["W_enc"] * norms, b_enc=tensors["b_enc"] * norms,
                           W_dec=tensors["W_dec"] / divisor[:, None])
        return {"sparsity": cls.kind, "k": k}, {"b_enc": tensors["b_enc"]}


register_sparsity(TopK)
