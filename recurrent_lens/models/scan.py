"""The shared scan engine for matrix recurrences ``S_t = M_t(S_{t-1}) + W_t``, read as ``o_t = S_tᵀ q_t``.

Every recurrent architecture reduces to one of three rules over the same inputs
(:class:`RecurrenceInputs`, all ``[batch, pos, head, ...]`` in fp32, keys and queries already expanded
to the value heads and scaled as the recurrence uses them):

- :class:`LinearRule`: ``S_t = diag(exp g_t) S_{t-1} + β_t k_t v_tᵀ`` (GLA, Mamba-2, linear attention);
  ``g`` is a scalar per head or one value per key channel.
- :class:`DeltaRule`: ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` (Gated DeltaNet, DeltaNet).
- :class:`DPLRRule`: ``S_t = diag(exp w_t) S_{t-1} − (κ_t⊙a_t)(κ_tᵀ S_{t-1}) + k_t v_tᵀ`` (RWKV-7).

Each rule has a short token-by-token ``step`` (the reference, modelled on fla's ``naive.py``) and, where
one exists, an exact chunked form used when nobody looks at per-step matrices. :func:`scan` picks the
form; :func:`replay` re-runs the recurrence after per-step state or erase edits, where an edited slice
replaces the quantity at its step and every later step is recomputed from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.models import kernels

State = Float[Tensor, "batch head d_k d_v"]
"""One state per head, ``S`` of shape ``d_k × d_v``."""
States = Float[Tensor, "batch pos head d_k d_v"]
"""A state (or write, or erase term) per position and head."""


@dataclass
class RecurrenceInputs:
    """Per-token inputs of a matrix recurrence, fp32, heads already expanded.

    Attributes:
        q: ``[batch, pos, head, d_k]`` queries, scaled as the read uses them.
        k: ``[batch, pos, head, d_k]`` keys.
        v: ``[batch, pos, head, d_v]`` values.
        beta: ``[batch, pos, head]`` write strength, or ``None`` for 1.
        decay: ``[batch, pos, head]`` or ``[batch, pos, head, d_k]`` log of the multiplicative decay, or
            ``None`` for no decay.
        extra: rule-specific inputs of shape ``[batch, pos, head, ...]`` (RWKV-7: ``erase_key``, ``a``).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor | None = None
    decay: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(batch, pos, head, d_k, d_v)``."""
        b, t, h, dk = self.k.shape
        return b, t, h, dk, self.v.shape[-1]

    def tensors(self) -> dict[str, Tensor]:
        out = {"q": self.q, "k": self.k, "v": self.v, **self.extra}
        if self.beta is not None:
            out["beta"] = self.beta
        if self.decay is not None:
            out["decay"] = self.decay
        return out

    def map(self, fn) -> RecurrenceInputs:
        """Apply ``fn`` to every tensor (all share the leading ``[batch, pos, head]`` axes)."""
        return RecurrenceInputs(
            q=fn(self.q),
            k=fn(self.k),
            v=fn(self.v),
            beta=None if self.beta is None else fn(self.beta),
            decay=None if self.decay is None else fn(self.decay),
            extra={n: fn(x) for n, x in self.extra.items()},
        )

    def at(self, t: int) -> RecurrenceInputs:
        """The inputs of position ``t``: every tensor ``[batch, head, ...]``."""
        return self.map(lambda x: x[:, t])

    def chunks(self, chunk_size: int) -> RecurrenceInputs:
        """The position axis cut into chunks and moved behind the head: every tensor ``[batch, n_chunks, head,
        chunk_size, ...]`` (the length must be a multiple of ``chunk_size``)."""
        return self.map(lambda t: rearrange(t, "b (n c) h ... -> b n h c ...", c=chunk_size))

    def write_key(self) -> Tensor:
        """``β_t k_t``, the key side of the rank-1 write ``W_t = (β_t k_t) v_tᵀ``: ``[batch, pos, head, d_k]``."""
        return self.k if self.beta is None else self.k * self.beta[..., None]

    def write(self) -> Tensor:
        """``W_t = β_t k_t v_tᵀ`` for every token: ``[batch, pos, head, d_k, d_v]``."""
        return self.write_key()[..., :, None] * self.v[..., None, :]


@dataclass
class ScanResult:
    """What a scan returns: outputs ``o`` ``[batch, pos, head, d_v]``, the final state
    ``[batch, head, d_k, d_v]`` and, when asked for, every state and every erase term
    ``[batch, pos, head, d_k, d_v]``."""

    o: Float[Tensor, "batch pos head d_v"]
    final_state: State
    states: States | None = None
    erases: States | None = None


def _unchunk(outs: list[Tensor]) -> Float[Tensor, "batch pos head d_v"]:
    """Per-chunk outputs ``[batch, head, chunk_size, d_v]`` back to ``[batch, pos, head, d_v]``."""
    return rearrange(torch.stack(outs, 1), "b n h c v -> b (n c) h v")


def _decay_factor(g: Tensor | None) -> Tensor | None:
    """exp(g) shaped to multiply a ``[batch, head, d_k, d_v]`` state (scalar or per key channel)."""
    if g is None:
        return None
    g = g.exp()
    return g[..., None, None] if g.dim() == 2 else g[..., None]


class Rule:
    """A recurrence family. Subclasses define ``step`` and optionally ``chunked``."""

    has_erase: bool = False
    has_chunked: bool = False

    @property
    def fla_kernel(self) -> str | None:
        """The name of fla's chunked kernel that computes this rule (see :mod:`recurrent_lens.models.kernels`),
        or ``None`` where fla has none."""
        return None

    def step(self, S: Tensor, x: RecurrenceInputs, write: Tensor | None = None,
             erase: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """One token: ``S`` is ``[batch, head, d_k, d_v]``, ``x`` holds ``[batch, head, ...]`` slices;
        ``write``/``erase`` (``[batch, head, d_k, d_v]``) override the rule's own terms. Returns the new state
        and this step's erase term (``None`` if the rule has none). The shapes are not annotated: the scans
        call this once per token."""
        raise NotImplementedError

    def transition(self, p: Tensor, x: RecurrenceInputs) -> Tensor:
        """``A_t p`` for key-side vectors ``p`` ``[batch, head, n, d_k]``, where the transition is
        ``M_t(S) = A_t S`` with a ``d_k × d_k`` matrix ``A_t`` built from this token's inputs ``x`` (``[batch,
        head, ...]`` slices, as in :meth:`step`) and never from the state. Carrying the keys of past writes
        through it gives their exact contribution to a later state (write attribution,
        :mod:`recurrent_lens.models.attribution`). Unannotated, like :meth:`step`: called once per token."""
        raise NotImplementedError(f"{type(self).__name__} defines no transition, which write attribution needs")

    def chunked(self, x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
            Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]]:
        """Exact chunked form on inputs whose length is a multiple of ``chunk_size``.
        Returns ``(o, final_state, boundary_states [batch, n_chunks, head, d_k, d_v])`` where
        ``boundary_states[:, c]`` is the state before chunk ``c``."""
        raise NotImplementedError

    def chunk_states(self, x: RecurrenceInputs, S0: Tensor, offsets: Tensor) -> Tensor | None:
        """The state after ``offsets + 1`` steps of one chunk per row, in closed form, or ``None`` where the
        rule has none (then :func:`replay_at` steps through the chunk).

        ``x`` holds ``[rows, chunk, head, ...]`` inputs, ``S0`` the ``[rows, head, d_k, d_v]`` state before each
        row's chunk and ``offsets`` ``[rows]`` the position inside it.
        """
        return None

    def chunked_updates(self, x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
            Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"],
            Float[Tensor, "batch pos head d_v"] | None]:
        """:meth:`chunked`, plus the update values ``u`` ``[batch, pos, head, d_v]`` where every step's
        whole update is rank-1 along its key, ``S_t = diag(exp g_t) S_{t-1} + k_t u_tᵀ`` (``None`` where it
        is not). With them a state inside a chunk follows from the chunk's boundary state by one masked
        product (:func:`replay_at`), without redoing whatever the rule solved to get ``u``."""
        return (*self.chunked(x, S0, chunk_size), None)


def _rank1_states(k: Tensor, u: Tensor, decay: Tensor | None, S0: Tensor, offsets: Tensor) -> Tensor:
    """``S_t = exp(G_t) ⊙ S_0 + Σ_{s≤t} exp(G_t − G_s) ⊙ k_s u_sᵀ`` inside one chunk per row, per head or per
    key channel: ``k`` ``[rows, head, chunk, d_k]``, ``u`` ``[rows, head, chunk, d_v]``, ``decay`` the per-step
    log-decay ``[rows, head, chunk(, d_k)]`` (``G`` its cumulative sum), ``S0`` ``[rows, head, d_k, d_v]``."""
    if decay is None:
        G = k.new_zeros(*k.shape[:3], 1)
    else:
        G = (decay if decay.dim() == 4 else decay[..., None]).cumsum(2)  # [R, H, C, 1|d_k]
    Gt, w = _up_to(G, offsets)
    return ((k * w).transpose(-1, -2) @ u).addcmul_(S0, Gt.exp().transpose(-1, -2))


def _up_to(G: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """For cumulative log-decays ``G`` ``[rows, head, chunk, c]``: ``G`` at each row's offset ``[rows, head, 1, c]``
    and ``exp(G_t − G_s)`` for ``s ≤ t`` (0 after ``t``) ``[rows, head, chunk, c]``, masked before the exp."""
    R, H, C, c = G.shape
    Gt = G.gather(2, offsets[:, None, None, None].expand(R, H, 1, c))
    after = torch.arange(C, device=G.device)[None, None, :, None] > offsets[:, None, None, None]
    return Gt, (Gt - G).masked_fill(after, float("-inf")).exp()


class LinearRule(Rule):
    """``S_t = diag(exp g_t) S_{t-1} + β_t k_t v_tᵀ`` with scalar or per-key-channel log-decay ``g``."""

    has_chunked = True
    channel_chunk = 16
    """Chunk length used inside ``chunked`` for per-channel decay, whose intra-chunk term costs
    ``chunk² · d_k`` per chunk; boundary states are still reported every ``chunk_size`` tokens."""

    @property
    def fla_kernel(self) -> str | None:
        # a subclass may change the update, which fla's GLA kernels would not follow
        return "gla" if type(self) is LinearRule else None

    def step(self, S, x, write=None, erase=None):  # per token: unannotated, see Rule.step
        decay = _decay_factor(x.decay)
        if decay is not None:
            S = S * decay
        if write is None:
            k = x.k if x.beta is None else x.k * x.beta[..., None]
            write = k[..., :, None] * x.v[..., None, :]
        return S + write, None

    def transition(self, p, x):  # per token: unannotated, see Rule.transition
        # A_t = diag(exp g_t): a scalar per head or one factor per key channel
        if x.decay is None:
            return p
        g = x.decay.exp()
        return p * (g[..., None, None] if g.dim() == 2 else g[..., None, :])

    def chunked(self, x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
            Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]]:
        per_channel = x.decay is not None and x.decay.dim() == 4 and x.decay.shape[-1] > 1
        if per_channel and chunk_size > self.channel_chunk and chunk_size % self.channel_chunk == 0:
            o, S, bounds = self._chunked(x, S0, self.channel_chunk)
            return o, S, bounds[:, :: chunk_size // self.channel_chunk]
        return self._chunked(x, S0, chunk_size)

    def chunk_states(self, x, S0, offsets):
        x = x.map(lambda t: t.transpose(1, 2))  # [R, H, C, ...]
        k = x.k if x.beta is None else x.k * x.beta[..., None]
        return _rank1_states(k, x.v, x.decay, S0, offsets)

    def chunked_updates(self, x, S0, chunk_size):
        u = x.v if x.beta is None else x.v * x.beta[..., None]
        return (*self.chunked(x, S0, chunk_size), u)

    def _chunked(self, x: RecurrenceInputs, S0: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, H, dk, dv = x.shape
        N, C = T // chunk_size, chunk_size
        chunks = x.chunks(C)  # [B, N, H, C, ...]
        q, k, v = chunks.q, chunks.k, chunks.v
        if chunks.beta is not None:
            k = k * chunks.beta[..., None]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        if chunks.decay is None:
            G = q.new_zeros(B, N, H, C, 1)
        else:
            G = chunks.decay if chunks.decay.dim() == 5 else chunks.decay[..., None]
            G = G.cumsum(-2)  # [B, N, H, C, 1 | d_k], inclusive log-decay from the chunk start
        if G.shape[-1] == 1:
            diff = (G[..., :, None, 0] - G[..., None, :, 0]).masked_fill(~causal, float("-inf"))
            A = (q @ k.transpose(-1, -2)) * diff.exp()  # [B, N, H, C, C]
        else:
            # per-channel decay: exp(G_t - G_s) on each key channel, masked before exp so it never overflows
            diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
            A = torch.einsum("bnhtd,bnhsd,bnhtsd->bnhts", q, k, diff.exp())
        intra = A @ v  # [B, N, H, C, dv]
        q_in = q * G.exp()  # reads the chunk's initial state
        k_out = k * (G[..., -1:, :] - G).exp()  # carries each write to the chunk's end
        last = G[..., -1, :].exp()  # [B, N, H, 1 | d_k]
        S, outs, bounds = S0, [], []
        for n in range(N):
            bounds.append(S)
            outs.append(intra[:, n] + q_in[:, n] @ S)
            S = last[:, n, ..., None] * S + k_out[:, n].transpose(-1, -2) @ v[:, n]
        return _unchunk(outs), S, torch.stack(bounds, 1)


class DeltaRule(LinearRule):
    """``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with scalar log-decay ``g = log α`` (or none).

    The erase term is ``E_t = −β_t k_t k_tᵀ α_t S_{t-1}``, so ``write + erase = k_t δ_tᵀ`` with
    ``δ_t = β_t (v_t − (α_t S_{t-1})ᵀ k_t)``.
    """

    has_erase = True

    @property
    def fla_kernel(self) -> str | None:
        return "gated_delta_rule"

    def step(self, S, x, write=None, erase=None):  # per token: unannotated, see Rule.step
        decay = _decay_factor(x.decay)
        if decay is not None:
            S = S * decay
        beta = torch.ones_like(x.k[..., 0]) if x.beta is None else x.beta
        if erase is None:
            kS = torch.einsum("bhk,bhkv->bhv", x.k, S)
            erase = -(beta[..., None] * x.k)[..., :, None] * kS[..., None, :]
        if write is None:
            write = (beta[..., None] * x.k)[..., :, None] * x.v[..., None, :]
        return S + erase + write, erase

    def transition(self, p, x):  # per token: unannotated, see Rule.transition
        # A_t = α_t (I − β_t k_t k_tᵀ): the erase reads the key side only, so it is part of A_t
        beta = 1.0 if x.beta is None else x.beta[..., None, None]
        p = p - (beta * (p @ x.k[..., :, None])) * x.k[..., None, :]
        return super().transition(p, x)

    def chunked(self, x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
            Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]]:
        return self._chunks(x, S0, chunk_size, keep_updates=False)[:3]

    def chunked_updates(self, x, S0, chunk_size):
        # write + erase = k_t u_tᵀ: the chunk's corrected values u are the rank-1 update values
        return self._chunks(x, S0, chunk_size, keep_updates=True)

    def _chunks(self, x: RecurrenceInputs, S0: Tensor, chunk_size: int, keep_updates: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        B, T, H, dk, dv = x.shape
        N, C = T // chunk_size, chunk_size
        chunks = x.chunks(C)  # [B, N, H, C, ...]
        q, k, v = chunks.q, chunks.k, chunks.v
        G, decay, U0, Wk = self._solve(k, v, chunks.beta, chunks.decay)
        A = (q @ k.transpose(-1, -2)) * decay  # [B, N, H, C, C]
        q_in = q * G.exp()[..., None]
        k_out = k * (G[..., -1:] - G).exp()[..., None]
        last = G[..., -1].exp()[..., None, None]  # [B, N, H, 1, 1]
        S, outs, bounds, updates = S0, [], [], []
        for n in range(N):
            bounds.append(S)
            U = U0[:, n] - Wk[:, n] @ S
            updates.append(U)
            outs.append(q_in[:, n] @ S + A[:, n] @ U)
            S = last[:, n] * S + k_out[:, n].transpose(-1, -2) @ U
        return _unchunk(outs), S, torch.stack(bounds, 1), _unchunk(updates) if keep_updates else None

    def chunk_states(self, x, S0, offsets):
        # S_t = Γ_t S_0 + Σ_{s≤t} (Γ_t/Γ_s) k_s u_sᵀ with the chunk's corrected values u = U0 − Wk S_0
        x = x.map(lambda t: t.transpose(1, 2))  # [R, H, C, ...]
        _, _, U0, Wk = self._solve(x.k, x.v, x.beta, x.decay)
        return _rank1_states(x.k, U0 - Wk @ S0, x.decay, S0, offsets)

    @staticmethod
    def _solve(k: Tensor, v: Tensor, beta: Tensor | None, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One chunk's delta-rule terms over ``[..., C]`` leading axes: the cumulative log-decay ``G``, the
        causal ``Γ_t/Γ_s``, and ``U0``, ``Wk`` with the chunk's corrected values ``u = U0 − Wk S_0``.

        ``u_t + β_t Σ_{s<t} (Γ_t/Γ_s)(k_t·k_s) u_s = β_t v_t − β_t Γ_t k_tᵀ S_0`` is a unit lower-triangular
        system.
        """
        beta = torch.ones_like(k[..., 0]) if beta is None else beta  # [..., C]
        G = torch.zeros_like(beta) if g is None else g.cumsum(-1)
        C = k.shape[-2]
        causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Γ_t/Γ_s, s ≤ t
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        L = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        Tinv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
        return G, decay, Tinv @ (beta[..., None] * v), Tinv @ ((beta * G.exp())[..., None] * k)


