"""The models: the hooked model, the shared mixer machinery and scan engine, and one file per architecture.

Each architecture file registers itself in :mod:`recurrent_lens.models.registry` when imported; the built-in
ones are imported here, so that they are registered whenever any part of the package is in use.
"""

from recurrent_lens.models import delta_net, gated_deltanet, gla, mamba2, rwkv7  # noqa: F401
