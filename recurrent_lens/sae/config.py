"""What an SAE's ``cfg.json`` holds: :class:`SAEConfig` and its :class:`SAEMetadata`.

The config names the SAE's parts (``encoder``, ``decoder``, ``sparsity``; see :mod:`recurrent_lens.sae.parts`
and :mod:`recurrent_lens.sae.sparsities`) and is checked when it is built, so that an SAE, a loader or a
trainer holding one knows it describes a buildable SAE.

Example:
    >>> cfg = SAEConfig(d_k=4, d_v=3, n_features=8, sparsity="jumprelu")
    >>> SAEConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import torch

from recurrent_lens.sae.parts import (
    BilinearEncoder, Decoder, Encoder, FactoredDecoder, FlatDecoder, FullDecoder, LinearEncoder,
)
from recurrent_lens.sae.sparsities import get_sparsity
from recurrent_lens.sae.sparsities.base import AT_LEAST_0, AT_LEAST_1
from recurrent_lens.sae.sparsities.registry import option_classes, option_fields

__all__ = ["SAEConfig", "SAEMetadata", "ENCODER_PARTS", "DECODER_PARTS"]

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
