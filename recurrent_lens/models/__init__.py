"""The models: the hooked model, the shared mixer machinery and scan engine, and one file per architecture.

Each architecture file registers itself in :mod:`recurrent_lens.models.registry` when imported; the built-in
ones are imported by ``recurrent_lens`` itself, so that they are registered whenever any part of the package is
in use (here they would import :mod:`recurrent_lens.config` while it is still importing the registry).
"""
