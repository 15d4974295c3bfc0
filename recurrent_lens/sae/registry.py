"""The SAE classes by ``architecture`` name: what rebuilds an SAE from its ``cfg.json``.

:mod:`recurrent_lens.sae.base` registers :class:`~recurrent_lens.sae.SAE` and
:mod:`recurrent_lens.sae.presets` the presets when they are imported (importing :mod:`recurrent_lens.sae`
imports both). The loaders (:mod:`recurrent_lens.sae.io`, :mod:`recurrent_lens.sae.saelens`) and the trainer
find classes here, so they do not import the classes' modules, which save and load through them.

Example:
    >>> from recurrent_lens.sae import SAE_REGISTRY
    >>> SAE_REGISTRY["write_sae"].__name__, SAE_REGISTRY[BASE_ARCHITECTURE].__name__
    ('WriteSAE', 'SAE')
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recurrent_lens.sae.base import SAE

__all__ = ["BASE_ARCHITECTURE", "SAE_REGISTRY", "register_sae_class"]

BASE_ARCHITECTURE = "sae"
"""The ``architecture`` of the plain :class:`~recurrent_lens.sae.SAE`, and the one a ``cfg.json`` without
the field has."""

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
