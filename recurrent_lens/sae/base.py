"""The SAE family for matrix-valued states.

One class, :class:`SAE`, composed of three parts chosen by its config (see
:mod:`recurrent_lens.sae.parts` and :mod:`recurrent_lens.sae.sparsities`):

- ``encoder``: ``"linear"`` (one dense matrix ``E_i`` per feature, ``pre_i = <E_i, S>_F``) or
  ``"bilinear"`` (``pre_i = sum_r V_enc[i,r]^T S W_enc[i,r]``);
- ``decoder``: ``"flat"`` (a dense ``d_k x d_v`` atom per feature, the reference FlatSAE),
  ``"factored"`` (atom ``sum_r V_dec[i,r] W_dec[i,r]^T`` of rank ``rank``) or ``"full"`` (the
  same dense atom as ``"flat"``, named after the paper's full-rank MatrixSAE);
- ``sparsity``: a registered sparsity, ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"gated"`` built in
  (one module each, with the config fields it reads and its SAELens conversion).

Orientation: ``V`` factors live on the key side (``d_k``), ``W`` factors on the value side
(``d_v``), so an atom ``v w^T`` has the state's ``[d_k, d_v]`` layout.

:meth:`SAE.forward` is pure: it returns the reconstruction, the codes and the training losses for
the current dead-feature counters, and changes nothing. Keeping the counters is the trainer's job
(:mod:`recurrent_lens.sae.training`): it runs :meth:`SAE.autoencode`, updates the counters from
the codes, then asks :meth:`SAE.losses` for the losses.

Speed: the bilinear encoder is one GEMM of ``vec(S)`` against the assembled atoms
``vec(V_i W_i^T)``, done in feature chunks (small enough to stay in the CPU's cache) by a custom
autograd function that re-assembles the atoms in the backward pass instead of storing them. With
TopK and BatchTopK only the selected atoms are decoded, and on the CPU the encoder's backward pass
touches only the selected features and the auxiliary loss is skipped while no feature is dead, so
that a training step costs little more than the encoder's forward GEMM. On a GPU nothing in a
training step copies a value to the host (those two CPU shortcuts need a count on the host).
"""

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from recurrent_lens.sae.parts import (
    BilinearEncoder, Code, Decoder, Directions, Encoder, FactoredDecoder, FlatDecoder, FullDecoder, LinearEncoder,
)
from recurrent_lens.sae.sparsities import Sparsity, get_sparsity
from recurrent_lens.sae.sparsities.base import AT_LEAST_0, AT_LEAST_1
from recurrent_lens.sae.sparsities.registry import option_classes, option_fields

__all__ = ["SAEConfig", "SAEMetadata", "SAEOutput", "SAEPass", "SAE", "SAE_REGISTRY", "register_sae_class"]

ENCODER_PARTS: dict[str, type[Encoder]] = {"linear": LinearEncoder, "bilinear": BilinearEncoder}
DECODER_PARTS: dict[str, type[Decoder]] = {"flat": FlatDecoder, "factored": FactoredDecoder, "full": FullDecoder}
ENCODERS = tuple(ENCODER_PARTS)
DECODERS = tuple(DECODER_PARTS)


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
class _ConfigFields:
    """The fields every SAE config has, whichever its sparsity (see :class:`SAEConfig`)."""

    d_k: int = field(metadata=AT_LEAST_1)
    """Key-side size of the state (rows)."""
    d_v: int = field(metadata=AT_LEAST_1)
    """Value-side size of the state (columns)."""
    n_features: int = field(metadata=AT_LEAST_1)
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
    """A registered sparsity (:mod:`recurrent_lens.sae.sparsities`): ``"topk"``, ``"batchtopk"``,
    ``"jumprelu"`` or ``"gated"`` built in."""
    _: KW_ONLY
    center: bool = False
    """Whether training fits the dataset mean M (stored in the ``mean`` buffer)."""
    dead_threshold: int = field(default=100, metadata=AT_LEAST_0)
    """A feature is dead after this many forwards without firing."""
    sparsity_options: dict[str, Any] = field(default_factory=dict)
    """The fields of every registered sparsity by name (``k``, ``jumprelu_bandwidth``, ...), each at its
    default unless given; they are also keywords and attributes of the config itself."""
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=SAEMetadata)
    """Free-form provenance: ``hook_name``, ``head``, ``model_name``, training info. Always an
    :class:`SAEMetadata` (a plain dict given here or assigned later is converted), so both
    ``metadata["hook_name"]`` and ``metadata.hook_name`` work."""


