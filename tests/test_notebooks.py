"""The classroom notebooks run top to bottom (at reduced sizes: RWML_NOTEBOOK_QUICK=1), draw their figures with every
axis labelled, and are committed with the outputs of such a run, so a reader sees the figures without running them."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_500_000  # figures at modest resolution; a notebook file past this carries something it should not

# Run first in the kernel: every pyplot figure is checked when the notebook shows it. A visible axes needs an x and a
# y label, its own or one of the axes it shares that axis with (stacked panels label the bottom one), or the figure's
# supxlabel / supylabel; and a title, its own or the figure's suptitle. Axes turned off (a panel of text) are skipped.
LABEL_CHECK = '''
import matplotlib.pyplot as _pyplot

_show, _checked_axes, _unlabelled = _pyplot.show, [], []


def _has(axis, getter, shared, figure_getter):
    return bool(figure_getter(axis.figure) or any(getter(a) for a in shared(axis).get_siblings(axis)))


def _show_checked(*args, **kwargs):
    for number in _pyplot.get_fignums():
        figure = _pyplot.figure(number)
        for axis in figure.axes:
            if not axis.axison:
                continue
            _checked_axes.append(axis)
            needs = {"x label": _has(axis, lambda a: a.get_xlabel(), lambda a: a.get_shared_x_axes(),
                                     lambda f: f.get_supxlabel()),
                     "y label": _has(axis, lambda a: a.get_ylabel(), lambda a: a.get_shared_y_axes(),
                                     lambda f: f.get_supylabel()),
                     "title": bool(axis.get_title() or figure.get_suptitle())}
            _unlabelled.extend(f"{what} missing on an axes of figure {number} (title {axis.get_title()!r}, "
                               f"x {axis.get_xlabel()!r}, y {axis.get_ylabel()!r})" for what, ok in needs.items() if not ok)
    return _show(*args, **kwargs)


_pyplot.show = _show_checked
'''
LABEL_REPORT = "import json\nprint(json.dumps({'checked': len(_checked_axes), 'unlabelled': _unlabelled}))"


def shown_figures(cell) -> int:
    """The figures a code cell shows: its pyplot show calls and its displayed images."""
    return cell.source.count("plt.show()") + cell.source.count("display(Image(")


def test_there_are_three_notebooks():
    assert [n.name[:2] for n in NOTEBOOKS] == ["1_", "2_", "3_"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs_without_errors_and_draws_labelled_figures(notebook, tmp_path, monkeypatch, embedded_cache, request):
    if notebook.name.startswith("1_"):  # it opens with SmolLM2, converted once per session (conftest's smollm2)
        request.getfixturevalue("smollm2")
    monkeypatch.setenv("RWML_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("RWML_JAX_CACHE", str(embedded_cache))  # the tiny embedded defaults the other tests build
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel runs in tmp_path and imports this checkout's modules
    book = nbformat.read(notebook, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    book.cells = [nbformat.v4.new_code_cell(LABEL_CHECK), *book.cells, nbformat.v4.new_code_cell(LABEL_REPORT)]
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a cell that raises fails the test (CellExecutionError); outputs of the committed file are replaced
    figures = [output for cell in code for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    # every figure the notebook shows arrives (a library call that switched matplotlib's backend would drop them)
    shown = sum(map(shown_figures, code))
    assert len(figures) == shown > 0
    report = json.loads("".join(o.get("text", "") for o in book.cells[-1].outputs if o.output_type == "stream"))
    pyplot_figures = sum(cell.source.count("plt.show()") for cell in code)
    assert report["checked"] >= pyplot_figures > 0  # every pyplot figure went through the check, each with an axes
    assert report["unlabelled"] == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_committed_notebook_carries_the_outputs_of_one_run(notebook):
    """A reader browsing the repository sees every figure: the file holds the outputs of one top-to-bottom run
    (execution counts 1, 2, 3, ...), without errors, each cell with the images it shows, at a modest size."""
    assert notebook.stat().st_size < MAX_BYTES
    book = nbformat.read(notebook, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    for index, cell in enumerate(code):
        assert [o for o in cell.outputs if o.output_type == "error"] == [], f"code cell {index + 1} holds an error"
        images = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        assert images == shown_figures(cell), f"code cell {index + 1} shows {shown_figures(cell)} figures, holds {images}"
    assert sum(map(shown_figures, code)) > 0
