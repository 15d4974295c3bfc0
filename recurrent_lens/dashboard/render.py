"""HTML of the feature views and the static site: plain HTML, CSS and JS, nothing fetched from the network.

Site layout (``write_site``)::

    index.html                 sortable, searchable table of the features (built by assets/index.js)
    features/feature_{i}.html  one view per feature (static HTML, the same fragment a notebook shows)
    data/features.json         [{"feature", "density", "max_activation", ...}, ...]
    data/features.js           the same list as ``window.RL_FEATURES``: Chromium refuses fetch() of local
                               files from file:// pages, but loads scripts
    data/feature_{i}.json      the feature's full record, ``top_examples`` sorted by activation
    assets/index.js, assets/style.css

DOM hooks, stable for tests: every table row and feature view carries ``data-feature``, every example
``data-activation`` (the exact value of the JSON), the firing token the class ``fire``; each of a top
example's writers the class ``writer`` with ``data-position`` and ``data-contribution`` (the JSON's values),
its list ``data-pre-activation``.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

_ASSETS = ("style.css", "index.js")


@functools.cache
def _asset(name: str) -> str:
    return resources.files("recurrent_lens.dashboard").joinpath("assets", name).read_text(encoding="utf-8")


def _num(x: float) -> str:
    return f"{x:.4g}"


def _token(text: str) -> str:
    """A token made visible: escaped, with newlines and tabs shown as symbols (spaces are kept by CSS)."""
    return html.escape(text.replace("\n", "↵").replace("\t", "⇥"), quote=True) or "&#8203;"


def _signed(x: float) -> str:
    return f"{x:+.3g}".replace("-", "−")


def _writers(w: dict[str, Any]) -> str:
    """A top example's writers: one chip per write (its token, signed term, a bar of its size, coloured by
    sign), then the remaining terms, all summing to the pre-activation shown first."""
    top = w["top"]
    biggest = max((abs(x["contribution"]) for x in top), default=0.0)
    chips = []
    for x in top:
        c = x["contribution"]
        width = 36 * abs(c) / biggest if biggest > 0 else 0.0
        chips.append(f'<span class="writer {"rl-plus" if c >= 0 else "rl-minus"}" data-position="{x["position"]}" '
                     f'data-contribution="{c!r}" title="write at position {x["position"]}: {html.escape(_num(c))}">'
                     f'<span class="tok">{_token(x["token"])}</span><span class="rl-wpos">@{x["position"]}</span>'
                     f'<span class="rl-wbar" style="width:{width:.1f}px"></span>{_signed(c)}</span>')
    rest = [("other writes", w["other_writes"]), ("bias", w["bias"])]
    if w["initial"] != 0:  # only with an initial state; a dashboard's runs start from zero
        rest.insert(1, ("initial state", w["initial"]))
    tail = " ".join(f'<span class="rl-wrest">{k} {_signed(v)}</span>' for k, v in rest)
    return (f'<div class="rl-writers" data-pre-activation="{w["pre_activation"]!r}">'
            f'<span class="rl-wlabel" title="the SAE pre-activation at the firing, before its sparsity; exact sum of '
            f'the terms that follow">pre-activation {_num(w["pre_activation"])} =</span>{"".join(chips)}{tail}</div>')


def _example(e: Any, scale: float) -> str:
    spans = []
    for j, (text, act) in enumerate(zip(e.tokens, e.token_activations)):
        classes = "tok fire" if j == e.fire_index else "tok"
        if act is None:
            style, title = "", "not computed"
        else:
            alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
            style, title = f' style="background:rgba(255,122,0,{alpha:.3f})"', _num(act)
        spans.append(f'<span class="{classes}"{style} title="{html.escape(title)}">{_token(text)}</span>')
    return (f'<div class="rl-example" data-activation="{e.activation!r}" data-sequence="{e.sequence}" '
            f'data-position="{e.position}"><span class="rl-act">{_num(e.activation)}</span>'
            f'<span class="rl-where">seq {e.sequence} · pos {e.position}</span>'
            f'<span class="rl-context">{"".join(spans)}</span>'
            f'{"" if e.writers is None else _writers(e.writers)}</div>')


def _histogram(hist: dict[str, list[float]]) -> str:
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return '<p class="rl-muted">never fires on this data</p>'
    width, height, top = 360, 90, max(counts)
    bar = width / len(counts)
    rects = []
    for j, c in enumerate(counts):
        h = 0 if c == 0 else max(1.0, height * math.log1p(c) / math.log1p(top))
        rects.append(f'<rect x="{j * bar:.2f}" y="{height - h:.2f}" width="{max(bar - 1, 0.5):.2f}" height="{h:.2f}">'
                     f'<title>{_num(edges[j])} – {_num(edges[j + 1])}: {c}</title></rect>')
    return (f'<svg class="rl-hist" viewBox="0 0 {width} {height + 16}" width="{width}" height="{height + 16}" '
            f'role="img" aria-label="histogram of log10 activations">{"".join(rects)}'
            f'<text x="0" y="{height + 13}">{_num(edges[0])}</text>'
            f'<text x="{width}" y="{height + 13}" text-anchor="end">{_num(edges[-1])}</text></svg>'
            '<p class="rl-muted">log-spaced activation bins, bar height log(1 + count)</p>')


def _token_table(title: str, pairs: list[tuple[str, float]], note: str, cls: str) -> str:
    rows = "".join(f'<tr><td><span class="tok">{_token(t)}</span></td><td class="num">{_num(v)}</td></tr>'
                   for t, v in pairs)
    return (f'<div class="rl-reading {cls}"><h4>{html.escape(title)}</h4><p class="rl-muted">{html.escape(note)}</p>'
            f'<table>{rows}</table></div>')


def feature_fragment(f: Any, meta: dict[str, Any]) -> str:
    """The view of one feature (a :class:`~recurrent_lens.dashboard.FeatureData`) with its styles, as an HTML
    fragment: what the site's feature page holds and what ``Dashboard.show`` displays.

    Example:
        >>> from recurrent_lens.dashboard import build_dashboard
        >>> dash = build_dashboard(toy_model, toy_sae, toy_task.make_batch(4, seed=1)[0], features=[0], progress=False)
        >>> feature_fragment(dash[0], dash.meta).count('data-feature="0"')
        1
    """
    stats = [("density", f"{100 * f.density:.3g}%"), ("firings", str(f.n_firings)),
             ("max activation", _num(f.max_activation)), ("mean activation", _num(f.mean_activation)),
             ("rank-1 share of the atom", f"{100 * f.rank1_share:.3g}%")]
    if f.substitution is not None:
        stats.append(("substitution win rate", f"{100 * f.substitution['win_rate']:.3g}% (n={f.substitution['n']})"))
    stat_html = "".join(f'<div class="rl-stat"><span>{html.escape(k)}</span><b>{v}</b></div>' for k, v in stats)
    scale = f.max_activation
    top = "".join(_example(e, scale) for e in f.top_examples) or '<p class="rl-muted">no firing</p>'
    bands = "".join(
        f'<h4>firings in quantiles {100 * b["quantiles"][0]:.0f}–{100 * b["quantiles"][1]:.0f}% (uniform sample)</h4>'
        + "".join(_example(e, scale) for e in b["examples"]) for b in f.quantile_samples)
    reading = "".join([
        _token_table("keys that write it", f.key_tokens, "cos(mean hook_k of the token, v)", "rl-keys"),
        _token_table("queries that read it", f.query_tokens, "cos(mean hook_q of the token, v)", "rl-queries"),
        _token_table("promoted", f.promoted_tokens, "logit effect of w through the head's output", "rl-up"),
        _token_table("suppressed", f.suppressed_tokens, "logit effect of w through the head's output", "rl-down"),
    ])
    where = f"{meta['sae_kind']} · {meta['hook_name']} head {meta['head']}"
    return (f'<style>{_asset("style.css")}</style>'
            f'<div class="rl-dash rl-feature" data-feature="{f.feature}">'
            f'<h2>Feature {f.feature} <small>{html.escape(where)}</small></h2>'
            f'<div class="rl-stats">{stat_html}</div>'
            f'<div class="rl-row"><section><h3>Activations</h3>{_histogram(f.histogram)}</section>'
            f'<section class="rl-atom"><h3>Reading the atom v wᵀ</h3><div class="rl-readings">{reading}</div>'
            f'</section></div>'
            f'<section class="rl-top"><h3>Top activations</h3>{top}</section>'
            f'<section class="rl-samples"><h3>Quantile samples</h3>{bands or "<p class=rl-muted>no firing</p>"}'
            f'</section></div>')


def _page(title: str, body: str, head: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title>'
            f'<style>body {{ margin: 0; padding: 18px 26px; background: #f6f7f9; }}</style>{head}</head>'
            f'<body>{body}</body></html>\n')


def _feature_page(f: Any, meta: dict[str, Any], prev: int | None, next_: int | None) -> str:
    nav = ['<a href="../index.html">← all features</a>']
    if prev is not None:
        nav.append(f'<a href="feature_{prev}.html" rel="prev">feature {prev}</a>')
    if next_ is not None:
        nav.append(f'<a href="feature_{next_}.html" rel="next">feature {next_}</a>')
    return _page(f"Feature {f.feature}", f'<nav class="rl-nav">{" · ".join(nav)}</nav>' + feature_fragment(f, meta))


def _index_page(meta: dict[str, Any]) -> str:
    facts = (f"{meta['sae']} · {meta['hook_name']} head {meta['head']} · model: {meta['model']} · "
             f"{meta['n_sequences']} sequences × {meta['context_length']} positions"
             + (f" (every {meta['stride']}th)" if meta["stride"] > 1 else ""))
    body = (f'<div class="rl-dash rl-index"><h1>SAE feature dashboard</h1><p class="rl-muted">{html.escape(facts)}</p>'
            '<input id="rl-search" type="search" placeholder="search features or tokens" aria-label="search">'
            '<span id="rl-count" class="rl-muted"></span>'
            '<table id="rl-table"><thead><tr>'
            '<th data-key="feature" data-type="number">feature</th>'
            '<th data-key="density" data-type="number">density</th>'
            '<th data-key="max_activation" data-type="number">max activation</th>'
            '<th data-key="top_tokens" data-type="text">top tokens</th>'
            '<th data-key="promoted" data-type="text">promotes</th>'
            '<th data-key="win_rate" data-type="number">substitution win</th>'
            '</tr></thead><tbody></tbody></table></div>'
            '<script src="data/features.js"></script><script src="assets/index.js"></script>')
    return _page("SAE feature dashboard", body, '<link rel="stylesheet" href="assets/style.css">')


def _json(obj: Any) -> str:
    # NaN/inf are not JSON; the records hold none (unset activations are null), so refuse rather than emit them.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def check_site_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` resolved, if a site may be written there: it does not exist, is empty, or holds a dashboard.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "notes.txt").write_text("mine")
        >>> check_site_dir(d / "site") == (d / "site").resolve()
        True
        >>> check_site_dir(d)
        Traceback (most recent call last):
        ...
        ValueError: out_dir: ... is neither empty nor a dashboard written before (...); refusing to replace it
    """
    out = Path(out_dir).resolve()
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir: expected a directory (new, empty or an earlier dashboard), got the file {out}")
        if any(out.iterdir()) and not ((out / "index.html").is_file() and (out / "data" / "features.json").is_file()):
            raise ValueError(f"out_dir: {out} is neither empty nor a dashboard written before (no index.html and "
                             f"data/features.json); refusing to replace it")
    return out


