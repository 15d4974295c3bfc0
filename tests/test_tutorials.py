"""Every notebook in ``tutorials/`` runs end to end (DESIGN.md §6).

Each notebook executes in a fresh ``python3`` kernel with a temporary working directory and
``RECURRENT_LENS_CI=1`` (notebooks use it to shrink their work). A cell error fails the test with the
cell's source and traceback.
"""

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


def test_tutorials_found():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorial notebooks in {TUTORIALS}, found {[p.name for p in NOTEBOOKS]}"


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
