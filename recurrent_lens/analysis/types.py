"""What the analyses need of a model and of an SAE, as runtime-checkable :class:`typing.Protocol` types.

The analyses annotate their ``model`` and ``sae`` arguments with :class:`ModelLike` and :class:`SAELike`, so
a type checker (and beartype, where it wraps the package) accepts any object that has the members listed
here: a :class:`~recurrent_lens.HookedRecurrentModel` and every SAE of :mod:`recurrent_lens.sae` do.

An ``isinstance`` check only asks whether each member exists. Python 3.12 and later look members up without
running ``__getattr__``, which is where :class:`torch.nn.Module` keeps its submodules; so the model's
modules that the analyses also read (``embed``, ``unembed``, ``ln_final`` and ``blocks[layer].mixer``) are
documented on :class:`ModelLike` but not part of the check.

Example:
    >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
    >>> from recurrent_lens.analysis import ModelLike, SAELike
    >>> from recurrent_lens.sae import WriteSAE
    >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=8)
    >>> isinstance(HookedRecurrentModel(cfg), ModelLike), isinstance(WriteSAE(8, 8, 16), SAELike)
    (True, True)
    >>> isinstance(WriteSAE(8, 8, 16), ModelLike)
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


class ModelConfigLike(Protocol):
    """The fields of a model's ``cfg`` that the analyses read."""

    d_vocab: int
    n_layers: int
    n_heads: int
    d_k: int
    d_v: int

    @property
    def recurrent_layers(self) -> Sequence[int]:
        """The layers whose mixer keeps a matrix state."""


class SAEConfigLike(Protocol):
    """The fields of an SAE's ``cfg`` that the analyses read."""

    d_k: int
    d_v: int
    n_features: int


@runtime_checkable
class ModelLike(Protocol):
    """A hooked recurrent model as the analyses use it (e.g. :class:`~recurrent_lens.HookedRecurrentModel`).

    Besides the members below, the analyses read the modules ``embed`` (its ``weight``: the device and dtype of
    the inputs, and ``W_U`` when tied), ``unembed`` (``None`` or one with a ``weight``), ``ln_final`` and
    ``blocks[layer].mixer`` (its output projection); see the module docstring for why they are not checked.
    """

    cfg: ModelConfigLike
    hook_dict: dict[str, Any]
    """Every hook point by name."""
    positions: Tensor | None
    """Absolute positions of the tokens of the current forward (read by hooks during generation)."""

    def __call__(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Logits ``[batch, pos, d_vocab]``; with ``cache=`` it continues from (and updates) that cache."""

    def make_cache(self) -> Any:
        """An empty recurrent cache for ``__call__(tokens, cache=...)``."""

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """TransformerLens' ``run_with_cache``: ``(logits, activation cache)``."""

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens' ``run_with_hooks``."""

    def hooks(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens' ``hooks`` context manager."""

    def generate(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Greedy continuation: the prompt followed by the generated tokens."""


@runtime_checkable
class SAELike(Protocol):
    """An SAE on ``[d_k, d_v]`` states as the analyses use it (every SAE of :mod:`recurrent_lens.sae`)."""

    cfg: SAEConfigLike

    def encode(self, S: Tensor) -> Tensor:
        """Codes ``[..., n_features]`` of states ``[..., d_k, d_v]``."""

    def decoder_atoms(self) -> Tensor:
        """Every decoder atom as a ``[n_features, d_k, d_v]`` tensor."""


__all__ = ["ModelLike", "SAELike", "ModelConfigLike", "SAEConfigLike"]
