"""Metrics against scikit-learn and a hand-computed example."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score

from sleeplib.metrics import confusion_matrix, fold_summary, macro_gmean, per_class_table, specificity, summarize


def test_hand_computed_two_class_example():
    # truth 0 0 1 1, prediction 0 1 1 1: class 0 recall 1/2, spec 1; class 1 recall 1, spec 1/2
    y_true, y_pred = [0, 0, 1, 1], [0, 1, 1, 1]
    table = per_class_table(y_true, y_pred, labels=[0, 1])
    np.testing.assert_allclose(table["recall"], [0.5, 1.0])
    np.testing.assert_allclose(table["specificity"], [1.0, 0.5])
    np.testing.assert_allclose(table["precision"], [1.0, 2 / 3])
    np.testing.assert_allclose(table["gmean"], [np.sqrt(0.5), np.sqrt(0.5)])
    s = summarize(y_true, y_pred, labels=[0, 1])
    assert s["accuracy"] == 0.75
    # kappa: po = .75, pe = (.5*.25 + .5*.75) = .5 -> .5
    assert s["kappa"] == pytest.approx(0.5)
    assert s["macro_gmean"] == pytest.approx(np.sqrt(0.5))


def test_against_sklearn_on_random_labels():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 5, 500))
    s = summarize(y_true, y_pred)
    assert s["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert s["kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred))
    table = per_class_table(y_true, y_pred)
    np.testing.assert_allclose(table["precision"], precision_score(y_true, y_pred, average=None))
    np.testing.assert_allclose(table["recall"], recall_score(y_true, y_pred, average=None))
    cm = confusion_matrix(y_true, y_pred)
    spec = [((y_true != k) & (y_pred != k)).sum() / (y_true != k).sum() for k in range(5)]
    np.testing.assert_allclose(specificity(cm), spec)
    assert macro_gmean(y_true, y_pred) == pytest.approx(np.mean(np.sqrt(table["recall"] * np.asarray(spec))))


def test_fold_summary_pools_and_averages():
    folds = {0: ([0, 1, 2, 2], [0, 1, 2, 1]), 1: ([3, 4, 4, 0], [3, 4, 0, 0])}
    out = fold_summary(folds)
    assert out["per_fold"]["accuracy"].tolist() == [0.75, 0.75]
    assert out["pooled"]["accuracy"] == 0.75
    assert out["sd"]["accuracy"] == 0.0
    assert out["confusion"].sum() == 8 and out["confusion"].shape == (5, 5)
    assert out["per_class"].loc["N2", "support"] == 2


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="one prediction per epoch"):
        summarize([0, 1], [0])


def test_headline_from_confusion_matches_scikit_learn():
    """The engines' per-epoch scores (from confusion counts) equal summarize()'s, absent classes too."""
    from sleeplib.metrics import confusion_matrix, headline_from_confusion, summarize

    rng = np.random.default_rng(3)
    for present in ([0, 1, 2, 3, 4], [0, 2, 4], [1, 2]):
        y_true = rng.choice(present, 300)
        y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice([0, 1, 2, 3, 4], 300))
        expected = summarize(y_true, y_pred)
        got = headline_from_confusion(confusion_matrix(y_true, y_pred))
        for name in ("accuracy", "macro_f1", "kappa"):
            assert got[name] == pytest.approx(expected[name], abs=1e-12), (present, name)
