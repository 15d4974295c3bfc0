"""HookedRecurrentModel: a TransformerLens ``HookedRootModule`` for matrix-state recurrent LMs."""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Integer
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.attention import Attention
from recurrent_lens.models.cache import LayerCache, RecurrentCache
from recurrent_lens.models.components import ShortConv, make_mlp, make_norm
from recurrent_lens.models.mixer import HarvestDone, HarvestRequest, fire
from recurrent_lens.models.registry import get_architecture

TokensLike = (str | list[str] | list[int] | list[list[int]]
              | Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"])
"""Text (a string or a list of strings), token ids as a list (``[pos]`` or ``[batch][pos]``) or as a
tensor of any integer dtype."""

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(ln1 x)``, then ``+ mlp(ln2 x)`` when the block has an MLP.

    Hook points, in execution order::

        hook_resid_pre   [batch, pos, d_model]
        hook_mixer_out   [batch, pos, d_model]
        hook_resid_mid   [batch, pos, d_model]
        hook_mlp_out     [batch, pos, d_model]   (blocks with an MLP)
        hook_resid_post  [batch, pos, d_model]

    The mixer is ``blocks.{l}.mixer`` (a MatrixMixer) in recurrent layers and ``blocks.{l}.attn`` in the
    softmax-attention layers of hybrids.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.is_attention = cfg.layer_types[layer] == "attention"
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = make_norm(cfg)
        if self.is_attention:
            self.attn = Attention(cfg, layer)
        else:
            self.mixer = get_architecture(cfg.architecture).mixer(cfg, layer)
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.mlp = make_mlp(cfg)
        if self.mlp is not None:
            self.ln2 = make_norm(cfg)
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor, cache: LayerCache | None = None, ctx: dict[str, Any] | None = None) -> Tensor:
        x = fire(self.hook_resid_pre, x)
        mixer = self.attn if self.is_attention else self.mixer
        x = fire(self.hook_resid_mid, x + fire(self.hook_mixer_out, mixer(self.ln1(x), cache, ctx)).to(x.dtype))
        if self.mlp is not None:
            x = x + fire(self.hook_mlp_out, self.mlp(self.ln2(x), cache)).to(x.dtype)
        return fire(self.hook_resid_post, x)


