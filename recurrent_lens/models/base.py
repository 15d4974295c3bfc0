"""HookedRecurrentModel: a TransformerLens ``HookedRootModule`` for matrix-state recurrent LMs."""

from __future__ import annotations

import difflib
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
from transformer_lens.utilities import Slice, get_act_name

from recurrent_lens.config import ModelConfig
from recurrent_lens.models import attribution
from recurrent_lens.models.attention import Attention
from recurrent_lens.models.cache import LayerCache, RecurrentCache
from recurrent_lens.models.components import ShortConv, make_mlp, make_norm
from recurrent_lens.models.loading import load_pretrained
from recurrent_lens.models.mixer import CaptureRequest, ForwardContext, HarvestRequest, fire
from recurrent_lens.models.registry import get_architecture
from recurrent_lens.models.tl_compat import CacheStacking, HookNameError, TLWeights
from recurrent_lens.sae import saes_on_model
from recurrent_lens.states import cells as cells_lib
from recurrent_lens.states import harvest as harvesting

TokensLike = (str | list[str] | list[int] | list[list[int]]
              | Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"])
"""Text (a string or a list of strings), token ids as a list (``[pos]`` or ``[batch][pos]``) or as a
tensor of any integer dtype."""

_TL_ATTENTION_LEAVES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores", "hook_result",
                        "hook_rot_q", "hook_rot_k")
"""TransformerLens' names of per-head attention activations."""

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

    hook_out_is_single_residual_stream = True
    """``hook_resid_post`` is the one ``[batch, pos, d_model]`` stream the next block (or ``ln_final``) reads;
    TransformerLens' logit lens checks every block for this flag."""

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

    def forward(self, x: Tensor, cache: LayerCache | None = None, ctx: ForwardContext | None = None) -> Tensor:
        x = fire(self.hook_resid_pre, x)
        mixer = self.attn if self.is_attention else self.mixer
        x = fire(self.hook_resid_mid, x + fire(self.hook_mixer_out, mixer(self.ln1(x), cache, ctx)).to(x.dtype))
        if self.mlp is not None:
            x = x + fire(self.hook_mlp_out, self.mlp(self.ln2(x), cache)).to(x.dtype)
        return fire(self.hook_resid_post, x)


class Unembed(nn.Module):
    """The untied unembedding: ``weight`` ``[d_vocab, d_model]``; called on ``[batch, pos, d_model]`` it gives
    fp32 logits ``[batch, pos, d_vocab]`` as the model's forward does."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.d_model**-0.5)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return F.linear(x.to(self.weight.dtype), self.weight).float()


class TiedUnembed(Unembed):
    """The unembedding of a tied model: ``weight`` is the embedding matrix, and the module holds no parameter
    of its own (so the state dict has no ``unembed.weight``). It exists so that ``model.unembed`` is a module
    in every model, as TransformerLens' tools expect."""

    def __init__(self, embed: nn.Embedding) -> None:
        nn.Module.__init__(self)
        # a plain attribute, not a submodule: the embedding is registered (and saved) once, as ``embed``
        self.__dict__["_embed"] = embed

    @property
    def weight(self) -> Tensor:
        return self._embed.weight


