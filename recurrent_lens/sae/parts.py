"""The parts an SAE is composed of: encoders and decoders (here) and sparsities
(:mod:`recurrent_lens.sae.sparsities`).

A part declares the parameters it owns, initialises them, keeps them normalised, re-initialises
dead features, rescales them for :meth:`~recurrent_lens.sae.SAE.fold_W_dec_norm` and computes with
them. The parameters live on the SAE itself under fixed names (``E_enc``, ``V_enc``, ``W_enc``,
``V_dec``, ``W_dec``, ``D_dec``, ``b_dec``, ...): those are the state-dict keys of every saved SAE,
so a part adds no prefix and SAEs written before the family was split into parts load unchanged.

=========================  ====================================================================
part                       parameters (``n`` features, rank ``r``)
=========================  ====================================================================
:class:`LinearEncoder`     ``E_enc`` [n, d_k, d_v]: ``pre_i = <E_i, x>_F``
:class:`BilinearEncoder`   ``V_enc`` [n, r, d_k], ``W_enc`` [n, r, d_v]: ``pre_i = sum_r V^T x W``
                           (tied: the decoder's ``V_dec``/``W_dec``, no parameters of its own)
:class:`FactoredDecoder`   ``V_dec`` [n, r, d_k], ``W_dec`` [n, r, d_v], ``b_dec`` [d_k, d_v]
:class:`FlatDecoder`       ``D_dec`` [n, d_k, d_v], ``b_dec`` (default-initialised, as the
                           reference's dense decoder)
:class:`FullDecoder`       as :class:`FlatDecoder` with ``b_dec = 0`` (the full-rank MatrixSAE)
=========================  ====================================================================

Orientation: ``V`` factors live on the key side (``d_k``), ``W`` factors on the value side
(``d_v``), so an atom ``v w^T`` has the state's ``[d_k, d_v]`` layout.

Example:
    >>> from recurrent_lens.sae import BilinearSAE
    >>> sae = BilinearSAE(4, 3, 8, decoder="flat", sparsity="jumprelu")
    >>> type(sae.encoder).__name__, type(sae.decoder).__name__, type(sae.sparsity).__name__
    ('BilinearEncoder', 'FlatDecoder', 'JumpReLU')
    >>> sae.decoder.feature_names, sae.sparsity.feature_names
    (('D_dec',), ('b_enc', 'log_threshold'))
"""

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

__all__ = [
    "on_host", "sparse_rows", "FactoredMatmul", "SparseFactoredDecode",
    "Part", "Code", "FixedCode", "SegmentCode", "Directions",
    "Encoder", "LinearEncoder", "BilinearEncoder",
    "Decoder", "FactoredDecoder", "FlatDecoder", "FullDecoder",
]


