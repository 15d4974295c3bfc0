"""Harvested states on disk.

This package will hold the cells, harvesting, the state store and their file helpers; for now it holds
the file helpers (:mod:`recurrent_lens.states.files`): the validated safetensors reader, atomic writes,
writability checks and the output-directory lock.
"""
