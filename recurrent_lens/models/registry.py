"""The architecture registry: one entry per file under ``recurrent_lens/models/``.

An :class:`Architecture` tells the shared code everything it needs about one family: which mixer class
to build, which options its configs take, how to read a reference ``config.json`` into a
:class:`ModelConfig`, and how each checkpoint key maps onto our parameters. Nothing outside the
architecture's own file branches on its name. Each architecture file registers itself when it is imported;
importing ``recurrent_lens`` imports the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from recurrent_lens.models.options import ArchOptions

if TYPE_CHECKING:
    from recurrent_lens.config import ModelConfig


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: our parameter ``name``, optionally only rows ``rows`` of it,
    after ``transform`` (e.g. a reshape or a sign flip)."""

    name: str
    rows: slice | None = None
    transform: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Attributes:
        name: registry name, the value of ``ModelConfig.architecture``.
        mixer: the :class:`~recurrent_lens.models.mixer.MatrixMixer` subclass of its recurrent layers.
        model_types: ``config.json`` ``model_type`` values this entry loads.
        config_from_hf: reads a reference ``config.json`` dict into a :class:`ModelConfig`.
        map_weight: maps a checkpoint key to a :class:`WeightTarget`, or ``None`` for keys the model
            does not use (vision towers, MTP heads), which are skipped with a note.
        detect: recognises checkpoints without a ``model_type`` (mamba_ssm's ``config.json``).
        embed_norm: builds a module applied to the embedding before the first block, the model's
            ``ln_embed`` (default: none).
        options: the :class:`~recurrent_lens.models.options.ArchOptions` subclass that ``ModelConfig.options`` is
            parsed into (default: no options).
        mlp: builds the block MLP for an MLP kind ``cfg.mlp`` other than ``"swiglu"``, which the
            architecture defines itself (default: none; SwiGLU is shared).
    """

    name: str
    mixer: type[nn.Module]
    model_types: tuple[str, ...] = ()
    config_from_hf: Callable[[dict[str, Any]], ModelConfig] | None = None
    map_weight: Callable[[str, ModelConfig], WeightTarget | None] | None = None
    detect: Callable[[dict[str, Any]], bool] | None = None
    embed_norm: Callable[[ModelConfig], nn.Module] | None = None
    options: type[ArchOptions] = ArchOptions
    mlp: Callable[[ModelConfig], nn.Module] | None = None


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *, overwrite: bool = False) -> Architecture:
    """Add an architecture so that ``from_config`` and ``from_pretrained`` can build it.

    Example:
        >>> from recurrent_lens.models.registry import Architecture, register_architecture, get_architecture
        >>> from recurrent_lens.models.gated_deltanet import GatedDeltaNetMixer
        >>> _ = register_architecture(Architecture("my_gdn", GatedDeltaNetMixer), overwrite=True)
        >>> get_architecture("my_gdn").mixer.__name__
        'GatedDeltaNetMixer'
    """
    if arch.name in _REGISTRY and not overwrite:
        raise ValueError(f"architecture {arch.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The architecture registered as ``name`` (a ValueError naming the registered ones otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"architecture: unknown name {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def architectures() -> dict[str, Architecture]:
    """All registered architectures by name."""
    return dict(_REGISTRY)

