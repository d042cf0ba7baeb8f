"""Tests of sleeplib.references: structure of PAPERS and the paper tables."""

from __future__ import annotations

import math

import pytest

from sleeplib import STAGES
from sleeplib.references import METRICS, PAPERS, dataset_key, paper_row, paper_table, reference_rows


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_every_entry_is_well_formed(name):
    entry = PAPERS[name]
    assert entry["citation"].strip() and entry["protocol"].strip()
    assert entry["results"], f"{name} has no results"
    for dataset, res in entry["results"].items():
        assert dataset == dataset_key(dataset), f"{name}: non-canonical dataset key {dataset!r}"
        for metric in METRICS:
            value = res.get(metric)
            assert value is None or isinstance(value, (int, float)), (name, dataset, metric)
        if res.get("kappa") is not None:
            assert -1 <= res["kappa"] <= 1, f"{name}/{dataset}: kappa is a fraction, not percent"
        for metric in ("accuracy", "macro_f1", "mgm"):
            if res.get(metric) is not None:
                assert 1 < res[metric] <= 100, f"{name}/{dataset}: {metric} is in percent"
        assert set(res.get("f1") or {}) <= set(STAGES)
    for dataset, fields in (entry.get("unverified") or {}).items():
        assert dataset in entry["results"]
        assert set(fields) <= set(METRICS) | {"f1"} | {f"f1_{s}" for s in STAGES}


def test_attnsleep_edf20_row_matches_the_paper():
    row = paper_row("AttnSleep", "Sleep-EDF-20")
    assert (row["accuracy"], row["macro_f1"], row["kappa"], row["mgm"]) == (84.4, 78.1, 0.79, 85.5)
    assert [row[f"f1_{s}"] for s in STAGES] == [89.7, 42.6, 88.8, 90.2, 79.0]
    assert row["published"] and row["note"] == ""
    # The per-class F1 of the paper averages to its macro-F1 (to rounding): a transcription check.
    assert sum(row[f"f1_{s}"] for s in STAGES) / 5 == pytest.approx(row["macro_f1"], abs=0.06)
    assert "TNSRE" in PAPERS["attnsleep"]["citation"] and "809" in PAPERS["attnsleep"]["citation"]


def test_unchecked_rows_are_flagged_in_the_table():
    for dataset in ("sleep-edf-78", "shhs"):
        table = paper_table("attnsleep", dataset)
        assert len(table) == 1
        note = table["note"].iloc[0]
        unverified = PAPERS["attnsleep"].get("unverified", {}).get(dataset)
        if unverified:
            assert note.startswith("unverified")
        else:
            assert note == ""


def test_unpublished_attempt_is_labelled_and_not_a_paper():
    table = reference_rows("attnsleep-unpublished-attempt", "sleep-edf-20/")
    assert list(table["accuracy"]) == [84.0, 83.0, 84.23]
    assert list(table["macro_f1"]) == [79.0, 78.0, 78.98]
    assert not table["published"].any()
    assert all("UNPUBLISHED" in label for label in table.index)
    assert all("UNPUBLISHED" in note for note in table["note"])


def test_dataset_aliases_and_errors():
    assert dataset_key("EDF20") == "sleep-edf-20"
    assert dataset_key("sleep_edf_78") == "sleep-edf-78"
    assert dataset_key("SHHS") == "shhs"
    assert dataset_key("sleep-edf-20/Ex1") == "sleep-edf-20/Ex1"
    with pytest.raises(KeyError, match="unknown paper"):
        paper_table("nosuchnet", "sleep-edf-20")
    with pytest.raises(KeyError, match="no results"):
        paper_table("attnsleep", "sample")



def test_results_table_puts_paper_above_ours_in_paper_units():
    import numpy as np

    from sleeplib.metrics import fold_summary
    from sleeplib.references import results_table

    rng = np.random.default_rng(0)
    folds = {}
    for fold in range(3):
        y = rng.integers(0, 5, 300)
        folds[fold] = (y, np.where(rng.random(300) < 0.8, y, rng.integers(0, 5, 300)))
    summary = fold_summary(folds)
    table = results_table({"ours (synthetic)": summary}, paper="attnsleep", dataset="sleep-edf-20",
                          notes={"ours (synthetic)": "SYNTHETIC"})
    assert list(table.index)[0].startswith("Eldele et al. 2021")
    ours = table.loc["ours (synthetic)"]
    assert ours["accuracy"] == pytest.approx(summary["pooled"]["accuracy"] * 100)
    assert ours["kappa"] == pytest.approx(summary["pooled"]["kappa"])
    assert ours["f1_N1"] == pytest.approx(summary["per_class"].loc["N1", "f1"] * 100)
    assert ours["accuracy_fold_sd"] == pytest.approx(summary["sd"]["accuracy"] * 100)
    assert ours["n_folds"] == 3 and ours["note"] == "SYNTHETIC"
    # A dataset the paper never reported gets a note row, not numbers.
    other = results_table({"ours": summary}, paper="attnsleep", dataset="sample")
    assert "reports no result" in other["note"].iloc[0]
