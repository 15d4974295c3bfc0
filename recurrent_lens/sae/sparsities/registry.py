"""The sparsity registry: one entry per module under ``recurrent_lens/sae/sparsities/``.

A registered :class:`~recurrent_lens.sae.sparsities.base.Sparsity` tells the shared code everything about
one sparsity: the part that computes the codes, the config fields it reads and its SAELens conversion, so
that nothing outside its module branches on its name. Each sparsity module registers its class when it is
imported; importing ``recurrent_lens.sae.sparsities`` imports the built-in ones.
"""

import dataclasses

from recurrent_lens.sae.sparsities.base import Sparsity, SparsityOptions

__all__ = ["register_sparsity", "get_sparsity", "sparsities", "option_fields", "option_classes", "saelens_readers"]

_SPARSITIES: dict[str, type[Sparsity]] = {}


def register_sparsity(cls: type[Sparsity], *, overwrite: bool = False) -> type[Sparsity]:
    """Add ``cls`` under its ``kind`` so that ``SAEConfig(sparsity=cls.kind)`` builds it.

    A name already registered is refused unless ``overwrite=True``; so are a config field that another
    sparsity declares in a different :class:`~recurrent_lens.sae.sparsities.base.SparsityOptions` (a config
    holds one value per name) and a SAELens architecture that another sparsity already reads.

    Example:
        >>> from recurrent_lens.sae.sparsities import TopK, get_sparsity, register_sparsity
        >>> register_sparsity(TopK, overwrite=True) is get_sparsity("topk")
        True
        >>> register_sparsity(TopK)
        Traceback (most recent call last):
        ...
        ValueError: sparsity 'topk' is already registered (pass overwrite=True to replace it)
    """
    name = cls.kind
    if name in _SPARSITIES and not overwrite:
        raise ValueError(f"sparsity {name!r} is already registered (pass overwrite=True to replace it)")
    others = {key: other for key, other in _SPARSITIES.items() if key != name}
    for key, other in others.items():
        shared = {f.name for f in dataclasses.fields(cls.Options)} & {f.name for f in dataclasses.fields(other.Options)}
        if shared and other.Options is not cls.Options:
            raise ValueError(f"sparsity {name!r}: config fields {sorted(shared)} are already declared by sparsity "
                             f"{key!r} ({other.Options.__name__}); use its options class or other names")
        taken = set(cls.saelens_reads) & set(other.saelens_reads)
        if taken:
            raise ValueError(f"sparsity {name!r}: SAELens architectures {sorted(taken)} are already read as "
                             f"sparsity {key!r}")
    _SPARSITIES[name] = cls
    return cls


def get_sparsity(name: str) -> type[Sparsity]:
    """The sparsity registered as ``name`` (a ``ValueError`` naming the registered ones otherwise).

    Example:
        >>> get_sparsity("l1")
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be one of the registered sparsities ['batchtopk', 'gated', 'jumprelu', 'topk'], got 'l1'
    """
    if name not in _SPARSITIES:
        raise ValueError(f"sparsity must be one of the registered sparsities {sorted(_SPARSITIES)}, got {name!r}")
    return _SPARSITIES[name]


def sparsities() -> dict[str, type[Sparsity]]:
    """All registered sparsities by name, in registration order."""
    return dict(_SPARSITIES)


def option_classes() -> tuple[type[SparsityOptions], ...]:
    """The distinct options classes of the registered sparsities, in registration order."""
    return tuple(dict.fromkeys(cls.Options for cls in _SPARSITIES.values()))


def option_fields() -> dict[str, dataclasses.Field]:
    """Every registered sparsity's config fields by name, in registration order."""
    return {f.name: f for options in option_classes() for f in dataclasses.fields(options)}


def saelens_readers() -> dict[str, type[Sparsity]]:
    """The sparsity that each readable SAELens architecture loads as."""
    return {architecture: cls for cls in _SPARSITIES.values() for architecture in cls.saelens_reads}
