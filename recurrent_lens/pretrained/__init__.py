"""Small recurrent language models that ship inside the package, loadable by name without a network.

``HookedRecurrentModel.from_pretrained("shakespeare-gdn")`` finds the shipped checkpoint
``recurrent_lens/pretrained/shakespeare-gdn/`` (a transformers ``config.json``, fp16 safetensors and the
tokenizer files) when no local directory of that name exists; a local directory always wins. The weights
load into fp32 unless a ``dtype`` is given. :func:`list_pretrained` names what ships; each model's
``MODEL_CARD.md`` records its data, recipe and losses, and ``scripts/build_shakespeare_zoo.py`` rebuilds
corpus, tokenizer and models from scratch.

:func:`text_loss` is the evaluation the model cards report: mean next-token loss in nats over a text,
next to the entropy of that text's own unigram distribution under the same tokenizer.

Example:
    >>> from recurrent_lens import HookedRecurrentModel, list_pretrained
    >>> "shakespeare-gdn" in list_pretrained()
    True
    >>> model = HookedRecurrentModel.from_pretrained("shakespeare-gdn")
    >>> model.to_string(model.to_tokens("To be, or not to be", prepend_bos=False)[0])
    'To be, or not to be'
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["list_pretrained", "pretrained_path", "list_pretrained_saes", "pretrained_sae_path", "excerpt", "text_loss",
           "TextLoss", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).parent
_EXCERPTS = PRETRAINED_DIR / "excerpts"


def list_pretrained() -> list[str]:
    """The names of the models that ship with the package (what ``from_pretrained(name)`` finds offline).

    Example:
        >>> list_pretrained()
        ['shakespeare-gdn', 'shakespeare-mamba2']
    """
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def pretrained_path(name: str) -> Path | None:
    """The directory of the shipped model ``name``, or ``None`` if no model of that name ships.

    Example:
        >>> pretrained_path("shakespeare-gdn").name
        'shakespeare-gdn'
        >>> pretrained_path("no-such-model") is None
        True
    """
    return PRETRAINED_DIR / name if name in list_pretrained() else None


def list_pretrained_saes() -> list[str]:
    """The SAEs that ship with the package, named ``"{model}/{hook_name}.h{head}"``; ``sae.load(name)`` and
    ``WriteSAE.from_pretrained(name)`` find them offline.

    Example:
        >>> list_pretrained_saes()
        ['shakespeare-gdn/blocks.1.mixer.hook_state.h0']
    """
    return sorted(f"{model}/{p.name}" for model in list_pretrained()
                  for p in (PRETRAINED_DIR / model / "saes").glob("*") if (p / "cfg.json").is_file())


def pretrained_sae_path(name: str) -> Path | None:
    """The directory of the shipped SAE ``name``, or ``None`` if no SAE of that name ships.

    Example:
        >>> pretrained_sae_path("shakespeare-gdn/blocks.1.mixer.hook_state.h0").name
        'blocks.1.mixer.hook_state.h0'
    """
    if name not in list_pretrained_saes():
        return None
    model, sae = name.split("/", 1)
    return PRETRAINED_DIR / model / "saes" / sae


def excerpt(name: str) -> str:
    """A held-out text shipped for tests and the quick start: ``"plays"`` (the start of *Macbeth*, a play
    no shipped model was trained on) or ``"milton"`` (the start of each of Milton's four works in the corpus,
    out of distribution: no shipped model saw any Milton).

    Example:
        >>> excerpt("plays")[:7]
        'MACBETH'
    """
    files = {"plays": "macbeth.txt", "milton": "milton.txt"}
    if name not in files:
        raise ValueError(f"name: expected one of {sorted(files)}, got {name!r}")
    return (_EXCERPTS / files[name]).read_text(encoding="utf-8")


class TextLoss(NamedTuple):
    """What :func:`text_loss` returns (losses in nats per token)."""

    loss: float
    """Mean next-token cross-entropy of the model."""
    unigram: float
    """Entropy of the text's own token frequencies (a unigram model fitted to the text itself)."""
    n_tokens: int
    """Tokens scored."""


@torch.no_grad()
def text_loss(model: Any, text: str, context_length: int = 256, batch_size: int = 16) -> TextLoss:
    """Score ``text`` as the models were trained: its tokens (no special tokens) are cut into consecutive
    windows of ``context_length - 1``, each read after the tokenizer's BOS token, and every token is
    predicted from the ones before it in its window.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel` with a tokenizer that has a BOS token.
        text: the text to score.
        context_length: tokens per window including the BOS (the shipped models were trained on 256).
        batch_size: windows per forward pass.

    Example:
        >>> from recurrent_lens import HookedRecurrentModel
        >>> model = HookedRecurrentModel.from_pretrained("shakespeare-gdn")
        >>> result = text_loss(model, excerpt("plays")[:2000])
        >>> result.loss < result.unigram
        True
    """
    tok = model.tokenizer
    if tok is None or tok.bos_token_id is None:
        raise ValueError("text_loss: the model needs a tokenizer with a BOS token")
    if context_length < 2:
        raise ValueError(f"context_length: expected at least 2, got {context_length}")
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if len(ids) == 0:
        raise ValueError("text_loss: the text has no tokens")
    step = context_length - 1
    windows = [ids[i:i + step] for i in range(0, len(ids), step)]
    total = 0.0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        # the last window may be shorter: score it on its own rather than pad a recurrent state
        for chunk in ([group] if len({len(w) for w in group}) == 1 else [[w] for w in group]):
            targets = torch.stack(chunk).to(model.cfg.device)
            bos = torch.full((len(chunk), 1), tok.bos_token_id, dtype=torch.long, device=targets.device)
            logits = model(torch.cat([bos, targets[:, :-1]], dim=1))
            total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
    counts = torch.tensor(list(Counter(ids.tolist()).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return TextLoss(total / len(ids), float(-(p * p.log()).sum()), len(ids))
