"""Execute the tutorial notebooks in place, so that they are committed with their outputs.

::

    python scripts/run_tutorials.py                      # every notebook in tutorials/
    python scripts/run_tutorials.py tutorials/02_*.ipynb  # some of them

Each notebook runs top to bottom in a fresh ``python3`` kernel (the interpreter running this script), in a
temporary working directory, single-threaded (``OMP_NUM_THREADS=1``: the tiny models run fastest so and give
the same bits on every run of a machine; the notebooks seed torch themselves). The outputs are written back
into the ``.ipynb`` (figures as PNG) with nothing volatile: the cells' execution timestamps and the kernel's
``language_info`` are dropped, so regenerating unchanged notebooks leaves ``git diff`` empty.
``tests/test_tutorials.py`` executes the notebooks the same way (:func:`execute`) and checks the committed
ones against the fresh run.

Quoted numbers
--------------
A number in a markdown cell that states a measurement is *marked* so that it is checked against the outputs:
write it followed immediately by the HTML comment ``<!--out-->`` (invisible when the markdown is rendered)::

    62<!--out--> of the 128 features never fire ...
    heads 1–3 read 1.00<!--out--> of their read; BOS gets 0.21<!--out-->–0.36<!--out-->

A marked number must appear, within its printed precision, among the numbers printed by the code cells right
above the markdown cell (the run of code cells that ends where this markdown cell, or the run of markdown
cells it belongs to, begins): ``1.00`` matches an output ``0.998`` or ``1.0``, ``62`` matches ``62``, ``50%``
matches ``50.0%``. Only text outputs count (``stdout``, and the ``text/plain`` form of displayed values and
tables); numbers in figures cannot be checked, so print what the text quotes. A number that depends on a long
training run (its last digits can differ between CPUs) may carry an absolute tolerance, ``62<!--out ±4-->``.
Unmarked numbers (settings, numbers from papers, counts the reader can see in the code) are not checked.

This script fails (exit status 1, after writing every notebook) when a marked number is contradicted by the
fresh outputs, naming the cell and the numbers printed near it: update the text, then run it again.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbclient
import nbformat
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
CELL_TIMEOUT_S = 600
# A marked number: digits (a sign, a decimal part or an exponent allowed), an optional % sign, the marker with
# an optional "±tolerance".
QUOTE = re.compile(r"(?P<number>[-−]?\d+(?:\.\d+)?(?:[eE][-−+]?\d+)?)(?P<percent>%?)"
                   r"<!--\s*out(?:\s*±\s*(?P<tol>\d+(?:\.\d+)?))?\s*-->")
# A number as printed in an output (part of a word such as "h0" or "L0" counts too: harmless, it only adds
# candidates).
PRINTED = re.compile(r"[-−]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
WIDGET = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class Quote:
    """A marked number of a markdown cell: its text, its value and how far an output may be from it."""

    text: str
    value: float
    slack: float

    def matches(self, printed: float) -> bool:
        # The margin keeps a value printed exactly half a unit away (0.125 quoted as 0.12) from failing on
        # the rounding of the binary floats.
        return abs(printed - self.value) <= self.slack * (1 + 1e-9)


def _parse(text: str) -> float:
    return float(text.replace("−", "-"))


def _precision(text: str) -> float:
    """Half a unit of the last printed digit: how far a value may be from ``text`` and still print as it."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent.replace("−", "-")) if exponent else 0))


def quotes(source: str) -> list[Quote]:
    """The marked numbers of one markdown cell's source.

    >>> [(q.text, q.value, round(q.slack, 6)) for q in quotes("62<!--out--> dead, 0.21<!--out ±0.1-->, 1 : 2.70")]
    [('62', 62.0, 0.5), ('0.21', 0.21, 0.105)]
    """
    return [Quote(m["number"], _parse(m["number"]),
                  _precision(m["number"]) + float(m["tol"] or 0)) for m in QUOTE.finditer(source)]


