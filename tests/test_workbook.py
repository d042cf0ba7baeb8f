"""Unit tests of sleeplib.workbook: profiles, reports, and running (failing) notebooks."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from sleeplib import workbook


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A throwaway workbook root with its own ``params/`` and ``notebooks/``."""
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "demo.yaml").write_text(
        "_all:\n  dataset: synthetic\n  subjects: '0-3'\n  seed: 1\n"
        "10_nb:\n  subjects: '0-1'\n  epochs: 2\n"
    )
    monkeypatch.setattr(workbook, "_root", lambda: tmp_path)
    return tmp_path


def _notebook(path: Path, *sources: str) -> Path:
    """Write a notebook whose first cell is tagged ``parameters``."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        "profile = None\nreports_dir = None\ndataset = None\nsubjects = None\nseed = 0\nepochs = 1"
    )
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(s) for s in sources)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_profile_section_overrides_all(fake_root):
    params = workbook.load_profile("demo", "10_nb")
    assert params == {"dataset": "synthetic", "subjects": "0-1", "seed": 1, "epochs": 2, "profile": "demo"}
    # A notebook without its own section gets the _all section only.
    assert workbook.load_profile("demo", "99_other") == {
        "dataset": "synthetic", "subjects": "0-3", "seed": 1, "profile": "demo"}


def test_unknown_profile_lists_available(fake_root):
    with pytest.raises(ValueError, match=r"unknown profile 'nope'; available: \['demo'\]"):
        workbook.load_profile("nope", "10_nb")


def test_repo_profiles_have_the_contract_keys():
    for profile in workbook.PROFILES:
        params = workbook.load_profile(profile, "00_get_data")
        for key in ("dataset", "subjects", "data_dir", "mirror"):
            assert key in params, f"params/{profile}.yaml lacks {key}"


def test_notebook_paths_in_order_and_unknown_name(fake_root):
    for stem in ("10_nb", "02_b", "01_a"):
        _notebook(fake_root / "notebooks" / f"{stem}.ipynb")
    assert [p.stem for p in workbook.notebook_paths()] == ["01_a", "02_b", "10_nb"]
    assert [p.stem for p in workbook.notebook_paths(["02"])] == ["02_b"]
    with pytest.raises(ValueError, match="no notebook matches"):
        workbook.notebook_paths(["77"])


def test_save_report_records_profile_and_synthetic(tmp_path):
    path = workbook.save_report("10_nb", {"n": 3}, key={"acc": 0.5}, profile="smoke", synthetic=True,
                                reports_dir=tmp_path)
    data = json.loads(path.read_text())
    assert path == tmp_path / "10_nb.json"
    assert data["notebook"] == "10_nb" and data["profile"] == "smoke" and data["synthetic_data"] is True
    assert data["key"] == {"acc": 0.5} and data["results"] == {"n": 3}


@pytest.mark.notebooks
def test_failing_notebook_gets_html_and_failed_status(fake_root, tmp_path):
    nb = _notebook(fake_root / "notebooks" / "10_nb.ipynb", "raise RuntimeError('boom at epoch ' + str(epochs))")
    out = tmp_path / "reports"
    out.mkdir()
    (out / "10_nb.json").write_text("{}")  # a stale report must not count for this run
    run = workbook.run_notebook(nb, "demo", out)
    assert run.status == "failed"
    assert "boom at epoch 2" in run.error  # the profile's section reached the notebook
    assert (out / "10_nb.html").exists() and (out / "10_nb.ipynb").exists()
    assert not (out / "10_nb.json").exists()
    assert "boom" in (out / "10_nb.html").read_text()


@pytest.mark.notebooks
def test_notebook_without_report_fails_and_index_lists_runs(fake_root, tmp_path):
    ok = _notebook(
        fake_root / "notebooks" / "01_ok.ipynb",
        "from sleeplib.workbook import save_report\n"
        "save_report('01_ok', {}, key={'epochs': 42}, profile=profile, synthetic=True, reports_dir=reports_dir)",
    )
    silent = _notebook(fake_root / "notebooks" / "02_silent.ipynb", "x = 1")
    out = tmp_path / "reports"
    out.mkdir()
    runs = [workbook.run_notebook(ok, "demo", out), workbook.run_notebook(silent, "demo", out)]
    assert [r.status for r in runs] == ["ok", "failed"]
    assert runs[0].key == {"epochs": 42} and runs[0].synthetic is True
    assert "did not write 02_silent.json" in runs[1].error
    index = workbook.write_index(runs, "demo", out).read_text()
    assert "01_ok.html" in index and "02_silent.html" in index
    assert "SYNTHETIC DATA" in index and "epochs: 42" in index


def test_index_flags_results_not_comparable_to_the_paper(tmp_path):
    runs = [workbook.NotebookRun("11_x", "ok", 1.0, key={"accuracy": 0.21}, synthetic=False, comparable=False),
            workbook.NotebookRun("12_y", "ok", 1.0, key={"accuracy": 0.84}, synthetic=False, comparable=True)]
    rows = workbook.write_index(runs, "sample", tmp_path).read_text().split("<tr>")
    row_x = next(r for r in rows if "11_x.html" in r)
    row_y = next(r for r in rows if "12_y.html" in r)
    assert "not comparable to the paper" in row_x and "accuracy: 0.21" in row_x
    assert "not comparable" not in row_y