class DPLRRule(Rule):
    """``S_t = diag(exp w_t) S_{t-1} − (κ_t⊙a_t)(κ_tᵀ S_{t-1}) + k_t v_tᵀ`` (RWKV-7).

    ``decay`` holds ``w`` per key channel; ``extra`` holds ``erase_key`` (κ, the normalised removal key)
    and ``a`` (the in-context learning rate), both ``[batch, pos, head, d_k]``.
    """

    has_erase = True
    has_chunked = True

    def chunked(self, x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
            Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]]:
        return dplr_chunked(x, S0, chunk_size)

    def step(self, S, x, write=None, erase=None):  # per token: unannotated, see Rule.step
        if erase is None:
            kS = torch.einsum("bhk,bhkv->bhv", x.extra["erase_key"], S)
            erase = -(x.extra["erase_key"] * x.extra["a"])[..., :, None] * kS[..., None, :]
        S_new = S * x.decay.exp()[..., None] + erase
        if write is None:
            k = x.k if x.beta is None else x.k * x.beta[..., None]
            write = k[..., :, None] * x.v[..., None, :]
        return S_new + write, erase

    def transition(self, p, x):  # per token: unannotated, see Rule.transition
        # A_t = diag(exp w_t) − (κ_t⊙a_t) κ_tᵀ: diagonal plus rank one, the erase reading the undecayed state
        kappa = x.extra["erase_key"]
        erased = (p @ kappa[..., :, None]) * (kappa * x.extra["a"])[..., None, :]
        return p * x.decay.exp()[..., None, :] - erased


