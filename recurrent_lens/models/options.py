"""The base of the architectures' typed options: the settings only one architecture reads, parsed from
``ModelConfig.options``."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

if TYPE_CHECKING:
    from recurrent_lens.config import ModelConfig

_Options = TypeVar("_Options", bound="ArchOptions")


def _option_type(hint: Any) -> str:
    """How an option's expected type reads in an error message."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_option_type(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        return f"a list or tuple of {len(items)} ({', '.join(map(_option_type, items))})"
    names = {bool: "True or False", int: "an int", float: "a number", str: "a string", type(None): "None"}
    if hint not in names:
        raise TypeError(f"ArchOptions: unsupported field type {hint!r} (use bool, int, float, str, Literal, "
                        "tuple and None)")
    return names[hint]


_NO_MATCH = object()


@functools.cache
def _option_fields(cls: type) -> dict[str, Any]:
    """The fields of an :class:`ArchOptions` subclass and their types (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce_option(hint: Any, value: Any) -> Any:
    """``value`` as a field of type ``hint`` holds it (an int as a float, a list as a tuple), or ``_NO_MATCH``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for h in args:
            got = _coerce_option(h, value)
            if got is not _NO_MATCH:
                return got
        return _NO_MATCH
    if origin is Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _NO_MATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _NO_MATCH
        items = tuple(_coerce_option(h, v) for h, v in zip(args, value))
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else items
    if hint is float:
        return float(value) if type(value) in (int, float) else _NO_MATCH
    if hint is type(None):
        return value if value is None else _NO_MATCH
    return value if type(value) is hint else _NO_MATCH


@dataclass(frozen=True)
class ArchOptions:
    """The settings only one architecture reads, as a typed dataclass (this base class has none).

    An architecture declares a subclass in its own module, with a default for every field, and names it in
    its registry entry (``Architecture(options=...)``). ``ModelConfig(options={...})`` takes the options as a
    plain dict, which is what the config keeps and saves; building the config parses that dict with
    :meth:`from_config`, so an unknown name or a value of the wrong type is a ValueError there, and the
    architecture's code reads the parsed dataclass. Field types may be ``bool``, ``int``, ``float`` (an int
    is accepted), ``str``, ``Literal`` choices, ``tuple`` (a list is accepted, as JSON gives it back) and
    unions with ``None``.

    Example:
        >>> from dataclasses import dataclass
        >>> from recurrent_lens.models.options import ArchOptions
        >>> @dataclass(frozen=True)
        ... class MyOptions(ArchOptions):
        ...     use_gate: bool = True
        ...     eps: float | None = None
        >>> MyOptions.parse("my_arch", {"use_gate": False, "eps": 1})
        MyOptions(use_gate=False, eps=1.0)
        >>> MyOptions.parse("my_arch", {"use_gat": False})
        Traceback (most recent call last):
        ...
        ValueError: options: architecture 'my_arch' has no option 'use_gat'; valid options: ['eps', 'use_gate']
        >>> MyOptions.parse("my_arch", {"use_gate": "no"})
        Traceback (most recent call last):
        ...
        ValueError: options['use_gate'] of architecture 'my_arch': expected True or False, got 'no' (str)
    """

    @classmethod
    def parse(cls: type[_Options], architecture: str, options: Mapping[str, Any]) -> _Options:
        """The options in ``options`` (a dict of field names to values); missing ones take their defaults."""
        if not isinstance(options, Mapping):
            raise ValueError(f"options: expected a dict of option names to values, got {type(options).__name__}")
        hints = _option_fields(cls)
        values = {}
        for key, value in options.items():
            if key not in hints:
                raise ValueError(f"options: architecture {architecture!r} has no option {key!r}; "
                                 f"valid options: {sorted(hints)}")
            values[key] = _coerce_option(hints[key], value)
            if values[key] is _NO_MATCH:
                raise ValueError(f"options[{key!r}] of architecture {architecture!r}: expected "
                                 f"{_option_type(hints[key])}, got {value!r} ({type(value).__name__})")
        return cls(**values)

    def check(self, cfg: ModelConfig) -> None:
        """Refuse, with a ValueError, option values that do not fit the rest of ``cfg`` (nothing to refuse here)."""

    @classmethod
    def from_config(cls: type[_Options], cfg: ModelConfig) -> _Options:
        """The options of ``cfg`` (parsed from ``cfg.options`` and checked against the other fields)."""
        parsed = cls.parse(cfg.architecture, cfg.options)
        parsed.check(cfg)
        return parsed