def write_site(dash: Any, out_dir: str | os.PathLike) -> str:
    """Write the static site of ``dash`` to ``out_dir``; returns the path of ``index.html``.

    The site is written to a temporary directory beside ``out_dir`` and renamed into place, so ``out_dir`` is
    never half-written. An existing ``out_dir`` is replaced only if it is empty or a dashboard written here
    before (it holds ``index.html`` and ``data/features.json``); anything else is refused.

    Example:
        >>> import tempfile
        >>> from recurrent_lens.dashboard import build_dashboard
        >>> dash = build_dashboard(toy_model, toy_sae, toy_task.make_batch(4, seed=1)[0], features=[0],
        ...                        n_examples=2, progress=False)
        >>> out = Path(tempfile.mkdtemp()) / "site"
        >>> Path(dash.save(out)).name, sorted(p.name for p in (out / "data").iterdir())
        ('index.html', ['feature_0.json', 'features.js', 'features.json'])
    """
    out = check_site_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for sub in ("data", "features", "assets"):
            (tmp / sub).mkdir()
        for name in _ASSETS:
            (tmp / "assets" / name).write_text(_asset(name), encoding="utf-8")
        summaries = [f.summary() for f in dash.records]
        (tmp / "data" / "features.json").write_text(_json(summaries), encoding="utf-8")
        (tmp / "data" / "features.js").write_text(f"window.RL_FEATURES = {_json(summaries)};\n", encoding="utf-8")
        order = dash.features
        for j, f in enumerate(dash.records):
            (tmp / "data" / f"feature_{f.feature}.json").write_text(_json(f.to_dict()), encoding="utf-8")
            prev = order[j - 1] if j > 0 else None
            next_ = order[j + 1] if j + 1 < len(order) else None
            (tmp / "features" / f"feature_{f.feature}.html").write_text(_feature_page(f, dash.meta, prev, next_),
                                                                        encoding="utf-8")
        (tmp / "index.html").write_text(_index_page(dash.meta), encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(old / "site")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out / "index.html")