MIN_CHUNK_LOG_DECAY = -80.0
"""The lowest cumulative log-decay one chunk may reach before ``e^{−G}`` leaves fp32's range."""


def dplr_chunked(x: RecurrenceInputs, S0: State, chunk_size: int) -> tuple[
        Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]]:
    """The DPLR recurrence (RWKV-7) chunk by chunk, exactly, with :meth:`Rule.chunked`'s contract.

    Per head, with ``D_t = diag(exp w_t)``, erase key ``κ_t`` and rate ``a_t``::

        S_t = D_t S_{t-1} − (κ_t⊙a_t)(κ_tᵀ S_{t-1}) + k_t v_tᵀ,      o_t = S_tᵀ q_t

    Inside a chunk that starts from ``S_0``, write ``G_t = Σ_{s≤t} w_s`` (per key channel), ``α_t = −κ_t``
    (the direction the erase reads), ``β_t = κ_t⊙a_t`` (the direction it writes) and ``u_t = α_tᵀ S_{t-1}``.
    Unrolling the chunk gives ``S_t = e^{G_t} ⊙ S_0 + Σ_{s≤t} e^{G_t − G_s} ⊙ (β_s u_sᵀ + k_s v_sᵀ)``, so
    the reads ``u`` solve one unit lower-triangular system per chunk::

        (I − A_αβ) U = (α ⊙ e^{G_{t-1}}) S_0 + A_αk V
        A_αβ[t, s] = Σ_c α_tc β_sc e^{G_{t-1,c} − G_{s,c}}  (s < t; A_αk likewise with k for β)

    and the outputs and the chunk's final state follow from ``U`` with matrix products only. This is the
    WY/UT form of fla's ``dplr_chunkwise``, written for our ``[batch, pos, head, ...]`` layout with an
    initial state, chunk-boundary states and autograd through ``torch.linalg.solve_triangular``.

    ``e^{G_{t-1} − G_s}`` is formed as ``e^{G_{t-1}} · e^{−G_s}``, so within one chunk the cumulative
    log-decay must stay above about −80 (fp32's exp range): RWKV-7's ``w ≥ −e^{−1/2}`` allows chunks of
    up to 128 tokens. :func:`dplr_chunked` raises a clear error beyond that.

    Args:
        x: inputs ``[batch, pos, head, ...]`` whose length is a multiple of ``chunk_size``: ``q``, ``k``,
            ``v``, optional ``beta`` (scales ``k``), ``decay`` (``w`` per key channel) and ``extra``
            ``erase_key`` (κ) and ``a``.
        S0: the state before the first token.
        chunk_size: tokens per chunk.

    Returns:
        ``(o [batch, pos, head, d_v], final_state, boundary_states [batch, n_chunks, head, d_k, d_v])``
        where ``boundary_states[:, c]`` is the state before chunk ``c``.
    """
    T = x.k.shape[1]
    if T % chunk_size:
        raise ValueError(f"dplr_chunked: the length ({T}) must be a multiple of chunk_size ({chunk_size})")
    if x.decay is None or x.decay.shape != x.k.shape:
        raise ValueError(f"dplr_chunked: decay must be per key channel with shape {tuple(x.k.shape)}, "
                         f"got {None if x.decay is None else tuple(x.decay.shape)}")
    N, C = T // chunk_size, chunk_size
    chunks = x.chunks(C)  # [B, N, H, C, ...]
    q, k, v, w = chunks.q, chunks.k, chunks.v, chunks.decay
    if chunks.beta is not None:
        k = k * chunks.beta[..., None]
    kappa = chunks.extra["erase_key"]
    alpha, beta = -kappa, kappa * chunks.extra["a"]
    G = w.cumsum(-2)  # [B, N, H, C, d_k], inclusive
    if bool((G[..., -1, :] < MIN_CHUNK_LOG_DECAY).any()):
        raise ValueError(f"dplr_chunked: a chunk's cumulative log-decay falls below {MIN_CHUNK_LOG_DECAY} "
                         f"(min {float(G[..., -1, :].min()):.1f}); use a smaller chunk_size than {chunk_size}")
    G_prev = G - w  # exclusive: the decay α_t sees when it reads S_{t-1}
    alpha_in = alpha * G_prev.exp()
    q_in = q * G.exp()
    beta_out, k_out = beta * (-G).exp(), k * (-G).exp()

    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    zero = q.new_zeros(())
    A_ab = torch.where(strict, alpha_in @ beta_out.transpose(-1, -2), zero)  # [B, N, H, C, C]
    A_ak = torch.where(strict, alpha_in @ k_out.transpose(-1, -2), zero)
    A_qb = torch.where(causal, q_in @ beta_out.transpose(-1, -2), zero)
    A_qk = torch.where(causal, q_in @ k_out.transpose(-1, -2), zero)

    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    Tinv = torch.linalg.solve_triangular(eye - A_ab, eye.expand_as(A_ab), upper=False, unitriangular=True)
    U_v = Tinv @ (A_ak @ v)  # [B, N, H, C, d_v], the part of u that does not depend on S_0
    U_s = Tinv @ alpha_in  # [B, N, H, C, d_k], u = U_v + U_s S_0
    intra = A_qk @ v
    last = G[..., -1:, :]  # [B, N, H, 1, d_k]
    carry_b = beta * (last - G).exp()  # carries β_s u_sᵀ to the chunk's end, factors ≤ 1
    carry_k = k * (last - G).exp()
    S, outs, bounds = S0, [], []
    for n in range(N):
        bounds.append(S)
        U = U_v[:, n] + U_s[:, n] @ S
        outs.append(q_in[:, n] @ S + A_qb[:, n] @ U + intra[:, n])
        S = last[:, n].exp().transpose(-1, -2) * S + carry_b[:, n].transpose(-1, -2) @ U \
            + carry_k[:, n].transpose(-1, -2) @ v[:, n]
    return _unchunk(outs), S, torch.stack(bounds, 1)