def assemble(V: torch.Tensor, W: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Atoms ``sum_r V[i,r] W[i,r]^T`` as ``[n, d_k * d_v]``, written into ``buffer[:n]`` if given."""
    n, _, d_k = V.shape
    d_v = W.shape[-1]
    out = None if buffer is None else buffer[:n].view(n, d_k, d_v)
    if V.shape[1] == 1:
        # An outer product as a broadcast multiply: bmm with an inner dimension of 1 is several times slower.
        out = torch.mul(V[:, 0, :, None], W[:, 0, None, :], out=out)
    else:
        out = torch.bmm(V.transpose(1, 2), W, out=out)
    return out.view(n, -1)


def on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` is on the CPU, where reading a count of it costs nothing. The fast paths that need
    one (sparse encoder gradients, skipping or shrinking the auxiliary loss) run only there: on a GPU
    they would make every training step wait for the device."""
    return t.device.type == "cpu"


def sparse_rows(G: torch.Tensor, max_fill: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The non-zeros of ``G`` [n, f] row by row, as ``(indices, values)`` [n, m] padded with zeros
    (``m`` = most non-zeros in a row), or ``None`` if a row is fuller than ``max_fill * f`` or ``G``
    is not :func:`on_host`."""
    if not on_host(G) or G.dim() != 2:
        return None
    n, f = G.shape
    rows, cols = G.nonzero().unbind(1)  # row-major order
    counts = torch.bincount(rows, minlength=n)
    m = int(counts.max()) if len(rows) else 0
    if m > max_fill * f:
        return None
    slot = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]  # position within its row
    indices = torch.zeros(n, m, dtype=torch.int64).index_put_((rows, slot), cols)
    return indices, G.new_zeros(n, m).index_put_((rows, slot), G[rows, cols])


def _add_rows(shape_like: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``zeros_like(shape_like)`` with ``rows[j]`` added at ``index[j]``."""
    out = torch.zeros_like(shape_like)
    if on_host(out):
        # About ten times faster than the accumulating index_put_ of autograd's gather backward.
        return out.index_add_(0, index, rows)
    # On CUDA index_add_ sums with atomics, so results would vary from run to run; index_put_ does not.
    return out.index_put_((index,), rows, accumulate=True)


class FactoredMatmul(torch.autograd.Function):
    """``X @ A^T`` (encode) or ``X @ A`` (decode) for atoms ``A_i = sum_r V[i,r] W[i,r]^T``.

    The atoms are built ``chunk`` features at a time and rebuilt in backward, so memory stays at
    one chunk of ``[chunk, d_k * d_v]`` instead of all ``n_features`` atoms plus their gradients
    (and a chunk that fits in the cache is also faster to multiply).

    Encoding, the backward pass is sparse when the incoming gradient is (TopK and BatchTopK pass
    gradient to the selected pre-activations only): with ``m`` non-zeros ``g`` per row it costs
    ``n * m * d_k * d_v`` instead of a GEMM over all features,
    ``dV_i = sum_b g_bi X_b W_i``, ``dW_i = sum_b g_bi X_b^T V_i``, ``dX_b = sum_i g_bi A_i``.
    It runs when no row has more than ``sparse_fill`` of the features (on the CPU only, see
    :func:`on_host`).
    """

    sparse_fill: ClassVar[float] = 1 / 8
    """Measured at d_k = d_v = 128, 8192 features, 2 threads: the sparse backward takes 4 ms for 32
    non-zeros per row against 330 ms dense, and breaks even at about a quarter of the features."""

    @staticmethod
    def forward(ctx, X, V, W, chunk, transpose):  # type: ignore[override]
        ctx.save_for_backward(X, V, W)
        ctx.chunk, ctx.transpose = chunk, transpose
        n = V.shape[0]
        # One buffer for every chunk's atoms: it stays in the cache, and the allocator is not asked
        # (and the pages not faulted in) again for each chunk.
        buffer = X.new_empty(min(chunk, n), V.shape[2] * W.shape[2])
        if transpose:
            out = X.new_empty(X.shape[0], n)
            for s in range(0, n, chunk):
                out[:, s : s + chunk] = X @ assemble(V[s : s + chunk], W[s : s + chunk], buffer).T
            return out
        out = None
        for s in range(0, n, chunk):
            part = X[:, s : s + chunk] @ assemble(V[s : s + chunk], W[s : s + chunk], buffer)
            out = part if out is None else out.add_(part)
        return out

    @staticmethod
    def backward(ctx, G):  # type: ignore[override]
        X, V, W = ctx.saved_tensors
        if ctx.transpose:
            rows = sparse_rows(G, FactoredMatmul.sparse_fill)
            if rows is not None:
                return (*_sparse_encode_grads(X, V, W, *rows, ctx.needs_input_grad[:3]), None, None)
        return (*_dense_grads(X, V, W, G, ctx.chunk, ctx.transpose, ctx.needs_input_grad[:3]), None, None)


def _dense_grads(X, V, W, G, chunk, transpose, needs):
    n, r, d_k = V.shape
    d_v = W.shape[-1]
    need_x, need_v, need_w = needs
    gX = torch.zeros_like(X) if need_x else None
    gV = torch.empty_like(V) if need_v else None
    gW = torch.empty_like(W) if need_w else None
    buffer = X.new_empty(min(chunk, n), d_k * d_v)
    for s in range(0, n, chunk):
        Vc, Wc = V[s : s + chunk], W[s : s + chunk]
        c = Vc.shape[0]
        A = assemble(Vc, Wc, buffer)
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
    return gX, gV, gW


def _sparse_encode_grads(X, V, W, idx, g, needs):
    """Gradients of ``X @ A^T`` for an incoming gradient with non-zeros ``g`` at ``idx`` ([n, m])."""
    n, m = idx.shape
    r, d_k, d_v = V.shape[1], V.shape[2], W.shape[2]
    need_x, need_v, need_w = needs
    S = X.reshape(n, d_k, d_v)
    flat = idx.reshape(-1)
    gr = g.repeat_interleave(r, dim=1)  # [n, m * r]: the weight of each (feature, rank) pair
    Vg = V[idx].view(n, m * r, d_k)
    Wg = W[idx].view(n, m * r, d_v)
    gV = gW = gX = None
    if need_v:
        SW = torch.bmm(Wg, S.transpose(1, 2))  # [n, m*r, d_k]: X_b W_ir
        gV = _add_rows(V, flat, (SW * gr[..., None]).view(n * m, r, d_k))
    if need_w:
        SV = torch.bmm(Vg, S)  # [n, m*r, d_v]: X_b^T V_ir
        gW = _add_rows(W, flat, (SV * gr[..., None]).view(n * m, r, d_v))
    if need_x:
        gX = torch.bmm((Vg * gr[..., None]).transpose(1, 2), Wg).view(n, d_k * d_v)
    return gX, gV, gW


class SparseFactoredDecode(torch.autograd.Function):
    """``sum_j values[b,j] A_{indices[b,j]}`` for factored atoms, touching the selected atoms only.

    The backward pass is written out (two batched products, the code gradient and one index_add_
    per factor) instead of autograd's chain of gathers, products and accumulating index_put_.
    """

    @staticmethod
    def forward(ctx, values, indices, V, W):  # type: ignore[override]
        n, k = values.shape
        r, d_k, d_v = V.shape[1], V.shape[2], W.shape[2]
        Vg = V[indices]
        P = (Vg * values[..., None, None]).reshape(n, k * r, d_k)
        Q = W[indices].reshape(n, k * r, d_v)
        ctx.save_for_backward(values, indices, V, W)
        return torch.bmm(P.transpose(1, 2), Q).reshape(n, -1)

    @staticmethod
    def backward(ctx, G):  # type: ignore[override]
        values, indices, V, W = ctx.saved_tensors
        need_values, _, need_v, need_w = ctx.needs_input_grad
        n, k = values.shape
        r, d_k, d_v = V.shape[1], V.shape[2], W.shape[2]
        G = G.reshape(n, d_k, d_v)
        Vg = V[indices].reshape(n, k * r, d_k)
        Q = W[indices].reshape(n, k * r, d_v)
        g_values = gV = gW = None
        if need_values or need_v:
            dP = torch.bmm(Q, G.transpose(1, 2))  # [n, k*r, d_k]: the gradient of P_j = values_j V_j
            if need_values:
                g_values = (dP * Vg).sum(-1).view(n, k, r).sum(-1)
            if need_v:
                rows = (dP.view(n, k, r, d_k) * values[..., None, None]).view(n * k, r, d_k)
                gV = _add_rows(V, indices.reshape(-1), rows)
        if need_w:
            P = (Vg.view(n, k, r, d_k) * values[..., None, None]).view(n, k * r, d_k)
            gW = _add_rows(W, indices.reshape(-1), torch.bmm(P, G).view(n * k, r, d_v))
        return g_values, None, gV, gW


# ---------------------------------------------------------------------------------------- codes


@dataclass
class Code:
    """Codes ``acts`` [n, n_features] with no known support (JumpReLU, Gated, or codes a hook edited):
    decoded densely. Subclasses also carry the active (value, index) pairs, so the decoder touches
    only those atoms.

    ``extra`` carries what a sparsity's auxiliary loss needs besides the codes (Gated: ``"gate"``).
    """

    acts: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict, kw_only=True)
    sparse: ClassVar[bool] = False

    def decode(self, decoder: "Decoder") -> torch.Tensor:
        """``sum_i acts_i A_i`` (no bias): ``[n, d_in]``."""
        return decoder.decode_dense(self.acts)


@dataclass
class FixedCode(Code):
    """``k`` active features per sample (TopK): ``values`` and ``indices`` are ``[n, k]``."""

    sparse: ClassVar[bool] = True
    values: torch.Tensor
    indices: torch.Tensor

    def decode(self, decoder: "Decoder") -> torch.Tensor:
        return decoder.decode_sparse(self.values, self.indices)


@dataclass
class SegmentCode(Code):
    """A varying number of active features per sample (BatchTopK): flat ``values``, ``indices`` and
    ``sample`` (sorted by sample)."""

    sparse: ClassVar[bool] = True
    values: torch.Tensor
    indices: torch.Tensor
    sample: torch.Tensor

    def decode(self, decoder: "Decoder") -> torch.Tensor:
        return decoder.decode_segments(self.values, self.indices, self.sample, self.acts.shape[0])


# ---------------------------------------------------------------------------------------- parts


class Directions:
    """Where resampled features point: the (centred) states ``X`` [m, d_k, d_v] chosen for them.

    ``flat`` is ``vec(X)/|X|`` (dense atoms, linear encoder rows); ``factors`` is ``(left, right)``,
    ``[m, rank, d_k]`` and ``[m, rank, d_v]``: the top singular vectors of each state (singular values
    dropped), zero beyond the state's numerical rank. Each is computed only if a part asks for it.
    """

    def __init__(self, X: torch.Tensor, rank: int) -> None:
        self.X, self.rank = X, rank

    @cached_property
    def flat(self) -> torch.Tensor:
        n = self.X.shape[0]
        return F.normalize(self.X.reshape(n, -1), dim=-1).view_as(self.X)

    @cached_property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        X, r = self.X, self.rank
        n, d_k, d_v = X.shape
        U, sv, Vh = torch.linalg.svd(X, full_matrices=False)  # [n, d_k, m], [n, m], [n, m, d_v]
        m = sv.shape[-1]
        tol = sv[:, :1] * max(d_k, d_v) * torch.finfo(sv.dtype).eps
        keep = (sv > tol).to(X.dtype)  # [n, m]
        left = X.new_zeros(n, r, d_k)
        right = X.new_zeros(n, r, d_v)
        j = min(r, m)
        left[:, :j] = (U[:, :, :j] * keep[:, None, :j]).transpose(1, 2)
        right[:, :j] = Vh[:, :j] * keep[:, :j, None]
        return left, right


def alive_scale(norms: torch.Tensor) -> torch.Tensor:
    """0.2 times the mean of the alive features' encoder norms (1 if none is alive): the size of a
    resampled feature's encoder vectors."""
    return 0.2 * (norms.mean() if norms.numel() else torch.ones((), dtype=norms.dtype))


class Part:
    """Base of encoders, decoders and sparsities. ``sae`` is the SAE the part belongs to: its
    parameters are registered there (see the module docstring), and its config is ``sae.cfg``."""

    kind: ClassVar[str] = "part"

    def __init__(self, sae: nn.Module) -> None:
        self.sae = sae

    @property
    def cfg(self) -> Any:
        return self.sae.cfg

    feature_names: tuple[str, ...] = ()
    """Names of the parameters this part owns whose first axis indexes features."""

    def _new(self, name: str, value: torch.Tensor) -> None:
        self.sae.register_parameter(name, nn.Parameter(value))

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.cfg.torch_dtype)

    def _unit(self, *shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, dtype=self.cfg.torch_dtype), dim=-1)

    def _linear_uniform(self, fan_in: int, *shape: int) -> torch.Tensor:
        # PyTorch's nn.Linear default init, which the reference uses for its dense layers.
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(*shape, dtype=self.cfg.torch_dtype).uniform_(-bound, bound)

    def build(self) -> None:
        """Register and initialise this part's parameters on the SAE."""

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        """Re-initialise features ``idx`` (``alive`` is the mask of features that were not dead)."""

    def check_fold(self) -> None:
        """Raise ``NotImplementedError`` if :meth:`~recurrent_lens.sae.SAE.fold_W_dec_norm` cannot
        preserve the SAE's outputs (checked on every part before any is changed)."""

    def describe(self) -> str:
        """How ``repr(sae)`` names this part."""
        return self.kind


