"""The tests mirror the package: every module has its test file, every other test file is a documented
suite, and test files share helpers only through tests/support."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, TESTS = ROOT / "recurrent_lens", ROOT / "tests"
LAYOUT = ROOT / "docs" / "layout.md"


def mirror(module: Path) -> Path:
    """``recurrent_lens/a/b.py`` → ``tests/a/test_b.py`` (a package's ``__init__.py`` → ``test_init.py``)."""
    rel = module.relative_to(PACKAGE)
    name = "init" if rel.name == "__init__.py" else rel.stem
    return TESTS / rel.parent / f"test_{name}.py"


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def all_test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "support" not in p.relative_to(TESTS).parts)


def documented(prefix: str) -> dict[str, str]:
    """The first column of docs/layout.md's table rows that name a ``prefix...`` path, with the second."""
    rows = re.findall(rf"^\| `({prefix}[^`]+)` \| (.+?) \|$", LAYOUT.read_text(), flags=re.M)
    return dict(rows)


def test_every_module_has_its_test_file_or_a_documented_reason():
    missing = [str(m.relative_to(ROOT)) for m in modules() if not mirror(m).exists()]
    excused = documented("recurrent_lens/")
    unexcused = sorted(set(missing) - set(excused))
    assert unexcused == [], f"modules without tests/<pkg>/test_<module>.py (add one, or say why in docs/layout.md): " \
                            f"{unexcused}"
    stale = sorted(set(excused) - set(missing))
    assert stale == [], f"docs/layout.md excuses modules that have their test file or no longer exist: {stale}"


def test_every_other_test_file_is_a_documented_suite():
    mirrors = {mirror(m) for m in modules()} | {mirror(p) for p in PACKAGE.rglob("__init__.py")}
    others = [str(t.relative_to(ROOT)) for t in all_test_files() if t not in mirrors]
    suites = documented("tests/")
    undocumented = sorted(set(others) - set(suites))
    assert undocumented == [], f"test files that mirror no module (move their tests to the mirrored file, or list " \
                               f"them in docs/layout.md): {undocumented}"
    stale = sorted(set(suites) - set(others))
    assert stale == [], f"docs/layout.md lists suites that mirror a module or no longer exist: {stale}"


def test_test_files_share_helpers_only_through_tests_support():
    offenders = []
    for path in TESTS.rglob("*.py"):
        if "support" in path.relative_to(TESTS).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.startswith("tests.") and not n.startswith("tests.support")]
    assert offenders == [], f"test files importing from other test files (move the helper to tests/support): " \
                            f"{offenders}"
