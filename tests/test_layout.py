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


def check_documented(found: list[str], prefix: str, what: str) -> None:
    """``found`` (the exceptions the tree has) equals the paths docs/layout.md's tables list under ``prefix``."""
    listed = re.findall(rf"^\| `({prefix}[^`]+)` \| .+? \|$", LAYOUT.read_text(), flags=re.M)
    unlisted, stale = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
    assert unlisted == [], f"{what}: add them to the table in docs/layout.md, or give them their mirror: {unlisted}"
    assert stale == [], f"docs/layout.md lists paths that are no exception (mirrored, or gone): {stale}"


def test_every_module_has_its_test_file_or_a_documented_reason():
    missing = [str(m.relative_to(ROOT)) for m in modules() if not mirror(m).exists()]
    check_documented(missing, "recurrent_lens/", "modules without tests/<package>/test_<module>.py")


def test_every_other_test_file_is_a_documented_suite():
    mirrors = {mirror(m) for m in modules()} | {mirror(p) for p in PACKAGE.rglob("__init__.py")}
    others = [str(t.relative_to(ROOT)) for t in all_test_files() if t not in mirrors]
    check_documented(others, "tests/", "test files that mirror no module")


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
