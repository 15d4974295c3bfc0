"""Text and token ids: TransformerLens' tokenizer methods of the model, and the checks every input goes through."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from jaxtyping import Int, Integer
from torch import Tensor

TokensLike = (str | list[str] | list[int] | list[list[int]]
              | Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"])
"""Text (a string or a list of strings), token ids as a list (``[pos]`` or ``[batch][pos]``) or as a
tensor of any integer dtype."""

ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
             torch.uint64)
"""The tensor dtypes accepted as token ids."""


class Tokenization:
    """TransformerLens' ``to_tokens``, ``to_string``, ``to_str_tokens`` and ``to_single_token``, for the model
    class, with the checks that turn any :data:`TokensLike` input into ``[batch, pos]`` ids."""

    cfg: Any
    tokenizer: Any
    embed: Any

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
        text = is_text(input)
        if text:
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif isinstance(input, list):
            tokens = _ids_from_list(input)
        else:
            tokens = input
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens: expected an integer tensor, a list of token ids or text, "
                            f"got {type(tokens).__name__}")
        if tokens.dtype not in ID_DTYPES:
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


def is_text(input: Any) -> bool:
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
