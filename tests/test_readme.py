"""The front page keeps its promises: the quick start runs as written, CI runs the setup and test commands
the README gives, the README stays short before it sends readers to the docs, and every relative link of
the README and the docs pages reaches a file (and, with ``#anchor``, a heading of that file).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "tutorials" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK_START_MAX_LINES = 15
WORDS_BEFORE_DOCS_MAX = 1500

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown page."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md: no '## {heading}' section"
    return match.group(1)


def _code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.M | re.S)


def _prose(text: str) -> str:
    """The page without code: fenced blocks and inline code spans, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    (code,) = _code_blocks(_section(README.read_text(encoding="utf-8"), "Quick start"), "python")
    assert len(code.splitlines()) <= QUICK_START_MAX_LINES, f"the quick start has {len(code.splitlines())} lines"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"{README}: Quick start", "exec"), namespace)
    assert namespace["states"].ndim == 5  # [batch, pos, head, d_k, d_v]
    assert (tmp_path / "site" / "index.html").is_file()


def test_ci_runs_the_readme_setup_and_test_commands():
    text = README.read_text(encoding="utf-8")
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    commands = [command.strip() for heading in ("Setup", "Test")
                for block in _code_blocks(_section(text, heading), "bash")
                for line in block.splitlines() for command in line.split(" && ")]
    assert commands, "README.md: no bash commands under Setup and Test"
    assert [c for c in commands if c not in ci_lines] == [], ".ci/run must run the README's commands as written"


def test_readme_is_short_before_its_first_docs_link():
    text = README.read_text(encoding="utf-8")
    first = re.search(r"\]\(docs/", text)
    assert first, "README.md links to no page under docs/"
    words = len(text[: first.start()].split())
    assert words <= WORDS_BEFORE_DOCS_MAX, f"README.md: {words} words before its first link to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading with anchor #{anchor} in {file.name})")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links: {broken}"
