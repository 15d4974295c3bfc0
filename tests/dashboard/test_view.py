"""The Dashboard: its repr, table, indexing, inline view and the static site it saves."""

import json

import pytest

from recurrent_lens.dashboard import Dashboard


def test_dashboard_api_and_site(dash, tmp_path):
    assert repr(dash) == "Dashboard(2048 features of WriteSAE at blocks.1.mixer.hook_state head 0, " \
                         "12 sequences x 34 positions)"
    frame = dash.to_frame()
    assert len(frame) == 2048 and frame.index.name == "feature"
    with pytest.raises(KeyError, match="feature: expected one of the 2048 collected features"):
        dash[2048]
    i = int(frame["density"].idxmax())
    shown = dash.show(i)
    assert f'data-feature="{i}"' in shown.data and 'class="tok fire"' in shown.data
    # the inline view's styles touch only its own elements, not the notebook's
    css = shown.data.split("<style>")[1].split("</style>")[0]
    rules = [r.split("{")[0] for r in css.split("}") if "{" in r]
    assert rules and all(".rl-" in r or "#rl-" in r for r in rules)

    sub = Dashboard([dash[i], dash[3]], dash.meta)
    index = sub.save(tmp_path / "site")
    site = tmp_path / "site"
    assert index == str(site / "index.html")
    listed = json.loads((site / "data" / "features.json").read_text())
    assert [r["feature"] for r in listed] == [i, 3] and listed[0]["density"] == dash[i].density
    js = (site / "data" / "features.js").read_text()
    assert json.loads(js.split("=", 1)[1].strip().rstrip(";")) == listed
    record = json.loads((site / "data" / f"feature_{i}.json").read_text())
    acts = [e["activation"] for e in record["top_examples"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == dash[i].top_examples[0].activation
    assert set(record["top_examples"][0]) >= {"sequence", "position", "activation", "tokens", "token_activations"}
    assert (site / "features" / f"feature_{i}.html").is_file()

    # an earlier dashboard is replaced whole; anything else is refused
    Dashboard([dash[3]], dash.meta).save(site)
    assert sorted(p.name for p in (site / "data").iterdir()) == ["feature_3.json", "features.js", "features.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="neither empty nor a dashboard"):
        sub.save(other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