def _pad_positions(t: Tensor, length: int) -> Tensor:
    """Zero-pad axis 1 (positions) of a ``[batch, pos, ...]`` tensor to ``length``."""
    if t.shape[1] == length:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))


def _pad_to(x: RecurrenceInputs, length: int) -> RecurrenceInputs:
    """Zero-pad the position axis: a zero key, zero write strength and zero log-decay leave the state unchanged."""
    if length == x.k.shape[1]:
        return x
    return x.map(lambda t: _pad_positions(t, length))


def recurrent_scan(rule: Rule, x: RecurrenceInputs, S0: State, *, writes: States | None = None,
                   keep_states: bool = False) -> ScanResult:
    """Token-by-token reference: one ``rule.step`` per position.

    Args:
        rule: the recurrence.
        x: inputs ``[batch, pos, head, ...]``.
        S0: initial state ``[batch, head, d_k, d_v]``.
        writes: explicit writes ``[batch, pos, head, d_k, d_v]`` overriding ``β k vᵀ`` (edited writes).
        keep_states: also return every state and erase term.
    """
    states, erases, outs = [], [], []
    S = S0
    for t in range(x.k.shape[1]):
        S, e = rule.step(S, x.at(t), None if writes is None else writes[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, x.q[:, t]))
        if keep_states:
            states.append(S)
            erases.append(e)
    o = torch.stack(outs, 1)
    if not keep_states:
        return ScanResult(o, S)
    return ScanResult(o, S, torch.stack(states, 1), torch.stack(erases, 1) if rule.has_erase else None)


