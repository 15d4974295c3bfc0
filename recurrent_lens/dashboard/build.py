"""``build_dashboard``: one streaming pass of a model over a dataset, everything a feature view shows."""

from __future__ import annotations

import collections.abc
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from recurrent_lens.dashboard.collect import BINS_PER_DECADE, LOG10_LOW, FeatureStats, TokenMeans
from recurrent_lens.dashboard.render import check_site_dir
from recurrent_lens.dashboard.reading import atom_directions, logit_extremes, top_aligned, value_readout
from recurrent_lens.dashboard.view import Dashboard, Example, FeatureData
from recurrent_lens.dashboard.writers import TopWriters, Writers, unavailable
from recurrent_lens.data import SampleBy, batches, open_tokens
from recurrent_lens.models.mixer import CaptureRequest
from recurrent_lens.states.cells import Cell, as_index, parse_cell

N_TOP_TOKENS = 10
N_QUANTILE_BANDS = 4
# The output path's Jacobian is averaged over at most this many (sequence, position) pairs of the first
# batch: each costs d_v Jacobian-vector products through the layer's output projection.
_READOUT_POSITIONS = 64


def build_dashboard(model, sae, data: Int[Tensor, "n_seq ctx"] | str | os.PathLike | Iterable[Tensor],
                    out_dir: str | os.PathLike | None = None, features: Sequence[int] | None = None,
                    n_examples: int = 20, context: int = 24, *, n_samples: int = 12, stride: int = 1,
                    batch_size: int = 8, hook_name: str | None = None, head: int | None = None,
                    substitution: Any = None, token_strings: Sequence[str] | Callable[[int], str] | None = None,
                    context_length: int | None = None, max_sequences: int | None = None, seed: int = 0,
                    n_writers: int = 5, sample_by: SampleBy = "line", progress: bool = True) -> Dashboard:
    """Feature dashboards of ``sae`` over ``data``, from one streaming pass (memory independent of its length).

    Per batch, the SAE's cell (its ``hook_name`` and ``head``, from ``sae.cfg.metadata`` unless given) is
    harvested at every ``stride``-th position with :meth:`~recurrent_lens.HookedRecurrentModel.harvest` (one
    head, no full state tensor) and encoded; ``hook_k`` and ``hook_q`` of that head are read in the same
    forward. Kept for every feature (or those in ``features``):

    - density (fraction of harvested positions where the code is positive), max and mean activation, a
      histogram of ``log10`` of the positive activations;
    - ``top_examples``: the ``n_examples`` largest activations, each with its sequence (its index in ``data``),
      position, and the ``± context`` tokens around it with the feature's activation at each of them;
    - ``quantile_samples``: a uniform sample of ``n_samples`` firings, in ``N_QUANTILE_BANDS`` bands of the
      feature's activation distribution (the sample's quartiles);
    - the atom's reading (:mod:`recurrent_lens.dashboard.reading`): the tokens whose mean key (``hook_k``) and
      mean query (``hook_q``) at that head have the largest cosine with the key-side direction ``v``, and the
      tokens the value side ``w`` promotes and suppresses through the head's output path and ``W_U`` (the
      output path linearised by its Jacobian averaged over up to 64 positions of the first batch, so the
      gated output norm enters with each sampled position's gate and scale; final norm left out);
    - with ``substitution`` (a :class:`~recurrent_lens.analysis.SubstitutionResult`), the feature's
      substitution win rate (atom beats delete) over its firings there;
    - each top example's ``writers``: the feature's pre-activation at the firing split exactly over the
      layer's past writes (the terms of :func:`~recurrent_lens.analysis.feature_attribution`), as the
      ``n_writers`` writes of largest ``|contribution|`` (position, token, contribution) and the rest
      (``other_writes``, ``initial``, ``bias``), which sum to ``pre_activation``. That is the SAE's
      pre-activation (``hook_sae_acts_pre``; Gated: the magnitude path), not the activation: top-k, JumpReLU
      or a ReLU apply after it. The harvesting forward also records the layer's recurrence inputs, and as
      firings enter the top examples their terms come at once from the encoder's factors, the batch's
      carried keys and its values (:mod:`recurrent_lens.dashboard.writers`; no forward runs again): the
      entering firings' own features only, ``O(pos × d_k × rank)`` per entering firing (a linear encoder's
      rank is ``d_k``) and ``O(batch × pos² × d_k)`` per batch to carry the keys. The field is left out
      (``None``, absent from the JSON) with ``n_writers=0``, for the quantile samples, and where attribution does not apply: when ``sae.cfg.metadata`` does not name the cell the
      dashboard reads (attribution takes the cell from the metadata, so ``hook_name=``/``head=`` given for an
      SAE whose metadata names none or another cell leave it out), or when the SAE has no
      ``pre_activation_affine``, ``encoder_atoms`` and ``autoencode`` (one from outside this library);
      ``meta["writers"]`` then says why.

    Args:
        model: a :class:`~recurrent_lens.HookedRecurrentModel`.
        sae: an SAE on the model's ``[d_k, d_v]`` states.
        data: token ids ``[n_seq, ctx]``, an iterable of 1-D windows, or any source
            :func:`recurrent_lens.data.open_tokens` reads (text needs ``context_length``).
        out_dir: if given, the static site is written there (:meth:`Dashboard.save`).
        features: feature indices to collect (default: all).
        n_examples: top activating contexts kept per feature.
        context: tokens shown on each side of a firing.
        n_samples: firings sampled uniformly per feature for the quantile bands.
        stride: harvest every ``stride``-th position (1: all).
        batch_size: sequences per forward.
        hook_name, head: the SAE's cell, when its metadata does not name it.
        substitution: a substitution result whose rows name this SAE's features, or ``None``.
        token_strings: a string per token id (a list, or a function of the id); default: the model's
            tokenizer, else the id in angle brackets.
        context_length: window length for text sources.
        max_sequences: stop after this many sequences.
        sample_by: what one document of a ``.txt`` path is (``"line"``, ``"paragraph"`` or the whole file,
            ``"document"``; see :func:`~recurrent_lens.data.open_tokens`).
        seed: seed of the uniform samples.
        n_writers: top writers kept per top example (0: none, and no attribution).
        progress: show a progress bar.

    Example:
        >>> dash = build_dashboard(toy_model, toy_sae, toy_task.make_batch(16, seed=1)[0], features=[0, 1, 2],
        ...                        n_examples=5, progress=False)
        >>> dash
        Dashboard(3 features of WriteSAE at blocks.1.mixer.hook_state head 0, 16 sequences x 34 positions)
        >>> f = dash[1]
        >>> len(f.top_examples) <= 5, f.density == f.n_firings / dash.n_positions
        (True, True)
        >>> w = f.top_examples[0].writers  # the top example's pre-activation, split over its past writes
        >>> total = sum(x["contribution"] for x in w["top"]) + w["other_writes"] + w["initial"] + w["bias"]
        >>> len(w["top"]), abs(total - w["pre_activation"]) <= 1e-5 * abs(w["pre_activation"])
        (5, True)
    """
    cell = _cell(model, sae, hook_name, head)
    hook_name, head, layer = cell.hook_name, cell.head, cell.layer
    feats = _features(features, sae.cfg.n_features)
    for name, value, low in (("n_examples", n_examples, 1), ("context", context, 0), ("n_samples", n_samples, 1),
                             ("stride", stride, 1), ("batch_size", batch_size, 1), ("n_writers", n_writers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if out_dir is not None:
        check_site_dir(out_dir)  # before the pass, not after it
    source, n_total = _source(model, data, context_length, max_sequences, sample_by)
    device = model.embed.weight.device
    stats = FeatureStats(len(feats), n_examples, n_samples, context, seed)
    keys, queries = TokenMeans(model.cfg.d_vocab, model.cfg.d_k), TokenMeans(model.cfg.d_vocab, model.cfg.d_k)
    captured: dict[str, Tensor] = {}
    why_not = "n_writers=0" if n_writers == 0 else unavailable(sae, hook_name, head)
    top_writers = TopWriters(model, sae, feats, n_examples, n_writers) if why_not is None else None

    def grab(name):
        def hook(x, hook):
            captured[name] = x[:, :, head].detach().float()
        return hook

    fwd_hooks = [(f"blocks.{layer}.mixer.hook_k", grab("k")), (f"blocks.{layer}.mixer.hook_q", grab("q"))]
    seq0, ctx, first = 0, None, None
    bar = tqdm(total=n_total, unit="seq", desc="dashboard", disable=not progress)
    # Indexing copies the codes: skipped when every feature is collected.
    select = None if features is None else feats.to(sae.b_dec.device)
    with torch.no_grad():
        for tokens in batches(source, batch_size):
            if ctx is None:
                ctx, first = tokens.shape[1], tokens
            tokens = tokens.long()
            positions = torch.arange(0, tokens.shape[1], stride)
            # With writers, the same forward records the layer's recurrence inputs: no forward runs again.
            request = None if top_writers is None else CaptureRequest(stop=False)
            with model.hooks(fwd_hooks=fwd_hooks):
                states = model.harvest(tokens.to(device), positions.to(device), [(hook_name, head)],
                                       capture=None if request is None else {layer: request})[hook_name, head]
            acts = sae.encode(states.to(sae.b_dec.device))
            acts = (acts if select is None else acts[..., select]).float().cpu()
            entered = stats.update(acts, positions, tokens, seq0)
            if top_writers is not None:
                top_writers.update(request, tokens, *entered)
            del states, request
            keys.update(tokens, captured.pop("k"))
            queries.update(tokens, captured.pop("q"))
            seq0 += tokens.shape[0]
            bar.update(tokens.shape[0])
    bar.close()
    if seq0 == 0:
        raise ValueError("data: expected at least one sequence, got none")

    n_per = max(1, _READOUT_POSITIONS // ctx)
    readout = value_readout(model, cell, first[:n_per, : min(ctx, _READOUT_POSITIONS)].to(device))
    v, w, share = atom_directions(sae, feats)
    key_ids, key_cos = top_aligned(v, keys.unit_means(), keys.ids, N_TOP_TOKENS)
    query_ids, query_cos = top_aligned(v, queries.unit_means(), queries.ids, N_TOP_TOKENS)
    up_i, up_v, down_i, down_v = logit_extremes(readout, w, N_TOP_TOKENS)
    wins = _win_rates(substitution)
    names = _Names(model, token_strings)
    writers = None if top_writers is None else top_writers.writers

    records = _Records(feats.tolist(), stats, names, wins, writers, keys=(key_ids, key_cos),
                       queries=(query_ids, query_cos), promoted=(up_i, up_v), suppressed=(down_i, down_v), share=share)
    meta = {"model": _describe(model), "sae": repr(sae), "sae_kind": type(sae).__name__, "hook_name": hook_name,
            "head": head, "n_features": sae.cfg.n_features, "n_sequences": seq0, "context_length": ctx,
            "stride": stride, "n_positions": stats.n_positions, "n_examples": n_examples, "context": context,
            "writers": why_not or f"top {n_writers} by |contribution| per top example"}
    dash = Dashboard(records, meta)
    if out_dir is not None:
        dash.save(out_dir)
    return dash


def _cell(model, sae, hook_name: str | None, head: int | None) -> Cell:
    meta = sae.cfg.metadata
    hook_name = meta.get("hook_name") if hook_name is None else hook_name
    head = meta.get("head") if head is None else head
    if hook_name is None or head is None:
        raise ValueError("sae: its metadata names no hook_name/head (the cell it reads); pass hook_name= and head=")
    cell = parse_cell(model, hook_name, head)
    if (sae.cfg.d_k, sae.cfg.d_v) != (model.cfg.d_k, model.cfg.d_v):
        raise ValueError(f"sae: reads [d_k, d_v] = [{sae.cfg.d_k}, {sae.cfg.d_v}] states, the model's cell "
                         f"{hook_name} head {head} holds [{model.cfg.d_k}, {model.cfg.d_v}]")
    return cell


def _features(features: Sequence[int] | None, n: int) -> Tensor:
    if features is None:
        return torch.arange(n)
    listed = list(features)
    bad = [f for f in listed if as_index(f, n) is None]
    if bad or not listed:
        raise ValueError(f"features: expected feature indices in [0, {n}) (the SAE's n_features), got "
                         f"{bad if bad else 'none'}")
    if len(set(map(int, listed))) != len(listed):
        raise ValueError(f"features: expected distinct indices, got {listed}")
    return torch.tensor([int(f) for f in listed])


def _source(model, data: Any, context_length: int | None, max_sequences: int | None,
            sample_by: SampleBy) -> tuple[Iterable[Tensor], int | None]:
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype.is_floating_point or data.dtype == torch.bool or 0 in data.shape:
            raise ValueError(f"data: expected token ids [n_seq, ctx], got shape {tuple(data.shape)} and "
                             f"dtype {data.dtype}")
        data = data[:max_sequences] if max_sequences is not None else data
        return data, data.shape[0]
    if isinstance(data, (str, os.PathLike)):
        data = open_tokens(data, tokenizer=model.tokenizer, context_length=context_length,
                           max_sequences=max_sequences, sample_by=sample_by)
        return data, max_sequences
    if isinstance(data, Iterable):
        n = len(data) if hasattr(data, "__len__") else None
        if max_sequences is not None:
            data, n = itertools.islice(data, max_sequences), (max_sequences if n is None else min(n, max_sequences))
        return data, n
    raise ValueError(f"data: expected a [n_seq, ctx] tensor, a dataset path or id, or an iterable of 1-D windows, "
                     f"got {type(data).__name__}")


def _win_rates(result: Any) -> dict[int, dict[str, float]]:
    if result is None:
        return {}
    rows = getattr(result, "rows", None)
    if rows is None or "win" not in rows.columns:
        raise ValueError(f"substitution: expected a SubstitutionResult (rows with a 'win' column), got "
                         f"{type(result).__name__}")
    unit = "feature" if "feature" in rows.columns else "atom"
    grouped = rows.groupby(unit)["win"].agg(["mean", "size"])
    return {int(i): {"win_rate": float(r["mean"]), "n": int(r["size"])} for i, r in grouped.iterrows()}


class _Names:
    """Token strings, decoded once per id."""

    def __init__(self, model, token_strings: Sequence[str] | Callable[[int], str] | None) -> None:
        if token_strings is None:
            if model.tokenizer is not None:
                token_strings = lambda i: model.tokenizer.decode([i])  # noqa: E731
            else:
                token_strings = lambda i: f"<{i}>"  # noqa: E731
        self.lookup = token_strings.__getitem__ if isinstance(token_strings, Sequence) else token_strings
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = str(self.lookup(i))
        return self.cache[i]

    def pairs(self, ids: Tensor, values: Tensor) -> list[tuple[str, float]]:
        return [(self(i), float(x)) for i, x in zip(ids.tolist(), values.tolist())]


class _Records(collections.abc.Sequence):
    """The feature records, each built from the collected tensors when first asked for: turning every example
    window into Python objects costs more than the pass itself, and a notebook usually looks at a few features."""

    def __init__(self, features: list[int], stats: FeatureStats, names: _Names, wins: dict[int, dict[str, float]],
                 writers: Writers | None, *, keys, queries, promoted, suppressed, share: Tensor) -> None:
        self.features = features
        self.stats, self.names, self.wins, self.writers = stats, names, wins, writers
        self.tables = {"key_tokens": keys, "query_tokens": queries, "promoted_tokens": promoted,
                       "suppressed_tokens": suppressed}
        self.share = share
        self.built: dict[int, FeatureData] = {}

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if not 0 <= j < len(self):
            raise IndexError(f"record {j} of {len(self)}")
        if j not in self.built:
            self.built[j] = self._build(j)
        return self.built[j]

    def _build(self, j: int) -> FeatureData:
        stats, names = self.stats, self.names
        count = int(stats.count[j])
        return FeatureData(
            feature=self.features[j],
            density=count / stats.n_positions,
            n_firings=count,
            max_activation=float(stats.max[j]),
            mean_activation=float(stats.total[j] / count) if count else 0.0,
            histogram=_histogram(stats.hist[j]),
            top_examples=_examples(stats.top, j, names, self.writers),
            quantile_samples=_bands(_examples(stats.reservoir, j, names)),
            rank1_share=float(self.share[j]),
            substitution=self.wins.get(self.features[j]),
            **{name: names.pairs(ids[j], values[j]) for name, (ids, values) in self.tables.items()},
        )


def _examples(buffer, j: int, names: _Names, writers: Writers | None = None) -> list[Example]:
    sequence, position = buffer.sequence[j].tolist(), buffer.position[j].tolist()
    value, tokens, token_acts = buffer.value[j].tolist(), buffer.tokens[j].tolist(), buffer.token_acts[j].tolist()
    middle = buffer.tokens.shape[2] // 2
    out = []
    for slot in buffer.order(j):
        ids = tokens[slot]
        # The window is clipped to the sequence: ids of -1 mark positions before its start or after its end.
        first = next(k for k, t in enumerate(ids) if t >= 0)
        last = len(ids) - next(k for k, t in enumerate(reversed(ids)) if t >= 0)
        out.append(Example(
            sequence=sequence[slot], position=position[slot], activation=value[slot],
            tokens=[names(t) for t in ids[first:last]], token_ids=ids[first:last],
            token_activations=[None if math.isnan(a) else a for a in token_acts[slot][first:last]],
            fire_index=middle - first, writers=None if writers is None else writers.record(j, slot, names),
        ))
    return out


def _bands(samples: list[Example]) -> list[dict[str, Any]]:
    """The samples sorted by activation, cut into quantile bands of (nearly) equal size, strongest first."""
    samples = sorted(samples, key=lambda e: e.activation)
    n = len(samples)
    bands = []
    for b in range(N_QUANTILE_BANDS):
        part = samples[b * n // N_QUANTILE_BANDS: (b + 1) * n // N_QUANTILE_BANDS]
        if part:
            bands.append({"quantiles": [b / N_QUANTILE_BANDS, (b + 1) / N_QUANTILE_BANDS],
                          "examples": part[::-1]})
    return bands[::-1]


def _histogram(counts: Tensor) -> dict[str, list[float]]:
    """The occupied span of the fixed log10 bins: ``edges`` (one more than ``counts``), in activation units."""
    nz = counts.nonzero()
    if len(nz) == 0:
        return {"edges": [], "counts": []}
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    edges = [10 ** (LOG10_LOW + b / BINS_PER_DECADE) for b in range(lo, hi + 1)]
    return {"edges": edges, "counts": counts[lo:hi].tolist()}


def _describe(model) -> str:
    cfg = model.cfg
    return (f"{cfg.architecture}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads of {cfg.d_k}x{cfg.d_v}")
