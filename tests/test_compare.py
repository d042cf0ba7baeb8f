"""Tests of sleeplib.compare: paired fold comparison and error clustering (synthetic numbers only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sleeplib.compare import (
    compare_variants,
    error_clusters,
    fold_differences,
    night_scores,
    paired_comparison,
    per_class_errors,
    transition_mask,
    worst_night,
)


def _per_fold(acc, f1=None, kappa=None, folds=None):
    acc = np.asarray(acc, dtype=float)
    return pd.DataFrame(
        {
            "accuracy": acc,
            "macro_f1": acc - 0.05 if f1 is None else f1,
            "kappa": acc - 0.1 if kappa is None else kappa,
        },
        index=pd.Index(range(len(acc)) if folds is None else folds, name="fold"),
    )


def test_fold_differences_are_variant_minus_baseline_on_matching_folds():
    base = _per_fold([0.80, 0.70, 0.90], folds=[2, 0, 1])
    var = _per_fold([0.85, 0.72, 0.80], folds=[2, 0, 1])
    diff = fold_differences(base, var)
    assert list(diff.index) == [0, 1, 2]
    np.testing.assert_allclose(diff["accuracy"].to_numpy(), [0.02, -0.10, 0.05])


def test_fold_differences_refuse_different_folds():
    with pytest.raises(ValueError, match="different folds"):
        fold_differences(_per_fold([0.8, 0.7]), _per_fold([0.8, 0.7], folds=[0, 5]))


def test_consistent_large_gain_exceeds_noise():
    rng = np.random.default_rng(0)
    base_acc = rng.uniform(0.7, 0.9, size=20)
    gain = 0.05 + rng.normal(0, 0.005, size=20)
    table = paired_comparison(_per_fold(base_acc), _per_fold(base_acc + gain))
    row = table.loc["accuracy"]
    assert row["n_folds"] == 20
    assert row["mean_diff"] == pytest.approx(gain.mean())
    assert row["ci_low"] > 0 and row["ci_high"] > row["ci_low"]
    assert row["t_p"] < 1e-6 and row["wilcoxon_p"] < 1e-3
    assert row["folds_better"] == 20
    assert bool(row["exceeds_noise"])


def test_zero_mean_noise_does_not_exceed_noise():
    base_acc = np.linspace(0.7, 0.9, 10)
    swings = np.array([0.03, -0.03, 0.02, -0.02, 0.01, -0.01, 0.04, -0.04, 0.005, -0.005])
    row = paired_comparison(_per_fold(base_acc), _per_fold(base_acc + swings)).loc["accuracy"]
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["wilcoxon_p"] > 0.5
    assert not bool(row["exceeds_noise"])


def test_matches_scipy_paired_tests():
    from scipy import stats

    base = np.array([0.81, 0.77, 0.85, 0.79, 0.83, 0.80, 0.76])
    var = np.array([0.82, 0.80, 0.84, 0.83, 0.85, 0.81, 0.79])
    row = paired_comparison(_per_fold(base), _per_fold(var)).loc["accuracy"]
    assert row["t_p"] == pytest.approx(stats.ttest_rel(var, base).pvalue)
    assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(var - base).pvalue)


def test_five_folds_can_never_exceed_noise_with_wilcoxon():
    # Two-sided Wilcoxon on 5 pairs has minimum p = 0.0625: even a consistent gain is not enough.
    base = np.array([0.80, 0.75, 0.85, 0.78, 0.82])
    row = paired_comparison(_per_fold(base), _per_fold(base + [0.05, 0.06, 0.05, 0.07, 0.06])).loc["accuracy"]
    assert row["ci_low"] > 0
    assert row["wilcoxon_p"] == pytest.approx(0.0625)
    assert not bool(row["exceeds_noise"])


def test_single_fold_gives_nan_tests():
    row = paired_comparison(_per_fold([0.8]), _per_fold([0.9])).loc["accuracy"]
    assert row["mean_diff"] == pytest.approx(0.1)
    assert np.isnan(row["t_p"]) and np.isnan(row["ci_low"])
    assert not bool(row["exceeds_noise"])


def test_accepts_fold_summary_dicts():
    from sleeplib.metrics import fold_summary

    rng = np.random.default_rng(1)
    folds_a, folds_b = {}, {}
    for fold in range(4):
        y = rng.integers(0, 5, 200)
        folds_a[fold] = (y, np.where(rng.random(200) < 0.7, y, rng.integers(0, 5, 200)))
        folds_b[fold] = (y, np.where(rng.random(200) < 0.9, y, rng.integers(0, 5, 200)))
    table = paired_comparison(fold_summary(folds_a), fold_summary(folds_b))
    assert table.loc["accuracy", "mean_diff"] > 0.1


def test_compare_variants_stacks_against_baseline():
    base = _per_fold([0.8, 0.7, 0.75])
    table = compare_variants({"Ex1": base, "Ex2": _per_fold([0.81, 0.69, 0.77]), "Ex3": base}, "Ex1")
    assert set(table.index.get_level_values("variant")) == {"Ex2", "Ex3"}
    assert table.loc[("Ex3", "accuracy"), "mean_diff"] == 0
    assert table.loc[("Ex3", "accuracy"), "wilcoxon_p"] == 1.0
    with pytest.raises(KeyError):
        compare_variants({"Ex2": base}, "Ex1")


def test_transition_mask_respects_night_boundaries():
    y = np.array([0, 0, 0, 2, 2, 2, 2, 3, 3])
    nights = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    mask = transition_mask(y, nights)
    # changes: 0->2 between epochs 2/3 (night 0), 2->3 between 6/7 (night 1); 4/5 is a night boundary
    assert mask.tolist() == [False, False, True, True, False, False, True, True, False]
    wide = transition_mask(y, nights, width=2)
    assert wide.tolist() == [False, True, True, True, True, True, True, True, True]


def test_error_clusters_separates_transition_and_stable_errors():
    y_true = np.array([0, 0, 0, 0, 2, 2, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 2, 0, 2, 2, 2, 3, 2])  # two errors at the change, one in a stable run
    table = error_clusters(y_true, y_pred)
    assert table.loc["transition", "n_epochs"] == 2
    assert table.loc["transition", "error_rate"] == pytest.approx(1.0)
    assert table.loc["stable", "n_errors"] == 1
    assert table.loc["stable", "error_rate"] == pytest.approx(1 / 8)
    assert table.loc["transition", "share_of_errors"] == pytest.approx(2 / 3)
    assert table.loc["all", "n_errors"] == 3


def test_per_class_errors_names_the_commonest_confusion():
    y_true = np.array([1, 1, 1, 1, 2, 2, 0])
    y_pred = np.array([2, 2, 0, 1, 2, 2, 0])
    table = per_class_errors(y_true, y_pred)
    assert table.loc["N1", "error_rate"] == pytest.approx(0.75)
    assert table.loc["N1", "commonest_confusion"] == "N2"
    assert table.loc["N1", "commonest_confusion_share"] == pytest.approx(2 / 3)
    assert table.loc["N2", "n_errors"] == 0 and table.loc["N2", "commonest_confusion"] == ""
    assert np.isnan(table.loc["REM", "error_rate"])


def test_worst_night_is_the_least_accurate():
    y_true = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 4])
    y_pred = np.array([0, 1, 2, 3, 0, 0, 0, 3, 4, 0])
    nights = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    scores = night_scores(y_true, y_pred, nights, night_names={0: "A", 1: "B", 2: "C"})
    assert scores.index[0] == 1 and scores.loc[1, "record"] == "B"
    assert scores.loc[0, "accuracy"] == 1.0
    assert worst_night(y_true, y_pred, nights) == 1
    with pytest.raises(ValueError):
        worst_night(y_true, y_pred, nights, min_epochs=50)


def test_error_analysis_on_a_predictions_table_ignores_gaps():
    from sleeplib.compare import contiguous_segments, error_analysis

    # Record A: two test blocks (epochs 0-3 and 10-13) with a gap; record B: perfect.
    rows = []
    a_true = [0, 0, 2, 2, 2, 2, 3, 3]
    a_pred = [0, 2, 0, 2, 2, 2, 3, 1]
    for pos, t, p in zip([0, 1, 2, 3, 10, 11, 12, 13], a_true, a_pred):
        rows.append({"record": "A", "epoch_in_night": pos, "y_true": t, "y_pred": p})
    for pos in range(6):
        rows.append({"record": "B", "epoch_in_night": pos, "y_true": 4, "y_pred": 4})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter
    out = error_analysis(df)
    assert out["worst_record"] == "A"
    assert list(out["worst_night"]["epoch_in_night"]) == [0, 1, 2, 3, 10, 11, 12, 13]
    # transitions: A 0->2 at epochs 1/2 and 2->3 at 11/12; the 3(pos 3)->2(pos 10) gap is not one
    assert out["worst_night"]["at_transition"].tolist() == [False, True, True, False, False, True, True, False]
    clusters = out["clusters"]
    assert clusters.loc["transition", "n_epochs"] == 4 and clusters.loc["transition", "n_errors"] == 2
    assert clusters.loc["stable", "n_errors"] == 1
    assert out["nights"].loc["B", "accuracy"] == 1.0
    ordered = df.sort_values(["record", "epoch_in_night"])
    assert contiguous_segments(ordered).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_table_records_are_json_ready():
    import json

    from sleeplib.compare import table_records

    frame = pd.DataFrame({"a": [1.5, np.nan], "b": ["x", "y"]}, index=pd.Index(["r1", "r2"], name="run"))
    records = table_records(frame)
    assert records == [{"run": "r1", "a": 1.5, "b": "x"}, {"run": "r2", "a": None, "b": "y"}]
    json.dumps(records, allow_nan=False)
