"""Computations behind the data notebooks (``00_get_data``, ``01_explore``) that are not plots.

* :func:`load_raw_night` - one night's raw signals for any dataset (synthetic, sample, Sleep-EDF);
* :func:`multitaper_spectrogram` - a light multitaper spectrogram on 30-s windows (scipy DPSS);
* :func:`psd_by_stage` - per-epoch PSD grouped by stage (MNE's Welch or multitaper, imported lazily);
* :func:`typical_epochs` - the most representative epoch of each stage;
* :func:`label_rule_counts` - how the label mapping and the 30-min wake crop change the counts;
* :func:`cohort_demographics`, :func:`prepared_summary`, :func:`verify_downloads` - tables.

Figures are drawn by :mod:`sleeplib.plots`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sleeplib import STAGES

__all__ = [
    "SYNTHETIC_BANNER",
    "EXPLORE_CHANNELS",
    "cohort_demographics",
    "label_rule_counts",
    "load_raw_night",
    "multitaper_spectrogram",
    "prepared_summary",
    "psd_by_stage",
    "selected_records",
    "synthetic_banner",
    "typical_epochs",
    "verify_downloads",
    "verify_sample",
]

SYNTHETIC_BANNER = "SYNTHETIC DATA - smoke test only, not a result"

#: EEG, EOG and chin EMG of Sleep-Cassette, as named in its EDF files.
EXPLORE_CHANNELS = ("EEG Fpz-Cz", "EOG horizontal", "EMG submental")



def synthetic_banner(synthetic: bool) -> str:
    """The banner a notebook prints when its data were generated (empty string otherwise)."""
    if not synthetic:
        return ""
    line = "=" * (len(SYNTHETIC_BANNER) + 8)
    return f"{line}\n    {SYNTHETIC_BANNER}\n{line}"


# --------------------------------------------------------------------------------------------------
# Raw nights
# --------------------------------------------------------------------------------------------------


def load_raw_night(
    dataset: str,
    subject: int | None = None,
    night: int | None = None,
    channels: Sequence[str] = EXPLORE_CHANNELS,
    data_dir: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    subjects=None,
    nights=None,
    synthetic_epochs: int | None = None,
):
    """Read one night's raw signals and R&K hypnogram, whatever the dataset.

    Parameters
    ----------
    dataset : str
        ``synthetic``, ``sample`` or a Sleep-EDF subset (``sleep-edf-20``, ``sleep-edf-78``,
        ``sleep-edf-st``; the files are downloaded and verified if missing).
    subject, night : int, optional
        Which night; when None, the first subject / night of the selection ``subjects``, ``nights``.
    channels : sequence of str
        Channels to read from EDF files (the sample and synthetic nights carry theirs).
    data_dir, mirror : optional
        See :func:`sleeplib.data.download.fetch_records`.
    subjects, nights : optional
        The notebook's selection (as for :func:`sleeplib.data.prepare.prepare`), used for defaults.
    synthetic_epochs : int, optional
        Length of a generated night (as given to :func:`sleeplib.data.prepare.prepare`).

    Returns
    -------
    sleeplib.data.raw.RawNight
        A generated night is the one :func:`~sleeplib.data.prepare.prepare` writes for the same
        subject and night (same seed).
    """
    from sleeplib.data.prepare import load_raw_night as read_night
    from sleeplib.data.records import parse_nights, parse_subjects

    if subject is None:
        subject = parse_subjects(subjects)[0] if subjects is not None else (0 if dataset == "synthetic" else None)
    if night is None:
        night = parse_nights(nights)[0] if nights is not None else 1
    if subject is None and dataset == "sample":
        from sleeplib.data.sample import SAMPLE_SUBJECT

        subject = SAMPLE_SUBJECT
    if subject is None:
        raise ValueError(f"load_raw_night needs a subject (or the notebook's subjects) for {dataset!r}")
    return read_night(dataset, subject, night, channels=channels, data_dir=data_dir, mirror=mirror,
                      synthetic_epochs=synthetic_epochs)


# --------------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------------


def multitaper_spectrogram(
    signal,
    sfreq: float,
    win_s: float = 30.0,
    method: str = "multitaper",
    time_bandwidth: float = 6.0,
    fmin: float = 0.0,
    fmax: float | None = 25.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectrogram on consecutive, non-overlapping windows (one per 30-s epoch by default).

    The multitaper estimate averages the periodograms of ``time_bandwidth - 1`` DPSS tapers
    (Slepian sequences) per window, which is much lighter than
    :func:`mne.time_frequency.tfr_array_multitaper` on a whole night and smooth enough to show
    the slow-wave, spindle and alpha bands. ``"welch"`` averages 4-s Hann segments instead.

    Parameters
    ----------
    signal : array-like of float
        One channel, ``(n_samples,)``; a trailing partial window is dropped.
    sfreq : float
        Sampling rate in Hz.
    win_s : float
        Window length in seconds.
    method : {"multitaper", "welch"}
        Spectral estimator per window.
    time_bandwidth : float
        ``2 NW`` of the DPSS tapers; frequency smoothing is ``time_bandwidth / win_s`` Hz.
    fmin, fmax : float
        Frequencies kept (``fmax=None``: up to Nyquist).

    Returns
    -------
    times : numpy.ndarray
        Window centres in seconds from the start of ``signal``, ``(n_windows,)``.
    freqs : numpy.ndarray
        Frequencies in Hz, ``(n_freqs,)``.
    psd : numpy.ndarray
        One-sided PSD in (unit of ``signal``)²/Hz, ``(n_windows, n_freqs)``.
    """
    from scipy import signal as sps

    x = np.asarray(signal, dtype=np.float64).ravel()
    n_win = int(round(win_s * sfreq))
    if n_win < 2:
        raise ValueError(f"win_s * sfreq = {win_s} * {sfreq} is too short a window")
    n_windows = x.size // n_win
    windows = x[: n_windows * n_win].reshape(n_windows, n_win)
    windows = windows - windows.mean(axis=1, keepdims=True)
    if method == "multitaper":
        half_nw = time_bandwidth / 2.0
        n_tapers = max(int(np.floor(time_bandwidth)) - 1, 1)
        tapers = sps.windows.dpss(n_win, half_nw, Kmax=n_tapers, norm=2)  # (K, n_win), unit energy
        freqs = np.fft.rfftfreq(n_win, 1.0 / sfreq)
        psd = np.zeros((n_windows, freqs.size))
        # Loop over tapers rather than broadcasting (K, N, n_win): a night's worth stays small.
        for taper in tapers:
            psd += np.abs(np.fft.rfft(windows * taper, axis=1)) ** 2
        psd /= n_tapers * sfreq
        psd[:, 1:-1 if n_win % 2 == 0 else None] *= 2  # one-sided: fold the negative frequencies
    elif method == "welch":
        nperseg = min(n_win, int(round(4 * sfreq)))
        freqs, psd = sps.welch(windows, fs=sfreq, nperseg=nperseg, axis=-1)
        psd = np.atleast_2d(psd)
    else:
        raise ValueError(f"method must be 'multitaper' or 'welch', not {method!r}")
    keep = (freqs >= fmin) & (freqs <= (np.inf if fmax is None else fmax))
    times = (np.arange(n_windows) + 0.5) * win_s
    return times, freqs[keep], psd[:, keep].reshape(n_windows, int(keep.sum()))


