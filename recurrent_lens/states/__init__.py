"""States: which ones (cells), where they are sampled, how they are harvested, and their files on disk.

- :mod:`recurrent_lens.states.cells`: :class:`~recurrent_lens.states.cells.Cell`, the one ``(hook_name,
  head)`` type, with the parsing and range checks of hook names, heads, layers and positions, and
  position sampling.
- :mod:`recurrent_lens.states.harvest`: a model's per-step matrices at chosen cells and positions, from one
  forward (what ``HookedRecurrentModel.harvest`` and ``states_at`` run).
- :mod:`recurrent_lens.states.store`: the sharded on-disk state store (:class:`~recurrent_lens.states.store.
  StateStore`, :func:`~recurrent_lens.states.store.harvest_to_store`).
- :mod:`recurrent_lens.states.files`: the validated safetensors reader, atomic writes, writability checks
  and the output-directory lock.
"""