class Unembed(nn.Module):
    """The untied unembedding ``W_U`` ``[d_vocab, d_model]`` (tied models read ``embed.weight``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.d_model**-0.5)


class HookedRecurrentModel(HookedRootModule):
    """A recurrent language model with a named hook point for every per-token write and state.

    Build one with :meth:`from_pretrained` (a local directory or hub id in any supported reference format)
    or :meth:`from_config`. ``run_with_hooks``, ``run_with_cache``, ``hooks()``, ``add_hook`` and
    ``reset_hooks`` work as in TransformerLens; ``run_with_cache`` returns an ``ActivationCache``
    and ``pos_slice`` always slices the position axis.

    Top-level hook points: ``hook_embed`` [batch, pos, d_model], every block's (see :class:`Block`),
    its mixer's (see :class:`~recurrent_lens.models.mixer.MatrixMixer`), ``ln_final.hook_normalized``.

    Absolute positions: while a forward runs, ``model.positions`` holds the absolute positions
    ``[pos]`` of the tokens being processed (``cache.seq_len + arange(pos)`` with a cache, so during
    ``generate`` it is the position of each new token). A hook reads it through a closure::

        def hook(x, hook):
            print(model.positions)  # e.g. tensor([7]) on the 8th token of generate()

    Threads: ``model.positions`` is per thread (each thread sees the positions of its own forward), but
    hooks, cache requests and spliced SAEs belong to the model, not to the thread that added them: a
    hook added in one thread fires in every thread's forwards, and ``run_with_hooks`` or
    ``run_with_cache`` in two threads at once see and remove each other's hooks. Forwards without
    hooks may run concurrently; with hooks, use one model per thread or hold a lock around each run.

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
        arch = get_architecture(cfg.architecture)
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.ln_embed = arch.embed_norm(cfg) if arch.embed_norm is not None else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = None if cfg.tie_embeddings else Unembed(cfg)
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
            name_or_path: a local directory or a hub id (fetched with huggingface_hub).
            dtype: weight dtype (default: the checkpoint's ``torch_dtype`` or fp32).
            device: where the weights go; they are streamed there shard by shard.
        """
        from recurrent_lens.models.loading import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, **kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        kinds = "".join("A" if t == "attention" else "R" for t in c.layer_types)
        return (f"HookedRecurrentModel({c.architecture}: {c.n_layers} layers [{kinds}], d_model={c.d_model}, "
                f"heads={c.n_heads}×(d_k={c.d_k}, d_v={c.d_v}), vocab={c.d_vocab}, dtype={c.dtype}"
                f"{', source=' + str(c.source) if c.source else ''})")

    # ------------------------------------------------------------------ tokens
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load from a directory with tokenizer files")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], *, add_special_tokens: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize with the checkpoint's tokenizer into ``[batch, pos]`` ids (a string gives batch 1)."""
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        ids = [tok(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        if len({len(i) for i in ids}) > 1:
            raise ValueError(f"to_tokens: texts tokenize to different lengths {[len(i) for i in ids]}; "
                             "batch equal-length texts (padding is not supported by recurrent states)")
        return torch.tensor(ids, dtype=torch.long, device=self.cfg.device)

    def to_string(self, tokens: Int[Tensor, "..."] | list[int]) -> str | list[str]:
        """Decode ids: ``[pos]`` gives a string, ``[batch, pos]`` a list of strings."""
        tok = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            return tok.decode(tokens.tolist())
        return [tok.decode(t.tolist()) for t in tokens]

    def to_str_tokens(self, input: str | Int[Tensor, "..."]) -> list[str]:
        """One string per token of a single sequence."""
        tokens = self.to_tokens(input)[0] if isinstance(input, str) else torch.as_tensor(input).reshape(-1)
        return [self._require_tokenizer().decode([t]) for t in tokens.tolist()]

    def _tokens(self, input: TokensLike) -> Int[Tensor, "batch pos"]:
        text = _is_text(input)
        if text:
            tokens = self.to_tokens(input)
        elif isinstance(input, list):
            tokens = _ids_from_list(input)
        else:
            tokens = input
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens: expected an integer tensor, a list of token ids or text, "
                            f"got {type(tokens).__name__}")
        if tokens.dtype not in _ID_DTYPES:
            why = " (a bool tensor is a mask, not token ids)" if tokens.dtype == torch.bool else ""
            raise TypeError(f"tokens: expected integer token ids, got a tensor of dtype {tokens.dtype}{why}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape [batch, pos], got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens: expected at least one sequence of at least one token, got shape "
                             f"{tuple(tokens.shape)}{' (the text tokenized to no tokens)' if text else ''}")
        tokens = tokens.to(device=self.embed.weight.device, dtype=torch.long)
        if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
            raise ValueError(f"tokens: ids must lie in [0, {self.cfg.d_vocab}) (d_vocab), "
                             f"got min {int(tokens.min())} and max {int(tokens.max())}")
        return tokens

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
        """
        tokens = self._tokens(input)
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
        ctx: dict[str, Any] = {"positions": self.positions, "tokens": tokens}
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
                       **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Like TransformerLens' ``run_with_cache``, but returns an ``ActivationCache`` and ``pos_slice``
        slices the position axis of every activation (dim 1 for ``[batch, pos, ...]``, dim 2 for
        attention patterns), never a state's ``d_k`` axis.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
            ...                   n_heads=2, d_k=8, d_v=4)
            >>> model = HookedRecurrentModel.from_config(cfg, seed=0)
            >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), pos_slice=-1)
            >>> tuple(cache["blocks.0.mixer.hook_state"].shape)
            (1, 1, 2, 8, 4)
        """
        out, raw = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if pos_slice is not None:
            from transformer_lens.utilities import Slice

            sl = Slice.unwrap(pos_slice)
            for name, t in raw.items():
                dim = (2 if name.endswith("hook_pattern") else 1) - (1 if remove_batch_dim else 0)
                if t.dim() > dim:
                    raw[name] = sl.apply(t, dim=dim)
        return out, ActivationCache(raw, self, has_batch_dim=not remove_batch_dim)

    def recurrent_hook_names(self, hook: str = "hook_state") -> list[str]:
        """Full names of one mixer hook across all recurrent layers, e.g. ``blocks.{l}.mixer.hook_state``."""
        return [f"blocks.{l}.mixer.{hook}" for l in self.cfg.recurrent_layers]

    # ------------------------------------------------------------------ harvesting
    def matrix_site(self, hook_name: str) -> tuple[int, str]:
        """``(layer, "state" | "write")`` of a per-step matrix hook ``blocks.{l}.mixer.hook_state|hook_write``.

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> model.matrix_site("blocks.1.mixer.hook_write")
            (1, 'write')
        """
        parts = hook_name.split(".") if isinstance(hook_name, str) else []
        kinds = {"hook_state": "state", "hook_write": "write"}
        ok = (len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "mixer"
              and parts[3] in kinds)
        if not ok:
            raise ValueError(f"hook_name: expected 'blocks.{{layer}}.mixer.hook_state' or '...hook_write', "
                             f"got {hook_name!r}")
        layer = int(parts[1])
        if layer not in self.cfg.recurrent_layers:
            raise ValueError(f"hook_name: {hook_name!r} names layer {layer}, which is not a recurrent layer; "
                             f"recurrent layers: {self.cfg.recurrent_layers}")
        return layer, kinds[parts[3]]

    def _positions(self, positions: Any, batch: int, length: int) -> Tensor:
        pos = torch.as_tensor(positions, device=self.embed.weight.device)
        if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise TypeError(f"positions: expected integer positions, got dtype {pos.dtype}")
        if pos.dim() == 1:
            pos = pos[None].expand(batch, -1)
        if pos.dim() != 2 or pos.shape[0] != batch:
            raise ValueError(f"positions: expected shape [batch={batch}, n] (or [n] for every sequence), "
                             f"got {tuple(pos.shape)}")
        if pos.numel() and (pos.min() < 0 or pos.max() >= length):
            raise ValueError(f"positions: expected values in [0, {length}) (the sequence length), "
                             f"got min {int(pos.min())} and max {int(pos.max())}")
        return pos.long()

    def _heads(self, heads: int | Sequence[int] | None, what: str) -> list[int]:
        H = self.cfg.n_heads
        if heads is None:
            return list(range(H))
        listed = [heads] if isinstance(heads, int) else list(heads)
        bad = [h for h in listed if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < H]
        if bad or not listed:
            raise ValueError(f"heads ({what}): expected head indices in [0, {H}), got {heads!r}")
        return listed

    def harvest(self, tokens: TokensLike, positions: Tensor | Sequence[Any],
                cells: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Float[Tensor, "batch n d_k d_v"]]:
        """Per-step matrices of many ``(hook_name, head)`` cells at chosen positions, from one forward.

        The forward runs only up to the deepest layer named and never forms ``[batch, pos, head, d_k, d_v]``:
        each layer's states at chunk boundaries come from its chunked scan, and each requested position
        replays at most one chunk on the requested heads. Writes (``hook_write``) are gathered at the
        positions without any scan. Memory beyond the forward itself is
        ``O(batch · n_chunks · heads · d_k · d_v + batch · n · heads · d_k · d_v)`` per harvested layer.
        Hooks attached upstream (``hook_q/k/v/beta/decay/write`` of these layers, anything in earlier
        layers) apply as in a forward; hooks on a harvested layer's ``hook_state``/``hook_erase`` are refused.

        Args:
            tokens: ``[batch, pos]`` token ids.
            positions: ``[batch, n]`` positions per sequence, or ``[n]`` for every sequence.
            cells: ``(hook_name, head)`` pairs, hook names ``blocks.{l}.mixer.hook_state`` (``S_t``) or
                ``blocks.{l}.mixer.hook_write`` (``W_t``).

        Returns:
            ``{(hook_name, head): [batch, n, d_k, d_v]}`` in fp32.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gated_deltanet", d_model=32,
            ...     n_layers=2, d_vocab=50, n_heads=2, d_k=8, d_v=4), seed=0)
            >>> out = model.harvest(torch.randint(0, 50, (3, 20)), [2, 19],
            ...                     [("blocks.0.mixer.hook_state", 1), ("blocks.1.mixer.hook_write", 0)])
            >>> tuple(out["blocks.0.mixer.hook_state", 1].shape)
            (3, 2, 8, 4)
        """
        requests: dict[int, dict[str, list[int]]] = {}
        cells = list(cells)
        if not cells:
            raise ValueError("cells: expected at least one (hook_name, head) pair, got none")
        for cell in cells:
            if not (isinstance(cell, tuple) and len(cell) == 2):
                raise ValueError(f"cells: expected (hook_name, head) pairs, got {cell!r}")
            layer, what = self.matrix_site(cell[0])
            head = cell[1]
            if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.cfg.n_heads:
                raise ValueError(f"cells: expected a head index in [0, {self.cfg.n_heads}) for {cell[0]}, got {head!r}")
            heads = requests.setdefault(layer, {}).setdefault(what, [])
            if head not in heads:
                heads.append(head)
        out = self._harvest(tokens, positions, requests)
        return {(name, head): out[layer][what][:, :, requests[layer][what].index(head)]
                for name, head in cells for layer, what in [self.matrix_site(name)]}

    def states_at(self, tokens: TokensLike, layer: int, positions: Tensor | Sequence[Any],
                  heads: int | Sequence[int] | None = None,
                  what: str = "state") -> Float[Tensor, "batch n head d_k d_v"]:
        """The per-step matrices of ``blocks.{layer}.mixer`` at ``positions``, without the full tensor.

        Equals ``run_with_cache(tokens)[f"blocks.{layer}.mixer.hook_state"][rows, positions][:, :, heads]``
        (``hook_write`` for ``what="write"``) within fp32 tolerance, at the memory cost given in
        :meth:`harvest`: the states at chunk boundaries, plus at most one chunk replayed per requested
        position on the requested heads. The forward stops after ``layer``.

        Args:
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
            >>> S = model.states_at(tokens, 1, torch.tensor([[3, 17], [0, 9]]), heads=[1])
            >>> _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_state")
            >>> full = cache["blocks.1.mixer.hook_state"]
            >>> bool(torch.allclose(S[1, 1, 0], full[1, 9, 1], atol=1e-6)), tuple(S.shape)
            (True, (2, 2, 1, 8, 4))
        """
        if what not in ("state", "write"):
            raise ValueError(f"what: expected 'state' or 'write', got {what!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in self.cfg.recurrent_layers:
            raise ValueError(f"layer: expected a recurrent layer {self.cfg.recurrent_layers}, got {layer!r}")
        return self._harvest(tokens, positions, {layer: {what: self._heads(heads, what)}})[layer][what]

    def _harvest(self, tokens: TokensLike, positions: Any,
                 requests: dict[int, dict[str, list[int]]]) -> dict[int, dict[str, Tensor]]:
        tokens = self._tokens(tokens)
        pos = self._positions(positions, *tokens.shape)
        deepest = max(requests)
        mixers = {layer: self.blocks[layer].mixer for layer in requests}
        for layer, heads in requests.items():
            mixers[layer].harvest_request = HarvestRequest(pos, heads, last=layer == deepest)
        try:
            self.forward(tokens, return_type=None, stop_at_layer=deepest + 1)
        except HarvestDone:
            pass
        finally:
            found = {layer: mixer.harvest_request.out for layer, mixer in mixers.items()}
            for mixer in mixers.values():
                mixer.harvest_request = None
        return found

    # ------------------------------------------------------------------ SAEs
    def add_sae(self, sae: nn.Module, hook_name: str, head: int, *, use_error_term: bool | None = None) -> None:
        """Splice an SAE's reconstruction into ``head`` of a matrix hook (see :mod:`recurrent_lens.sae.attach`)."""
        from recurrent_lens.sae.attach import add_sae

        add_sae(self, sae, hook_name, head, use_error_term=use_error_term)

    def reset_saes(self) -> None:
        """Detach every SAE added with :meth:`add_sae`."""
        from recurrent_lens.sae.attach import reset_saes

        reset_saes(self)

    @contextmanager
    def saes(self, saes: Sequence[tuple[nn.Module, str, int]], *, use_error_term: bool | None = None) -> Iterator[HookedRecurrentModel]:
        """Attach ``(sae, hook_name, head)`` triples for the duration of a ``with`` block."""
        from recurrent_lens.sae.attach import saes as attach_saes

        with attach_saes(self, saes, use_error_term=use_error_term):
            yield self

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: TokensLike,
        max_new_tokens: int = 10,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        stop_at_eos: bool = True,
        seed: int | None = None,
        cache: RecurrentCache | None = None,
        return_type: Literal["tokens", "str"] | None = None,
        verbose: bool = False,
    ) -> Any:
        """Decode with a per-layer recurrent cache: O(1) work per new token in recurrent layers.

        Every hook fires on every step (the prompt in one call, then one call per new token);
        ``model.positions`` tells hooks where they are. Editing a write or a state during a step
        changes the cache and therefore every later token.

        Args:
            input: prompt ids ``[batch, pos]`` (tensor or list of ints) or text; at least one token.
            max_new_tokens: tokens to add.
            do_sample: sample instead of greedy argmax (with ``temperature`` > 0, ``top_k`` >= 1 and
                ``top_p`` in (0, 1]).
            eos_token_id: stop a sequence there (defaults to the tokenizer's) when ``stop_at_eos``.
            cache: continue from this cache instead of an empty one. Like transformers, the last generated
                token is returned but not fed through the model, so the cache ends one token before the
                returned sequence. The cache is updated only when ``generate`` returns: if a step raises
                (a hook, say), the exception propagates and the cache is exactly as it was passed in.
            return_type: ``"tokens"`` or ``"str"``; default: strings for text input, tokens otherwise.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
            ...                   n_heads=2, d_k=8, d_v=8)
            >>> model = HookedRecurrentModel.from_config(cfg, seed=0)
            >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
            torch.Size([1, 7])
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        _check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        return_type = return_type or ("str" if _is_text(input) else "tokens")
        tokens = self._tokens(input)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache: expected a RecurrentCache, got {type(cache).__name__}")
        # the steps update a fork; the caller's cache takes it over only when every step succeeded
        target, cache = cache, (self.make_cache() if cache is None else cache.fork())
        logits = self(tokens, cache=cache)[:, -1]
        out = [tokens]
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            if eos_token_id is not None and stop_at_eos:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (stop_at_eos and eos_token_id is not None and bool(finished.all())):
                break
            logits = self(nxt[:, None], cache=cache)[:, -1]
        result = torch.cat(out, dim=1)
        result = self.to_string(result) if return_type == "str" else result
        if target is not None:
            target.commit(cache)
        return result


def sample_next(logits: Float[Tensor, "batch d_vocab"], *, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Int[Tensor, " batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering.

    Example:
        >>> import torch
        >>> from recurrent_lens.models.base import sample_next
        >>> sample_next(torch.tensor([[0.0, 2.0, 1.0]]))
        tensor([1])
        >>> sample_next(torch.tensor([[0.0, 2.0, 1.0]]), do_sample=True, top_k=1)
        tensor([1])
    """
    _check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _check_sampling(*, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number, got {temperature!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def _is_text(input: Any) -> bool:
    """A string or a non-empty list of strings (a list of ints is token ids)."""
    return isinstance(input, str) or (isinstance(input, list) and bool(input)
                                      and all(isinstance(t, str) for t in input))


def _is_id(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _ids_from_list(ids: list[Any]) -> Tensor:
    """``[pos]`` or ``[batch, pos]`` long ids from a list of ints or a list of equal-length lists of ints."""
    if not ids:
        raise ValueError("tokens: expected at least one token id, got an empty list")
    if all(_is_id(i) for i in ids):
        return torch.tensor([int(i) for i in ids], dtype=torch.long)
    if all(isinstance(row, list) for row in ids):
        bad = next((i for row in ids for i in row if not _is_id(i)), None)
        if bad is not None:
            raise TypeError(f"tokens: expected int token ids in every row, got {bad!r} ({type(bad).__name__})")
        lengths = [len(row) for row in ids]
        if len(set(lengths)) > 1:
            raise ValueError(f"tokens: expected rows of equal length, got lengths {lengths} "
                             "(padding is not supported by recurrent states)")
        return torch.tensor([[int(i) for i in row] for row in ids], dtype=torch.long)
    kinds = sorted({type(i).__name__ for i in ids})
    raise TypeError(f"tokens: a list must hold only str (text), only int (one sequence of ids) or only lists "
                    f"of int (a batch), got a list of {', '.join(kinds)}")
