"""Published results: the single source of truth for every paper number shown in the workbook.

Every results table of a notebook puts the paper's row (from here, with its citation) beside ours.
Numbers are copied by hand from the papers; a number that could not be checked against the paper or
a paper quoting it is flagged in ``unverified`` and shown as such by :func:`paper_table`.

Structure
---------
``PAPERS[name]`` is a dict with

- ``citation`` (str): full reference.
- ``protocol`` (str): how the published numbers were obtained (folds, selection, weights).
- ``results``: ``{dataset: {"accuracy", "macro_f1", "kappa", "mgm", "f1": {"W", "N1", "N2", "N3",
  "REM"}}}``; accuracy, macro-F1, MGm and per-class F1 in percent, kappa in 0..1, as the papers print
  them. A figure a paper does not report is ``None``.
- ``source`` (optional): ``{dataset: str}`` where each row was checked.
- ``unverified`` (optional): ``{dataset: [field, ...]}`` figures that could not be checked.
- ``published`` (bool): False for reference points that were never peer-reviewed (shown labelled).

Other tracks add their papers (DeepSleepNet, SleepEEGNet, ...) to :data:`PAPERS` with the same keys.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from sleeplib import STAGES

__all__ = [
    "PAPERS", "METRICS", "paper_table", "paper_row", "reference_rows", "dataset_key", "our_row", "results_table",
]

METRICS = ("accuracy", "macro_f1", "kappa", "mgm")
"""Headline metric keys of a results entry (percent except kappa)."""

_ATTNSLEEP_CITATION = (
    "Eldele E, Chen Z, Liu C, Wu M, Kwoh C-K, Li X, Guan C. An Attention-Based Deep Learning Approach "
    "for Sleep Stage Classification With Single-Channel EEG. IEEE Trans Neural Syst Rehabil Eng "
    "29:809-818, 2021. doi:10.1109/TNSRE.2021.3076234"
)

PAPERS: dict[str, dict[str, Any]] = {
    "attnsleep": {
        "citation": _ATTNSLEEP_CITATION,
        "short": "Eldele et al. 2021 (AttnSleep)",
        "published": True,
        "protocol": (
            "Subject-wise k-fold CV (Sleep-EDF-20: 20-fold, one subject out; Sleep-EDF-78: 10-fold; "
            "SHHS: 10-fold), single EEG channel (Fpz-Cz for Sleep-EDF, C4-A1 for SHHS), 30-s epochs "
            "classified one at a time; batch 128, Adam lr 1e-3 (1e-4 after epoch 10), 100 epochs; "
            "class-weighted cross-entropy with weights from the label counts; the epoch kept is the "
            "one with the best accuracy on the test fold (the published code has no separate "
            "validation set), metrics on the confusion matrix pooled over folds."
        ),
        "results": {
            "sleep-edf-20": {
                "accuracy": 84.4,
                "macro_f1": 78.1,
                "kappa": 0.79,
                "mgm": 85.5,
                "f1": {"W": 89.7, "N1": 42.6, "N2": 88.8, "N3": 90.2, "REM": 79.0},
            },
            # Headline figures as widely quoted for the paper; the paper's table could not be read
            # from here, so they are flagged unverified. MGm and per-class F1 are left out
            # (None) rather than guessed.
            "sleep-edf-78": {
                "accuracy": 81.3,
                "macro_f1": 75.1,
                "kappa": 0.74,
                "mgm": None,
                "f1": {},
            },
            "shhs": {
                "accuracy": 84.2,
                "macro_f1": 75.3,
                "kappa": 0.78,
                "mgm": None,
                "f1": {},
            },
        },
        "source": {
            "sleep-edf-20": "Eldele et al. 2021, results table (figures given in the project brief)",
            "sleep-edf-78": (
                "not checked against the paper; accuracy 81.3 (10-fold) is also quoted by a third-party "
                "README comparing against AttnSleep"
            ),
            "shhs": "not checked against the paper",
        },
        "unverified": {
            "sleep-edf-78": ["accuracy", "macro_f1", "kappa"],
            "shhs": ["accuracy", "macro_f1", "kappa"],
        },
    },
    "attnsleep-unpublished-attempt": {
        "citation": (
            "Earlier unpublished attempt to improve AttnSleep on Sleep-EDF-20 (Ex1 AttnSleep baseline, "
            "Ex2 Conformer temporal context encoder, Ex3 MSMP CRNN front end); not peer-reviewed, "
            "protocol details not published"
        ),
        "short": "earlier unpublished attempt (not peer-reviewed)",
        "published": False,
        "protocol": "Sleep-EDF-20, said to follow AttnSleep's protocol; not independently documented.",
        "results": {
            "sleep-edf-20/Ex1": {"accuracy": 84.0, "macro_f1": 79.0, "kappa": None, "mgm": None, "f1": {}},
            "sleep-edf-20/Ex2": {"accuracy": 83.0, "macro_f1": 78.0, "kappa": None, "mgm": None, "f1": {}},
            "sleep-edf-20/Ex3": {"accuracy": 84.23, "macro_f1": 78.98, "kappa": None, "mgm": None, "f1": {}},
        },
        "source": {},
        "unverified": {},
    },
    # Track F (notebook 10): DeepSleepNet.
    "deepsleepnet": {
        "citation": (
            "Supratak A, Dong H, Wu C, Guo Y. DeepSleepNet: A Model for Automatic Sleep Stage Scoring Based on "
            "Raw Single-Channel EEG. IEEE Trans Neural Syst Rehabil Eng 25(11):1998-2008, 2017. "
            "doi:10.1109/TNSRE.2017.2721116"
        ),
        "short": "Supratak et al. 2017 (DeepSleepNet)",
        "published": True,
        "protocol": (
            "Sleep-EDF (2013 release, 20 subjects), Fpz-Cz, 20-fold subject-wise CV (fold k tests subject k); "
            "pre-training of the CNNs on class-balanced oversampled epochs, then fine-tuning on sequences of "
            "25 epochs; the last epoch's model is reported (no model selection); metrics pooled over folds."
        ),
        "results": {
            "sleep-edf-20": {
                "accuracy": 82.0,
                "macro_f1": 76.9,
                "kappa": 0.76,
                "mgm": None,
                "f1": {"W": 84.7, "N1": 46.6, "N2": 85.9, "N3": 84.8, "REM": 82.4},
            },
        },
        "source": {"sleep-edf-20": "Supratak et al. 2017, Fpz-Cz results (figures given in the project brief)"},
        "unverified": {},
    },
    # Track F (notebook 12): SleepEEGNet.
    "sleepeegnet": {
        "citation": (
            "Mousavi S, Afghah F, Acharya UR. SleepEEGNet: Automated sleep stage scoring with sequence to "
            "sequence deep learning approach. PLoS ONE 14(5):e0216456, 2019. doi:10.1371/journal.pone.0216456"
        ),
        "short": "Mousavi et al. 2019 (SleepEEGNet)",
        "published": True,
        "protocol": (
            "Sleep-EDF 2013 (20 subjects) and 2018 (78 subjects), Fpz-Cz, 20-fold CV; the released code splits "
            "by NIGHT (night files permuted, then array_split), so a subject's other night can be in training, "
            "and keeps the checkpoint with the best macro-F1 on the test fold (evaluated every 5 epochs); "
            "sequences of 10 epochs, SMOTE-balanced training set, MFE loss."
        ),
        "results": {
            "sleep-edf-20": {
                "accuracy": 84.26,
                "macro_f1": 79.66,
                "kappa": 0.79,
                "mgm": None,
                "f1": {"W": 89.19, "N1": 52.19, "N2": 86.77, "N3": 85.13, "REM": 85.02},
            },
            "sleep-edf-78": {"accuracy": 80.03, "macro_f1": 73.55, "kappa": 0.73, "mgm": None, "f1": {}},
        },
        "source": {
            "sleep-edf-20": "Mousavi et al. 2019, Sleep-EDF 2013 Fpz-Cz (figures given in the project brief)",
            "sleep-edf-78": "Mousavi et al. 2019, Sleep-EDF 2018 Fpz-Cz (figures given in the project brief)",
        },
        "unverified": {},
    },
}
"""Published (and clearly labelled unpublished) results by paper name."""

_DATASET_ALIASES = {
    "edf20": "sleep-edf-20",
    "sleepedf20": "sleep-edf-20",
    "sleep-edf-20": "sleep-edf-20",
    "edf78": "sleep-edf-78",
    "sleepedf78": "sleep-edf-78",
    "sleep-edf-78": "sleep-edf-78",
    "shhs": "shhs",
    "shhs1": "shhs",
}


def dataset_key(dataset: str) -> str:
    """Canonical dataset name (``"Sleep-EDF-20"``, ``"edf20"`` -> ``"sleep-edf-20"``).

    Sub-keys after a slash (``"sleep-edf-20/Ex1"``) are kept as they are.
    """
    base, sep, rest = str(dataset).partition("/")
    norm = base.strip().lower().replace("_", "-")
    norm = _DATASET_ALIASES.get(norm.replace("-", ""), _DATASET_ALIASES.get(norm, norm))
    return norm + (sep + rest if sep else "")


def _entry(name: str) -> dict[str, Any]:
    key = name.lower()
    if key not in PAPERS:
        raise KeyError(f"unknown paper {name!r}; known: {sorted(PAPERS)}")
    return PAPERS[key]


def paper_row(name: str, dataset: str) -> dict[str, Any]:
    """One flat row of a paper's results: headline metrics, per-class F1 (``f1_W``...), labels.

    Parameters
    ----------
    name : str
        Key of :data:`PAPERS`.
    dataset : str
        Dataset key (aliases accepted), possibly with a sub-key (``"sleep-edf-20/Ex1"``).

    Returns
    -------
    dict
        ``source`` (short citation), ``published``, ``accuracy``, ``macro_f1``, ``kappa``, ``mgm``,
        ``f1_W`` ... ``f1_REM`` (None where not reported) and ``note`` ("unverified: ..." when
        some figures could not be checked, "" otherwise).

    Raises
    ------
    KeyError
        When the paper or the dataset is not in :data:`PAPERS`.
    """
    entry = _entry(name)
    key = dataset_key(dataset)
    results = entry["results"]
    if key not in results:
        raise KeyError(f"{name!r} reports no results for {dataset!r}; available: {sorted(results)}")
    res = results[key]
    row: dict[str, Any] = {
        "source": entry.get("short", name),
        "published": bool(entry.get("published", True)),
    }
    for metric in METRICS:
        row[metric] = res.get(metric)
    f1 = res.get("f1") or {}
    for stage in STAGES:
        row[f"f1_{stage}"] = f1.get(stage)
    unverified = list((entry.get("unverified") or {}).get(key, []))
    notes = []
    if not row["published"]:
        notes.append("UNPUBLISHED reference point, not a published result")
    if unverified:
        notes.append("unverified: " + ", ".join(unverified))
    row["note"] = "; ".join(notes)
    return row


def paper_table(name: str, dataset: str) -> pd.DataFrame:
    """A paper's published row for one dataset as a one-row DataFrame, ready to stack on ours.

    Parameters
    ----------
    name : str
        Key of :data:`PAPERS`, e.g. ``"attnsleep"``.
    dataset : str
        ``"sleep-edf-20"``, ``"sleep-edf-78"``, ``"shhs"`` (aliases accepted).

    Returns
    -------
    pandas.DataFrame
        Index = the paper's short citation (``"... (paper)"``); columns as :func:`paper_row`
        (minus ``source``), units as the paper prints them (percent; kappa 0..1).
    """
    row = paper_row(name, dataset)
    kind = "paper" if row["published"] else "UNPUBLISHED"
    label = f"{row.pop('source')} [{kind}, {dataset_key(dataset)}]"
    return pd.DataFrame([row], index=pd.Index([label], name="run"))


def reference_rows(name: str, prefix: str) -> pd.DataFrame:
    """All result rows of one paper whose dataset key starts with ``prefix`` (e.g. the Ex1..Ex3 rows).

    Returns
    -------
    pandas.DataFrame
        One row per matching key, indexed ``"<short> [<key>]"``.
    """
    entry = _entry(name)
    prefix = dataset_key(prefix)
    frames = [paper_table(name, key) for key in entry["results"] if key.startswith(prefix)]
    if not frames:
        raise KeyError(f"{name!r} has no results starting with {prefix!r}")
    return pd.concat(frames)


def _pct(value: Any) -> float:
    return float("nan") if value is None else float(value) * 100.0


def our_row(summary: dict, note: str = "") -> dict[str, Any]:
    """One results row from :func:`sleeplib.metrics.fold_summary`'s dict, in the papers' units.

    Pooled figures (the papers' convention: metrics on the confusion matrix pooled over folds) go
    in the same columns as :func:`paper_row`; the fold-to-fold spread goes in ``*_fold_mean`` and
    ``*_fold_sd`` columns. Accuracy, F1 and MGm in percent, kappa in 0..1.
    """
    pooled = summary["pooled"]
    per_class = summary["per_class"]
    row: dict[str, Any] = {
        "published": False,
        "accuracy": _pct(pooled["accuracy"]),
        "macro_f1": _pct(pooled["macro_f1"]),
        "kappa": float(pooled["kappa"]),
        "mgm": _pct(pooled.get("macro_gmean")),
    }
    for stage in STAGES:
        row[f"f1_{stage}"] = _pct(per_class.loc[stage, "f1"]) if stage in per_class.index else float("nan")
    mean, sd = summary["mean"], summary["sd"]
    for metric in ("accuracy", "macro_f1", "kappa"):
        scale = 1.0 if metric == "kappa" else 100.0
        row[f"{metric}_fold_mean"] = float(mean[metric]) * scale
        row[f"{metric}_fold_sd"] = float(sd[metric]) * scale
    row["n_folds"] = int(len(summary["per_fold"]))
    row["n_epochs"] = int(pooled.get("n_epochs", 0))
    row["note"] = note
    return row


def results_table(
    ours: dict[str, dict],
    paper: str | None = None,
    dataset: str | None = None,
    notes: dict[str, str] | None = None,
    extra: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Our runs with the paper's published row above them, in the papers' units.

    Parameters
    ----------
    ours : mapping label -> fold_summary dict
        Our runs (e.g. ``{"ours, paper protocol": ..., "ours, clean protocol": ...}``).
    paper : str, optional
        Key of :data:`PAPERS` whose row goes on top (skipped when it reports nothing for
        ``dataset``, with a note row saying so).
    dataset : str, optional
        Dataset of the paper row.
    notes : mapping label -> str, optional
        A note per run (protocol caveats, "SYNTHETIC", "not comparable").
    extra : pandas.DataFrame, optional
        More reference rows (e.g. :func:`reference_rows` of the unpublished attempt), put after
        the paper's row.

    Returns
    -------
    pandas.DataFrame
        Index ``run``; columns as :func:`paper_row` plus fold mean/sd, ``n_folds``, ``n_epochs``.
    """
    frames = []
    if paper is not None and dataset is not None:
        try:
            frames.append(paper_table(paper, dataset))
        except KeyError:
            entry = _entry(paper)
            frames.append(
                pd.DataFrame(
                    [{"published": True, "note": f"{entry.get('short', paper)} reports no result on {dataset}"}],
                    index=pd.Index([f"{entry.get('short', paper)} [paper]"], name="run"),
                )
            )
    if extra is not None:
        frames.append(extra)
    notes = notes or {}
    if ours:
        frames.append(
            pd.DataFrame(
                [our_row(summary, notes.get(label, "")) for label, summary in ours.items()],
                index=pd.Index(list(ours), name="run"),
            )
        )
    if not frames:
        raise ValueError("nothing to tabulate: pass runs of ours or a paper")
    table = pd.concat(frames)
    # Figures a paper does not report are None in PAPERS; as NaN the numeric columns stay numeric.
    for column in table.columns:
        if column not in ("published", "note"):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    table.index.name = "run"
    return table
