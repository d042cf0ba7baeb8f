"""The workbook's notebooks: structure checks (fast) and a full smoke run (``-m notebooks``)."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest

from sleeplib import workbook

NOTEBOOKS = workbook.notebook_paths()
REQUIRED_PARAMETERS = ("profile", "dataset", "subjects", "channels", "data_dir", "mirror", "reports_dir")


def _code(nb) -> str:
    """The notebook's code, with IPython magics and shell lines left out so that it parses."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_has_tagged_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"
    assigned = {t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    missing = [p for p in REQUIRED_PARAMETERS if p not in assigned]
    assert not missing, f"{path.name}: the parameters cell lacks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_logic_lives_in_sleeplib(path):
    nb = nbformat.read(path, as_version=4)
    tree = ast.parse(_code(nb))
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert len(defs) <= 2, f"{path.name} defines {defs}; move logic into sleeplib (at most 2 tiny helpers)"


@pytest.mark.notebooks
@pytest.mark.slow
def test_workbook_runs_at_smoke_profile(tmp_path, monkeypatch):
    # Data and reports go to tmp folders so that a test run leaves data/ and reports/ alone.
    monkeypatch.setenv("SLEEPLIB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    reports = tmp_path / "reports"
    runs = workbook.run_workbook("smoke", reports_dir=reports)
    assert [r.stem for r in runs] == [p.stem for p in NOTEBOOKS]
    failed = {r.stem: r.error for r in runs if r.status != "ok"}
    assert not failed, f"notebooks failed at the smoke profile (see their HTML in {reports}): {failed}"
    index = (reports / "index.html").read_text()
    for run in runs:
        report = json.loads((reports / f"{run.stem}.json").read_text())
        assert report["profile"] == "smoke"
        assert report["synthetic_data"] is True, f"{run.stem} must flag the smoke profile's data as synthetic"
        assert (reports / f"{run.stem}.html").stat().st_size > 0
        assert f"{run.stem}.html" in index
    assert "SYNTHETIC DATA" in index
    # MPLBACKEND=Agg (as run_all.sh sets it) must not swallow the figures of the HTML reports.
    explore = nbformat.read(reports / "01_explore.ipynb", as_version=4)
    images = [o for c in explore.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "01_explore rendered no figures into its report"
