"""Sleep-staging metrics, computed with scikit-learn.

The papers this workbook reproduces (AttnSleep, DeepSleepNet, SleepEEGNet) report overall accuracy,
macro-F1 (MF1), Cohen's kappa, macro G-mean (MGm, AttnSleep) and per-class precision, recall and F1,
all on the confusion matrix *pooled over the cross-validation folds*. :func:`fold_summary` also gives
the per-fold mean and standard deviation, which shows how much the figures move between subjects.

Labels are the integers of :data:`sleeplib.STAGES` (0..4 = W, N1, N2, N3, REM). Every function takes
``labels`` so that a class absent from one fold still gets its row (with zero support).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix as _sk_confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from sleeplib import STAGES

__all__ = [
    "confusion_matrix",
    "specificity",
    "per_class_table",
    "macro_gmean",
    "summarize",
    "fold_summary",
]

_LABELS = tuple(range(len(STAGES)))


def _check(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has {y_true.size} labels but y_pred has {y_pred.size}; pass one prediction per epoch"
        )
    if y_true.size == 0:
        raise ValueError("no labels given; metrics need at least one epoch")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, labels: Sequence[int] = _LABELS) -> np.ndarray:
    """Confusion matrix, rows = true stage, columns = predicted stage.

    Parameters
    ----------
    y_true, y_pred : array-like of int
        True and predicted labels.
    labels : sequence of int
        Label order of the rows/columns (default 0..4 = W, N1, N2, N3, REM).

    Returns
    -------
    numpy.ndarray
        int64 ``(n_labels, n_labels)``.
    """
    y_true, y_pred = _check(y_true, y_pred)
    return _sk_confusion_matrix(y_true, y_pred, labels=list(labels)).astype(np.int64)


def specificity(cm: np.ndarray) -> np.ndarray:
    """Per-class specificity TN / (TN + FP) from a confusion matrix (one-vs-rest).

    A class for which TN + FP is zero gets NaN (specificity is undefined there).
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return tn / (tn + fp)


def per_class_table(
    y_true, y_pred, labels: Sequence[int] = _LABELS, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per-class precision, recall (sensitivity), F1, specificity, G-mean and support.

    G-mean of a class is ``sqrt(recall * specificity)`` (one-vs-rest), the definition AttnSleep uses
    for its macro G-mean (MGm). Precision of a never-predicted class is 0 (scikit-learn's
    ``zero_division=0``).

    Returns
    -------
    pandas.DataFrame
        Index = stage names; columns ``precision, recall, f1, specificity, gmean, support``.
    """
    y_true, y_pred = _check(y_true, y_pred)
    labels = list(labels)
    if names is None:
        names = [STAGES[k] if 0 <= k < len(STAGES) else str(k) for k in labels]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    spec = specificity(confusion_matrix(y_true, y_pred, labels))
    return pd.DataFrame(
        {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "specificity": spec,
            "gmean": np.sqrt(recall * spec),
            "support": support.astype(np.int64),
        },
        index=pd.Index(list(names), name="stage"),
    )


def macro_gmean(y_true, y_pred, labels: Sequence[int] = _LABELS) -> float:
    """Macro G-mean: mean over classes present in ``y_true`` of ``sqrt(recall * specificity)``."""
    table = per_class_table(y_true, y_pred, labels)
    present = table["support"] > 0
    return float(table.loc[present, "gmean"].mean())


def headline_from_confusion(cm: np.ndarray) -> dict:
    """Accuracy, macro-F1 and Cohen's kappa of one confusion matrix (rows true, columns predicted).

    The same definitions as :func:`summarize` (macro-F1 over the classes present in truth or
    prediction), computed from counts: the training engines accumulate confusion matrices on the
    device and select epochs with this, so eager and batched training score alike.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    accuracy = tp.sum() / total
    rows, cols = cm.sum(1), cm.sum(0)
    present = (rows + cols) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / (rows + cols), 0.0)
    expected = (rows * cols).sum() / total**2
    kappa = (accuracy - expected) / (1 - expected) if expected < 1 else 0.0
    return {"accuracy": float(accuracy), "macro_f1": float(f1[present].mean()), "kappa": float(kappa)}


def summarize(y_true, y_pred, labels: Sequence[int] = _LABELS) -> dict:
    """Headline metrics of one set of predictions.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` (over classes present in ``y_true`` or ``y_pred``, as
        scikit-learn), ``kappa`` (Cohen's), ``macro_gmean`` and ``n_epochs``, as floats in 0..1
        (kappa in -1..1).
    """
    y_true, y_pred = _check(y_true, y_pred)
    present = sorted(set(np.unique(y_true)) | set(np.unique(y_pred)))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=list(labels))),
        "macro_gmean": macro_gmean(y_true, y_pred, labels),
        "n_epochs": int(y_true.size),
    }


def fold_summary(
    folds: Mapping[object, tuple[Iterable, Iterable]] | Sequence[tuple[Iterable, Iterable]],
    labels: Sequence[int] = _LABELS,
) -> dict:
    """Metrics per fold, their mean and sd, and the pooled figures the papers report.

    Parameters
    ----------
    folds : mapping fold -> (y_true, y_pred), or sequence of (y_true, y_pred)
        Test-fold predictions of a cross-validation.

    Returns
    -------
    dict
        ``per_fold`` (DataFrame, one row per fold), ``mean`` and ``sd`` (Series over folds, sd with
        ``ddof=1``; NaN for one fold), ``pooled`` (dict from :func:`summarize` on all folds' epochs
        concatenated), ``confusion`` (pooled confusion matrix) and ``per_class`` (pooled
        :func:`per_class_table`).
    """
    items = list(folds.items()) if isinstance(folds, Mapping) else list(enumerate(folds))
    if not items:
        raise ValueError("no folds given; pass at least one (y_true, y_pred) pair")
    rows, all_true, all_pred = {}, [], []
    for fold, (y_true, y_pred) in items:
        y_true, y_pred = _check(y_true, y_pred)
        rows[fold] = summarize(y_true, y_pred, labels)
        all_true.append(y_true)
        all_pred.append(y_pred)
    per_fold = pd.DataFrame.from_dict(rows, orient="index")
    per_fold.index.name = "fold"
    y_true, y_pred = np.concatenate(all_true), np.concatenate(all_pred)
    return {
        "per_fold": per_fold,
        "mean": per_fold.mean(),
        "sd": per_fold.std(ddof=1),
        "pooled": summarize(y_true, y_pred, labels),
        "confusion": confusion_matrix(y_true, y_pred, labels),
        "per_class": per_class_table(y_true, y_pred, labels),
    }
