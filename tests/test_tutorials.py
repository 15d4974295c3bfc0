"""Every notebook in ``tutorials/`` runs end to end, with clean outputs.

Each notebook executes in a fresh ``python3`` kernel with a temporary working directory and
``RECURRENT_LENS_CI=1`` (notebooks use it to shrink their work). A cell error fails the test with the
cell's source and traceback; so does anything written to stderr (warnings, text progress bars) and any
widget output. The notebooks assert the measurements their text relies on, so a retrained toy that
changes a conclusion fails here too.
"""

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
# Calls whose ``progress`` defaults to True: a bar per call (thousands of stderr lines in an executed
# notebook when ipywidgets is missing), so the tutorials switch it off.
PROGRESS_CALLS = {"toy.load", "toy.load_sae", "toy.train_toy", "toy.train_probe_sae", "toy.build_embedded",
                  "toy.build_embedded_sae", "TrainConfig", "harvest_to_store", "build_dashboard"}
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_tutorials_found():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorial notebooks in {TUTORIALS}, found {[p.name for p in NOTEBOOKS]}"


def _code(path):
    """The notebook's code as one Python module (IPython magics such as ``%pip`` become ``pass``)."""
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    lines = [line if not line.lstrip().startswith(("%", "!")) else line[: len(line) - len(line.lstrip())] + "pass"
             for cell in cells for line in cell.splitlines()]
    return ast.parse("\n".join(lines), filename=path.name)


def _progress_problems(tree):
    """Calls that would show a progress bar: ``progress`` not ``False``, or left to a default of True."""
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        progress = [kw.value for kw in node.keywords if kw.arg == "progress"]
        if any(not (isinstance(v, ast.Constant) and v.value is False) for v in progress):
            problems.append(f"line {node.lineno}: {ast.unparse(node)[:80]} (progress is not False)")
        elif ast.unparse(node.func) in PROGRESS_CALLS and not progress:
            problems.append(f"line {node.lineno}: {ast.unparse(node)[:80]} (needs progress=False)")
    return problems


def test_progress_check():
    tree = ast.parse('model, task = toy.load("gdn")\nsae = load("dir")\ncfg = TrainConfig(n_steps=3, progress=not CI)\n'
                     'sae = toy.load_sae("gdn", progress=False)\nx = f(progress=True)')
    assert [p.split(":")[0] for p in _progress_problems(tree)] == ["line 1", "line 3", "line 5"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_progress_off(path):
    problems = _progress_problems(_code(path))
    assert not problems, f"{path.name}: progress bars must be off in the tutorials:\n" + "\n".join(problems)


def _noise(nb):
    """stderr text and widget outputs of an executed notebook, as ``(cell index, excerpt)``."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr":
                found.append((i, out.text[:300]))
            elif WIDGET in out.get("data", {}):
                found.append((i, "a widget (a tqdm.auto progress bar?)"))
    if importlib.util.find_spec("ipywidgets") is None:
        # Without ipywidgets (the dev extra installs it) tqdm.auto warns once when imported in a kernel.
        found = [(i, text) for i, text in found if "IProgress not found" not in text]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURRENT_LENS_CI", "1")
    # Tiny models run fastest single-threaded (as in conftest.py); a kernel would otherwise use every core.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel spec launches "python": make that the interpreter running the tests.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    noise = _noise(nb)
    assert not noise, f"{path.name}: outputs must be clean, found:\n" + "\n".join(f"cell {i}: {t}" for i, t in noise)