def psd_by_stage(
    x,
    y,
    sfreq: float,
    fmin: float = 0.5,
    fmax: float = 25.0,
    method: str = "welch",
    max_epochs_per_stage: int | None = 500,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Power spectral density of every epoch, grouped by stage.

    Parameters
    ----------
    x : array-like
        Epochs of one channel, ``(N, T)`` (for ``(N, C, T)`` pass ``x[:, c]``).
    y : array-like of int
        Labels ``(N,)`` (0..4 = W, N1, N2, N3, REM).
    sfreq : float
        Sampling rate in Hz.
    fmin, fmax : float
        Frequency range.
    method : {"welch", "multitaper"}
        :func:`mne.time_frequency.psd_array_welch` (4-s Hamming segments, 50 % overlap) or
        :func:`mne.time_frequency.psd_array_multitaper` (2 Hz bandwidth).
    max_epochs_per_stage : int or None
        Draw at most this many epochs per stage at random (reproducibly) to bound the cost on a
        whole cohort; None uses them all.
    seed : int
        Seed of that draw.

    Returns
    -------
    freqs : numpy.ndarray
        ``(F,)`` in Hz.
    psd : dict of str to numpy.ndarray
        Stage name -> ``(n_epochs, F)`` PSD in (unit of x)²/Hz; stages without epochs are absent.
    """
    from mne.time_frequency import psd_array_multitaper, psd_array_welch

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (N, T) with N == len(y); got x {x.shape} and y {y.shape}")
    rng = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}
    for label, stage in enumerate(STAGES):
        idx = np.flatnonzero(y == label)
        if max_epochs_per_stage is not None and idx.size > max_epochs_per_stage:
            idx = np.sort(rng.choice(idx, max_epochs_per_stage, replace=False))
        if idx.size:
            chosen[stage] = idx
    if not chosen:
        raise ValueError("no epochs to compute a PSD from")
    order = np.concatenate(list(chosen.values()))
    if method == "welch":
        n_fft = min(int(round(4 * sfreq)), x.shape[1])
        psd, freqs = psd_array_welch(x[order], sfreq, fmin=fmin, fmax=fmax, n_fft=n_fft,
                                     n_overlap=n_fft // 2, verbose="error")
    elif method == "multitaper":
        psd, freqs = psd_array_multitaper(x[order], sfreq, fmin=fmin, fmax=fmax, bandwidth=2.0, verbose="error")
    else:
        raise ValueError(f"method must be 'welch' or 'multitaper', not {method!r}")
    out, start = {}, 0
    for stage, idx in chosen.items():
        out[stage] = psd[start:start + idx.size]
        start += idx.size
    return freqs, out


def typical_epochs(x, y, sfreq: float, fmin: float = 0.5, fmax: float = 25.0) -> dict[str, int]:
    """Index of the most typical epoch of each stage.

    Typical means: among the epochs of a stage whose two neighbours have the same stage (so not a
    transition), the one whose log-PSD (Welch, ``fmin``-``fmax`` Hz) is closest to the median
    log-PSD of the stage. Falls back to all epochs of the stage when none sits inside a run.

    Parameters
    ----------
    x : array-like
        Epochs of one channel, ``(N, T)``; use the EEG channel of ``(N, C, T)``.
    y : array-like of int
        Labels ``(N,)``.
    sfreq : float
        Sampling rate in Hz.
    fmin, fmax : float
        Frequencies compared.

    Returns
    -------
    dict of str to int
        Stage name -> index into ``x``, for every stage present (in :data:`sleeplib.STAGES` order).
    """
    from scipy.signal import welch

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (N, T) with N == len(y); got x {x.shape} and y {y.shape}")
    freqs, psd = welch(x, fs=sfreq, nperseg=min(x.shape[1], int(round(4 * sfreq))), axis=-1)
    band = (freqs >= fmin) & (freqs <= fmax)
    log_psd = np.log10(np.maximum(psd[:, band], np.finfo(float).tiny))
    inside_run = np.zeros(len(y), dtype=bool)
    if len(y) >= 3:
        inside_run[1:-1] = (y[1:-1] == y[:-2]) & (y[1:-1] == y[2:])
    chosen = {}
    for label, stage in enumerate(STAGES):
        idx = np.flatnonzero((y == label) & inside_run)
        if idx.size == 0:
            idx = np.flatnonzero(y == label)
        if idx.size == 0:
            continue
        centre = np.median(log_psd[idx], axis=0)
        chosen[stage] = int(idx[np.argmin(((log_psd[idx] - centre) ** 2).sum(axis=1))])
    return chosen


# --------------------------------------------------------------------------------------------------
# Label rule, cohort, files
# --------------------------------------------------------------------------------------------------

_RK_ROWS = (("W", ("W",)), ("N1", ("1",)), ("N2", ("2",)), ("N3", ("3", "4")), ("REM", ("R",)),
            ("M (movement)", ("M",)), ("? (unscored)", ("?",)))


def label_rule_counts(raw, epoch_s: float = 30.0, wake_margin_min: float = 30.0) -> pd.DataFrame:
    """Epoch counts of one night at each step of the labelling rule.

    Columns: ``R&K code`` (the codes behind a row, with S3 and S4 counted separately),
    ``R&K annotations`` (every 30-s epoch of the signal by its R&K stage), ``after mapping`` (S3+S4 -> N3, M and ? dropped) and ``after wake crop`` (only
    ``wake_margin_min`` of wake kept on each side of the sleep period), which is what
    :func:`sleeplib.data.prepare.epoch_night` keeps.

    Parameters
    ----------
    raw : sleeplib.data.raw.RawNight
        The night (signals and R&K annotations).
    epoch_s, wake_margin_min : float
        As in :func:`~sleeplib.data.prepare.epoch_night`.

    Returns
    -------
    pandas.DataFrame
        Rows ``W, N1, N2, N3, REM, M (movement), ? (unscored), total``.
    """
    from sleeplib.data.prepare import epoch_stages, label_epochs

    # The same grid as epoch_night: from the first annotation (modulo epoch_s) to the end of the signal.
    duration = raw.duration_s
    t0 = float(raw.annotations["onset"].min() % epoch_s) if len(raw.annotations) else 0.0
    n_grid = max(int(np.floor((duration - t0) / epoch_s + 1e-9)), 0)
    stages = epoch_stages(raw.annotations, n_grid, epoch_s, t0)
    rk = pd.Series(stages).value_counts()
    _, y_mapped = label_epochs(stages, None)
    _, y_cropped = label_epochs(stages, int(round(wake_margin_min * 60 / epoch_s)))
    mapped = np.bincount(y_mapped, minlength=len(STAGES))
    cropped = np.bincount(y_cropped, minlength=len(STAGES))
    rows = []
    for name, codes in _RK_ROWS:
        # Name the R&K codes behind each row, with their own counts when several merge (S3 + S4).
        names = [f"S{c}" if c.isdigit() else c for c in codes]
        rk_text = names[0] if len(codes) == 1 else " + ".join(
            f"{n} ({int(rk.get(c, 0))})" for n, c in zip(names, codes))
        row = {"stage": name, "R&K code": rk_text, "R&K annotations": int(sum(rk.get(c, 0) for c in codes))}
        if name in STAGES:
            row["after mapping"] = int(mapped[STAGES.index(name)])
            row["after wake crop"] = int(cropped[STAGES.index(name)])
        else:
            row["after mapping"] = row["after wake crop"] = 0
        rows.append(row)
    table = pd.DataFrame(rows).set_index("stage")
    table.loc["total"] = ["", *table[["R&K annotations", "after mapping", "after wake crop"]].sum().tolist()]
    for col in ("R&K annotations", "after mapping", "after wake crop"):
        table[col] = table[col].astype(int)
    return table


def selected_records(dataset: str, subjects=None, nights=None) -> pd.DataFrame | None:
    """Rows of the records table behind a dataset selection (age, sex, files, checksums).

    Parameters
    ----------
    dataset : str
        A Sleep-EDF subset, ``sample`` (the row of the bundled night) or ``synthetic``.
    subjects, nights : optional
        As for :func:`sleeplib.data.records.select_records`.

    Returns
    -------
    pandas.DataFrame or None
        None for synthetic data, which have no records (and no age or sex).
    """
    from sleeplib.data.records import records_table, select_records

    if dataset == "synthetic":
        return None
    if dataset == "sample":
        from sleeplib.data.sample import SAMPLE_RECORD

        table = records_table()
        return table[table["record"] == SAMPLE_RECORD].reset_index(drop=True)
    return select_records(dataset, subjects, nights)


def cohort_demographics(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Age and sex of the subjects of a records selection.

    Parameters
    ----------
    records : pandas.DataFrame
        Rows of :func:`sleeplib.data.records.records_table` (one per night; ``age`` and ``sex``
        repeat over a subject's nights).

    Returns
    -------
    per_subject : pandas.DataFrame
        One row per subject: ``age``, ``sex``, ``nights``.
    summary : pandas.DataFrame
        One row: ``subjects``, ``female``, ``male``, ``age mean``, ``age sd``, ``age min``, ``age max``.
    """
    missing = [c for c in ("subject", "age", "sex") if c not in records.columns]
    if missing:
        raise ValueError(f"records lack columns {missing}; pass rows of records_table()/select_records()")
    per_subject = records.groupby("subject").agg(age=("age", "first"), sex=("sex", "first"),
                                                nights=("night", "count"))
    ages = per_subject["age"].astype(float)
    summary = pd.DataFrame([{
        "subjects": len(per_subject),
        "female": int((per_subject["sex"] == "F").sum()),
        "male": int((per_subject["sex"] == "M").sum()),
        "age mean": round(float(ages.mean()), 1),
        "age sd": round(float(ages.std(ddof=1)), 1) if len(ages) > 1 else float("nan"),
        "age min": int(ages.min()),
        "age max": int(ages.max()),
    }])
    return per_subject, summary


def verify_downloads(records: pd.DataFrame, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Recompute the SHA256 of each night's local PSG and hypnogram and compare with PhysioNet's.

    Parameters
    ----------
    records : pandas.DataFrame
        Rows of :func:`sleeplib.data.records.records_table` (``psg``, ``hypnogram``,
        ``psg_sha256``, ``hyp_sha256``).
    data_dir : path-like, optional
        Data folder the files were fetched into.

    Returns
    -------
    pandas.DataFrame
        Per record: ``psg MB``, ``hypnogram kB`` and ``sha256 verified`` (``"yes"`` when both files
        exist and match, ``"missing"``, or ``"NO"``).
    """
    import pooch

    from sleeplib.data.download import local_path

    rows = []
    for row in records.itertuples(index=False):
        psg, hyp = local_path(row.psg, data_dir), local_path(row.hypnogram, data_dir)
        if not (psg.is_file() and hyp.is_file()):
            status = "missing"
        else:
            ok = (pooch.file_hash(str(psg), alg="sha256") == row.psg_sha256
                  and pooch.file_hash(str(hyp), alg="sha256") == row.hyp_sha256)
            status = "yes" if ok else "NO"
        rows.append({
            "record": row.record,
            "psg MB": round(psg.stat().st_size / 1e6, 1) if psg.is_file() else np.nan,
            "hypnogram kB": round(hyp.stat().st_size / 1e3, 1) if hyp.is_file() else np.nan,
            "sha256 verified": status,
        })
    return pd.DataFrame(rows).set_index("record")


def verify_sample(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Check that the bundled sample was built from PhysioNet's files.

    The sample's provenance (``SC4001E0.json``) records the SHA256 of the PSG and hypnogram it was
    cut from; they must equal PhysioNet's checksums in the records table.

    Parameters
    ----------
    path : path-like, optional
        The sample's ``.npz`` (default: the bundled one).

    Returns
    -------
    pandas.DataFrame
        One row (the record): ``source psg``, ``source hypnogram``, ``sample MB`` and
        ``sha256 verified`` (``"yes"`` or ``"NO"``).
    """
    import json

    from sleeplib.data.records import records_table
    from sleeplib.data.sample import sample_path

    npz = Path(path) if path is not None else sample_path()
    meta = json.loads(npz.with_suffix(".json").read_text())
    table = records_table().set_index("record")
    row = table.loc[meta["record"]]
    ok = meta.get("psg_sha256") == row["psg_sha256"] and meta.get("hypnogram_sha256") == row["hyp_sha256"]
    return pd.DataFrame([{
        "record": meta["record"],
        "source psg": meta.get("psg_file"),
        "source hypnogram": meta.get("hypnogram_file"),
        "sample MB": round(npz.stat().st_size / 1e6, 1),
        "sha256 verified": "yes" if ok else "NO",
    }]).set_index("record")


def prepared_summary(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per prepared night: subject, night, epochs per stage, total, file size, synthetic.

    Parameters
    ----------
    paths : sequence of path-like
        ``.npz`` files written by :func:`sleeplib.data.prepare.prepare`.

    Returns
    -------
    pandas.DataFrame
        Indexed by record, with a last row ``total``.
    """
    rows = []
    for path in paths:
        # Read only the labels and provenance: an .npz member is loaded when accessed, and the
        # signals of a whole cohort would be hundreds of MB.
        with np.load(path, allow_pickle=False) as npz:
            y = npz["y"].astype(np.int64)
            meta = {k: npz[k].item() for k in ("record", "subject", "night", "synthetic") if k in npz.files}
        counts = np.bincount(y, minlength=len(STAGES))[: len(STAGES)]
        rows.append({"record": str(meta.get("record", Path(path).stem)), "subject": int(meta.get("subject", -1)),
                     "night": int(meta.get("night", 1)), **dict(zip(STAGES, counts.tolist())), "epochs": len(y),
                     "npz MB": round(Path(path).stat().st_size / 1e6, 2),
                     "synthetic": bool(meta.get("synthetic", False))})
    table = pd.DataFrame(rows, columns=["record", "subject", "night", *STAGES, "epochs", "npz MB", "synthetic"])
    table = table.set_index("record")
    if len(table):
        total = table[[*STAGES, "epochs", "npz MB"]].sum()
        # The total row has no subject or night: hold them as objects so the ids stay integers.
        table = table.astype({"subject": object, "night": object, "synthetic": object})
        table.loc["total"] = {**total.to_dict(), "subject": "", "night": "", "synthetic": bool(table["synthetic"].any())}
    return table
