"""Every notebook in ``tutorials/`` is committed with its outputs, and they are not stale.

The outputs come from ``scripts/run_tutorials.py``, which executes each notebook in place. Here, without
running anything, the committed notebooks must have run top to bottom with clean outputs (no error, nothing on
stderr, no widget) and agree with the numbers their markdown quotes (the ``<!--out-->`` convention documented
in that script). The slow test executes each notebook again the same way, fails on a cell error or unclean
output, and checks the committed notebook against the fresh run: a cell that shows something must have
committed outputs, and every quoted number must still be printed. So a retrained model that changes a number
the text relies on fails here until the notebooks are regenerated and the text updated; the notebooks also
assert the measurements their conclusions rest on.
"""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

_spec = importlib.util.spec_from_file_location(
    "run_tutorials", Path(__file__).resolve().parent.parent / "scripts" / "run_tutorials.py")
run_tutorials = importlib.util.module_from_spec(_spec)
sys.modules["run_tutorials"] = run_tutorials  # its dataclass looks its module up there
_spec.loader.exec_module(run_tutorials)

NOTEBOOKS = sorted(run_tutorials.TUTORIALS.glob("*.ipynb"))
# Calls whose ``progress`` defaults to True: a bar per call (thousands of stderr lines in an executed
# notebook when ipywidgets is missing), so the tutorials switch it off.
PROGRESS_CALLS = {"toy.load", "toy.load_sae", "toy.train_toy", "toy.train_probe_sae", "toy.build_embedded",
                  "toy.build_embedded_sae", "TrainConfig", "harvest_to_store", "build_dashboard"}


def test_tutorials_found():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorial notebooks in {run_tutorials.TUTORIALS}, found {[p.name for p in NOTEBOOKS]}"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs(path):
    nb = nbformat.read(path, as_version=4)
    problems = run_tutorials.output_problems(nb) + run_tutorials.contradicted_quotes(nb)
    assert not problems, (f"{path.name}: the committed outputs are not clean or contradict the text; rerun "
                          "scripts/run_tutorials.py (and update the text):\n" + "\n".join(problems))


def test_quote_check():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x", execution_count=1, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="dead: 62 of 128, share 0.998\n")]),
        nbformat.v4.new_markdown_cell("62<!--out--> dead, 1.00<!--out--> of it, 63<!--out--> no, 2.70 unmarked"),
        nbformat.v4.new_markdown_cell("60<!--out ±2--> within the tolerance, 0.99<!--out--> not"),
        nbformat.v4.new_code_cell("y", execution_count=2),
        nbformat.v4.new_markdown_cell("62<!--out--> was printed above the previous code cell only"),
    ])
    problems = run_tutorials.contradicted_quotes(nb)
    assert [p.split(" (")[0] for p in problems] == [
        "markdown cell 1: 63", "markdown cell 2: 0.99", "markdown cell 4: 62"], problems
    assert run_tutorials.output_problems(nb) == []
    nb.cells[3].execution_count = None
    assert run_tutorials.output_problems(nb) == [
        "execution counts [1, None]: the notebook was not run top to bottom in one kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    for name, value in run_tutorials.kernel_env().items():
        monkeypatch.setenv(name, value)
    try:
        fresh = run_tutorials.execute(path, tmp_path)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    problems = run_tutorials.output_problems(fresh)
    assert not problems, f"{path.name}: outputs must be clean, found:\n" + "\n".join(problems)
    # The fresh run has the committed markdown: its quotes are checked against the fresh outputs.
    problems = run_tutorials.missing_outputs(nbformat.read(path, as_version=4), fresh)
    problems += run_tutorials.contradicted_quotes(fresh)
    assert not problems, (f"{path.name}: the committed notebook is stale; rerun scripts/run_tutorials.py "
                          "(and update the text):\n" + "\n".join(problems))