class SAEConfig(_ConfigFields):
    """Configuration of one SAE.  ``to_dict()`` is what ``cfg.json`` holds.

    Besides the fields of every SAE (``d_k``, ``d_v``, ``n_features``, ``encoder``, ``decoder``, ``rank``,
    ``tied``, ``sparsity``, ``center``, ``dead_threshold``, ``dtype``, ``metadata``), a config carries the
    fields that the registered sparsities declare (their
    :class:`~recurrent_lens.sae.sparsities.base.SparsityOptions`), as keywords and attributes: TopK's and
    BatchTopK's ``k`` (``None``: 32, or every feature of a smaller dictionary; refused above
    ``n_features``), ``k_aux`` and ``aux_coef``; JumpReLU's ``jumprelu_init_threshold``,
    ``jumprelu_bandwidth`` and ``l0_coef``; Gated's ``gate_temperature``, ``gate_mode``,
    ``gated_sparsity_coef`` and ``gated_aux_coef``. They are kept in :attr:`sparsity_options` and written
    flat by :meth:`to_dict`.

    Example:
        >>> cfg = SAEConfig(d_k=4, d_v=3, n_features=8, decoder=2)
        >>> cfg.decoder, cfg.rank, cfg.d_in, cfg.k
        ('factored', 2, 12, 8)
        >>> SAEConfig(d_k=4, d_v=3, n_features=8, sparsity="jumprelu", l0_coef=0.1).l0_coef
        0.1
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        declared = option_fields()
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in declared}
        super().__init__(*args, **kwargs)
        if not isinstance(self.sparsity_options, dict):
            raise TypeError(f"sparsity_options: expected a dict, got {type(self.sparsity_options).__name__}")
        unknown = sorted(set(self.sparsity_options) - set(declared))
        if unknown:
            raise ValueError(f"sparsity_options: unknown fields {unknown}; the registered sparsities declare "
                             f"{sorted(declared)}")
        self.sparsity_options = {**self.sparsity_options, **given}
        self._check()

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("sparsity_options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("sparsity_options", {}):
            self.sparsity_options[name] = value
            return
        if name == "metadata" and not isinstance(value, SAEMetadata):
            if not isinstance(value, dict):
                raise TypeError(f"metadata: expected a dict, got {type(value).__name__}")
            value = SAEMetadata(value)
        super().__setattr__(name, value)

    def _check(self) -> None:
        if isinstance(self.decoder, int) and not isinstance(self.decoder, bool):
            self.rank, self.decoder = self.decoder, "factored"
        if self.rank == "full":
            self.rank, self.decoder = 1, "full"
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS} or an int rank, got {self.decoder!r}")
        sparsity = get_sparsity(self.sparsity)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int or 'full', got {self.rank!r}")
        if self.tied and not (self.encoder == "bilinear" and self.decoder == "factored"):
            raise ValueError(
                "tied=True needs encoder='bilinear' and a factored decoder, got "
                f"encoder={self.encoder!r}, decoder={self.decoder!r}"
            )
        self._check_minimum(dataclasses.fields(_ConfigFields), self.__dict__)
        options = self.sparsity_options
        resolved: dict[str, Any] = {}
        for cls in option_classes():
            own = {f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options}
            resolved.update(dataclasses.asdict(cls(**own).resolved(self.n_features)))
        self._check_minimum(option_fields().values(), resolved)
        self.sparsity_options = resolved
        sparsity.Options(**{name: resolved[name] for name in sparsity.option_names()}).check(self)

    @staticmethod
    def _check_minimum(fields: Any, values: dict[str, Any]) -> None:
        for f in fields:
            minimum = f.metadata.get("minimum")
            if minimum is not None and values[f.name] is not None and values[f.name] < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {values[f.name]}")

    @classmethod
    def flat_fields(cls) -> dict[str, dataclasses.Field]:
        """The fields :meth:`to_dict` writes, by name and in its order: those of every SAE, with the
        registered sparsities' fields in place of ``sparsity_options``.

        Example:
            >>> fields = SAEConfig.flat_fields()
            >>> "k" in fields and "sparsity_options" not in fields, fields["k"].type
            (True, int | None)
        """
        flat: dict[str, dataclasses.Field] = {}
        for f in dataclasses.fields(_ConfigFields):
            flat.update(option_fields() if f.name == "sparsity_options" else {f.name: f})
        return flat

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
        """All fields, the sparsities' flat (``metadata`` as a plain dict); the owning SAE adds ``architecture``."""
        d = dataclasses.asdict(self)
        d["metadata"] = dict(d["metadata"])
        return {name: d["sparsity_options"][name] if name in self.sparsity_options else d[name]
                for name in self.flat_fields()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Build from ``to_dict()`` output; unknown keys (``architecture``) are ignored."""
        names = cls.flat_fields()
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



@dataclass
class SAEPass:
    """One encode/decode pass of an SAE over a batch (:meth:`SAE.autoencode`), before any loss.

    ``x``, ``pre``, ``code.acts`` and ``x_hat`` are 2-D (samples flattened); ``acts`` and
    ``reconstruction`` have the input's leading dims and are what the hooks returned.
    """

    x: Float[torch.Tensor, "n d_in"]
    """The centred input ``vec(S - mean)``."""
    pre: Float[torch.Tensor, "n n_features"]
    """Pre-activations (Gated: the magnitude path), as ``hook_sae_acts_pre`` returned them."""
    acts: Float[torch.Tensor, "... n_features"]
    """Codes, as ``hook_sae_acts_post`` returned them."""
    code: Code
    """The codes in the form the decoder used (sparse unless a hook edited them)."""
    x_hat: Float[torch.Tensor, "n d_in"]
    """The centred reconstruction, ``b_dec`` included (before ``hook_sae_recons``)."""
    reconstruction: Float[torch.Tensor, "... d_k d_v"]
    """``x_hat + mean`` in the input's shape, as ``hook_sae_recons`` returned it."""
    recons_edited: bool = False
    """Whether a hook on ``hook_sae_recons`` returned a different tensor."""


SAE_REGISTRY: dict[str, type["SAE"]] = {}


def register_sae_class(architecture: str, cls: type["SAE"], *, overwrite: bool = False) -> None:
    """Register ``cls`` under ``architecture`` so that :func:`recurrent_lens.sae.load` finds it.

    A name already registered is refused unless ``overwrite=True``.

    Example:
        >>> from recurrent_lens.sae import SAE, register_sae_class
        >>> class MySAE(SAE):
        ...     architecture = "my_sae"
        >>> register_sae_class("my_sae", MySAE)
        >>> register_sae_class("write_sae", MySAE)
        Traceback (most recent call last):
        ...
        ValueError: SAE architecture 'write_sae' is already registered (pass overwrite=True to replace it)
    """
    if architecture in SAE_REGISTRY and not overwrite:
        raise ValueError(f"SAE architecture {architecture!r} is already registered (pass overwrite=True to replace it)")
    SAE_REGISTRY[architecture] = cls


@contextmanager
def _hooks_off(sae: HookedRootModule) -> Iterator[None]:
    """Run ``sae`` with its hook points as plain identities."""
    saved = []
    for hp in sae.hook_dict.values():
        saved.append((hp, hp._forward_hooks.copy()))
        hp._forward_hooks.clear()
    try:
        yield
    finally:
        for hp, hooks in saved:
            hp._forward_hooks.update(hooks)


class SAE(HookedRootModule):
    """A sparse autoencoder on ``[..., d_k, d_v]`` matrix states.

    Hook points, in execution order (SAELens names)::

        hook_sae_input      [..., d_k, d_v]     the state as given
        hook_sae_acts_pre   [..., n_features]   pre-activations (Gated: the magnitude path)
        hook_sae_acts_post  [..., n_features]   sparse codes
        hook_sae_recons     [..., d_k, d_v]     reconstruction (bias and mean included)
        hook_sae_error      [..., d_k, d_v]     input minus clean reconstruction (spliced with
                                                use_error_term=True only)

    The SAE is composed of three parts (``sae.encoder``, ``sae.decoder``, ``sae.sparsity``; see
    :mod:`recurrent_lens.sae.parts`), chosen by ``cfg.encoder``, ``cfg.decoder`` and
    ``cfg.sparsity``. Parameters, depending on the config: ``E_enc`` [n_features, d_k, d_v] (linear
    encoder), ``V_enc`` [n_features, rank, d_k] and ``W_enc`` [n_features, rank, d_v] (bilinear
    encoder, absent when tied), ``b_enc`` [n_features], ``V_dec``/``W_dec`` (factored decoder) or
    ``D_dec`` [n_features, d_k, d_v] (flat/full decoder), ``b_dec`` [d_k, d_v]; JumpReLU adds
    ``log_threshold``, Gated replaces ``b_enc`` by ``b_gate``, ``r_mag``, ``b_mag``. Buffers:
    ``mean`` [d_k, d_v] (dataset mean, zero unless centred) and ``steps_since_active`` (kept by the
    trainer, see :mod:`recurrent_lens.sae.training`).

    ``use_error_term`` (constructor argument and attribute, default ``False``) is what
    :func:`recurrent_lens.sae.add_sae` uses when its own ``use_error_term`` is not given, as in
    SAELens; it does not change :meth:`forward`.

    Methods: :meth:`encode`, :meth:`decode`, :meth:`reconstruct`, :meth:`forward`,
    :meth:`autoencode`, :meth:`losses`, :meth:`splice`, :meth:`normalize_decoder`,
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
    _cpu_chunk_elements: int = 1 << 22
    """The same on the CPU, where a chunk that stays in the cache while it is multiplied (16 MiB fp32)
    makes the encoder about 1.5x faster; on a GPU, large chunks keep the kernels few."""

    encoder: Encoder
    decoder: Decoder
    sparsity: Sparsity

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
        self.encoder = ENCODER_PARTS[cfg.encoder](self)
        self.decoder = DECODER_PARTS[cfg.decoder](self)
        self.sparsity = get_sparsity(cfg.sparsity)(self)
        # Registration order is the state-dict order, the optimizer's parameter order and the order
        # in which the random init is drawn: the same as in SAEs saved before the parts existed.
        self.encoder.build()
        self.decoder.build()
        self.sparsity.build()
        self.decoder.build_bias()
        self.register_buffer("mean", torch.zeros(cfg.d_k, cfg.d_v, dtype=cfg.torch_dtype))
        self.register_buffer("steps_since_active", torch.zeros(cfg.n_features, dtype=torch.int64))
        self.normalize_decoder()
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

    def _parts(self) -> tuple[Encoder, Decoder, Sparsity]:
        return self.encoder, self.decoder, self.sparsity

    @property
    def encoder_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, W)`` used by the bilinear encoder (the decoder's when tied)."""
        return self.encoder.factors

    def feature_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters whose first axis indexes features (what resampling touches)."""
        return {name: getattr(self, name) for part in self._parts() for name in part.feature_names}

    def _chunk(self, device: torch.device) -> int:
        """Features per chunk of the factored GEMM: as many as the bound allows, in chunks of equal
        size (no small remainder, which BLAS would multiply with other kernels)."""
        limit = min(self._chunk_elements, self._cpu_chunk_elements) if device.type == "cpu" else self._chunk_elements
        n = self.cfg.n_features
        n_chunks = -(-n // max(1, limit // self.cfg.d_in))
        return -(-n // n_chunks)

    def encoder_atoms(self, features: Int[torch.Tensor, " n"] | None = None
                      ) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every encoder row as a ``d_k x d_v`` matrix ``E_i`` with ``pre_i = <E_i, S - mean>_F + bias``
        (bilinear: ``sum_r V_enc[i,r] W_enc[i,r]^T``; allocates ``n_features * d_in``), or only the rows
        ``features`` (allocating ``n * d_in``). Gated's magnitude path scales ``<E_i, S - mean>_F``: see
        :meth:`pre_activation_affine`.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8)
            >>> torch.equal(sae.encoder_atoms()[0], torch.outer(sae.V_enc[0, 0], sae.W_enc[0, 0]))
            True
        """
        return self.encoder.atoms(features)

    def pre_activation_affine(self) -> tuple[Float[torch.Tensor, " n_features"] | None,
                                             Float[torch.Tensor, " n_features"]]:
        """``(scale, bias)`` with pre-activations (``hook_sae_acts_pre``) ``scale * <E_i, S - mean>_F + bias``;
        ``scale`` is ``None`` where it is 1 (every sparsity but Gated, whose magnitude path has ``exp(r_mag)``).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import FlatSAE
            >>> sae = FlatSAE(4, 3, 8, sparsity="gated")
            >>> scale, bias = sae.pre_activation_affine()
            >>> S = torch.randn(4, 3)
            >>> pre = scale * (sae.encoder_atoms() * (S - sae.mean)).sum((-1, -2)) + bias
            >>> bool(torch.allclose(pre, sae.autoencode(S[None]).pre[0], atol=1e-6))
            True
        """
        return self.sparsity.pre_affine()

    def decoder_atoms(self) -> Float[torch.Tensor, "n_features d_k d_v"]:
        """Every decoder atom as a ``d_k x d_v`` matrix (allocates ``n_features * d_in``).

        Example:
            >>> from recurrent_lens.sae import WriteSAE
            >>> WriteSAE(4, 3, 8).decoder_atoms().shape
            torch.Size([8, 4, 3])
        """
        return self.decoder.atoms()

    # ------------------------------------------------------------------ maths

    def _check_input(self, S: torch.Tensor, name: str = "S") -> None:
        d_k, d_v = self.cfg.d_k, self.cfg.d_v
        if S.dim() < 2 or tuple(S.shape[-2:]) != (d_k, d_v):
            raise ValueError(
                f"{type(self).__name__}: {name} must have shape [..., d_k={d_k}, d_v={d_v}], got {tuple(S.shape)}"
            )

    # The parts' maths under the names the tests of the fast paths use.
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.project(x)

    def _dense_decode(self, a: torch.Tensor, detach: bool = False) -> torch.Tensor:
        return self.decoder.decode_dense(a, detach)

    def _sparse_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_sparse(values, indices)

    def _segment_decode(self, values: torch.Tensor, indices: torch.Tensor, sample: torch.Tensor, n: int) -> torch.Tensor:
        return self.decoder.decode_segments(values, indices, sample, n)

    def _encode(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Code]:
        """Returns ``(x_centred [n, d_in], pre [n, n_f], acts_post [..., n_f], code)``."""
        self._check_input(S)
        lead = tuple(S.shape[:-2])
        S = self.hook_sae_input(S.to(self.cfg.torch_dtype))
        x = (S - self.mean).reshape(-1, self.cfg.d_in)
        pre, code = self.sparsity.activate(self.encoder.project(x), lead)
        acts_in = code.acts.view(*lead, self.cfg.n_features)
        acts = self.hook_sae_acts_post(acts_in)
        if acts is not acts_in:
            # A hook edited the codes, so the sparse (value, index) form no longer describes them.
            code = Code(acts.reshape(-1, self.cfg.n_features), extra=code.extra)
        return x, pre, acts, code

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
        flat = self.decoder.decode_dense(acts.reshape(-1, self.cfg.n_features).to(self.cfg.torch_dtype))
        return self.hook_sae_recons(flat.view(*lead, self.cfg.d_k, self.cfg.d_v) + self.b_dec + self.mean)

    def autoencode(self, S: Float[torch.Tensor, "... d_k d_v"]) -> SAEPass:
        """Encode and decode ``S`` through the fast sparse path; no loss, no bookkeeping.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> p = WriteSAE(4, 3, 8, k=2).autoencode(torch.randn(2, 5, 4, 3))
            >>> p.reconstruction.shape, p.acts.shape, p.x_hat.shape
            (torch.Size([2, 5, 4, 3]), torch.Size([2, 5, 8]), torch.Size([10, 12]))
        """
        cfg = self.cfg
        x, pre, acts, code = self._encode(S)
        x_hat = code.decode(self.decoder) + self.b_dec.reshape(-1)
        recons_in = x_hat.view(*S.shape[:-2], cfg.d_k, cfg.d_v) + self.mean
        recons = self.hook_sae_recons(recons_in)
        return SAEPass(x, pre, acts, code, x_hat, recons, recons_edited=recons is not recons_in)

    def reconstruct(self, S: Float[torch.Tensor, "... d_k d_v"]) -> Float[torch.Tensor, "... d_k d_v"]:
        """``decode(encode(S))`` through the fast sparse path, in ``S``'s dtype.

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> WriteSAE(4, 3, 8).reconstruct(torch.randn(4, 3)).shape
            torch.Size([4, 3])
        """
        return self.autoencode(S).reconstruction.to(S.dtype)

    def losses(self, p: SAEPass, dead: Bool[torch.Tensor, " n_features"] | None = None) -> SAEOutput:
        """The training losses of the pass ``p`` for the dead-feature mask ``dead`` (default:
        :meth:`dead_mask`, the counters as they are).

        ``loss = mse + aux_loss``. ``aux_loss`` is the dead-feature loss (TopK, BatchTopK; zero
        while no feature is dead), the L0 penalty (JumpReLU) or the gate losses (Gated).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8, k=2)
            >>> out = sae.losses(sae.autoencode(torch.randn(10, 4, 3)))
            >>> bool(out.loss == out.mse + out.aux_loss), int(out.n_dead)
            (True, 0)
        """
        dead = self.dead_mask() if dead is None else dead
        mse = (p.x_hat - p.x).pow(2).mean()
        aux = self.sparsity.aux_loss(p, dead)
        return SAEOutput(p.reconstruction, p.acts, mse + aux, mse, aux, dead.sum())

    def forward(self, S: Float[torch.Tensor, "... d_k d_v"]) -> SAEOutput:
        """Encode, decode and the training losses of one batch (:meth:`losses` of :meth:`autoencode`).

        Pure: the dead-feature counters are read, never changed (training updates them, see
        :class:`recurrent_lens.sae.training.Learner`).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> out = WriteSAE(4, 3, 8, k=2)(torch.randn(10, 4, 3))
            >>> out.loss.shape, int(out.n_dead)
            (torch.Size([]), 0)
        """
        return self.losses(self.autoencode(S))

    def splice(
        self, x: Float[torch.Tensor, "... d_k d_v"], use_error_term: bool = False
    ) -> Float[torch.Tensor, "... d_k d_v"]:
        """What an attached SAE puts in place of the states ``x`` (see :mod:`recurrent_lens.sae.attach`).

        Without the error term: the reconstruction. With it: ``x + (recon - recon_clean)``, where
        ``recon_clean`` is the reconstruction with the SAE's hooks off and without gradient, so that
        with no hook edit the result is bitwise ``x``, and an edit of ``hook_sae_acts_post`` shifts it
        by the decoded difference. A hook on ``hook_sae_error`` replaces the error term (the result
        is then ``recon + error``).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(4, 3, 8, k=2)
            >>> x = torch.randn(2, 5, 4, 3)
            >>> torch.equal(sae.splice(x, use_error_term=True), x), torch.equal(sae.splice(x), sae.reconstruct(x))
            (True, True)
        """
        p = self.autoencode(x)
        recons = p.reconstruction.to(x.dtype)
        if not use_error_term:
            return recons
        with torch.no_grad(), _hooks_off(self):
            clean = self.autoencode(x)
        error_in = x - clean.reconstruction.to(x.dtype)
        error = self.hook_sae_error(error_in)
        if error is not error_in:
            return recons + error
        if not p.recons_edited and not p.code.sparse and clean.code.sparse:
            # Edited codes go through the dense decoder and the clean ones did not, so their difference
            # would carry rounding noise into every slice. Decoding the (exactly zero where unedited)
            # difference of the codes keeps unedited slices bitwise equal to x, which the model needs
            # to tell replaced states from recomputed ones.
            delta = self.decoder.decode_dense((p.acts - clean.acts).reshape(-1, self.cfg.n_features))
            return x + delta.view_as(x).to(x.dtype)
        # Same decoding path for both, so with no edit the difference is exactly zero.
        return x + (p.reconstruction - clean.reconstruction).to(x.dtype)

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
        self.decoder.normalize()

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
        for part in (self.sparsity, self.encoder, self.decoder):
            part.check_fold()
        norms = self.decoder_atoms().reshape(self.cfg.n_features, -1).norm(dim=-1).clamp(min=1e-8)
        self.decoder.fold(norms[:, None, None])
        self.encoder.fold(norms[:, None, None])
        self.sparsity.fold(norms)

    def dead_mask(self) -> Bool[torch.Tensor, " n_features"]:
        """Boolean ``[n_features]``: features that have not fired for ``dead_threshold`` training steps."""
        return self.steps_since_active >= self.cfg.dead_threshold

    @torch.no_grad()
    def resample_dead_features(
        self, batch: Float[torch.Tensor, "batch d_k d_v"], generator: torch.Generator | None = None
    ) -> Int[torch.Tensor, " n_resampled"]:
        """Re-initialise dead features from badly reconstructed samples of ``batch``.

        As the reference does: samples drawn with replacement in proportion to their squared error;
        factored atoms from the SVD of the (centred) sample, dense atoms from its normalised vec;
        encoder weights in the same directions at 0.2x the mean alive norm; biases zero (JumpReLU:
        mean alive threshold); counters reset. Returns the resampled indices; the caller clears
        their optimizer state (see :class:`recurrent_lens.sae.SAETrainer`).

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
        directions = Directions(batch[picks] - self.mean, cfg.rank)
        for part in self._parts():
            part.resample(idx, ~dead, directions)
        self.steps_since_active[idx] = 0
        return idx

    # ------------------------------------------------------------------ io

    def save_pretrained(self, path: str, format: str = "native") -> None:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into directory ``path`` (atomically).

        ``format="native"`` keeps this SAE exactly (our keys under SAELens's file names: SAELens cannot
        read it); ``format="saelens"`` writes a directory that SAELens's ``SAE.load_from_disk`` reads, on
        ``d_in = d_k * d_v`` (see :mod:`recurrent_lens.sae.saelens`).

        Example:
            >>> import tempfile
            >>> from recurrent_lens.sae import WriteSAE, load
            >>> sae = WriteSAE(4, 3, 8)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     sae.save_pretrained(d)
            ...     type(load(d)).__name__
            'WriteSAE'
        """
        from recurrent_lens.sae.io import save_sae  # io imports this module

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
        from recurrent_lens.sae.io import load  # io imports this module

        sae = load(path, device=device)
        if not isinstance(sae, cls):
            raise TypeError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae

    def config_dict(self) -> dict[str, Any]:
        """``cfg.to_dict()`` plus ``"architecture"``: the content of ``cfg.json``."""
        return {"architecture": self.architecture, **self.cfg.to_dict()}

    def __repr__(self) -> str:
        cfg = self.cfg
        fields = [
            f"d_k={cfg.d_k}, d_v={cfg.d_v}, n_features={cfg.n_features}",
            f"encoder={self.encoder.describe()}",
            f"decoder={self.decoder.describe()}",
            f"sparsity={self.sparsity.describe()}",
        ]
        if cfg.center:
            fields.append("centred")
        for key in ("hook_name", "head"):
            if key in cfg.metadata:
                fields.append(f"{key}={cfg.metadata[key]!r}")
        return f"{type(self).__name__}({', '.join(fields)})"


register_sae_class(SAE.architecture, SAE)
