"""What a sparsity is: the SAE part that turns pre-activations into codes, the config fields it reads and
its SAELens conversion, all declared by one class.

A sparsity maps pre-activations ``[n, n_features]`` to non-negative codes. Its part owns the encoder biases
(``b_enc``, or whatever the sparsity uses instead), applies its rule, and defines the auxiliary loss that
training adds to the MSE. Its :class:`SparsityOptions` subclass declares the config fields it reads (they
become :class:`~recurrent_lens.sae.SAEConfig` keywords, attributes and ``cfg.json`` keys), and its
``saelens_*`` members say how it converts to and from SAELens's SAEs. A new sparsity is one module that
subclasses :class:`Sparsity` and calls :func:`~recurrent_lens.sae.sparsities.registry.register_sparsity`.

Example:
    >>> from recurrent_lens.sae import WriteSAE
    >>> sae = WriteSAE(4, 3, 8, sparsity="jumprelu")
    >>> type(sae.sparsity).__name__, sae.sparsity.feature_names, sae.sparsity.saelens_architecture
    ('JumpReLU', ('b_enc', 'log_threshold'), 'jumprelu')
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float

from recurrent_lens.sae.parts import Code, Part

__all__ = ["SparsityOptions", "Sparsity", "AT_LEAST_1", "AT_LEAST_0"]

AT_LEAST_1 = {"minimum": 1}
"""Field metadata of a count that must be positive (checked by ``SAEConfig`` and when ``cfg.json`` is read)."""
AT_LEAST_0 = {"minimum": 0}
"""Field metadata of a count that may be zero but not negative."""


@dataclass(frozen=True)
class SparsityOptions:
    """The config fields one sparsity reads, as a dataclass with a default for every field (none here).

    Every :class:`~recurrent_lens.sae.SAEConfig` carries the fields of every registered sparsity, each at its
    default unless given, whichever sparsity it selects, so that its ``cfg.json`` keeps one set of keys.
    Field types are the ones ``cfg.json`` may hold (``int``, ``float``, ``str``, ``bool``, unions with
    ``None``); ``metadata=AT_LEAST_1`` (or ``AT_LEAST_0``) bounds a count.

    Example:
        >>> from dataclasses import dataclass, field
        >>> @dataclass(frozen=True)
        ... class MyOptions(SparsityOptions):
        ...     my_offset: float = 0.5
        ...     my_count: int = field(default=4, metadata=AT_LEAST_1)
        >>> MyOptions(my_offset=1.0).resolved(n_features=8)
        MyOptions(my_offset=1.0, my_count=4)
    """

    def resolved(self, n_features: int) -> "SparsityOptions":
        """These options with the defaults that depend on the dictionary size filled in (any config)."""
        return self

    def check(self, cfg: Any) -> None:
        """Refuse, with a ``ValueError`` naming the field, values that do not fit ``cfg`` (a config that
        selects this sparsity); nothing to refuse here."""


class Sparsity(Part):
    """Biases, the ``hook_sae_acts_pre`` hook and a sparsity rule: ``shared = <E_i, x>`` -> codes.

    ``kind`` is the name ``SAEConfig.sparsity`` selects it by, ``Options`` the config fields it reads.
    SAELens: ``saelens_architecture`` is the architecture it exports as (``None``: it has no SAELens
    equivalent, and ``saelens_refusal`` says why), ``saelens_reads`` the SAELens architectures that load
    as this sparsity (see :mod:`recurrent_lens.sae.saelens`).
    """

    Options: ClassVar[type[SparsityOptions]] = SparsityOptions
    saelens_architecture: ClassVar[str | None] = None
    saelens_reads: ClassVar[tuple[str, ...]] = ()
    saelens_refusal: ClassVar[str] = ""

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

    # ------------------------------------------------------------------ SAELens

    def to_saelens(
        self, shift: Float[torch.Tensor, " n_features"]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(cfg_fields, tensors)`` of the SAELens SAE: the ``cfg.json`` fields this architecture adds and
        its encoder-side tensors (SAELens names), with the centring ``shift = <E_i, mean>`` folded into the
        biases. Raises ``ValueError`` where this SAE's settings have no SAELens equivalent."""
        raise NotImplementedError

    @classmethod
    def saelens_tensors(cls, architecture: str) -> tuple[str, ...]:
        """Names of the ``[d_sae]`` tensors a SAELens ``architecture`` SAE read as this sparsity holds
        besides ``W_enc``, ``W_dec`` and ``b_dec``."""
        return ("b_enc",)

    @classmethod
    def from_saelens(
        cls, architecture: str, cfg_dict: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config_fields, state)``: the :class:`~recurrent_lens.sae.SAEConfig` fields and this part's
        parameters (our names) of the SAE equal to SAELens's ``architecture`` SAE with ``cfg_dict`` and
        ``tensors`` (SAELens names, already checked for names and shapes; entries may be replaced where the
        conversion rescales ``W_enc`` or ``W_dec``). Errors are ``ValueError`` naming ``cfg_path``."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The config fields this sparsity reads."""
        return tuple(f.name for f in dataclasses.fields(cls.Options))
