"""HookedRecurrentModel: a TransformerLens ``HookedRootModule`` for matrix-state recurrent LMs.

The class is assembled from one mixin per concern: :class:`~recurrent_lens.models.tokens.Tokenization`
(text and token ids), :class:`~recurrent_lens.models.hook_names.HookAliases` (TransformerLens' hook names),
:class:`~recurrent_lens.models.tl_compat.TLWeights` (TransformerLens' weights),
:class:`~recurrent_lens.models.generation.Generation` (``generate``) and
:class:`~recurrent_lens.sae.saes_on_model.HookedSAEMethods` (SAELens' SAE methods); this module holds
construction, the forward pass, caching and harvesting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from recurrent_lens.config import ModelConfig
from recurrent_lens.models import attribution
from recurrent_lens.models.activation_cache import RecurrentActivationCache
from recurrent_lens.models.block import Block, TiedUnembed, Unembed
from recurrent_lens.models.cache import RecurrentCache
from recurrent_lens.models.components import ShortConv, make_norm
from recurrent_lens.models.generation import Generation
from recurrent_lens.models.hook_names import HookAliases
from recurrent_lens.models.loading import load_pretrained
from recurrent_lens.models.mixer import CaptureRequest, HarvestRequest, fire
from recurrent_lens.models.registry import get_architecture
from recurrent_lens.models.tl_compat import TLWeights
from recurrent_lens.models.tokens import Tokenization, TokensLike
from recurrent_lens.sae.saes_on_model import HookedSAEMethods
from recurrent_lens.states import cells as cells_lib
from recurrent_lens.states import harvest as harvesting


class HookedRecurrentModel(Tokenization, HookAliases, TLWeights, Generation, HookedSAEMethods,
                           HookedRootModule):
    """A recurrent language model with a named hook point for every per-token write and state.

    Build one with :meth:`from_pretrained` (a local directory or hub id in any supported reference format)
    or :meth:`from_config`. TransformerLens' attention weights and per-head sweeps: see
    :mod:`recurrent_lens.models.tl_compat`. ``run_with_hooks``, ``run_with_cache``, ``hooks()``, ``add_hook`` and
    ``reset_hooks`` work as in TransformerLens; ``run_with_cache`` returns an ``ActivationCache``
    and ``pos_slice`` always slices the position axis.

    Top-level hook points: ``hook_embed`` [batch, pos, d_model], every block's (see
    :class:`~recurrent_lens.models.block.Block`), its mixer's (see :class:`~recurrent_lens.models.mixer.MatrixMixer`),
    ``ln_final.hook_normalized``.

    Absolute positions: while a forward runs, ``model.positions`` holds the absolute positions
    ``[pos]`` of the tokens being processed (``cache.seq_len + arange(pos)`` with a cache, so during
    ``generate`` it is the position of each new token). A hook reads it through a closure::

        def hook(x, hook):
            print(model.positions)  # e.g. tensor([7]) on the 8th token of generate()

    Threads: ``model.positions`` is per thread (each thread sees the positions of its own forward), but
    hooks, cache requests and spliced SAEs belong to the model, not to the thread that added them: a
    hook added in one thread fires in every thread's forwards, and ``run_with_hooks`` or
    ``run_with_cache`` in two threads at once see and remove each other's hooks. Forwards, ``states_at``,
    ``harvest``, ``write_contributions`` and ``implicit_attention`` without hooks may run concurrently (a
    harvest's or an attribution's request travels with its own forward, never on the model); with hooks,
    use one model per thread or hold a lock around each run.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=2, d_vocab=50,
        ...                   n_heads=2, d_k=8, d_v=8, d_mlp=64)
        >>> model = HookedRecurrentModel.from_config(cfg, seed=0)
        >>> logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter="blocks.1.mixer.hook_state")
        >>> tuple(cache["blocks.1.mixer.hook_state"].shape)
        (1, 3, 2, 8, 8)
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.checkpoint_files: list[str] | None = None
        """Weight files the model was loaded from (``from_pretrained``); they identify its weights."""
        arch = get_architecture(cfg.architecture)
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.ln_embed = arch.embed_norm(cfg) if arch.embed_norm is not None else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = TiedUnembed(self.embed) if cfg.tie_embeddings else Unembed(cfg)
        self.positions = None
        self.setup()

    @property
    def positions(self) -> Tensor | None:
        """The absolute positions ``[pos]`` of the tokens of this thread's current (or last) forward."""
        return getattr(self._thread_state(), "positions", None)

    @positions.setter
    def positions(self, value: Tensor | None) -> None:
        self._thread_state().positions = value

    def _thread_state(self) -> threading.local:
        # created lazily and dropped from pickles/deep copies, which cannot hold a threading.local
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__["_local"] = threading.local()
        return local

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: ModelConfig, *, seed: int | None = None, tokenizer: Any = None) -> HookedRecurrentModel:
        """A randomly initialised model (weights in ``cfg.dtype`` on ``cfg.device``).

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
            ...                   n_heads=2, d_k=8, d_v=8)
            >>> HookedRecurrentModel.from_config(cfg, seed=0).cfg.n_layers
            1
        """
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(cfg, tokenizer=tokenizer)
        return model.to(device=cfg.device, dtype=cfg.torch_dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs: Any) -> HookedRecurrentModel:
        """Load a checkpoint in any supported reference format (see :mod:`recurrent_lens.models.loading`).

        Args:
            name_or_path: a local directory; else the name of a model that ships with the package
                (:func:`~recurrent_lens.list_pretrained`, loaded offline); else a hub id (fetched with
                huggingface_hub).
            dtype: weight dtype (default: the checkpoint's ``torch_dtype`` or fp32; fp32 for shipped models).
            device: where the weights go; they are streamed there shard by shard.
        """
        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, **kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        kinds = "".join("A" if t == "attention" else "R" for t in c.layer_types)
        return (f"HookedRecurrentModel({c.architecture}: {c.n_layers} layers [{kinds}], d_model={c.d_model}, "
                f"heads={c.n_heads}×(d_k={c.d_k}, d_v={c.d_v}), vocab={c.d_vocab}, dtype={c.dtype}"
                f"{', source=' + str(c.source) if c.source else ''})")

    # ------------------------------------------------------------------ forward
    def make_cache(self) -> RecurrentCache:
        """An empty :class:`RecurrentCache` for this model."""
        return RecurrentCache(self.cfg.n_layers)

    def forward(
        self,
        input: TokensLike,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        *,
        cache: RecurrentCache | None = None,
        initial_states: dict[int, Float[Tensor, "batch head d_k d_v"]] | None = None,
        stop_at_layer: int | None = None,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> Any:
        """Run the model.

        Args:
            input: token ids ``[batch, pos]`` (or ``[pos]``; a tensor of any integer dtype or a list of
                ints), or text.
            return_type: ``"logits"`` (``[batch, pos, d_vocab]``, fp32), ``"loss"`` (next-token
                cross-entropy), ``"both"`` or ``None``.
            cache: a :class:`RecurrentCache` to start from and update in place (continues a sequence).
                The update is all or nothing: every layer and ``seq_len`` change together when the
                forward returns, and a forward that raises (in a hook, say) leaves the cache as it was.
                A cache built for another batch size or model shape is refused with a ValueError.
            initial_states: ``{layer: state [batch, head, d_k, d_v]}`` to start recurrent layers from
                (any floating dtype and device: converted to fp32 on the model's device).
            stop_at_layer: as in TransformerLens: run blocks ``0 .. stop_at_layer - 1`` only and return the
                residual stream entering block ``stop_at_layer`` (negative values count from the end).
            loss_per_token: with a loss, return it per position ``[batch, pos - 1]``.
            prepend_bos, padding_side: how text is tokenized (see :meth:`to_tokens`); token ids are used as
                given, as in TransformerLens (whose tools, SAELens' ``ActivationsStore`` among them, pass
                ``prepend_bos=False`` with tokens).
        """
        return self._forward(input, return_type, cache=cache, initial_states=initial_states,
                             stop_at_layer=stop_at_layer, loss_per_token=loss_per_token, prepend_bos=prepend_bos,
                             padding_side=padding_side)

    def _forward(self, input: TokensLike, return_type: str | None, *, cache: RecurrentCache | None = None,
                 initial_states: dict[int, Tensor] | None = None, stop_at_layer: int | None = None,
                 loss_per_token: bool = False, harvest: dict[int, HarvestRequest] | None = None,
                 capture: dict[int, CaptureRequest] | None = None, prepend_bos: bool | None = None,
                 padding_side: str | None = None) -> Any:
        tokens = self._tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        B, T = tokens.shape
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type: expected 'logits', 'loss', 'both' or None, got {return_type!r}")
        if stop_at_layer is not None:
            n = self.cfg.n_layers
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) or not -n <= stop_at_layer <= n:
                raise ValueError(f"stop_at_layer: expected an int in [{-n}, {n}] or None, got {stop_at_layer!r}")
        if cache is not None and initial_states:
            raise ValueError("pass either cache or initial_states, not both (put the states into the cache)")
        if cache is not None and len(self.blocks[:stop_at_layer]) < len(self.blocks):
            raise ValueError(f"stop_at_layer: {stop_at_layer} cannot be combined with cache (the later layers would "
                             "not advance, leaving the cache inconsistent); run without stop_at_layer")
        if initial_states:
            cache = self._cache_from_states(initial_states, B)
        work = None
        if cache is not None:
            if not isinstance(cache, RecurrentCache):
                raise TypeError(f"cache: expected a RecurrentCache, got {type(cache).__name__}")
            cache.check(self.cfg, B, {layer: (m.channels, m.kernel - 1) for layer, block in enumerate(self.blocks)
                                      for m in block.modules() if isinstance(m, ShortConv)})
            # every layer updates this fork; the caller's cache takes it over only once the forward succeeded
            work = cache.fork(device=tokens.device)
        offset = cache.seq_len if cache is not None else 0
        self.positions = torch.arange(offset, offset + T, device=tokens.device)
        ctx = get_architecture(self.cfg.architecture).mixer.context_type(positions=self.positions, tokens=tokens,
                                                                          harvest=harvest or {},
                                                                          capture=capture or {})
        x = fire(self.hook_embed, self.embed(tokens))
        if self.cfg.residual_in_fp32:
            x = x.float()
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        for layer, block in enumerate(self.blocks[:stop_at_layer]):
            x = block(x, None if work is None else work[layer], ctx)
        result: Any = x
        if stop_at_layer is None:
            x = self.ln_final(x)
            weight = self.embed.weight if self.unembed is None else self.unembed.weight
            logits = F.linear(x.to(weight.dtype), weight).float()
            result = logits if return_type == "logits" else None
            if return_type in ("loss", "both"):
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                       reduction="none").view(B, T - 1)
                loss = loss if loss_per_token else loss.mean()
                result = loss if return_type == "loss" else (logits, loss)
        if work is not None:
            work.seq_len += T
            cache.commit(work)
        return result

    def _cache_from_states(self, states: dict[int, Tensor], batch: int) -> RecurrentCache:
        cache = self.make_cache()
        cfg = self.cfg
        for layer, S in states.items():
            if layer not in cfg.recurrent_layers:
                raise ValueError(f"initial_states: layer {layer} is not a recurrent layer; recurrent layers: {cfg.recurrent_layers}")
            if not isinstance(S, Tensor) or not S.is_floating_point():
                got = f"a tensor of dtype {S.dtype}" if isinstance(S, Tensor) else type(S).__name__
                raise TypeError(f"initial_states[{layer}]: expected a floating-point tensor, got {got}")
            expected = (batch, cfg.n_heads, cfg.d_k, cfg.d_v)
            if tuple(S.shape) != expected:
                raise ValueError(f"initial_states[{layer}]: expected shape {expected}, got {tuple(S.shape)}")
            cache[layer].state = S.to(device=self.embed.weight.device, dtype=torch.float32)
        return cache

    # ------------------------------------------------------------------ caching
    def run_with_cache(self, *model_args: Any, pos_slice: Any = None, remove_batch_dim: bool = False,
                       **kwargs: Any) -> tuple[Any, RecurrentActivationCache]:
        """Like TransformerLens' ``run_with_cache``, but returns an ``ActivationCache`` (a
        :class:`RecurrentActivationCache`) and ``pos_slice`` slices the position axis of every activation
        (dim 1 for ``[batch, pos, ...]``, dim 2 for attention patterns), never a state's ``d_k`` axis.
        ``names_filter`` may name aliases (see :meth:`setup`); each activation is cached once, under its
        hook point's own name, and the cache also answers to the aliases and TransformerLens' short names.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
            ...                   n_heads=2, d_k=8, d_v=4)
            >>> model = HookedRecurrentModel.from_config(cfg, seed=0)
            >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), pos_slice=-1)
            >>> tuple(cache["blocks.0.mixer.hook_state"].shape), tuple(cache["state", 0].shape)
            ((1, 1, 2, 8, 4), (1, 1, 2, 8, 4))
        """
        out, raw = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if pos_slice is not None:
            sl = Slice.unwrap(pos_slice)
            for name, t in raw.items():
                dim = (2 if name.endswith("hook_pattern") else 1) - (1 if remove_batch_dim else 0)
                if t.dim() > dim:
                    raw[name] = sl.apply(t, dim=dim)
        return out, RecurrentActivationCache(raw, self, has_batch_dim=not remove_batch_dim)

    def recurrent_hook_names(self, hook: str = "hook_state") -> list[str]:
        """Full names of one mixer hook across all recurrent layers, e.g. ``blocks.{l}.mixer.hook_state``."""
        return [f"blocks.{l}.mixer.{hook}" for l in self.cfg.recurrent_layers]

    # ------------------------------------------------------------------ harvesting
    def matrix_site(self, hook_name: str) -> tuple[int, str]:
        """``(layer, "state" | "write")`` of a per-step matrix hook ``blocks.{l}.mixer.hook_state|hook_write``
        (see :func:`recurrent_lens.states.cells.matrix_site`).

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> model.matrix_site("blocks.1.mixer.hook_write")
            (1, 'write')
        """
        return cells_lib.matrix_site(self.cfg, hook_name)

    def harvest(self, tokens: TokensLike, positions: Tensor | Sequence[Any],
                cells: Iterable[tuple[str, int]], *, capture: dict[int, CaptureRequest] | None = None
                ) -> dict[tuple[str, int], Float[Tensor, "batch n d_k d_v"]]:
        """Per-step matrices of many ``(hook_name, head)`` cells at chosen positions, from one forward that
        never forms ``[batch, pos, head, d_k, d_v]``: see :func:`recurrent_lens.states.harvest.harvest`.

        Returns:
            ``{(hook_name, head): [batch, n, d_k, d_v]}`` in fp32.

        Example:
            >>> out = tiny_model.harvest(tiny_tokens, [2, 5], [("blocks.0.mixer.hook_write", 1)])
            >>> tuple(out["blocks.0.mixer.hook_write", 1].shape)
            (2, 2, 8, 8)
        """
        return harvesting.harvest(self, tokens, positions, cells, capture=capture)

    def states_at(self, tokens: TokensLike, layer: int, positions: Tensor | Sequence[Any],
                  heads: int | Sequence[int] | None = None,
                  what: str = "state") -> Float[Tensor, "batch n head d_k d_v"]:
        """The per-step matrices of ``blocks.{layer}.mixer`` at ``positions``, ``[batch, n, head, d_k, d_v]``
        fp32, without the full tensor: see :func:`recurrent_lens.states.harvest.states_at`.

        Example:
            >>> tuple(tiny_model.states_at(tiny_tokens, 0, [3, 7], heads=[1]).shape)
            (2, 2, 1, 8, 8)
        """
        return harvesting.states_at(self, tokens, layer, positions, heads, what)

    # ------------------------------------------------------------------ write attribution
    def write_contributions(self, tokens: TokensLike, layer: int,
                            read_positions: Tensor | Sequence[Any] | None = None,
                            heads: int | Sequence[int] | None = None, *,
                            initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
                            progress: bool | None = None) -> attribution.WriteContributions:
        """``blocks.{layer}.mixer.hook_read`` split exactly into one term per past write, an initial-state term
        and the architecture's extra: see :func:`recurrent_lens.models.attribution.write_contributions`.

        Example:
            >>> c = tiny_model.write_contributions(tiny_tokens, 0, read_positions=[5])
            >>> tuple(c.writes.shape), tuple(c.initial.shape)
            ((2, 1, 2, 8, 8), (2, 1, 2, 8))
        """
        return attribution.write_contributions(self, tokens, layer, read_positions, heads,
                                               initial_state=initial_state, progress=progress)

    def implicit_attention(self, tokens: TokensLike, layer: int, heads: int | Sequence[int] | None = None, *,
                           progress: bool | None = None) -> Float[Tensor, "batch head t s"]:
        """The share of each read ``S_tᵀ q_t`` that each past write supplies, ``[batch, head, t, s]``, rows
        summing to 1: see :func:`recurrent_lens.models.attribution.implicit_attention`.

        Example:
            >>> tuple(tiny_model.implicit_attention(tiny_tokens, 0).shape)
            (2, 2, 8, 8)
        """
        return attribution.implicit_attention(self, tokens, layer, heads, progress=progress)