def chunked_scan(rule: Rule, x: RecurrenceInputs, S0: State, chunk_size: int) -> ScanResult:
    """The fast path: the rule's exact chunked form (no per-step matrices); fla's kernels on CUDA."""
    if kernels.kernels_enabled(x):
        out = kernels.fla_chunked(rule, x, S0)
        if out is not None:
            return ScanResult(out[0].to(x.v.dtype), out[1].to(S0.dtype))
    T = x.k.shape[1]
    padded = _pad_to(x, -(-T // chunk_size) * chunk_size)
    o, S, _ = rule.chunked(padded, S0, chunk_size)
    return ScanResult(o[:, :T], S)


def materialized_scan(rule: Rule, x: RecurrenceInputs, S0: State, chunk_size: int) -> ScanResult:
    """Every state and erase term, fast: states at chunk boundaries from the chunked form, then all
    chunks replayed in parallel token by token (``chunk_size`` Python steps instead of ``pos``)."""
    B, T = x.k.shape[:2]
    if not rule.has_chunked or T <= chunk_size:
        return recurrent_scan(rule, x, S0, keep_states=True)
    N = -(-T // chunk_size)
    padded = _pad_to(x, N * chunk_size)
    _, final, bounds = rule.chunked(padded, S0, chunk_size)
    flat = padded.map(lambda t: rearrange(t, "b (n c) ... -> (b n) c ...", c=chunk_size))
    res = recurrent_scan(rule, flat, rearrange(bounds, "b n ... -> (b n) ..."), keep_states=True)

    def unflatten(t: Tensor) -> Tensor:
        return rearrange(t, "(b n) c ... -> b (n c) ...", b=B)[:, :T]

    erases = None if res.erases is None else unflatten(res.erases)
    return ScanResult(unflatten(res.o), final, unflatten(res.states), erases)


def scan(rule: Rule, x: RecurrenceInputs, S0: State, *, chunk_size: int = 64,
         keep_states: bool = False, writes: States | None = None) -> ScanResult:
    """Run the recurrence in the cheapest exact form the request allows.

    - no per-step matrices wanted and no explicit writes: the chunked form (or the loop for rules
      without one), never materialising a per-step state;
    - ``keep_states``: chunk-boundary states plus a parallel replay of all chunks;
    - explicit ``writes`` (an edited ``hook_write``): the token-by-token loop with those writes.

    Example:
        >>> import torch
        >>> from recurrent_lens.models.scan import RecurrenceInputs, DeltaRule, scan
        >>> B, T, H, D = 1, 10, 2, 4
        >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
        >>> x = RecurrenceInputs(q=torch.randn(B, T, H, D), k=k, v=torch.randn(B, T, H, D),
        ...                      beta=torch.rand(B, T, H), decay=-torch.rand(B, T, H))
        >>> fast = scan(DeltaRule(), x, torch.zeros(B, H, D, D), chunk_size=4)
        >>> full = scan(DeltaRule(), x, torch.zeros(B, H, D, D), chunk_size=4, keep_states=True)
        >>> bool(torch.allclose(fast.o, full.o, atol=1e-5)), tuple(full.states.shape)
        (True, (1, 10, 2, 4, 4))
    """
    if writes is not None:
        return recurrent_scan(rule, x, S0, writes=writes, keep_states=keep_states)
    if keep_states:
        return materialized_scan(rule, x, S0, chunk_size)
    if rule.has_chunked and x.k.shape[1] > 1:
        return chunked_scan(rule, x, S0, chunk_size)
    return recurrent_scan(rule, x, S0)


def boundary_scan(rule: Rule, x: RecurrenceInputs, S0: State, chunk_size: int, *, writes: States | None = None,
                  updates: bool = False) -> tuple[
        Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"]] | tuple[
        Float[Tensor, "batch pos head d_v"], State, Float[Tensor, "batch n_chunks head d_k d_v"],
        Float[Tensor, "batch pos head d_v"] | None]:
    """Outputs, final state and the state before every chunk, without any other per-step state.

    The rule's chunked form where it has one; otherwise (or with explicit ``writes``, which the chunked
    forms do not take) the token-by-token loop, keeping only the states at chunk boundaries.

    Args:
        updates: also return the rank-1 update values of :meth:`Rule.chunked_updates` (``None`` from the
            token-by-token loop, or for a rule without them), for :func:`replay_at`.

    Returns:
        ``(o [batch, pos, head, d_v], final_state [batch, head, d_k, d_v],
        bounds [batch, n_chunks, head, d_k, d_v])`` with ``bounds[:, c]`` the state before token
        ``c · chunk_size`` and ``n_chunks = ceil(pos / chunk_size)``; with ``updates=True`` a fourth item,
        ``[batch, pos, head, d_v]`` or ``None``.

    Example:
        >>> import torch
        >>> from recurrent_lens.models.scan import RecurrenceInputs, LinearRule, boundary_scan
        >>> x = RecurrenceInputs(q=torch.randn(1, 10, 2, 4), k=torch.randn(1, 10, 2, 4), v=torch.randn(1, 10, 2, 3))
        >>> o, final, bounds = boundary_scan(LinearRule(), x, torch.zeros(1, 2, 4, 3), 4)
        >>> tuple(bounds.shape)
        (1, 3, 2, 4, 3)
    """
    T = x.k.shape[1]
    N = -(-T // chunk_size)
    if writes is None and rule.has_chunked:
        o, final, bounds, u = rule.chunked_updates(_pad_to(x, N * chunk_size), S0, chunk_size)
        head = (o[:, :T], final, bounds)
        return (*head, None if u is None else u[:, :T]) if updates else head
    S, outs, bounds = S0, [], []
    for t in range(T):
        if t % chunk_size == 0:
            bounds.append(S)
        S, _ = rule.step(S, x.at(t), None if writes is None else writes[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, x.q[:, t]))
    head = (torch.stack(outs, 1), S, torch.stack(bounds, 1))
    return (*head, None) if updates else head


def replay_at(rule: Rule, x: RecurrenceInputs, bounds: Float[Tensor, "batch n_chunks head d_k d_v"],
              positions: Int[Tensor, "batch n"], chunk_size: int, *, writes: States | None = None,
              updates: Float[Tensor, "batch pos head d_v"] | None = None) -> Float[Tensor, "batch n head d_k d_v"]:
    """The states ``S_t`` at chosen positions, each computed from the boundary state of its chunk.

    With ``updates`` (the rank-1 update values from ``boundary_scan(..., updates=True)``, same heads)
    each state is one masked product over its chunk: ``S_t = Γ_t S_0 + Σ_{s≤t} (Γ_t/Γ_s) k_s u_sᵀ``.
    Without them, rules with a closed form inside a chunk (:meth:`Rule.chunk_states`: the linear and delta
    rules) get each state with a few matrix products per position (the delta rule re-solves the chunk);
    otherwise (RWKV-7's rule, or edited writes) every requested position replays at most one chunk
    (``positions % chunk_size + 1`` steps), all positions at once: ``chunk_size`` Python steps at most,
    over ``batch · n`` rows. Nothing of size ``[batch, pos, head, d_k, d_v]`` is formed.

    Args:
        x: inputs ``[batch, pos, head, ...]`` (the heads wanted; ``bounds`` must have the same heads).
        bounds: ``[batch, n_chunks, head, d_k, d_v]`` from :func:`boundary_scan` with the same ``chunk_size``.
        positions: ``[batch, n]`` positions in ``[0, pos)``.
        writes: explicit writes ``[batch, pos, head, d_k, d_v]`` overriding ``β k vᵀ`` (edited writes).
        updates: ``[batch, pos, head, d_v]`` update values ``u`` with ``S_t = diag(exp g_t) S_{t-1} + k_t u_tᵀ``
            (ignored with ``writes``).

    Returns:
        ``[batch, n, head, d_k, d_v]``.
    """
    B, n = positions.shape
    N = bounds.shape[1]
    rows = torch.arange(B, device=positions.device)[:, None]
    chunk_of = (rows * N + positions // chunk_size).reshape(B * n)  # each position's chunk among the B·N
    offset = (positions % chunk_size).reshape(B * n)  # its place inside that chunk

    def chunk_inputs(t: Tensor, head_major: bool = False) -> Tensor:
        # [B, pos, H, ...] -> the chunk of every requested position, [B·n, C, H, ...] (or [B·n, H, C, ...])
        t = _pad_positions(t, N * chunk_size).unflatten(1, (N, chunk_size))
        return (t.movedim(3, 2) if head_major else t).flatten(0, 1).index_select(0, chunk_of)

    S = bounds.flatten(0, 1).index_select(0, chunk_of)
    if writes is None and updates is not None:
        decay = None if x.decay is None else chunk_inputs(x.decay, head_major=True)
        k, u = chunk_inputs(x.k, head_major=True), chunk_inputs(updates, head_major=True)
        closed = _rank1_states(k, u, decay, S, offset)
        return closed.reshape(B, n, *closed.shape[1:])
    flat = x.map(chunk_inputs)
    flat_writes = None if writes is None else chunk_inputs(writes)
    if flat_writes is None:
        closed = rule.chunk_states(flat, S, offset)
        if closed is not None:
            return closed.reshape(B, n, *closed.shape[1:])
    out = torch.zeros_like(S)
    for s in range(int(offset.max()) + 1 if n else 0):
        S, _ = rule.step(S, flat.at(s), None if flat_writes is None else flat_writes[:, s])
        out = torch.where((offset == s)[:, None, None, None], S, out)
    return rearrange(out, "(b k) ... -> b k ...", b=B)


def replay(rule: Rule, x: RecurrenceInputs, S0: State, states: States, *, writes: States | None = None,
           state_edit: tuple[Tensor, ...] | None = None,
           erase_edit: tuple[Tensor, ...] | None = None, differentiable: bool = False) -> States:
    """Recompute states after per-step edits, from the first edited position on.

    Args:
        states: the unedited states ``[batch, pos, head, d_k, d_v]`` (positions before the first edit
            keep these values bitwise).
        state_edit: ``(mask [batch, pos, head] bool, values [batch, pos, head, d_k, d_v])``: where the
            mask is set, ``S_t`` is replaced by ``values`` after the update at ``t``. The form
            ``(mask, values, unedited)``, where ``values`` equals ``unedited`` wherever the mask is
            clear, also makes ``values`` take part in the gradient at every step (straight-through):
            an unmasked ``S_t`` becomes ``recomputed + (values − unedited)``, which has the recomputed
            value and gives ``values`` the total derivative of everything downstream (that of an additive
            edit ``S_t + εD``), while the gradient reaching ``unedited`` through it cancels the one
            reaching it through ``values``. The replay then runs from the first position.
        erase_edit: the same for the erase term at ``t``.
        differentiable: run from the first position even without three-element edits, so that a
            gradient reaches ``writes`` (and the inputs) through every step.

    Returns:
        The edited states; every unedited step is recomputed from the recurrence, so edits carry forward.

    Example:
        >>> import torch
        >>> from recurrent_lens.models.scan import RecurrenceInputs, LinearRule, recurrent_scan, replay
        >>> x = RecurrenceInputs(q=torch.randn(1, 5, 1, 2), k=torch.randn(1, 5, 1, 2), v=torch.randn(1, 5, 1, 3))
        >>> S0 = torch.zeros(1, 1, 2, 3)
        >>> states = recurrent_scan(LinearRule(), x, S0, keep_states=True).states
        >>> mask = torch.zeros(1, 5, 1, dtype=torch.bool)
        >>> mask[0, 2] = True
        >>> edited = replay(LinearRule(), x, S0, states, state_edit=(mask, torch.zeros_like(states)))
        >>> bool(edited[0, 2].abs().max() == 0), torch.allclose(edited[0, 3], x.write()[0, 3])
        (True, True)
    """
    if state_edit is not None and bool(state_edit[0].all()):
        return state_edit[1]
    edits = [e for e in (state_edit, erase_edit) if e is not None]
    T = x.k.shape[1]
    edited = torch.stack([e[0].any(0).any(-1) for e in edits]).any(0) if edits else None  # [pos]
    t0 = int(edited.nonzero()[0]) if edited is not None and bool(edited.any()) else T
    start = 0 if differentiable or any(len(e) == 3 for e in edits) else t0
    if start == T:
        return states

    def carry(edit: tuple[Tensor, ...] | None, t: int) -> Tensor | None:
        """The straight-through term ``values − unedited`` at ``t`` (zero in value where unmasked)."""
        return None if edit is None or len(edit) < 3 else edit[1][:, t] - edit[2][:, t]

    S = S0 if start == 0 else states[:, start - 1]
    out = [states[:, :start]]
    for t in range(start, T):
        xt, wt = x.at(t), None if writes is None else writes[:, t]
        erase, erase_carry = None, carry(erase_edit, t)
        if erase_edit is not None and erase_edit[0][:, t].any():
            _, own = rule.step(S, xt, wt)
            own = own if erase_carry is None else own + erase_carry
            erase = torch.where(erase_edit[0][:, t, :, None, None], erase_edit[1][:, t], own)
        new, _ = rule.step(S, xt, wt, erase)
        if erase is None and erase_carry is not None:
            new = new + erase_carry  # the erase enters the update additively
        if t < t0:  # nothing edited yet: the unedited value, the recurrence's gradient
            new = states[:, t].detach() + (new - new.detach())
        state_carry = carry(state_edit, t)
        S = new if state_carry is None else new + state_carry
        if state_edit is not None:
            S = torch.where(state_edit[0][:, t, :, None, None], state_edit[1][:, t], S)
        out.append(S[:, None])
    return torch.cat(out, 1)


__all__ = [
    "RecurrenceInputs", "ScanResult", "Rule", "LinearRule", "DeltaRule", "DPLRRule", "dplr_chunked",
    "recurrent_scan", "chunked_scan", "materialized_scan", "scan", "replay", "boundary_scan", "replay_at",
]
