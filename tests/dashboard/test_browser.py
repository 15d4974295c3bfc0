"""The static site in a real browser: Playwright drives the system Chromium, headless, from ``file://``.

``RECURRENT_LENS_SCREENSHOT=1`` also saves ``docs/images/dashboard.png`` (the README's picture, a feature of the
shipped SAE over the Macbeth excerpt); CI leaves it unset so that the tree stays clean.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from recurrent_lens import toy
from recurrent_lens.dashboard import build_dashboard

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system chromium on PATH (CI installs it: apt-get install "
                                                         "chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    model, task = toy.load("gdn", progress=False)
    sae = toy.load_sae("gdn", progress=False)
    tokens = task.make_batch(24, seed=5)[0]
    probe = build_dashboard(model, sae, tokens[:8], n_examples=1, context=0, progress=False)
    busiest = probe.to_frame().sort_values("density", ascending=False).index[:30].tolist()
    out = tmp_path_factory.mktemp("dash") / "site"
    build_dashboard(model, sae, tokens, out_dir=out, features=sorted(busiest), n_examples=12, context=12,
                    token_strings=task.token_strings(), progress=False)
    return out


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith("file:") else None)
    page.goto(url)
    return page, errors


def _fmt(x):
    """The index's number format, JS ``Number(x.toPrecision(4)).toString()``: four significant digits, shortest form."""
    return repr(float(f"{x:.4g}")).removesuffix(".0")


def test_index_lists_sorts_and_searches(site, browser):
    features = json.loads((site / "data" / "features.json").read_text())
    page, errors = _open(browser, (site / "index.html").as_uri())
    rows = page.locator("#rl-table tbody tr")
    assert rows.count() == len(features)
    listed = [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")]
    assert listed == [f["feature"] for f in features]
    # the numbers shown are the JSON's
    by_feature = {f["feature"]: f for f in features}
    for row in rows.all()[:10]:
        f = by_feature[int(row.get_attribute("data-feature"))]
        assert row.locator(".rl-max").inner_text() == _fmt(f["max_activation"])
        assert float(row.locator(".rl-density").get_attribute("data-value")) == f["density"]
        assert float(row.locator(".rl-max").get_attribute("data-value")) == f["max_activation"]

    page.click('th[data-key="density"]')
    shown = [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")]
    want = [f["feature"] for f in sorted(features, key=lambda f: (-f["density"], -f["feature"]))]
    assert shown == want
    page.click('th[data-key="density"]')
    shown = [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")]
    assert shown == [f["feature"] for f in sorted(features, key=lambda f: (f["density"], f["feature"]))]
    page.click('th[data-key="max_activation"]')
    assert page.locator('th[data-key="max_activation"]').get_attribute("aria-sort") == "descending"
    maxima = [by_feature[int(x)]["max_activation"] for x in rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")]
    assert maxima == sorted(maxima, reverse=True)

    target = features[len(features) // 2]["feature"]
    page.fill("#rl-search", str(target))
    visible = [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")]
    assert target in visible and len(visible) < len(features)
    page.fill("#rl-search", "")
    assert rows.count() == len(features)
    assert errors == []
    page.close()


def test_feature_view_shows_top_context_with_the_firing_token(site, browser):
    page, errors = _open(browser, (site / "index.html").as_uri())
    page.click('th[data-key="density"]')
    first = page.locator("#rl-table tbody tr").first
    i = int(first.get_attribute("data-feature"))
    first.locator("a").click()
    view = page.locator(f'.rl-feature[data-feature="{i}"]')
    view.wait_for()
    record = json.loads((site / "data" / f"feature_{i}.json").read_text())
    top = record["top_examples"]
    examples = page.locator(".rl-top .rl-example")
    assert examples.count() == len(top) > 0
    shown = [float(x) for x in examples.evaluate_all("es => es.map(e => e.dataset.activation)")]
    assert shown == [e["activation"] for e in top]
    best = examples.first
    assert best.locator(".rl-act").inner_text() == f"{top[0]['activation']:.4g}"
    fire = best.locator(".tok.fire")
    assert fire.count() == 1
    assert fire.inner_text() == top[0]["tokens"][top[0]["fire_index"]]
    # the colour scale runs from transparent to full orange at the feature's max activation (this example)
    assert fire.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(255, 122, 0)"
    assert best.get_attribute("data-sequence") == str(top[0]["sequence"])
    # its top writers, as the JSON lists them: position, token, exact contribution, colour by sign
    writers = top[0]["writers"]
    shown = best.locator(".rl-writers .writer")
    assert shown.count() == len(writers["top"]) > 0
    assert float(best.locator(".rl-writers").get_attribute("data-pre-activation")) == writers["pre_activation"]
    for chip, want in zip(shown.all(), writers["top"]):
        assert int(chip.get_attribute("data-position")) == want["position"]
        assert float(chip.get_attribute("data-contribution")) == want["contribution"]
        assert chip.locator(".tok").inner_text() == want["token"]
        assert chip.is_visible()
        sign = "rl-plus" if want["contribution"] >= 0 else "rl-minus"
        assert sign in chip.get_attribute("class").split()
    assert page.locator(".rl-hist rect").count() == len(record["histogram"]["counts"])
    assert errors == []
    page.close()


@pytest.mark.skipif(os.environ.get("RECURRENT_LENS_SCREENSHOT") != "1", reason="RECURRENT_LENS_SCREENSHOT=1 "
                    "refreshes docs/images/dashboard.png")
def test_readme_screenshot(browser, tmp_path):
    """The README's picture: feature 918 of the shipped SAE over the Macbeth excerpt, as the command in
    docs/dashboard.md builds it (the features described there come from that dashboard)."""
    from PIL import Image

    from recurrent_lens import HookedRecurrentModel
    from recurrent_lens.pretrained import PRETRAINED_DIR
    from recurrent_lens.sae import load

    model = HookedRecurrentModel.from_pretrained("shakespeare-gdn")
    sae = load("shakespeare-gdn/blocks.1.mixer.hook_state.h0")
    build_dashboard(model, sae, str(PRETRAINED_DIR / "excerpts" / "macbeth.txt"), out_dir=tmp_path / "site",
                    features=[918], context_length=256, sample_by="document", progress=False)
    page, errors = _open(browser, (tmp_path / "site" / "features" / "feature_918.html").as_uri())
    assert page.locator(".rl-example").count() > 0 and errors == []
    page.set_viewport_size({"width": 1400, "height": 820})
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    page.close()
    # A 128-colour palette keeps the committed picture near 45 kB (Pillow comes with matplotlib); the octree
    # method keeps the few pixels of rare colours (the green heading) that median cut merges away.
    image = Image.open(SCREENSHOT).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(SCREENSHOT, optimize=True)
