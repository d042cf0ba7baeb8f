"""Paired comparison of a model variant against a baseline, and where a model's errors cluster.

A variant evaluated on the *same folds* as its baseline gives one difference per fold; the folds
are the unit of replication (one or a few subjects each), so the question "is the variant better?"
is answered by the paired differences, not by comparing two pooled numbers. With k folds:

- mean difference with a t-based 95% confidence interval;
- paired t-test (``scipy.stats.ttest_rel``) and Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, no normality assumption);
- ``exceeds_noise``: the difference is larger than fold-to-fold noise, i.e. the 95% CI of the mean
  difference excludes zero *and* the Wilcoxon test agrees (p < alpha). With 5 or fewer folds the
  two-sided Wilcoxon test cannot reach p < 0.05, so such a study can never claim a difference;
  that is by design (five subjects are too few to tell).

Error analysis works on epoch-level predictions: errors at stage transitions (epochs whose true
stage differs from a neighbour's in the same night) against errors within stable runs, per-class
error rates with the commonest confusion, and per-night scores to find the worst night.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sleeplib import STAGES

__all__ = [
    "DEFAULT_METRICS",
    "fold_differences",
    "paired_comparison",
    "compare_variants",
    "transition_mask",
    "error_clusters",
    "per_class_errors",
    "night_scores",
    "worst_night",
    "contiguous_segments",
    "error_analysis",
    "table_records",
]

DEFAULT_METRICS = ("accuracy", "macro_f1", "kappa")


def _per_fold_frame(per_fold) -> pd.DataFrame:
    """Accept a per-fold DataFrame or the dict of :func:`sleeplib.metrics.fold_summary`."""
    if isinstance(per_fold, Mapping) and "per_fold" in per_fold:
        per_fold = per_fold["per_fold"]
    if not isinstance(per_fold, pd.DataFrame):
        raise TypeError(
            f"expected a per-fold DataFrame (or fold_summary's dict), got {type(per_fold).__name__}"
        )
    return per_fold


def fold_differences(
    baseline, variant, metrics: Sequence[str] = DEFAULT_METRICS
) -> pd.DataFrame:
    """Per-fold differences ``variant - baseline`` on the folds both were evaluated on.

    Parameters
    ----------
    baseline, variant : pandas.DataFrame or dict
        One row per fold (index = fold id), columns including ``metrics``; or the dict returned by
        :func:`sleeplib.metrics.fold_summary`.
    metrics : sequence of str
        Columns to compare.

    Returns
    -------
    pandas.DataFrame
        Index = the common folds (sorted); columns = ``metrics``.

    Raises
    ------
    ValueError
        When the two runs share no fold, or when their folds differ (a paired comparison on
        different folds would compare different subjects).
    """
    base, var = _per_fold_frame(baseline), _per_fold_frame(variant)
    missing = [m for m in metrics if m not in base.columns or m not in var.columns]
    if missing:
        raise ValueError(f"metrics {missing} are missing from the per-fold tables")
    base_folds, var_folds = set(base.index), set(var.index)
    if base_folds != var_folds:
        raise ValueError(
            "baseline and variant were evaluated on different folds "
            f"(only baseline: {sorted(base_folds - var_folds, key=str)}, "
            f"only variant: {sorted(var_folds - base_folds, key=str)}); run both on the same folds"
        )
    if not base_folds:
        raise ValueError("no folds to compare")
    folds = sorted(base_folds, key=str)
    diff = var.loc[folds, list(metrics)].astype(float) - base.loc[folds, list(metrics)].astype(float)
    diff.index.name = "fold"
    return diff


def _wilcoxon_p(d: np.ndarray) -> float:
    # All-zero differences: the variant equals the baseline on every fold, no evidence of a change.
    if np.allclose(d, 0):
        return 1.0
    try:
        return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    except ValueError:
        return float("nan")


def paired_comparison(
    baseline,
    variant,
    metrics: Sequence[str] = DEFAULT_METRICS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Paired per-fold test of a variant against its baseline.

    Parameters
    ----------
    baseline, variant : pandas.DataFrame or dict
        Per-fold metric tables on the same folds (see :func:`fold_differences`).
    metrics : sequence of str
        Metrics to compare (in the units of the tables: fractions from :mod:`sleeplib.metrics`).
    alpha : float
        Significance level; the confidence interval is ``1 - alpha``.

    Returns
    -------
    pandas.DataFrame
        One row per metric: ``n_folds``, ``baseline_mean``, ``variant_mean``, ``mean_diff``,
        ``ci_low``, ``ci_high`` (t interval of the mean difference), ``sd_diff``,
        ``baseline_fold_sd`` (fold-to-fold sd of the baseline, the noise scale), ``folds_better``
        (folds where the variant is higher), ``t_p`` (paired t-test), ``wilcoxon_p`` and
        ``exceeds_noise`` (bool: CI excludes 0 and Wilcoxon p < alpha). With one fold the
        interval and tests are NaN and ``exceeds_noise`` is False.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diffs = fold_differences(baseline, variant, metrics)
    base, var = _per_fold_frame(baseline), _per_fold_frame(variant)
    rows = {}
    for metric in metrics:
        d = diffs[metric].to_numpy(dtype=float)
        n = d.size
        mean = float(d.mean())
        if n >= 2:
            sd = float(d.std(ddof=1))
            half = float(stats.t.ppf(1 - alpha / 2, n - 1) * sd / np.sqrt(n))
            ci = (mean - half, mean + half)
            if sd == 0:
                # Identical difference on every fold: the t statistic is undefined; zero means no change.
                t_p = 1.0 if mean == 0 else 0.0
            else:
                t_p = float(stats.ttest_1samp(d, 0.0).pvalue)
            w_p = _wilcoxon_p(d)
        else:
            sd, ci, t_p, w_p = float("nan"), (float("nan"), float("nan")), float("nan"), float("nan")
        ci_excludes_zero = bool(n >= 2 and (ci[0] > 0 or ci[1] < 0))
        rows[metric] = {
            "n_folds": n,
            "baseline_mean": float(base.loc[diffs.index, metric].mean()),
            "variant_mean": float(var.loc[diffs.index, metric].mean()),
            "mean_diff": mean,
            "ci_low": ci[0],
            "ci_high": ci[1],
            "sd_diff": sd,
            "baseline_fold_sd": float(base.loc[diffs.index, metric].std(ddof=1)) if n >= 2 else float("nan"),
            "folds_better": int((d > 0).sum()),
            "t_p": t_p,
            "wilcoxon_p": w_p,
            "exceeds_noise": bool(ci_excludes_zero and np.isfinite(w_p) and w_p < alpha),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "metric"
    return table


def compare_variants(
    per_fold_by_variant: Mapping[str, object],
    baseline: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """:func:`paired_comparison` of every variant against one baseline, stacked.

    Parameters
    ----------
    per_fold_by_variant : mapping name -> per-fold table (or fold_summary dict)
    baseline : str
        Key of the baseline in the mapping (it is not compared with itself).

    Returns
    -------
    pandas.DataFrame
        MultiIndex ``(variant, metric)``, columns as :func:`paired_comparison`. Empty when there is
        nothing but the baseline.
    """
    if baseline not in per_fold_by_variant:
        raise KeyError(f"baseline {baseline!r} not among {list(per_fold_by_variant)}")
    frames = {
        name: paired_comparison(per_fold_by_variant[baseline], table, metrics, alpha)
        for name, table in per_fold_by_variant.items()
        if name != baseline
    }
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, names=["variant", "metric"])


def _as_int(a) -> np.ndarray:
    return np.asarray(a).astype(np.int64).ravel()


def transition_mask(y_true, night_index=None, width: int = 1) -> np.ndarray:
    """Epochs at a stage transition of the true hypnogram.

    An epoch is "at a transition" when the true stage changes within ``width`` epochs before or
    after it, inside the same night (the boundary between two nights is not a transition).

    Parameters
    ----------
    y_true : array-like of int
        True labels, nights concatenated in time order.
    night_index : array-like, optional
        Night id of each epoch (all one night when None).
    width : int
        Neighbourhood in epochs (1: the epochs on both sides of each change).

    Returns
    -------
    numpy.ndarray of bool
    """
    y = _as_int(y_true)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    nights = np.zeros_like(y) if night_index is None else np.asarray(night_index).ravel()
    if nights.shape != y.shape:
        raise ValueError(f"night_index has {nights.size} entries for {y.size} labels")
    # change[i] marks a stage change between epoch i and i+1 within one night.
    change = (y[1:] != y[:-1]) & (nights[1:] == nights[:-1])
    mask = np.zeros(y.size, dtype=bool)
    idx = np.flatnonzero(change)
    for offset in range(width):
        # Epochs i-offset .. i+1+offset around each change, clipped and kept in the same night.
        for pos, anchor in ((idx - offset, idx), (idx + 1 + offset, idx + 1)):
            ok = (pos >= 0) & (pos < y.size)
            pos, anchor = pos[ok], anchor[ok]
            same = nights[pos] == nights[anchor]
            mask[pos[same]] = True
    return mask


def error_clusters(y_true, y_pred, night_index=None, width: int = 1) -> pd.DataFrame:
    """Error rate at stage transitions against within stable runs.

    Returns
    -------
    pandas.DataFrame
        Rows ``transition``, ``stable``, ``all``; columns ``n_epochs``, ``n_errors``,
        ``error_rate`` (errors / epochs, NaN when empty) and ``share_of_errors``.
    """
    y_t, y_p = _as_int(y_true), _as_int(y_pred)
    if y_t.shape != y_p.shape:
        raise ValueError(f"y_true has {y_t.size} labels but y_pred has {y_p.size}")
    at_transition = transition_mask(y_t, night_index, width)
    wrong = y_t != y_p
    total_errors = int(wrong.sum())
    rows = {}
    for name, sel in (("transition", at_transition), ("stable", ~at_transition), ("all", np.ones_like(wrong))):
        n, e = int(sel.sum()), int(wrong[sel].sum())
        rows[name] = {
            "n_epochs": n,
            "n_errors": e,
            "error_rate": e / n if n else float("nan"),
            "share_of_errors": e / total_errors if total_errors else float("nan"),
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "where"
    return out


def per_class_errors(y_true, y_pred, names: Sequence[str] = STAGES) -> pd.DataFrame:
    """Error rate of each true stage and the stage it is most often mistaken for.

    Returns
    -------
    pandas.DataFrame
        Index = stage names; columns ``support``, ``n_errors``, ``error_rate`` (NaN without
        support), ``share_of_errors``, ``commonest_confusion`` (stage name, "" without errors) and
        ``commonest_confusion_share`` (fraction of that stage's errors).
    """
    y_t, y_p = _as_int(y_true), _as_int(y_pred)
    if y_t.shape != y_p.shape:
        raise ValueError(f"y_true has {y_t.size} labels but y_pred has {y_p.size}")
    total_errors = int((y_t != y_p).sum())
    rows = {}
    for k, name in enumerate(names):
        sel = y_t == k
        wrong_pred = y_p[sel & (y_p != k)]
        n, e = int(sel.sum()), int(wrong_pred.size)
        if e:
            counts = np.bincount(wrong_pred, minlength=len(names))
            top = int(counts.argmax())
            confusion, share = names[top], counts[top] / e
        else:
            confusion, share = "", float("nan")
        rows[name] = {
            "support": n,
            "n_errors": e,
            "error_rate": e / n if n else float("nan"),
            "share_of_errors": e / total_errors if total_errors else float("nan"),
            "commonest_confusion": confusion,
            "commonest_confusion_share": share,
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "stage"
    return out


def night_scores(y_true, y_pred, night_index, night_names: Mapping | Sequence | None = None) -> pd.DataFrame:
    """Accuracy, macro-F1 and kappa of each night.

    Parameters
    ----------
    y_true, y_pred : array-like of int
    night_index : array-like
        Night id of each epoch.
    night_names : mapping or sequence, optional
        Display name (record) of each night id.

    Returns
    -------
    pandas.DataFrame
        Index = night id; columns ``record``, ``n_epochs``, ``accuracy``, ``macro_f1``, ``kappa``,
        sorted by accuracy ascending (worst first).
    """
    from sleeplib.metrics import summarize

    y_t, y_p = _as_int(y_true), _as_int(y_pred)
    nights = np.asarray(night_index).ravel()
    if not (y_t.shape == y_p.shape == nights.shape):
        raise ValueError("y_true, y_pred and night_index must have one entry per epoch")
    rows = {}
    for night in pd.unique(nights):
        sel = nights == night
        s = summarize(y_t[sel], y_p[sel])
        if night_names is None:
            record = str(night)
        elif isinstance(night_names, Mapping):
            record = str(night_names.get(night, night))
        else:
            record = str(night_names[int(night)])
        rows[night] = {
            "record": record,
            "n_epochs": int(sel.sum()),
            "accuracy": s["accuracy"],
            "macro_f1": s["macro_f1"],
            "kappa": s["kappa"],
        }
    out = pd.DataFrame.from_dict(rows, orient="index").sort_values("accuracy", kind="stable")
    out.index.name = "night"
    return out


def worst_night(y_true, y_pred, night_index, metric: str = "accuracy", min_epochs: int = 1):
    """Id of the night with the lowest ``metric`` (among nights with at least ``min_epochs``)."""
    scores = night_scores(y_true, y_pred, night_index)
    scores = scores[scores["n_epochs"] >= min_epochs]
    if scores.empty:
        raise ValueError(f"no night has at least {min_epochs} epochs")
    return scores[metric].astype(float).idxmin()


def contiguous_segments(predictions: pd.DataFrame) -> np.ndarray:
    """Segment id of each row of a predictions table: a new segment at each gap in time.

    Rows are taken in ``(record, epoch_in_night)`` order; a segment ends where the record changes
    or ``epoch_in_night`` jumps by more than one (e.g. between the test blocks of a time-block
    split), so that no stage "transition" is counted across a gap.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Columns ``record`` and ``epoch_in_night`` (as :class:`sleeplib.train.CVResults`), already
        sorted by them.

    Returns
    -------
    numpy.ndarray of int
    """
    record = predictions["record"].astype(str).to_numpy()
    pos = predictions["epoch_in_night"].to_numpy(dtype=np.int64)
    new = np.ones(len(pos), dtype=bool)
    if len(pos) > 1:
        new[1:] = (record[1:] != record[:-1]) | (np.diff(pos) != 1)
    return np.cumsum(new) - 1


def error_analysis(predictions: pd.DataFrame, width: int = 1) -> dict:
    """Where the errors of a cross-validation cluster: transitions, stages, nights.

    Parameters
    ----------
    predictions : pandas.DataFrame
        One row per test epoch with ``record``, ``epoch_in_night``, ``y_true``, ``y_pred`` (the
        ``predictions`` of :class:`sleeplib.train.CVResults`).
    width : int
        Transition neighbourhood in epochs (see :func:`transition_mask`).

    Returns
    -------
    dict
        ``clusters`` (:func:`error_clusters`), ``per_class`` (:func:`per_class_errors`),
        ``nights`` (:func:`night_scores` by record, worst first), ``worst_record`` (str) and
        ``worst_night`` (that record's rows, in time order, with ``at_transition``).
    """
    missing = {"record", "epoch_in_night", "y_true", "y_pred"} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    if predictions.empty:
        raise ValueError("no predictions to analyse")
    df = predictions.sort_values(["record", "epoch_in_night"], kind="stable").reset_index(drop=True)
    segments = contiguous_segments(df)
    y_true, y_pred = df["y_true"].to_numpy(), df["y_pred"].to_numpy()
    records = df["record"].astype(str).to_numpy()
    nights = night_scores(y_true, y_pred, records)
    worst = str(nights.index[0])
    sel = records == worst
    worst_rows = df.loc[sel].copy()
    worst_rows["at_transition"] = transition_mask(y_true, segments, width)[sel]
    return {
        "clusters": error_clusters(y_true, y_pred, segments, width),
        "per_class": per_class_errors(y_true, y_pred),
        "nights": nights,
        "worst_record": worst,
        "worst_night": worst_rows,
    }


def table_records(frame: pd.DataFrame) -> list[dict]:
    """A table as JSON-ready records: index kept as columns, NaN as None, numpy scalars as Python."""
    flat = frame.reset_index() if any(name is not None for name in frame.index.names) else frame
    flat = flat.astype(object).where(flat.notna(), None)
    return [
        {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
        for row in flat.to_dict("records")
    ]
