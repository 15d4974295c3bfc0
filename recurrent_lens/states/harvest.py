"""Harvesting: the per-step matrices of chosen cells at chosen positions, from one forward.

:func:`harvest` and :func:`states_at` are what :meth:`HookedRecurrentModel.harvest
<recurrent_lens.models.base.HookedRecurrentModel.harvest>` and :meth:`~recurrent_lens.models.base.
HookedRecurrentModel.states_at` run; :func:`harvest_cells` gives :class:`~recurrent_lens.states.cells.Cell`
keyed, flattened states for SAE training and the state store.

The forward runs only up to the deepest layer named and never forms ``[batch, pos, head, d_k, d_v]``:
each layer's states at chunk boundaries and its per-token update values come from its chunked scan, and
each requested state follows in closed form from its chunk's boundary state, on the requested heads
(RWKV-7's rule, and edited writes, replay at most one chunk instead). Writes (``hook_write``) are gathered
at the positions without any scan. Memory beyond the forward itself is
``O(batch · n_chunks · heads · d_k · d_v + batch · n · heads · (d_k · d_v + chunk · (d_k + d_v)))`` per
harvested layer.

Example:
    >>> import torch
    >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
    >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
    ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
    >>> out = harvest(model, torch.randint(0, 20, (2, 9)), [3, 8], [("blocks.1.mixer.hook_state", 0)])
    >>> tuple(out["blocks.1.mixer.hook_state", 0].shape)
    (2, 2, 4, 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.models.mixer import CaptureRequest, HarvestDone, HarvestRequest
from recurrent_lens.states.cells import Cell, check_heads, check_layer, check_positions, parse_cell

__all__ = ["harvest", "states_at", "harvest_cells"]


def harvest(model: Any, tokens: Any, positions: Tensor | Sequence[Any], cells: Iterable[Cell | tuple[str, int]], *,
            capture: dict[int, CaptureRequest] | None = None) -> dict[tuple[str, int], Float[Tensor, "batch n d_k d_v"]]:
    """Per-step matrices of many ``(hook_name, head)`` cells of ``model`` at chosen positions, from one
    forward (see the module docstring for its cost).

    Hooks attached upstream (``hook_q/k/v/beta/decay/write`` of these layers, anything in earlier layers)
    apply as in a forward; hooks on a harvested layer's ``hook_state``/``hook_erase`` are refused.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        tokens: ``[batch, pos]`` token ids (or text, tokenized as the model's forward does).
        positions: ``[batch, n]`` positions per sequence, or ``[n]`` for every sequence.
        cells: ``(hook_name, head)`` pairs or :class:`~recurrent_lens.states.cells.Cell` s, hook names
            ``blocks.{l}.mixer.hook_state`` (``S_t``) or ``blocks.{l}.mixer.hook_write`` (``W_t``).
        capture: ``{layer: CaptureRequest(stop=False)}``: the same forward also records those layers'
            recurrence inputs (:class:`~recurrent_lens.models.mixer.CaptureRequest`; layers up to the
            deepest harvested one).

    Returns:
        ``{(hook_name, head): [batch, n, d_k, d_v]}`` in fp32.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=2, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
        >>> out = harvest(model, torch.randint(0, 50, (3, 20)), [2, 19],
        ...               [("blocks.0.mixer.hook_state", 1), ("blocks.1.mixer.hook_write", 0)])
        >>> tuple(out["blocks.0.mixer.hook_state", 1].shape)
        (3, 2, 8, 4)
    """
    cells = list(cells)
    if not cells:
        raise ValueError("cells: expected at least one (hook_name, head) pair, got none")
    requests: dict[int, dict[str, list[int]]] = {}
    parsed = []
    for cell in cells:
        if not isinstance(cell, Cell) and not (isinstance(cell, tuple) and len(cell) == 2):
            raise ValueError(f"cells: expected (hook_name, head) pairs, got {cell!r}")
        cell = parse_cell(model, *((cell.hook_name, cell.head) if isinstance(cell, Cell) else cell))
        parsed.append(cell)
        heads = requests.setdefault(cell.layer, {}).setdefault(cell.kind, [])
        if cell.head not in heads:
            heads.append(cell.head)
    out = _harvest(model, tokens, positions, requests, capture)
    return {(c.hook_name, c.head): out[c.layer][c.kind][:, :, requests[c.layer][c.kind].index(c.head)]
            for c in parsed}


def states_at(model: Any, tokens: Any, layer: int, positions: Tensor | Sequence[Any],
              heads: int | Sequence[int] | None = None,
              what: str = "state") -> Float[Tensor, "batch n head d_k d_v"]:
    """The per-step matrices of ``blocks.{layer}.mixer`` at ``positions``, without the full tensor.

    Equals ``run_with_cache(tokens)[f"blocks.{layer}.mixer.hook_state"][rows, positions][:, :, heads]``
    (``hook_write`` for ``what="write"``) within fp32 tolerance, at the memory cost of :func:`harvest`: the
    states at chunk boundaries, plus at most one chunk replayed per requested position on the requested
    heads. The forward stops after ``layer``.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        tokens: ``[batch, pos]`` token ids.
        layer: a recurrent layer.
        positions: ``[batch, n]`` integer positions (one row per sequence), or ``[n]`` for every sequence.
        heads: a head, a list of heads, or ``None`` for all.
        what: ``"state"`` (``S_t``, after the update at ``t``) or ``"write"`` (``W_t``).

    Returns:
        ``[batch, n, head, d_k, d_v]`` fp32.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
        ...     n_layers=2, d_vocab=50, n_heads=2, d_k=8, d_v=4, chunk_size=8), seed=0)
        >>> tokens = torch.randint(0, 50, (2, 20))
        >>> S = states_at(model, tokens, 1, torch.tensor([[3, 17], [0, 9]]), heads=[1])
        >>> _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_state")
        >>> full = cache["blocks.1.mixer.hook_state"]
        >>> bool(torch.allclose(S[1, 1, 0], full[1, 9, 1], atol=1e-6)), tuple(S.shape)
        (True, (2, 2, 1, 8, 4))
    """
    if what not in ("state", "write"):
        raise ValueError(f"what: expected 'state' or 'write', got {what!r}")
    layer = check_layer(model.cfg, layer)
    heads = check_heads(heads, model.cfg.n_heads, what)
    return _harvest(model, tokens, positions, {layer: {what: heads}})[layer][what]


def harvest_cells(model: Any, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch n"],
                  cells: Sequence[Cell]) -> dict[Cell, Float[Tensor, "samples d_k d_v"]]:
    """Each cell's matrices at ``positions`` of ``tokens``, flattened to ``[batch · n, d_k, d_v]`` fp32,
    from one :func:`harvest` pass.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.states.cells import sample_positions
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
        >>> tokens = torch.randint(0, 20, (2, 9))
        >>> out = harvest_cells(model, tokens, sample_positions([0, 1], 9, 3), [Cell("blocks.1.mixer.hook_state", 0)])
        >>> tuple(out[Cell("blocks.1.mixer.hook_state", 0)].shape)
        (6, 4, 4)
    """
    got = harvest(model, tokens, positions, cells)
    return {c: got[c.hook_name, c.head].reshape(-1, *got[c.hook_name, c.head].shape[-2:]).float() for c in cells}


def _harvest(model: Any, tokens: Any, positions: Any, requests: dict[int, dict[str, list[int]]],
             capture: dict[int, CaptureRequest] | None = None) -> dict[int, dict[str, Tensor]]:
    tokens = model._tokens(tokens)
    pos = check_positions(positions, *tokens.shape, device=model.embed.weight.device)
    deepest = max(requests)
    # the requests ride in this forward's context: nothing is left on the (shared) mixers
    requests = {layer: HarvestRequest(pos, heads, last=layer == deepest) for layer, heads in requests.items()}
    try:
        model._forward(tokens, None, stop_at_layer=deepest + 1, harvest=requests, capture=capture)
    except HarvestDone:
        pass
    return {layer: request.out for layer, request in requests.items()}