# ---------------------------------------------------------------------------------------- encoders


class Encoder(Part):
    """Computes ``<E_i, x>_F`` for every feature (no bias; the sparsity owns the biases)."""

    def bias_init(self) -> torch.Tensor:
        """Initial value of ``b_enc`` for a sparsity that has one: zero."""
        return self._zeros(self.cfg.n_features)

    def project(self, x: Float[torch.Tensor, "n d_in"]) -> Float[torch.Tensor, "n n_features"]:
        raise NotImplementedError

    def atoms(self, features: torch.Tensor | None = None) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every encoder row as a ``d_k x d_v`` matrix ``E_i`` (only rows ``features`` when given)."""
        raise NotImplementedError

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        """Multiply encoder row ``i`` by ``per_feature[i]`` (``[n, 1, 1]``)."""
        raise NotImplementedError


class LinearEncoder(Encoder):
    """A dense ``d_k x d_v`` matrix ``E_i`` per feature on ``vec(x)`` (the reference's ``nn.Linear``)."""

    kind = "linear"

    feature_names: tuple[str, ...] = ("E_enc",)

    def build(self) -> None:
        cfg = self.cfg
        self._new("E_enc", self._linear_uniform(cfg.d_in, cfg.n_features, cfg.d_k, cfg.d_v))

    def bias_init(self) -> torch.Tensor:
        return self._linear_uniform(self.cfg.d_in, self.cfg.n_features)

    def project(self, x: Float[torch.Tensor, "n d_in"]) -> Float[torch.Tensor, "n n_features"]:
        return x @ self.sae.E_enc.reshape(self.cfg.n_features, -1).T

    def atoms(self, features: torch.Tensor | None = None) -> Float[torch.Tensor, "n_features d_k d_v"]:
        return self.sae.E_enc if features is None else self.sae.E_enc[features]

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        E = self.sae.E_enc
        E[idx] = directions.flat * alive_scale(E[alive].flatten(1).norm(dim=-1))

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        self.sae.E_enc.mul_(per_feature)


class BilinearEncoder(Encoder):
    """``pre_i = sum_r V_enc[i,r]^T x W_enc[i,r]``, computed as one GEMM of ``vec(x)`` against the
    assembled atoms in feature chunks; tied, it uses the decoder's factors."""

    kind = "bilinear"

    @property
    def tied(self) -> bool:
        return self.cfg.tied

    @property
    def feature_names(self) -> tuple[str, ...]:
        return () if self.tied else ("V_enc", "W_enc")

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, W)`` of the encoder (the decoder's when tied)."""
        sae = self.sae
        return (sae.V_dec, sae.W_dec) if self.tied else (sae.V_enc, sae.W_enc)

    def build(self) -> None:
        cfg = self.cfg
        if not self.tied:
            self._new("V_enc", self._unit(cfg.n_features, cfg.rank, cfg.d_k))
            self._new("W_enc", self._unit(cfg.n_features, cfg.rank, cfg.d_v))

    def project(self, x: Float[torch.Tensor, "n d_in"]) -> Float[torch.Tensor, "n n_features"]:
        V, W = self.factors
        return FactoredMatmul.apply(x, V, W, self.sae._chunk(x.device), True)

    def atoms(self, features: torch.Tensor | None = None) -> Float[torch.Tensor, "n_features d_k d_v"]:
        V, W = self.factors
        if features is not None:
            V, W = V[features], W[features]
        return assemble(V, W).view(-1, self.cfg.d_k, self.cfg.d_v)

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        if self.tied:
            return
        sae = self.sae
        left, right = directions.factors
        s = alive_scale(sae.V_enc[alive].norm(dim=-1))
        sae.V_enc[idx] = left * s
        sae.W_enc[idx] = right * s

    def check_fold(self) -> None:
        if self.tied:
            raise NotImplementedError(
                "fold_W_dec_norm: tied SAEs share encoder and decoder factors, so the norms cannot be folded"
            )

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        self.sae.V_enc.mul_(per_feature)

    def describe(self) -> str:
        r = self.cfg.rank
        return "bilinear" + (f"(rank {r})" if r > 1 else "") + (", tied" if self.tied else "")


# ---------------------------------------------------------------------------------------- decoders


class Decoder(Part):
    """Maps codes to centred reconstructions ``sum_i a_i A_i`` (``b_dec`` is added by the SAE)."""

    def build_bias(self) -> None:
        """Register ``b_dec`` [d_k, d_v] (zero unless the decoder says otherwise)."""
        self._new("b_dec", self._zeros(self.cfg.d_k, self.cfg.d_v))

    def atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every decoder atom as a ``d_k x d_v`` matrix."""
        raise NotImplementedError

    def decode_dense(self, a: Float[torch.Tensor, "n n_features"], detach: bool = False) -> Float[torch.Tensor, "n d_in"]:
        """``sum_i a_i A_i`` over all features (``detach``: no gradient to the atoms)."""
        raise NotImplementedError

    def decode_sparse(self, values: Float[torch.Tensor, "n k"], indices: Int[torch.Tensor, "n k"]) -> Float[torch.Tensor, "n d_in"]:
        """``sum_j values[n,j] A_{indices[n,j]}``, touching only the selected atoms."""
        raise NotImplementedError

    def decode_segments(
        self, values: Float[torch.Tensor, " m"], indices: Int[torch.Tensor, " m"], sample: Int[torch.Tensor, " m"], n: int
    ) -> Float[torch.Tensor, "n d_in"]:
        """Like :meth:`decode_sparse` for a varying number of atoms per sample (sorted by ``sample``)."""
        raise NotImplementedError

    @torch.no_grad()
    def normalize(self) -> None:
        """Set every decoder factor vector (dense decoders: every atom) to unit L2 norm."""
        raise NotImplementedError

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        """Divide atom ``i`` by ``per_feature[i]`` (``[n, 1, 1]``)."""
        raise NotImplementedError


class FactoredDecoder(Decoder):
    """Atoms ``sum_r V_dec[i,r] W_dec[i,r]^T`` of rank ``cfg.rank``."""

    kind = "factored"

    feature_names: tuple[str, ...] = ("V_dec", "W_dec")

    def build(self) -> None:
        cfg = self.cfg
        self._new("V_dec", self._unit(cfg.n_features, cfg.rank, cfg.d_k))
        self._new("W_dec", self._unit(cfg.n_features, cfg.rank, cfg.d_v))

    def atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        return assemble(self.sae.V_dec, self.sae.W_dec).view(-1, self.cfg.d_k, self.cfg.d_v)

    def decode_dense(self, a: Float[torch.Tensor, "n n_features"], detach: bool = False) -> Float[torch.Tensor, "n d_in"]:
        V, W = self.sae.V_dec, self.sae.W_dec
        if detach:
            V, W = V.detach(), W.detach()
        return FactoredMatmul.apply(a, V, W, self.sae._chunk(a.device), False)

    def decode_sparse(self, values: Float[torch.Tensor, "n k"], indices: Int[torch.Tensor, "n k"]) -> Float[torch.Tensor, "n d_in"]:
        return SparseFactoredDecode.apply(values, indices, self.sae.V_dec, self.sae.W_dec)

    def decode_segments(
        self, values: Float[torch.Tensor, " m"], indices: Int[torch.Tensor, " m"], sample: Int[torch.Tensor, " m"], n: int
    ) -> Float[torch.Tensor, "n d_in"]:
        P = self.sae.V_dec[indices] * values[:, None, None]
        atoms = torch.bmm(P.transpose(1, 2), self.sae.W_dec[indices]).reshape(len(values), -1)
        return atoms.new_zeros(n, self.cfg.d_in).index_add(0, sample, atoms)

    @torch.no_grad()
    def normalize(self) -> None:
        self.sae.V_dec.copy_(F.normalize(self.sae.V_dec, dim=-1))
        self.sae.W_dec.copy_(F.normalize(self.sae.W_dec, dim=-1))

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        left, right = directions.factors
        self.sae.V_dec[idx] = left
        self.sae.W_dec[idx] = right

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        self.sae.V_dec.div_(per_feature)

    def describe(self) -> str:
        return f"rank-{self.cfg.rank}"


class FlatDecoder(Decoder):
    """A dense ``d_k x d_v`` atom ``D_dec[i]`` per feature (the reference FlatSAE's ``nn.Linear``)."""

    kind = "flat"

    feature_names: tuple[str, ...] = ("D_dec",)

    def build(self) -> None:
        cfg = self.cfg
        self._new("D_dec", self._linear_uniform(cfg.n_features, cfg.n_features, cfg.d_k, cfg.d_v))

    def build_bias(self) -> None:
        # The reference default-initialises its dense decoder's bias (factored decoders start at zero).
        self._new("b_dec", self._linear_uniform(self.cfg.n_features, self.cfg.d_k, self.cfg.d_v))

    def _matrix(self) -> torch.Tensor:
        return self.sae.D_dec.reshape(self.cfg.n_features, -1)

    def atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        return self.sae.D_dec

    def decode_dense(self, a: Float[torch.Tensor, "n n_features"], detach: bool = False) -> Float[torch.Tensor, "n d_in"]:
        D = self._matrix()
        return a @ (D.detach() if detach else D)

    def decode_sparse(self, values: Float[torch.Tensor, "n k"], indices: Int[torch.Tensor, "n k"]) -> Float[torch.Tensor, "n d_in"]:
        return F.embedding_bag(indices, self._matrix(), per_sample_weights=values, mode="sum")

    def decode_segments(
        self, values: Float[torch.Tensor, " m"], indices: Int[torch.Tensor, " m"], sample: Int[torch.Tensor, " m"], n: int
    ) -> Float[torch.Tensor, "n d_in"]:
        counts = torch.bincount(sample, minlength=n)
        offsets = torch.cumsum(counts, 0) - counts
        return F.embedding_bag(indices, self._matrix(), offsets, per_sample_weights=values, mode="sum")

    @torch.no_grad()
    def normalize(self) -> None:
        D = self.sae.D_dec
        D.copy_(F.normalize(D.reshape(self.cfg.n_features, -1), dim=-1).view_as(D))

    @torch.no_grad()
    def resample(self, idx: torch.Tensor, alive: torch.Tensor, directions: Directions) -> None:
        self.sae.D_dec[idx] = directions.flat

    @torch.no_grad()
    def fold(self, per_feature: torch.Tensor) -> None:
        self.sae.D_dec.div_(per_feature)


class FullDecoder(FlatDecoder):
    """The same dense atoms as :class:`FlatDecoder`, named after the paper's full-rank MatrixSAE; its
    ``b_dec`` starts at zero like the other matrix decoders'."""

    kind = "full"

    def build_bias(self) -> None:
        Decoder.build_bias(self)
