"""Decoding: the model's ``generate`` and the sampling step it takes per token."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.models.cache import RecurrentCache
from recurrent_lens.models.tokens import TokensLike, is_text


class Generation:
    """TransformerLens' ``generate`` for the model class, on a per-layer :class:`RecurrentCache`."""

    tokenizer: Any

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
        text = is_text(input)
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



def sample_next(logits: Float[Tensor, "batch d_vocab"], *, do_sample: bool = False, temperature: float | int = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Int[Tensor, " batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering; ``temperature=0``
    is greedy even when sampling (TransformerLens' convention).

    Example:
        >>> import torch
        >>> from recurrent_lens.models.generation import sample_next
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