class HookedRecurrentModel(TLWeights, HookedRootModule):
    """A recurrent language model with a named hook point for every per-token write and state.

    Build one with :meth:`from_pretrained` (a local directory or hub id in any supported reference format)
    or :meth:`from_config`. TransformerLens' attention weights and per-head sweeps: see
    :mod:`recurrent_lens.models.tl_compat`. ``run_with_hooks``, ``run_with_cache``, ``hooks()``, ``add_hook`` and
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

    # ------------------------------------------------------------------ tokens
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load from a directory with tokenizer files")
        return self.tokenizer

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  *, add_special_tokens: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize with the checkpoint's tokenizer into ``[batch, pos]`` ids (a string gives batch 1).

        As TransformerLens' ``to_tokens``, except that texts of different lengths are refused unless a
        ``padding_side`` is given (a recurrent state runs through every pad token it is fed).

        Args:
            input: a string or a list of strings.
            prepend_bos: ``True``: the tokenizer's BOS token, then the text without any other special token;
                ``False``: the text without special tokens; ``None``: ``cfg.default_prepend_bos``, whose
                default ``None`` keeps the tokenizer's own convention (``tokenizer(text, add_special_tokens=
                add_special_tokens)``).
            padding_side: ``"right"`` or ``"left"`` pads texts of different lengths with the tokenizer's pad
                token (its EOS token if it has none). Right padding leaves every real position exactly as in
                an unpadded run (the models are causal); left padding runs the pad tokens through the
                recurrence first, so states and logits at real positions differ from an unpadded run.
                ``None`` refuses texts of different lengths.
            add_special_tokens: passed to the tokenizer when the tokenizer's convention applies.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> from tokenizers import Tokenizer, models, pre_tokenizers
            >>> from transformers import PreTrainedTokenizerFast
            >>> vocab = {"<unk>": 0, "<s>": 1, "<pad>": 2, "a": 3, "b": 4}
            >>> core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
            >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
            >>> model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
            ...                                           pad_token="<pad>")
            >>> model.to_tokens(["a b", "b"], prepend_bos=True, padding_side="right")
            tensor([[1, 3, 4],
                    [1, 4, 2]])
        """
        tok = self._require_tokenizer()
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side: expected 'left', 'right' or None, got {padding_side!r}")
        if isinstance(input, str):
            texts = [input]
        elif isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            texts = list(input)
        else:
            raise TypeError(f"input: expected a string or a non-empty list of strings, got {type(input).__name__}")
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if bos not in (None, True, False):
            raise ValueError(f"prepend_bos: expected True, False or None, got {prepend_bos!r}")
        if bos is None:
            ids = [list(tok(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
        else:
            ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            if bos:
                if getattr(tok, "bos_token_id", None) is None:
                    raise ValueError("prepend_bos: True asks for a BOS token, but this tokenizer has none")
                ids = [[tok.bos_token_id, *i] for i in ids]
        lengths = [len(i) for i in ids]
        if len(set(lengths)) > 1:
            if padding_side is None:
                raise ValueError(f"to_tokens: texts tokenize to different lengths {lengths}; batch equal-length texts "
                                 "or pass padding_side='right' (recurrent states run through every pad token)")
            pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else tok.eos_token_id
            if pad is None:
                raise ValueError("padding_side: the tokenizer has neither a pad token nor an EOS token to pad with")
            width = max(lengths)
            ids = [i + [pad] * (width - len(i)) if padding_side == "right" else [pad] * (width - len(i)) + i
                   for i in ids]
        return torch.tensor(ids, dtype=torch.long, device=self.cfg.device)

    def to_string(self, tokens: Int[Tensor, "..."] | list[int] | int) -> str | list[str]:
        """Decode ids: one id (an int or a 0-d tensor) or ``[pos]`` gives a string, ``[batch, pos]`` a list of
        strings."""
        tok = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() <= 1:
            return tok.decode(tokens.reshape(-1).tolist())
        return [tok.decode(t.tolist()) for t in tokens]

    def to_str_tokens(self, input: str | list[str] | Int[Tensor, "..."] | list[int], prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """One string per token: of a text (tokenized by :meth:`to_tokens` with ``prepend_bos`` and
        ``padding_side``), of each text of a list (a list of lists), or of one sequence of ids (``[pos]``,
        ``[1, pos]`` or a list of ints)."""
        tok = self._require_tokenizer()
        if isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(t, str) for t in input)):
            rows = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            pieces = [[tok.decode([t]) for t in row] for row in rows.tolist()]
            return pieces[0] if isinstance(input, str) else pieces
        tokens = torch.as_tensor(input)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() == 0:
            tokens = tokens[None]
        if tokens.dim() != 1:
            raise ValueError(f"input: expected one sequence of ids ([pos] or [1, pos]), "
                             f"got shape {tuple(tokens.shape)}")
        return [tok.decode([t]) for t in tokens.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (without special tokens), as in TransformerLens."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"string: expected text that is a single token, got {string!r}, which is "
                             f"{ids.numel()} tokens {ids.tolist()}")
        return int(ids[0])

    def _tokens(self, input: TokensLike, prepend_bos: bool | None = None,
                padding_side: str | None = None) -> Int[Tensor, "batch pos"]:
        text = _is_text(input)
        if text:
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
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

    # ------------------------------------------------------------------ TransformerLens names
    def setup(self) -> None:
        """TransformerLens' ``setup`` (names every module and hook point), then the hook-name aliases.

        Aliases let TransformerLens' short names reach the hook that plays that role in each layer kind
        (``hook_aliases`` maps alias → hook name; an alias never shadows a real hook name):

        - ``blocks.{l}.hook_X`` → ``blocks.{l}.mixer.hook_X`` in a recurrent layer and ``blocks.{l}.attn.hook_X``
          in an attention layer, for every hook ``X`` of that mixer except ``hook_in``/``hook_out``;
        - ``blocks.{l}.attn.hook_X`` → ``blocks.{l}.mixer.hook_X`` in a recurrent layer (TransformerLens names
          ``q``, ``k``, ``v`` as attention hooks: ``cache["k", l]`` looks up ``blocks.{l}.attn.hook_k``);
        - ``blocks.{l}.attn.hook_z`` → ``blocks.{l}.mixer.hook_read`` in a recurrent layer: each head's read,
          what TransformerLens' per-head patching calls a head's output (see :mod:`~recurrent_lens.models.tl_compat`);
        - ``blocks.{l}.hook_attn_out`` → ``blocks.{l}.hook_mixer_out`` in every layer.

        An alias is resolved once, to one hook point: a hook added under an alias fires once, and caches hold
        each activation once, under its own name.
        """
        super().setup()
        aliases: dict[str, str] = {}
        for name in self.hook_dict:
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blocks" or parts[2] not in ("mixer", "attn"):
                continue
            layer, kind, leaf = parts[1], parts[2], parts[3]
            if kind == "mixer":
                aliases[f"blocks.{layer}.attn.{leaf}"] = name
            if leaf not in ("hook_in", "hook_out"):
                aliases[f"blocks.{layer}.{leaf}"] = name
        for layer in range(len(self.blocks)):
            aliases[f"blocks.{layer}.hook_attn_out"] = f"blocks.{layer}.hook_mixer_out"
            if f"blocks.{layer}.mixer.hook_read" in self.hook_dict:
                aliases[f"blocks.{layer}.attn.hook_z"] = f"blocks.{layer}.mixer.hook_read"
        self.hook_aliases = {alias: name for alias, name in aliases.items() if alias not in self.hook_dict}
        self._aliases_of: dict[str, list[str]] = {}
        for alias, name in self.hook_aliases.items():
            self._aliases_of.setdefault(name, []).append(alias)

    def resolve_hook_name(self, name: str) -> str:
        """The hook point's own name for a hook name or alias (see :meth:`setup` for the aliases).

        Raises a :class:`HookNameError` (a KeyError) that says why a name does not exist, e.g. a state asked of
        an attention layer or an attention pattern asked of a recurrent layer.

        Example:
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> model.resolve_hook_name("blocks.1.hook_state"), model.resolve_hook_name("blocks.1.attn.hook_k")
            ('blocks.1.mixer.hook_state', 'blocks.1.mixer.hook_k')
            >>> model.resolve_hook_name("blocks.0.hook_attn_out")
            'blocks.0.hook_mixer_out'
        """
        if not isinstance(name, str):
            raise TypeError(f"hook name: expected a string, got {type(name).__name__}")
        if name in self.hook_dict:
            return name
        if name in self.hook_aliases:
            return self.hook_aliases[name]
        raise HookNameError(self._unknown_hook_message(name))

    def _unknown_hook_message(self, name: str) -> str:
        parts = name.split(".")
        cfg = self.cfg
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].lstrip("-").isdigit():
            layer, leaf = int(parts[1]), parts[-1]
            if not 0 <= layer < cfg.n_layers:
                return f"hook name {name!r}: layer {layer} does not exist (n_layers={cfg.n_layers})"
            if cfg.attn_only and (leaf == "hook_mlp_out" or parts[2] in ("mlp", "ln2")):
                return (f"hook name {name!r}: blocks have no MLP in this model (d_mlp=0, cfg.attn_only=True); "
                        "TransformerLens helpers that read MLP hooks (mlp_out patching, get_act_patch_block_every, "
                        "neuron results) do not apply")
            leaves: dict[str, set[str]] = {"mixer": set(), "attn": set(_TL_ATTENTION_LEAVES)}
            for n in self.hook_dict:
                p = n.split(".")
                if len(p) == 4 and p[0] == "blocks" and p[2] in leaves:
                    leaves[p[2]].add(p[3])
            kind = "attn" if cfg.layer_types[layer] == "attention" else "mixer"
            own = sorted(n.rsplit(".", 1)[1] for n in self.hook_dict
                         if n.startswith(f"blocks.{layer}.{kind}.") and n.count(".") == 3)
            if kind == "attn" and leaf in leaves["mixer"] and leaf not in own:
                return (f"hook name {name!r}: layer {layer} is a softmax-attention layer, which has no {leaf}; "
                        f"recurrent layers: {cfg.recurrent_layers}; its attention hooks: {own} "
                        "(TransformerLens' patching: pass an index_df over the layers that have it)")
            if kind == "mixer" and leaf in leaves["attn"] and leaf not in own:
                return (f"hook name {name!r}: layer {layer} is a recurrent layer: it has no softmax-attention heads "
                        f"and no {leaf}; its mixer hooks: {own}")
        near = difflib.get_close_matches(name, [*self.hook_dict, *self.hook_aliases], n=3)
        return f"hook name {name!r}: no such hook point or alias" + (f"; did you mean {near}?" if near else "")

    def _hook_target(self, name: Any) -> Any:
        """A hook name resolved, or a name predicate made alias-aware (for ``hooks``/``add_hook``)."""
        if isinstance(name, str):
            return self.resolve_hook_name(name)
        if callable(name):
            aliases_of = self._aliases_of

            def accepts(hook_name: str) -> bool:
                return bool(name(hook_name)) or any(name(a) for a in aliases_of.get(hook_name, ()))

            return accepts
        raise TypeError(f"hook name: expected a string or a function of the name, got {type(name).__name__}")

    def _names_filter(self, names_filter: Any) -> Any:
        """TransformerLens' ``names_filter`` (None, a name, a list of names or a predicate) over hook names and
        aliases, as a predicate over the hook points' own names; unknown names are refused."""
        if names_filter is None:
            return None
        if isinstance(names_filter, str) or callable(names_filter):
            target = self._hook_target(names_filter)
            return target if callable(target) else (lambda hook_name: hook_name == target)
        if isinstance(names_filter, Iterable):
            names = list(names_filter)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("names_filter: expected None, a hook name, a list of hook names or a function")
            wanted = {self.resolve_hook_name(n) for n in names}
            return lambda hook_name: hook_name in wanted
        raise TypeError(f"names_filter: expected None, a hook name, a list of hook names or a function, "
                        f"got {type(names_filter).__name__}")

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[Any] = (), bwd_hooks: Iterable[Any] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator[HookedRecurrentModel]:
        """TransformerLens' ``hooks()`` context manager; names may be aliases (see :meth:`setup`), and a name
        predicate is asked about each hook point's own name and its aliases (the point is hooked once if
        any is accepted). Every name is resolved before any hook is added.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> seen = []
            >>> with model.hooks([("blocks.1.hook_state", lambda x, hook: seen.append(hook.name))]):
            ...     _ = model(torch.tensor([[1, 2, 3]]))
            >>> seen
            ['blocks.1.mixer.hook_state']
        """
        fwd = [self._guarded(self._hook_target(name), fn) for name, fn in fwd_hooks]
        bwd = [self._guarded(self._hook_target(name), fn) for name, fn in bwd_hooks]
        with super().hooks(fwd, bwd, reset_hooks_end, clear_contexts) as model:
            yield model

    def _guarded(self, target: Any, fn: Any) -> tuple[Any, Any]:
        return target, (self._head_count_guard(target, fn) if isinstance(target, str) else fn)

    def add_hook(self, name: Any, hook: Any, dir: Literal["fwd", "bwd"] = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        """TransformerLens' ``add_hook``; ``name`` may be an alias or a predicate (as in :meth:`hooks`)."""
        super().add_hook(self._hook_target(name), hook, dir=dir, is_permanent=is_permanent, level=level,
                         prepend=prepend)

    def list_hooks(self, name_filter: Any = None, dir: Literal["fwd", "bwd", "both"] = "both",
                   including_permanent: bool = True) -> dict[str, list[Any]]:
        """TransformerLens' ``list_hooks``; ``name_filter`` may name aliases (as in :meth:`hooks`). Keys are the
        hook points' own names."""
        return super().list_hooks(self._names_filter(name_filter), dir, including_permanent)

    def get_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any) -> tuple[dict, list, list]:
        """TransformerLens' ``get_caching_hooks``; ``names_filter`` may name aliases (as in :meth:`hooks`)."""
        return super().get_caching_hooks(self._names_filter(names_filter), *args, **kwargs)

    def add_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any) -> dict:
        """TransformerLens' ``add_caching_hooks``; ``names_filter`` may name aliases (as in :meth:`hooks`)."""
        return super().add_caching_hooks(self._names_filter(names_filter), *args, **kwargs)

    # ------------------------------------------------------------------ TransformerLens weights
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The embedding matrix ``[d_vocab, d_model]``."""
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding ``[d_model, d_vocab]`` as TransformerLens lays it out (a view of ``unembed.weight``,
        which is ``embed.weight`` in tied models). The final norm's weight is not folded in: the logits are
        ``ln_final(resid) @ W_U``."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias: zeros (no supported architecture has one)."""
        return torch.zeros(self.cfg.d_vocab, dtype=self.unembed.weight.dtype, device=self.unembed.weight.device)

    def tokens_to_residual_directions(self, tokens: str | int | Integer[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The residual direction whose dot product with the final-norm-scaled residual is each token's logit.

        As TransformerLens defines it for models whose norms are folded: a token (a single-token string, an
        int or a one-element tensor) gives ``[d_model]``, a tensor of ids ``[..., d_model]``. The final norm's
        weight is folded in (``W_U[:, t] · w``, ``· (1 + w)`` for Qwen3.5's norm), because
        ``ActivationCache.apply_ln_to_stack`` divides by the cached ``ln_final.hook_scale`` without applying
        the weight; ``logit_attrs`` of a stack that sums to the final residual then sums to the logit
        (LayerNorm models: minus the constant ``ln_final.bias @ W_U[:, t]``).

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=1,
            ...     d_vocab=20, n_heads=2, d_k=4, d_v=4), seed=0)
            >>> to_dirs = model.tokens_to_residual_directions
            >>> to_dirs(3).shape, to_dirs(torch.tensor([[1, 2]])).shape
            (torch.Size([16]), torch.Size([1, 2, 16]))
        """
        if isinstance(tokens, str):
            ids: Any = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            if tokens.dtype not in _ID_DTYPES:
                raise TypeError(f"tokens: expected integer token ids, got a tensor of dtype {tokens.dtype}")
            ids = int(tokens.item()) if tokens.numel() == 1 else tokens.to(self.unembed.weight.device, torch.long)
        elif isinstance(tokens, numbers.Integral) and not isinstance(tokens, bool):
            ids = int(tokens)
        else:
            raise TypeError(f"tokens: expected a string, an int or a tensor of ids, got {type(tokens).__name__}")
        bad = torch.as_tensor(ids)
        if bad.numel() == 0 or bad.min() < 0 or bad.max() >= self.cfg.d_vocab:
            raise ValueError(f"tokens: ids must lie in [0, {self.cfg.d_vocab}) (d_vocab), got {tokens!r}")
        weight = self.unembed.weight  # [d_vocab, d_model]
        w = self.ln_final.weight.float()
        fold = (1.0 + w) if getattr(self.ln_final, "one_plus", False) else w
        return weight[ids] * fold.to(weight.dtype)

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
                cells: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Float[Tensor, "batch n d_k d_v"]]:
        """Per-step matrices of many ``(hook_name, head)`` cells at chosen positions, from one forward that
        never forms ``[batch, pos, head, d_k, d_v]``: see :func:`recurrent_lens.states.harvest.harvest`.

        Returns:
            ``{(hook_name, head): [batch, n, d_k, d_v]}`` in fp32.

        Example:
            >>> out = tiny_model.harvest(tiny_tokens, [2, 5], [("blocks.0.mixer.hook_write", 1)])
            >>> tuple(out["blocks.0.mixer.hook_write", 1].shape)
            (2, 2, 8, 8)
        """
        return harvesting.harvest(self, tokens, positions, cells)

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

    # ------------------------------------------------------------------ SAEs
    def add_sae(self, sae: nn.Module, hook_name: str | None = None, head: int | None = None, *,
                use_error_term: bool | None = None) -> None:
        """Attach one of our SAEs (to a head of a matrix hook) or a SAELens SAE (to a vector hook) until
        :meth:`reset_saes`; the hook name defaults to ``sae.cfg.metadata.hook_name`` (see
        :mod:`recurrent_lens.sae.saes_on_model`)."""
        saes_on_model.add_sae(self, sae, hook_name, head, use_error_term=use_error_term)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Detach the SAEs at ``act_names`` (default: every SAE added with :meth:`add_sae`)."""
        saes_on_model.reset_saes(self, act_names)

    @contextmanager
    def saes(self, saes: Sequence[Any] = (), reset_saes_end: bool = True, *,
             use_error_term: bool | None = None) -> Iterator[HookedRecurrentModel]:
        """Attach SAEs (objects, or ``(sae, hook_name[, head])`` tuples) for the duration of a ``with`` block."""
        with saes_on_model.saes(self, saes, reset_saes_end, use_error_term):
            yield self

    def run_with_saes(self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
        """SAELens' ``run_with_saes``: the forward with ``saes`` attached (see :meth:`saes`).

        Example:
            >>> import torch
            >>> from recurrent_lens.sae import WriteSAE
            >>> sae = WriteSAE(8, 8, 16, k=4, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
            >>> clean = tiny_model(tiny_tokens)
            >>> spliced = tiny_model.run_with_saes(tiny_tokens, saes=[sae], use_error_term=True)
            >>> bool(torch.allclose(spliced, clean, atol=1e-4)), "saes" in str(list(tiny_model.hook_dict))
            (True, False)
        """
        return saes_on_model.run_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                                           use_error_term=use_error_term, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None,
                                 **kwargs: Any) -> tuple[Any, RecurrentActivationCache]:
        """SAELens' ``run_with_cache_with_saes``: :meth:`run_with_cache` with ``saes`` attached."""
        return saes_on_model.run_with_cache_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                                                      use_error_term=use_error_term, **kwargs)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: TokensLike,
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | int = 1.0,
        freq_penalty: float | int = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: str = "input",
        verbose: bool = False,
        *,
        seed: int | None = None,
        cache: RecurrentCache | None = None,
    ) -> Int[Tensor, "batch pos_plus_new"] | str | list[str]:
        """Decode as TransformerLens' ``generate`` does, with a per-layer recurrent cache (O(1) work per new
        token in recurrent layers).

        TransformerLens' signature and defaults: it samples (``do_sample=True``, ``temperature=1.0``) unless
        told ``do_sample=False`` (greedy argmax) or ``temperature=0`` (also greedy), and ``return_type=
        "input"`` answers in the input's kind: a string for a string, a list of strings for a list of strings,
        token ids for token ids. Differences: ``verbose`` defaults to False, and ``seed`` and ``cache`` are
        extras.

        Every hook fires on every step (the prompt in one call, then one call per new token, or the whole
        sequence again each step with ``use_past_kv_cache=False``); ``model.positions`` tells hooks where
        they are. Editing a write or a state during a step changes the cache and therefore every later token.

        Args:
            input: prompt ids ``[batch, pos]`` (tensor or list of ints) or text; at least one token.
            max_new_tokens: tokens to add.
            stop_at_eos: stop a sequence at ``eos_token_id`` (later positions repeat it).
            eos_token_id: defaults to the tokenizer's.
            do_sample: sample after ``temperature``, ``freq_penalty``, ``top_k`` and ``top_p``; ``False``
                decodes greedily and refuses any of those four set away from its default, which only
                sampling would use.
            top_k, top_p: keep the ``top_k`` likeliest tokens / the smallest set with probability ``top_p``.
            temperature: divides the logits; ``0`` decodes greedily, as in TransformerLens.
            freq_penalty: subtracted from a token's logit once per time it already occurs in the sequence.
            use_past_kv_cache: ``False`` reruns the whole sequence at every step (same tokens, more work).
            prepend_bos, padding_side: how text is tokenized (see :meth:`to_tokens`).
            return_type: ``"input"`` (the input's kind), ``"str"`` (one string for one sequence, else a
                list) or ``"tokens"`` (``[batch, pos + new]``).
            verbose: a progress bar.
            seed: seeds the sampling generator, for reproducible samples.
            cache: continue from this cache instead of an empty one. Like transformers, the last generated
                token is returned but not fed through the model, so the cache ends one token before the
                returned sequence. The cache is updated only when ``generate`` returns: if a step raises
                (a hook, say), the exception propagates and the cache is exactly as it was passed in.

        Example:
            >>> import torch
            >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
            >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
            ...                   n_heads=2, d_k=8, d_v=8)
            >>> model = HookedRecurrentModel.from_config(cfg, seed=0)
            >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape
            torch.Size([1, 7])
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type: expected 'input', 'str' or 'tokens', got {return_type!r}")
        if isinstance(freq_penalty, bool) or not isinstance(freq_penalty, numbers.Real) \
                or not math.isfinite(freq_penalty):
            raise ValueError(f"freq_penalty: expected a finite number, got {freq_penalty!r}")
        if not do_sample:
            given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "freq_penalty": freq_penalty}
            defaults = {"temperature": 1.0, "top_k": None, "top_p": None, "freq_penalty": 0.0}
            contradicting = {k: v for k, v in given.items() if v != defaults[k]}
            if contradicting:
                raise ValueError(f"do_sample=False decodes greedily, but {contradicting} only apply when sampling: "
                                 "pass do_sample=True or leave them at their defaults")
        _check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        if cache is not None and not use_past_kv_cache:
            raise ValueError("cache: continuing from a cache needs use_past_kv_cache=True")
        text = _is_text(input)
        if return_type == "input":
            return_type = "str" if text else "tokens"
        tokens = self._tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache: expected a RecurrentCache, got {type(cache).__name__}")
        greedy = not do_sample or temperature == 0
        # the steps update a fork; the caller's cache takes it over only when every step succeeded
        target = cache
        if use_past_kv_cache:
            cache = self.make_cache() if cache is None else cache.fork()
        logits = self(tokens, cache=cache)[:, -1]
        out = [tokens]
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            if freq_penalty and not greedy:
                seen = torch.cat(out, 1)
                counts = torch.zeros_like(logits).scatter_add_(-1, seen, torch.ones(seen.shape, dtype=logits.dtype,
                                                                                     device=logits.device))
                logits = logits - freq_penalty * counts
            nxt = sample_next(logits, do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            if eos_token_id is not None and stop_at_eos:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (stop_at_eos and eos_token_id is not None and bool(finished.all())):
                break
            logits = (self(nxt[:, None], cache=cache) if use_past_kv_cache else self(torch.cat(out, 1)))[:, -1]
        result = torch.cat(out, dim=1)
        if target is not None:
            target.commit(cache)
        if return_type == "tokens":
            return result
        texts = [self.to_string(row) for row in result]
        keep_list = isinstance(input, list) and text
        return texts if keep_list or len(texts) > 1 else texts[0]


class RecurrentActivationCache(CacheStacking, ActivationCache):
    """The ``ActivationCache`` that :meth:`HookedRecurrentModel.run_with_cache` returns.

    TransformerLens' class, with three differences:

    - Keys may be hook names, aliases or TransformerLens' short forms: ``cache["state", 1]``
      (``blocks.1.hook_state``) gives ``blocks.1.mixer.hook_state``; ``cache["k", 1]``
      (``blocks.1.attn.hook_k``) gives the mixer's ``hook_k`` in a recurrent layer and the attention's in an
      attention layer; ``cache["attn_out", 1]`` gives ``blocks.1.hook_mixer_out``; ``..._grad`` keys likewise.
      Each activation is stored once, under its hook point's own name (``keys()`` lists those). A name the
      model does not have raises a :class:`HookNameError` (a KeyError) saying why.
    - ``decompose_resid`` counts the embedding after the embedding norm (RWKV-7's ``ln_embed``) as the
      ``embed`` component, so that the components sum to the residual stream.
    - ``stack_head_results`` stacks the softmax-attention layers' heads, and ``stack_activation`` of a
      name only some layers have (``"state"`` on a hybrid) stacks those layers and can say which (see
      :class:`~recurrent_lens.models.tl_compat.CacheStacking`). ``compute_head_results`` and
      ``get_full_resid_decomposition`` (which need a per-head result in every layer) and TransformerLens'
      SSM bridges (``compute_ssm_state``, ``compute_ssm_effective_attention``, ``ssm_layers``) raise a
      NotImplementedError that says what to use instead; neuron results raise a ValueError in models
      without MLPs.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> model = HookedRecurrentModel.from_config(ModelConfig(architecture="gla", d_model=16, n_layers=2,
        ...     d_vocab=20, n_heads=2, d_k=4, d_v=4, d_mlp=32), seed=0).eval()
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> cache["state", -1] is cache["blocks.1.mixer.hook_state"]
        True
        >>> resid, labels = cache.decompose_resid(return_labels=True)
        >>> labels
        ['embed', '0_attn_out', '0_mlp_out', '1_attn_out', '1_mlp_out']
        >>> bool(torch.allclose(resid.sum(0), cache["resid_post", 1], atol=1e-5))
        True
    """

    def _key_name(self, key: Any) -> str:
        if isinstance(key, str):
            return get_act_name(key)
        if isinstance(key, tuple) and key:
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            return get_act_name(*key)
        raise TypeError(f"key: expected a hook name or a (name, layer[, layer_type]) tuple, got {key!r}")

    def _stored_name(self, key: Any) -> str:
        name = self._key_name(key)
        grad = name.endswith("_grad")
        stored = self.model.resolve_hook_name(name[:-5] if grad else name) + ("_grad" if grad else "")
        if stored not in self.cache_dict:
            via = "" if stored == name else f" (stored as {stored!r})"
            raise HookNameError(f"{name!r}{via} is not in this cache; run_with_cache's names_filter left it out")
        return stored

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        if not hasattr(self.model, "resolve_hook_name"):
            return super().__getitem__(key)
        return self.cache_dict[self._stored_name(key)]

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> RecurrentActivationCache:
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return RecurrentActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False, pos_slice: Any = None,
                        incl_embeds: bool = True, return_labels: bool = False) -> Any:
        """TransformerLens' ``decompose_resid`` (``attn_out`` is each layer's mixer output); in a model with
        an embedding norm the ``embed`` component is the normalised embedding (``ln_embed.hook_normalized``)."""
        ln_embed = getattr(self.model, "ln_embed", None)
        plain = ln_embed is None or isinstance(ln_embed, nn.Identity)
        if plain or not incl_embeds or "ln_embed.hook_normalized" not in self.cache_dict:
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        n = self.model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        sl = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        embed = sl.apply(self["ln_embed.hook_normalized"], dim=-2)[None]
        if apply_ln:
            embed = self.apply_ln_to_stack(embed, layer, pos_slice=sl, mlp_input=mlp_input)
        with_attn, with_mlp = mode != "mlp", mode != "attn" and not self.model.cfg.attn_only
        if (layer > 0 and (with_attn or with_mlp)) or (mlp_input and with_attn):
            rest, labels = super().decompose_resid(layer, mlp_input, mode, apply_ln, sl, False, True)
            stack, labels = torch.cat([embed, rest]), ["embed", *labels]
        else:
            stack, labels = embed, ["embed"]
        return (stack, labels) if return_labels else stack

    def _no_heads(self, what: str) -> NotImplementedError:
        cfg = self.model.cfg
        where = (f"recurrent layers {cfg.recurrent_layers} have none (their heads write through a shared output "
                 "norm and gate); stack_head_results gives the attention layers' heads" if cfg.has_attention
                 else "this model's layers are all recurrent: there are no softmax-attention heads")
        return NotImplementedError(
            f"{what} needs per-head attention results (attn.hook_result) in every layer, but {where}. "
            "Use decompose_resid (per-layer mixer and MLP outputs), stack_activation('read') or the per-head "
            "states and writes (cache['state', l], cache['write', l]) instead")

    def compute_head_results(self) -> None:
        raise self._no_heads("compute_head_results")

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_heads("get_full_resid_decomposition")

    def _no_bridge(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} reconstructs states inside TransformerLens' SSM bridges; here the states are hook points "
            f"of their own: read cache['state', layer] (blocks.{{layer}}.mixer.hook_state, "
            f"[batch, pos, head, d_k, d_v]) for layers {self.model.cfg.recurrent_layers}")

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("compute_ssm_state")

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("compute_ssm_effective_attention")

    def ssm_layers(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_bridge("ssm_layers")

    def _require_mlps(self, what: str) -> None:
        if self.model.cfg.attn_only:
            raise ValueError(f"{what}: blocks have no MLP in this model (d_mlp=0, cfg.attn_only=True), so there "
                             "are no neurons")

    def get_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        self._require_mlps("get_neuron_results")
        return super().get_neuron_results(layer, *args, **kwargs)

    def stack_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        self._require_mlps("stack_neuron_results")
        return super().stack_neuron_results(layer, *args, **kwargs)


def sample_next(logits: Float[Tensor, "batch d_vocab"], *, do_sample: bool = False, temperature: float | int = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Int[Tensor, " batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering; ``temperature=0``
    is greedy even when sampling (TransformerLens' convention).

    Example:
        >>> import torch
        >>> from recurrent_lens.models.base import sample_next
        >>> sample_next(torch.tensor([[0.0, 2.0, 1.0]]))
        tensor([1])
        >>> sample_next(torch.tensor([[0.0, 2.0, 1.0]]), do_sample=True, top_k=1)
        tensor([1])
    """
    _check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if not do_sample or temperature == 0:
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


def _check_sampling(*, do_sample: bool, temperature: float | int, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number, got {temperature!r}")
    if do_sample and temperature < 0:
        raise ValueError(f"temperature: expected >= 0 when sampling (0: greedy), got {temperature}")
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