def output_text(cell) -> str:
    """The text a code cell printed or displayed (stdout, ``text/plain``), joined."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _sources(nb, index: int) -> list[int]:
    """The code cells whose outputs a markdown cell may quote: the run of code cells right above it."""
    i = index - 1
    while i >= 0 and nb.cells[i].cell_type == "markdown":
        i -= 1
    run = []
    while i >= 0 and nb.cells[i].cell_type == "code":
        run.append(i)
        i -= 1
    return run[::-1]


def contradicted_quotes(nb) -> list[str]:
    """Marked numbers of the markdown that the outputs above them do not show, each with what they show."""
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        cells = _sources(nb, index)
        printed = [_parse(n) for i in cells for n in PRINTED.findall(output_text(nb.cells[i]))]
        for q in quotes(cell.source):
            if not any(q.matches(p) for p in printed):
                near = sorted(printed, key=lambda p: abs(p - q.value))[:5]
                problems.append(f"markdown cell {index}: {q.text} (±{q.slack:.3g}) is not among the numbers printed "
                                f"by cells {cells}; the closest are {[f'{p:g}' for p in near]}")
    return problems


def _tqdm_without_widgets(text: str) -> bool:
    """Whether ``text`` is only tqdm.auto's warning that ipywidgets is missing (the dev extra installs it)."""
    return "IProgress not found" in text and importlib.util.find_spec("ipywidgets") is None


def output_problems(nb) -> list[str]:
    """What a committed or freshly executed notebook must not hold: errors, stderr text, widgets, code cells
    that never ran, and execution out of order."""
    problems = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    counts = [c.get("execution_count") for _, c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts {counts}: the notebook was not run top to bottom in one kernel")
    for i, cell in code:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                problems.append(f"cell {i}: error {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and out.name == "stderr" and not _tqdm_without_widgets(out.text):
                problems.append(f"cell {i}: stderr {out.text[:300]!r}")
            elif WIDGET in out.get("data", {}):
                problems.append(f"cell {i}: a widget output (a tqdm.auto progress bar?)")
    return problems


def missing_outputs(committed, fresh) -> list[str]:
    """Code cells that print or show something when run but whose committed outputs are missing."""
    if len(committed.cells) != len(fresh.cells):
        return [f"{len(committed.cells)} cells committed, {len(fresh.cells)} executed"]
    return [f"cell {i}: no committed outputs, the run shows {[o.output_type for o in new.outputs]}"
            for i, (old, new) in enumerate(zip(committed.cells, fresh.cells))
            if new.cell_type == "code" and new.outputs and not old.get("outputs")]


def kernel_env() -> dict[str, str]:
    """The environment the notebook kernels run in (inherited by the kernel process)."""
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            # The kernel spec launches "python": make that the interpreter running this script.
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def execute(path: Path, workdir: Path, progress: bool = False):
    """``path`` executed top to bottom in a fresh kernel with working directory ``workdir``, normalised.

    Raises ``nbclient.exceptions.CellExecutionError`` when a cell fails. The kernel inherits this process's
    environment: set :func:`kernel_env` there first (``main`` and the test do).
    """
    nb = nbformat.read(path, as_version=4)
    metadata = dict(nb.metadata)
    bar = tqdm(total=sum(c.cell_type == "code" for c in nb.cells), desc=path.stem, unit="cell", disable=not progress,
               leave=False)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}},
                                     on_cell_executed=lambda **_: bar.update())
    try:
        client.execute()
    finally:
        bar.close()
    nb.metadata = nbformat.from_dict(metadata)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: tutorials/*.ipynb)")
    paths = parser.parse_args(argv).notebooks or sorted(TUTORIALS.glob("*.ipynb"))
    os.environ.update(kernel_env())
    failed = False
    for path in tqdm(paths, desc="tutorials", unit="notebook"):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                nb = execute(path, Path(workdir), progress=True)
            except nbclient.exceptions.CellExecutionError as e:
                tqdm.write(f"{path.name}: a cell failed, notebook left as it was\n{e}")
                failed = True
                continue
        nbformat.write(nb, path)
        problems = output_problems(nb) + contradicted_quotes(nb)
        tqdm.write(f"{path.name}: {time.perf_counter() - start:.1f} s" + "".join(f"\n  {p}" for p in problems))
        failed |= bool(problems)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
