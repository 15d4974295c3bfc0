"""The four named SAEs of the paper, as presets of :class:`recurrent_lens.sae.SAE`.

=============  =========  ================================  =====================  ===============
preset         encoder    decoder                           reference ``sae_type``  paper name
=============  =========  ================================  =====================  ===============
WriteSAE       bilinear   rank-1 ``v w^T``                  ``bilinear``            WriteSAE
FlatSAE        linear     flat                              ``flat``                FlatSAE
MatrixSAE      linear     rank r (default 1) or ``"full"``  ``rank1``               MatrixSAE
BilinearSAE    bilinear   rank r (default 2) or ``"flat"``  ``bilinear(_tied)``,    BilinearSAE,
                                                            ``bilinear_flat``       rank-2 control
=============  =========  ================================  =====================  ===============

Every preset takes ``(d_k, d_v, n_features, **config_fields)``; fields a preset fixes raise if
given a different value. Sparsity (``"topk"`` default, ``"batchtopk"``, ``"jumprelu"``,
``"gated"``) and the rest of :class:`recurrent_lens.sae.SAEConfig` are free.
"""

from typing import Any, ClassVar

from recurrent_lens.sae.base import SAE
from recurrent_lens.sae.registry import register_sae_class

__all__ = ["WriteSAE", "FlatSAE", "MatrixSAE", "BilinearSAE"]


class WriteSAE(SAE):
    """Bilinear encoder ``v_i^T S w_i`` and rank-1 decoder atoms ``v_i w_i^T``: the paper's WriteSAE.

    Example:
        >>> import torch
        >>> from recurrent_lens.sae import WriteSAE
        >>> sae = WriteSAE(d_k=8, d_v=8, n_features=64, k=4)
        >>> sae
        WriteSAE(d_k=8, d_v=8, n_features=64, encoder=bilinear, decoder=rank-1, sparsity=topk(k=4))
        >>> sae(torch.randn(16, 8, 8)).reconstruction.shape
        torch.Size([16, 8, 8])
    """

    architecture: ClassVar[str] = "write_sae"
    preset: ClassVar[dict[str, Any]] = {"encoder": "bilinear", "decoder": "factored", "rank": 1, "tied": False}


class FlatSAE(SAE):
    """Linear encoder and dense (flat) decoder on ``vec(S)``: the standard SAE baseline.

    Example:
        >>> import torch
        >>> from recurrent_lens.sae import FlatSAE
        >>> FlatSAE(4, 4, 32, k=4).encode(torch.randn(3, 4, 4)).shape
        torch.Size([3, 32])
    """

    architecture: ClassVar[str] = "flat_sae"
    preset: ClassVar[dict[str, Any]] = {"encoder": "linear", "decoder": "flat", "tied": False}


class MatrixSAE(SAE):
    """Linear encoder on ``vec(S)`` and matrix atoms of rank ``rank`` (1 by default, or ``"full"``).

    Example:
        >>> from recurrent_lens.sae import MatrixSAE
        >>> MatrixSAE(4, 4, 32, rank=2)
        MatrixSAE(d_k=4, d_v=4, n_features=32, encoder=linear, decoder=rank-2, sparsity=topk(k=32))
        >>> MatrixSAE(4, 4, 32, rank="full").cfg.decoder
        'full'
    """

    architecture: ClassVar[str] = "matrix_sae"
    preset: ClassVar[dict[str, Any]] = {"encoder": "linear", "tied": False}
    defaults: ClassVar[dict[str, Any]] = {"decoder": "factored", "rank": 1}

    def _check_preset(self, cfg: Any) -> None:
        super()._check_preset(cfg)
        if cfg.decoder == "flat":
            raise ValueError("MatrixSAE has matrix atoms; use FlatSAE for decoder='flat'")


class BilinearSAE(SAE):
    """Bilinear encoder and rank-``rank`` decoder (default 2); ``decoder="flat"``; ``tied=True``.

    Example:
        >>> from recurrent_lens.sae import BilinearSAE
        >>> BilinearSAE(4, 4, 32)
        BilinearSAE(d_k=4, d_v=4, n_features=32, encoder=bilinear(rank 2), decoder=rank-2, sparsity=topk(k=32))
        >>> BilinearSAE(4, 4, 32, rank=1, tied=True).cfg.tied
        True
    """

    architecture: ClassVar[str] = "bilinear_sae"
    preset: ClassVar[dict[str, Any]] = {"encoder": "bilinear"}
    defaults: ClassVar[dict[str, Any]] = {"decoder": "factored", "rank": 2}

    def __init__(self, d_k: int | None = None, d_v: int | None = None, n_features: int | None = None, **kwargs: Any):
        # The rank-2 default describes the decoder; a dense decoder keeps the reference's rank-1 encoder.
        if kwargs.get("cfg") is None and kwargs.get("decoder") in ("flat", "full"):
            kwargs.setdefault("rank", 1)
        super().__init__(d_k, d_v, n_features, **kwargs)


for _cls in (WriteSAE, FlatSAE, MatrixSAE, BilinearSAE):
    register_sae_class(_cls.architecture, _cls)
