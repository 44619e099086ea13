"""The classroom notebooks run top to bottom (at reduced sizes: RWML_NOTEBOOK_QUICK=1) and draw their figures."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
    assert [n.name[:2] for n in NOTEBOOKS] == ["1_", "2_", "3_"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs_without_errors_and_draws_figures(notebook, tmp_path, monkeypatch, embedded_cache):
    monkeypatch.setenv("RWML_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("RWML_JAX_CACHE", str(embedded_cache))  # the tiny embedded defaults the other tests build
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel runs in tmp_path and imports this checkout's modules
    book = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a cell that raises fails the test (CellExecutionError)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    figures = [output for cell in code for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    # every figure the notebook shows arrives (a library call that switched matplotlib's backend would drop them)
    shown = sum(cell.source.count("plt.show()") + cell.source.count("display(Image(") for cell in code)
    assert len(figures) == shown > 0
