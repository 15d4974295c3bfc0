"""The SAE family for matrix-valued states (specs/WRITESAE.md §1, DESIGN.md §4).

One class, :class:`SAE`, covers every variant through two orthogonal choices plus a sparsity:

- ``encoder``: ``"linear"`` (one dense matrix ``E_i`` per feature, ``pre_i = <E_i, S>_F``) or
  ``"bilinear"`` (``pre_i = sum_r V_enc[i,r]^T S W_enc[i,r]``);
- ``decoder``: ``"flat"`` (a dense ``d_k x d_v`` atom per feature, the reference FlatSAE),
  ``"factored"`` (atom ``sum_r V_dec[i,r] W_dec[i,r]^T`` of rank ``rank``) or ``"full"`` (the
  same dense atom as ``"flat"``, named after the paper's full-rank MatrixSAE);
- ``sparsity``: ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"gated"``.

Orientation: ``V`` factors live on the key side (``d_k``), ``W`` factors on the value side
(``d_v``), so an atom ``v w^T`` has the state's ``[d_k, d_v]`` layout.

Speed (specs/WRITESAE.md §6): the encoder is one GEMM of ``vec(S)`` against the assembled atoms
``vec(V_i W_i^T)``, done in feature chunks by a custom autograd function that re-assembles the
atoms in the backward pass instead of storing them; TopK/BatchTopK decoders gather only the
active atoms. Nothing in a training step copies a value to the host.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from recurrent_lens.sae import sparsity as sp

__all__ = ["SAEConfig", "SAEMetadata", "SAEOutput", "SAE", "SAE_REGISTRY", "register_sae_class"]

ENCODERS = ("linear", "bilinear")
DECODERS = ("flat", "factored", "full")
SPARSITIES = ("topk", "batchtopk", "jumprelu", "gated")


class SAEMetadata(dict):
    """Provenance of an SAE: a ``dict`` that also answers attribute access, as SAELens's metadata does.

    ``metadata["hook_name"]`` and ``metadata.hook_name`` are the same entry; a missing name reads as
    ``None`` through attribute access (SAELens semantics) and raises ``KeyError`` through item access
    (dict semantics). ``hook_head_index`` (SAELens's name) is an alias of our ``head`` entry.

    Example:
        >>> m = SAEMetadata(hook_name="blocks.0.mixer.hook_state", head=2)
        >>> m.hook_name, m["head"], m.hook_head_index, m.model_name
        ('blocks.0.mixer.hook_state', 2, 2, None)
        >>> m.model_name = "toy"; m["model_name"]
        'toy'
    """

    _ALIASES: ClassVar[dict[str, str]] = {"hook_head_index": "head"}

    def __getattr__(self, name: str) -> Any:
        # copy and pickle probe names such as __deepcopy__ / __getstate__; answering None would break them.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.get(self._ALIASES.get(name, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"SAEMetadata: cannot set private attribute {name!r}; use item assignment")
        self[self._ALIASES.get(name, name)] = value

    def __delattr__(self, name: str) -> None:
        key = self._ALIASES.get(name, name)
        if key not in self:
            raise AttributeError(name)
        del self[key]

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy (SAELens's ``SAEMetadata.to_dict``)."""
        return dict(self)


@dataclass
class SAEConfig:
    """Configuration of one SAE.  ``to_dict()`` is what ``cfg.json`` holds.

    Example:
        >>> cfg = SAEConfig(d_k=4, d_v=3, n_features=8, decoder=2)
        >>> cfg.decoder, cfg.rank, cfg.d_in
        ('factored', 2, 12)
    """

    d_k: int
    """Key-side size of the state (rows)."""
    d_v: int
    """Value-side size of the state (columns)."""
    n_features: int
    """Dictionary size."""
    encoder: str = "bilinear"
    """``"linear"`` on vec(S) or ``"bilinear"`` (sum over rank of V_enc^T S W_enc)."""
    decoder: str | int = "factored"
    """``"flat"``, ``"factored"``, ``"full"``, or an int r meaning ``"factored"`` with rank r."""
    rank: int | str = 1
    """Rank of factored atoms and of the bilinear encoder; ``"full"`` means ``decoder="full"``."""
    tied: bool = False
    """Bilinear encoder reuses the decoder factors (needs ``encoder="bilinear"``, factored)."""
    sparsity: str = "topk"
    """``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"gated"``."""
    k: int = 32
    """Active features per sample (TopK) or average per sample (BatchTopK)."""
    center: bool = False
    """Whether training fits the dataset mean M (stored in the ``mean`` buffer)."""
    dead_threshold: int = 100
    """A feature is dead after this many forwards without firing."""
    k_aux: int = 256
    """Features used by the dead-feature auxiliary loss (TopK variants)."""
    aux_coef: float = 1.0
    """Weight of the dead-feature auxiliary loss (the reference code uses 1.0)."""
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    l0_coef: float = 1e-3
    """JumpReLU: weight of the L0 penalty."""
    gate_temperature: float = 0.1
    gate_mode: str = "soft"
    """Gated: ``"soft"`` sigmoid gate as in the reference, ``"hard"`` Heaviside gate with STE."""
    gated_sparsity_coef: float = 1e-3
    gated_aux_coef: float = 1.0
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=SAEMetadata)
    """Free-form provenance: ``hook_name``, ``head``, ``model_name``, training info. Always an
    :class:`SAEMetadata` (a plain dict given here or assigned later is converted), so both
    ``metadata["hook_name"]`` and ``metadata.hook_name`` work."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "metadata" and not isinstance(value, SAEMetadata):
            if not isinstance(value, dict):
                raise TypeError(f"metadata: expected a dict, got {type(value).__name__}")
            value = SAEMetadata(value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        if isinstance(self.decoder, int) and not isinstance(self.decoder, bool):
            self.rank, self.decoder = self.decoder, "factored"
        if self.rank == "full":
            self.rank, self.decoder = 1, "full"
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS} or an int rank, got {self.decoder!r}")
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"sparsity must be one of {SPARSITIES}, got {self.sparsity!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int or 'full', got {self.rank!r}")
        if self.tied and not (self.encoder == "bilinear" and self.decoder == "factored"):
            raise ValueError(
                "tied=True needs encoder='bilinear' and a factored decoder, got "
                f"encoder={self.encoder!r}, decoder={self.decoder!r}"
            )
        for name in ("d_k", "d_v", "n_features", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def d_in(self) -> int:
        """Size of the flattened state ``vec(S)``: ``d_k * d_v`` (SAELens's ``d_in``)."""
        return self.d_k * self.d_v

    @property
    def d_sae(self) -> int:
        """SAELens's name for :attr:`n_features`.

        Example:
            >>> SAEConfig(d_k=4, d_v=3, n_features=8).d_sae
            8
        """
        return self.n_features

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """All fields (``metadata`` as a plain dict); the owning SAE adds ``architecture``."""
        d = dataclasses.asdict(self)
        d["metadata"] = dict(d["metadata"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Build from ``to_dict()`` output; unknown keys (``architecture``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


@dataclass
class SAEOutput:
    """What :meth:`SAE.forward` returns.

    ``n_dead`` is a 0-d int64 tensor (not a Python int) so that a training step never waits for
    the device; call ``int(out.n_dead)`` when you want the number.
    """

    reconstruction: Float[torch.Tensor, "... d_k d_v"]
    acts: Float[torch.Tensor, "... n_features"]
    loss: Float[torch.Tensor, ""]
    mse: Float[torch.Tensor, ""]
    aux_loss: Float[torch.Tensor, ""]
    n_dead: Int[torch.Tensor, ""]

    @property
    def coefficients(self) -> torch.Tensor:
        """The reference's name for ``acts``."""
        return self.acts


def _assemble(V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Atoms ``sum_r V[i,r] W[i,r]^T`` as ``[n, d_k * d_v]``."""
    n = V.shape[0]
    if V.shape[1] == 1:
        # An outer product as a broadcast multiply: bmm with an inner dimension of 1 is several times slower.
        return (V[:, 0, :, None] * W[:, 0, None, :]).reshape(n, -1)
    return torch.bmm(V.transpose(1, 2), W).reshape(n, -1)


class _FactoredMatmul(torch.autograd.Function):
    """``X @ A^T`` (encode) or ``X @ A`` (decode) for atoms ``A_i = sum_r V[i,r] W[i,r]^T``.

    The atoms are built ``chunk`` features at a time and rebuilt in backward, so memory stays at
    one chunk of ``[chunk, d_k * d_v]`` instead of all ``n_features`` atoms plus their gradients.
    """

    @staticmethod
    def forward(ctx, X, V, W, chunk, transpose):  # type: ignore[override]
        ctx.save_for_backward(X, V, W)
        ctx.chunk, ctx.transpose = chunk, transpose
        n = V.shape[0]
        if transpose:
            out = X.new_empty(X.shape[0], n)
            for s in range(0, n, chunk):
                out[:, s : s + chunk] = X @ _assemble(V[s : s + chunk], W[s : s + chunk]).T
            return out
        out = None
        for s in range(0, n, chunk):
            part = X[:, s : s + chunk] @ _assemble(V[s : s + chunk], W[s : s + chunk])
            out = part if out is None else out.add_(part)
        return out

    @staticmethod
    def backward(ctx, G):  # type: ignore[override]
        X, V, W = ctx.saved_tensors
        chunk, transpose = ctx.chunk, ctx.transpose
        n, r, d_k = V.shape
        d_v = W.shape[-1]
        need_x, need_v, need_w = ctx.needs_input_grad[:3]
        gX = torch.zeros_like(X) if need_x else None
        gV = torch.empty_like(V) if need_v else None
        gW = torch.empty_like(W) if need_w else None
        for s in range(0, n, chunk):
            Vc, Wc = V[s : s + chunk], W[s : s + chunk]
            c = Vc.shape[0]
            A = _assemble(Vc, Wc)
            if transpose:
                Gc = G[:, s : s + chunk]
                if need_x:
                    gX.addmm_(Gc, A)
                gA = Gc.T @ X if (need_v or need_w) else None
            else:
                if need_x:
                    gX[:, s : s + chunk] = G @ A.T
                gA = X[:, s : s + chunk].T @ G if (need_v or need_w) else None
            if gA is None:
                continue
            gA = gA.view(c, d_k, d_v)
            if need_v:
                gV[s : s + chunk] = torch.bmm(gA, Wc.transpose(1, 2)).transpose(1, 2)
            if need_w:
                gW[s : s + chunk] = torch.bmm(gA.transpose(1, 2), Vc.transpose(1, 2)).transpose(1, 2)
        return gX, gV, gW, None, None


@dataclass
class _Code:
    """Sparse codes in the forms the decoder can use.

    ``kind`` is ``"fixed"`` (``values``/``indices`` are ``[n, k]``), ``"segments"`` (flat
    ``values``/``indices``/``sample`` sorted by sample) or ``"dense"`` (only ``acts``).
    """

    acts: torch.Tensor
    kind: str
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


SAE_REGISTRY: dict[str, type["SAE"]] = {}


def register_sae_class(architecture: str, cls: type["SAE"]) -> None:
    """Register ``cls`` under ``architecture`` so that :func:`recurrent_lens.sae.load` finds it.

    Example:
        >>> from recurrent_lens.sae import SAE, register_sae_class
        >>> class MySAE(SAE):
        ...     architecture = "my_sae"
        >>> register_sae_class("my_sae", MySAE)
    """
    SAE_REGISTRY[architecture] = cls


class SAE(HookedRootModule):
    """A sparse autoencoder on ``[..., d_k, d_v]`` matrix states.

    Hook points, in execution order (SAELens names)::

        hook_sae_input      [..., d_k, d_v]     the state as given
        hook_sae_acts_pre   [..., n_features]   pre-activations (Gated: the magnitude path)
        hook_sae_acts_post  [..., n_features]   sparse codes
        hook_sae_recons     [..., d_k, d_v]     reconstruction (bias and mean included)
        hook_sae_error      [..., d_k, d_v]     input minus clean reconstruction (attached with
                                                use_error_term=True only)

    Parameters, depending on the config: ``E_enc`` [n_features, d_k, d_v] (linear encoder),
    ``V_enc`` [n_features, rank, d_k] and ``W_enc`` [n_features, rank, d_v] (bilinear encoder,
    absent when tied), ``b_enc`` [n_features], ``V_dec``/``W_dec`` (factored decoder) or ``D_dec``
    [n_features, d_k, d_v] (flat/full decoder), ``b_dec`` [d_k, d_v]; JumpReLU adds
    ``log_threshold``, Gated replaces ``b_enc`` by ``b_gate``, ``r_mag``, ``b_mag``. Buffers:
    ``mean`` [d_k, d_v] (dataset mean, zero unless centred) and ``steps_since_active``.

    ``use_error_term`` (constructor argument and attribute, default ``False``) is what
    :func:`recurrent_lens.sae.add_sae` uses when its own ``use_error_term`` is not given, as in
    SAELens; it does not change :meth:`forward`.

    Methods: :meth:`encode`, :meth:`decode`, :meth:`forward`, :meth:`normalize_decoder`,
    :meth:`fold_W_dec_norm`, :meth:`resample_dead_features`, :meth:`save_pretrained`,
    :meth:`from_pretrained`.

    SAELens users: ``cfg.d_in`` / ``cfg.d_sae``, ``cfg.metadata.hook_name``,
    ``cfg.metadata.hook_head_index``, ``use_error_term``, :meth:`fold_W_dec_norm` and the hook names
    mean what they mean there, and :meth:`encode` also takes the flattened ``[..., d_k * d_v]``
    input (``vec(S)``, row-major). Differences: :meth:`decode` returns ``[..., d_k, d_v]`` (call
    ``.flatten(-2)`` for SAELens's layout), :meth:`forward` returns an :class:`SAEOutput` with the
    training losses rather than a reconstruction, there is no ``hook_sae_output`` (the spliced
    tensor is the model's own hook point, see :mod:`recurrent_lens.sae.attach`), and ``W_enc`` /
    ``W_dec`` here are the bilinear value-side factors, not SAELens's ``[d_in, d_sae]`` matrices:
    ``save_pretrained(path, format="saelens")`` materialises those (see
    :mod:`recurrent_lens.sae.saelens`).

    Example:
        >>> import torch
        >>> from recurrent_lens.sae import SAE
        >>> sae = SAE(d_k=4, d_v=3, n_features=16, k=2)
        >>> out = sae(torch.randn(5, 4, 3))
        >>> out.reconstruction.shape, out.acts.shape, int((out.acts > 0).sum(-1).max()) <= 2
        (torch.Size([5, 4, 3]), torch.Size([5, 16]), True)
    """

    architecture: ClassVar[str] = "sae"
    preset: ClassVar[dict[str, Any]] = {}
    """Config values a preset fixes; passing a different value raises."""
    defaults: ClassVar[dict[str, Any]] = {}
    """Config values a preset defaults to but allows to change."""

    _chunk_elements: int = 1 << 26
    """Upper bound on atom entries materialised at once by the factored GEMM (256 MiB fp32)."""

    def __init__(
        self,
        d_k: int | None = None,
        d_v: int | None = None,
        n_features: int | None = None,
        *,
        cfg: SAEConfig | None = None,
        use_error_term: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.use_error_term = use_error_term
        if cfg is None:
            if d_k is None or d_v is None or n_features is None:
                raise TypeError(f"{type(self).__name__} needs d_k, d_v and n_features (or cfg=SAEConfig(...))")
            for key, value in self.preset.items():
                if key in kwargs and kwargs[key] != value:
                    raise ValueError(f"{type(self).__name__} fixes {key}={value!r}; got {key}={kwargs[key]!r}")
            cfg = SAEConfig(d_k=d_k, d_v=d_v, n_features=n_features, **{**self.defaults, **kwargs, **self.preset})
        elif d_k is not None or d_v is not None or n_features is not None or kwargs:
            raise TypeError("pass either cfg=SAEConfig(...) or the config fields, not both")
        self._check_preset(cfg)
        self.cfg = cfg
        self._build_parameters()
        self.hook_sae_input = HookPoint()  # [..., d_k, d_v]
        self.hook_sae_acts_pre = HookPoint()  # [..., n_features]
        self.hook_sae_acts_post = HookPoint()  # [..., n_features]
        self.hook_sae_recons = HookPoint()  # [..., d_k, d_v]
        self.hook_sae_error = HookPoint()  # [..., d_k, d_v]
        self.setup()

    def _check_preset(self, cfg: SAEConfig) -> None:
        probe = SAEConfig(d_k=1, d_v=1, n_features=1, **self.preset)
        for key in self.preset:
            if getattr(cfg, key) != getattr(probe, key):
                raise ValueError(
                    f"{type(self).__name__} needs {key}={getattr(probe, key)!r}, config has {getattr(cfg, key)!r}"
                )

    # ------------------------------------------------------------------ parameters

    def _build_parameters(self) -> None:
        cfg = self.cfg
        n, r, d_k, d_v, d_in = cfg.n_features, cfg.rank, cfg.d_k, cfg.d_v, cfg.d_in
        opts = {"dtype": cfg.torch_dtype}

        def unit(*shape: int) -> nn.Parameter:
            return nn.Parameter(F.normalize(torch.randn(*shape, **opts), dim=-1))

        def linear_uniform(fan_in: int, *shape: int) -> nn.Parameter:
            # PyTorch's nn.Linear default init, which the reference uses for its dense layers.
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(*shape, **opts).uniform_(-bound, bound))

        if cfg.encoder == "linear":
            self.E_enc = linear_uniform(d_in, n, d_k, d_v)
        elif not cfg.tied:
            self.V_enc = unit(n, r, d_k)
            self.W_enc = unit(n, r, d_v)
        if cfg.decoder == "factored":
            self.V_dec = unit(n, r, d_k)
            self.W_dec = unit(n, r, d_v)
        else:
            self.D_dec = linear_uniform(n, n, d_k, d_v)
        if cfg.sparsity == "gated":
            self.b_gate = nn.Parameter(torch.zeros(n, **opts))
            self.r_mag = nn.Parameter(torch.zeros(n, **opts))
            self.b_mag = nn.Parameter(torch.zeros(n, **opts))
        elif cfg.encoder == "linear":
            self.b_enc = linear_uniform(d_in, n)
        else:
            self.b_enc = nn.Parameter(torch.zeros(n, **opts))
        if cfg.sparsity == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(cfg.jumprelu_init_threshold), **opts))
        # The reference default-initialises the dense decoder's bias and zeroes the factored one.
        self.b_dec = linear_uniform(n, d_k, d_v) if cfg.decoder == "flat" else nn.Parameter(torch.zeros(d_k, d_v, **opts))
        self.register_buffer("mean", torch.zeros(d_k, d_v, **opts))
        self.register_buffer("steps_since_active", torch.zeros(n, dtype=torch.int64))
        self.normalize_decoder()

    @property
    def encoder_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, W)`` used by the bilinear encoder (the decoder's when tied)."""
        if self.cfg.tied:
            return self.V_dec, self.W_dec
        return self.V_enc, self.W_enc

    def feature_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters whose first axis indexes features (what resampling touches)."""
        names = ("E_enc", "V_enc", "W_enc", "V_dec", "W_dec", "D_dec", "b_enc", "log_threshold", "b_gate", "r_mag", "b_mag")
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def _chunk(self) -> int:
        return max(1, self._chunk_elements // self.cfg.d_in)

    def encoder_atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every encoder row as a ``d_k x d_v`` matrix ``E_i`` with ``pre_i = <E_i, S - mean>_F + bias``
        (bilinear: ``sum_r V_enc[i,r] W_enc[i,r]^T``; allocates ``n_features * d_in``).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8)
            >>> torch.equal(sae.encoder_atoms()[0], torch.outer(sae.V_enc[0, 0], sae.W_enc[0, 0]))
            True
        """
        if self.cfg.encoder == "linear":
            return self.E_enc
        return _assemble(*self.encoder_factors).view(-1, self.cfg.d_k, self.cfg.d_v)

    def decoder_atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every decoder atom as a ``d_k x d_v`` matrix (allocates ``n_features * d_in``).

        Example:
            >>> from recurrent_lens.sae import WriteSAE
            >>> WriteSAE(4, 3, 8).decoder_atoms().shape
            torch.Size([8, 4, 3])
        """
        if self.cfg.decoder == "factored":
            return _assemble(self.V_dec, self.W_dec).view(-1, self.cfg.d_k, self.cfg.d_v)
        return self.D_dec

    # ------------------------------------------------------------------ maths

    def _check_input(self, S: torch.Tensor, name: str = "S") -> None:
        d_k, d_v = self.cfg.d_k, self.cfg.d_v
        if S.dim() < 2 or tuple(S.shape[-2:]) != (d_k, d_v):
            raise ValueError(
                f"{type(self).__name__}: {name} must have shape [..., d_k={d_k}, d_v={d_v}], got {tuple(S.shape)}"
            )

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``<E_i, x>`` for every feature, no bias: ``[n, d_in] -> [n, n_features]``."""
        if self.cfg.encoder == "linear":
            return x @ self.E_enc.reshape(self.cfg.n_features, -1).T
        V, W = self.encoder_factors
        return _FactoredMatmul.apply(x, V, W, self._chunk(), True)

    def _dense_decode(self, a: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """``sum_i a_i A_i`` over all features: ``[n, n_features] -> [n, d_in]``."""
        if self.cfg.decoder == "factored":
            V, W = (self.V_dec.detach(), self.W_dec.detach()) if detach else (self.V_dec, self.W_dec)
            return _FactoredMatmul.apply(a, V, W, self._chunk(), False)
        D = self.D_dec.detach() if detach else self.D_dec
        return a @ D.reshape(self.cfg.n_features, -1)

    def _sparse_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j values[n,j] A_{indices[n,j]}`` touching only the selected atoms: ``-> [n, d_in]``."""
        n, k = values.shape
        if self.cfg.decoder == "factored":
            r = self.cfg.rank
            P = (self.V_dec[indices] * values[..., None, None]).reshape(n, k * r, self.cfg.d_k)
            Q = self.W_dec[indices].reshape(n, k * r, self.cfg.d_v)
            return torch.bmm(P.transpose(1, 2), Q).reshape(n, -1)
        return F.embedding_bag(indices, self.D_dec.reshape(self.cfg.n_features, -1), per_sample_weights=values, mode="sum")

    def _segment_decode(self, values: torch.Tensor, indices: torch.Tensor, sample: torch.Tensor, n: int) -> torch.Tensor:
        """Like :meth:`_sparse_decode` for a variable number of atoms per sample (BatchTopK)."""
        if self.cfg.decoder == "factored":
            P = self.V_dec[indices] * values[:, None, None]
            atoms = torch.bmm(P.transpose(1, 2), self.W_dec[indices]).reshape(len(values), -1)
            return atoms.new_zeros(n, self.cfg.d_in).index_add(0, sample, atoms)
        counts = torch.bincount(sample, minlength=n)
        offsets = torch.cumsum(counts, 0) - counts
        return F.embedding_bag(indices, self.D_dec.reshape(self.cfg.n_features, -1), offsets, per_sample_weights=values, mode="sum")

    def _activate(self, shared: torch.Tensor, lead: tuple[int, ...]) -> tuple[torch.Tensor, _Code]:
        """Biases, the acts_pre hook and the sparsity rule. Returns ``(pre, code)``, both 2-D."""
        cfg, n_f = self.cfg, self.cfg.n_features
        if cfg.sparsity == "gated":
            gate = shared + self.b_gate
            pre = self.hook_sae_acts_pre((self.r_mag.exp() * shared + self.b_mag).view(*lead, n_f)).reshape(-1, n_f)
            acts, g = sp.gated(gate, pre, cfg.gate_temperature, cfg.gate_mode)
            return pre, _Code(acts, "dense", extra={"gate": g})
        pre = self.hook_sae_acts_pre((shared + self.b_enc).view(*lead, n_f)).reshape(-1, n_f)
        if cfg.sparsity == "topk":
            values, indices = sp.topk(pre, cfg.k)
            acts = pre.new_zeros(pre.shape).scatter(1, indices, values)
            return pre, _Code(acts, "fixed", values, indices)
        if cfg.sparsity == "batchtopk":
            values, indices, sample = sp.batch_topk(pre, cfg.k)
            acts = pre.new_zeros(pre.shape).index_put((sample, indices), values)
            return pre, _Code(acts, "segments", values, indices, sample)
        acts = sp.jumprelu(pre, self.log_threshold, cfg.jumprelu_bandwidth)
        return pre, _Code(acts, "dense")

    def _encode(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Code]:
        """Returns ``(x_centred [n, d_in], pre [n, n_f], acts_post [..., n_f], code)``."""
        self._check_input(S)
        lead = tuple(S.shape[:-2])
        S = self.hook_sae_input(S.to(self.cfg.torch_dtype))
        x = (S - self.mean).reshape(-1, self.cfg.d_in)
        pre, code = self._activate(self._project(x), lead)
        acts_in = code.acts.view(*lead, self.cfg.n_features)
        acts = self.hook_sae_acts_post(acts_in)
        if acts is not acts_in:
            # A hook edited the codes, so the sparse (value, index) form no longer describes them.
            code = _Code(acts.reshape(-1, self.cfg.n_features), "dense", extra=code.extra)
        return x, pre, acts, code

    def _decode_code(self, code: _Code) -> torch.Tensor:
        """Centred reconstruction without the bias: ``[n, d_in]``."""
        if code.kind == "fixed":
            return self._sparse_decode(code.values, code.indices)
        if code.kind == "segments":
            return self._segment_decode(code.values, code.indices, code.sample, code.acts.shape[0])
        return self._dense_decode(code.acts)

    def encode(
        self, S: Float[torch.Tensor, "... d_k d_v"] | Float[torch.Tensor, "... d_in"]
    ) -> Float[torch.Tensor, "... n_features"]:
        """Sparse codes of ``S`` (centred by ``mean`` first). BatchTopK pools all leading dims.

        ``S`` is ``[..., d_k, d_v]`` or, as in SAELens, the flattened ``[..., d_k * d_v]``
        (``vec(S)``, row-major). A shape that fits both readings (``d_k == 1`` and a leading size
        of 1) is read as a matrix. ``hook_sae_input`` always sees the ``[..., d_k, d_v]`` form.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8, k=2)
            >>> S = torch.randn(2, 5, 4, 3)
            >>> sae.encode(S).shape
            torch.Size([2, 5, 8])
            >>> torch.equal(sae.encode(S.flatten(-2)), sae.encode(S))
            True
        """
        return self._encode(self._as_matrix(S))[2]

    def _as_matrix(self, S: torch.Tensor) -> torch.Tensor:
        """``[..., d_k * d_v]`` -> ``[..., d_k, d_v]``; anything else is returned for ``_check_input``."""
        d_k, d_v = self.cfg.d_k, self.cfg.d_v
        if S.dim() >= 1 and S.shape[-1] == d_k * d_v and not (S.dim() >= 2 and tuple(S.shape[-2:]) == (d_k, d_v)):
            return S.reshape(*S.shape[:-1], d_k, d_v)
        return S

    def decode(self, acts: Float[torch.Tensor, "... n_features"]) -> Float[torch.Tensor, "... d_k d_v"]:
        """Reconstruction ``sum_i acts_i A_i + b_dec + mean`` for arbitrary (dense) codes.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import FlatSAE
            >>> sae = FlatSAE(4, 3, 8)
            >>> torch.allclose(sae.decode(torch.zeros(8)), sae.b_dec + sae.mean)
            True
        """
        if acts.shape[-1] != self.cfg.n_features:
            raise ValueError(
                f"{type(self).__name__}.decode: acts must have shape [..., n_features={self.cfg.n_features}], "
                f"got {tuple(acts.shape)}"
            )
        lead = tuple(acts.shape[:-1])
        flat = self._dense_decode(acts.reshape(-1, self.cfg.n_features).to(self.cfg.torch_dtype))
        return self.hook_sae_recons(self._finish(flat, lead))

    def _finish(self, flat: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        return flat.view(*lead, self.cfg.d_k, self.cfg.d_v) + self.b_dec + self.mean

    def reconstruct(self, S: Float[torch.Tensor, "... d_k d_v"]) -> Float[torch.Tensor, "... d_k d_v"]:
        """``decode(encode(S))`` through the fast sparse path, without touching dead counters.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> WriteSAE(4, 3, 8).reconstruct(torch.randn(4, 3)).shape
            torch.Size([4, 3])
        """
        _, _, _, code = self._encode(S)
        return self.hook_sae_recons(self._finish(self._decode_code(code), tuple(S.shape[:-2]))).to(S.dtype)

    def forward(self, S: Float[torch.Tensor, "... d_k d_v"]) -> SAEOutput:
        """Encode, decode, losses and dead-feature bookkeeping for one batch.

        ``loss = mse + aux_loss``. ``aux_loss`` is the dead-feature loss (TopK, BatchTopK; zero
        while no feature is dead), the L0 penalty (JumpReLU) or the gate losses (Gated). Every
        call updates ``steps_since_active``, in training and in eval.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> out = WriteSAE(4, 3, 8, k=2)(torch.randn(10, 4, 3))
            >>> out.loss.shape, int(out.n_dead)
            (torch.Size([]), 0)
        """
        cfg = self.cfg
        lead = tuple(S.shape[:-2])
        x, pre, acts, code = self._encode(S)
        x_hat = self._decode_code(code) + self.b_dec.reshape(-1)
        recon = self.hook_sae_recons(x_hat.view(*lead, cfg.d_k, cfg.d_v) + self.mean)
        mse = (x_hat - x).pow(2).mean()
        n_dead = self._update_dead(code.acts)
        aux = self._aux_loss(x, x_hat, pre, code)
        return SAEOutput(recon, acts, mse + aux, mse, aux, n_dead)

    @torch.no_grad()
    def _update_dead(self, acts: torch.Tensor) -> torch.Tensor:
        fired = (acts > 0).any(0)
        self.steps_since_active.add_(1).masked_fill_(fired, 0)
        return (self.steps_since_active >= self.cfg.dead_threshold).sum()

    def _aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, code: _Code) -> torch.Tensor:
        cfg = self.cfg
        if cfg.sparsity in ("topk", "batchtopk"):
            dead = self.steps_since_active >= cfg.dead_threshold
            # Alive features are masked to -inf; any of them still picked by topk (fewer dead than
            # k_aux) becomes 0 after the ReLU, so no host-side count of the dead is needed.
            values, indices = sp.topk(pre.masked_fill(~dead, float("-inf")), cfg.k_aux)
            aux_hat = self._sparse_decode(values, indices) + self.b_dec.reshape(-1)
            aux = (aux_hat - (x - x_hat.detach())).pow(2).mean()
            return cfg.aux_coef * aux * dead.any().to(aux.dtype)
        if cfg.sparsity == "jumprelu":
            l0 = sp.jumprelu_l0(pre, self.log_threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
            return cfg.l0_coef * l0
        g = code.extra["gate"]
        gate_hat = self._dense_decode(g, detach=True) + self.b_dec.detach().reshape(-1)
        return cfg.gated_sparsity_coef * g.sum(-1).mean() + cfg.gated_aux_coef * (gate_hat - x).pow(2).mean()

    # ------------------------------------------------------------------ maintenance

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Set every decoder factor vector (flat/full: every atom) to unit L2 norm.

        Example:
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8)
            >>> _ = sae.V_dec.data.mul_(3.0); sae.normalize_decoder()
            >>> bool(sae.V_dec.norm(dim=-1).sub(1).abs().max() < 1e-6)
            True
        """
        if self.cfg.decoder == "factored":
            self.V_dec.copy_(F.normalize(self.V_dec, dim=-1))
            self.W_dec.copy_(F.normalize(self.W_dec, dim=-1))
        else:
            n = self.cfg.n_features
            self.D_dec.copy_(F.normalize(self.D_dec.reshape(n, -1), dim=-1).view_as(self.D_dec))

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Scale every decoder atom to unit Frobenius norm and its encoder row, biases and threshold up
        by the same factor, as SAELens's ``fold_W_dec_norm`` does.

        Reconstructions are unchanged; codes are multiplied by the atom norms. Like SAELens, TopK
        and BatchTopK refuse (rescaling the pre-activations changes which features win), and so do
        the soft Gated gate (``sigmoid(gate / T)`` is not scale invariant) and tied SAEs (encoder and
        decoder share the factors, so they cannot be scaled in opposite directions).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import FlatSAE
            >>> sae = FlatSAE(4, 3, 8, sparsity="jumprelu")
            >>> _ = sae.D_dec.data.mul_(torch.arange(1.0, 9.0)[:, None, None])
            >>> S = torch.randn(5, 4, 3)
            >>> before = sae.reconstruct(S)
            >>> sae.fold_W_dec_norm()
            >>> bool((sae.reconstruct(S) - before).abs().max() < 1e-5)
            True
            >>> bool(sae.decoder_atoms().flatten(1).norm(dim=-1).sub(1).abs().max() < 1e-6)
            True
        """
        cfg = self.cfg
        if cfg.sparsity in ("topk", "batchtopk"):
            raise NotImplementedError(
                f"fold_W_dec_norm: not output-preserving for sparsity={cfg.sparsity!r} (scaling the "
                "pre-activations changes which features are selected)"
            )
        if cfg.sparsity == "gated" and cfg.gate_mode != "hard":
            raise NotImplementedError(
                f"fold_W_dec_norm: not output-preserving for gate_mode={cfg.gate_mode!r} (the soft gate "
                "sigmoid(gate / T) is not scale invariant); only gate_mode='hard' can be folded"
            )
        if cfg.tied:
            raise NotImplementedError(
                "fold_W_dec_norm: tied SAEs share encoder and decoder factors, so the norms cannot be folded"
            )
        norms = self.decoder_atoms().reshape(cfg.n_features, -1).norm(dim=-1).clamp(min=1e-8)
        per_feature = norms[:, None, None]
        if cfg.decoder == "factored":
            self.V_dec.div_(per_feature)
        else:
            self.D_dec.div_(per_feature)
        if cfg.encoder == "linear":
            self.E_enc.mul_(per_feature)
        else:
            self.V_enc.mul_(per_feature)
        if cfg.sparsity == "gated":
            self.b_gate.mul_(norms)
            self.b_mag.mul_(norms)
        else:
            self.b_enc.mul_(norms)
        if cfg.sparsity == "jumprelu":
            self.log_threshold.add_(norms.log())

    def dead_mask(self) -> torch.Tensor:
        """Boolean ``[n_features]``: features that have not fired for ``dead_threshold`` forwards."""
        return self.steps_since_active >= self.cfg.dead_threshold

    @torch.no_grad()
    def resample_dead_features(
        self, batch: Float[torch.Tensor, "batch d_k d_v"], generator: torch.Generator | None = None
    ) -> Int[torch.Tensor, " n_resampled"]:
        """Re-initialise dead features from badly reconstructed samples of ``batch``.

        Follows specs/WRITESAE.md §1.2: samples drawn with replacement in proportion to their
        squared error; factored atoms from the SVD of the (centred) sample, dense atoms from its
        normalised vec; encoder weights in the same directions at 0.2x the mean alive norm; biases
        zero (JumpReLU: mean alive threshold); counters reset. Returns the resampled indices; the
        caller clears their optimizer state (see :class:`recurrent_lens.sae.SAETrainer`).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8)
            >>> _ = sae.steps_since_active.fill_(1000)
            >>> sae.resample_dead_features(torch.randn(3, 4, 3)).tolist()
            [0, 1, 2]
        """
        self._check_input(batch, "batch")
        cfg = self.cfg
        batch = batch.reshape(-1, cfg.d_k, cfg.d_v).to(cfg.torch_dtype)
        dead = self.dead_mask()
        dead_idx = dead.nonzero().squeeze(1)
        n = min(len(dead_idx), batch.shape[0])
        if n == 0:
            return dead_idx[:0]
        idx = dead_idx[:n]
        errors = (self.reconstruct(batch) - batch).pow(2).flatten(1).sum(1)
        total = errors.sum()
        if not torch.isfinite(total) or total <= 0:
            errors = torch.ones_like(errors)
        picks = torch.multinomial(errors, n, replacement=True, generator=generator)
        X = batch[picks] - self.mean  # [n, d_k, d_v]
        alive = ~dead

        def scale(norms: torch.Tensor) -> torch.Tensor:
            # 0.2x the mean norm of the alive features' encoder vectors (1 if none is alive).
            return 0.2 * (norms.mean() if norms.numel() else torch.ones((), dtype=norms.dtype))

        if cfg.decoder == "factored" or cfg.encoder == "bilinear":
            U, sv, Vh = torch.linalg.svd(X, full_matrices=False)  # [n, d_k, m], [n, m], [n, m, d_v]
            r, m = cfg.rank, sv.shape[-1]
            tol = sv[:, :1] * max(cfg.d_k, cfg.d_v) * torch.finfo(sv.dtype).eps
            keep = (sv > tol).to(X.dtype)  # [n, m]
            left = X.new_zeros(n, r, cfg.d_k)
            right = X.new_zeros(n, r, cfg.d_v)
            j = min(r, m)
            left[:, :j] = (U[:, :, :j] * keep[:, None, :j]).transpose(1, 2)
            right[:, :j] = Vh[:, :j] * keep[:, :j, None]
        flat_dir = F.normalize(X.reshape(n, -1), dim=-1).view(n, cfg.d_k, cfg.d_v)

        if cfg.encoder == "linear":
            self.E_enc[idx] = flat_dir * scale(self.E_enc[alive].flatten(1).norm(dim=-1))
        elif not cfg.tied:
            s = scale(self.V_enc[alive].norm(dim=-1))
            self.V_enc[idx] = left * s
            self.W_enc[idx] = right * s
        if cfg.decoder == "factored":
            self.V_dec[idx] = left
            self.W_dec[idx] = right
        else:
            self.D_dec[idx] = flat_dir
        if cfg.sparsity == "gated":
            for name in ("b_gate", "r_mag", "b_mag"):
                getattr(self, name)[idx] = 0.0
        else:
            self.b_enc[idx] = 0.0
        if cfg.sparsity == "jumprelu":
            self.log_threshold[idx] = self.log_threshold[alive].mean() if alive.any() else math.log(cfg.jumprelu_init_threshold)
        self.steps_since_active[idx] = 0
        return idx

    # ------------------------------------------------------------------ io

    def save_pretrained(self, path: str, format: str = "native") -> None:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into directory ``path`` (atomically).

        ``format="native"`` keeps this SAE exactly (our keys); ``format="saelens"`` writes a
        directory that SAELens's ``SAE.load_from_disk`` reads, on ``d_in = d_k * d_v`` (see
        :mod:`recurrent_lens.sae.saelens`).

        Example:
            >>> import tempfile
            >>> from recurrent_lens.sae import WriteSAE, load
            >>> sae = WriteSAE(4, 3, 8)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     sae.save_pretrained(d)
            ...     type(load(d)).__name__
            'WriteSAE'
        """
        from recurrent_lens.sae.io import save_sae

        save_sae(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> "SAE":
        """Load a directory written by :meth:`save_pretrained`; see :func:`recurrent_lens.sae.load`.

        Example:
            >>> import tempfile
            >>> from recurrent_lens.sae import FlatSAE, SAE
            >>> with tempfile.TemporaryDirectory() as d:
            ...     FlatSAE(4, 3, 8).save_pretrained(d)
            ...     type(SAE.from_pretrained(d)).__name__
            'FlatSAE'
        """
        from recurrent_lens.sae.io import load

        sae = load(path, device=device)
        if not isinstance(sae, cls):
            raise TypeError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae

    def config_dict(self) -> dict[str, Any]:
        """``cfg.to_dict()`` plus ``"architecture"``: the content of ``cfg.json``."""
        return {"architecture": self.architecture, **self.cfg.to_dict()}

    def __repr__(self) -> str:
        cfg = self.cfg
        dec = {"factored": f"rank-{cfg.rank}", "flat": "flat", "full": "full"}[cfg.decoder]
        enc = cfg.encoder + (f"(rank {cfg.rank})" if cfg.encoder == "bilinear" and cfg.rank > 1 else "")
        spars = f"{cfg.sparsity}(k={cfg.k})" if cfg.sparsity in ("topk", "batchtopk") else cfg.sparsity
        parts = [
            f"d_k={cfg.d_k}, d_v={cfg.d_v}, n_features={cfg.n_features}",
            f"encoder={enc}{', tied' if cfg.tied else ''}",
            f"decoder={dec}",
            f"sparsity={spars}",
        ]
        if cfg.center:
            parts.append("centred")
        for key in ("hook_name", "head"):
            if key in cfg.metadata:
                parts.append(f"{key}={cfg.metadata[key]!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


register_sae_class(SAE.architecture, SAE)
