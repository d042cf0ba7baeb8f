"""From a :class:`~sleeplib.data.raw.RawNight` to labelled 30-s epochs, and one ``.npz`` per night.

The labelling rule is the one of DeepSleepNet (Supratak et al., 2017) and AttnSleep (Eldele et al.,
2021) for Sleep-EDF:

1. every 30-s epoch takes the R&K stage of the annotation covering it; R&K 1 -> N1, 2 -> N2,
   3 and 4 -> N3, R -> REM, W -> W;
2. epochs scored M (movement) or ? (unscored), epochs with no annotation and epochs that run past
   the end of the signal are dropped;
3. of what is left, only the span from ``wake_margin`` (30 min) before the first to ``wake_margin``
   after the last non-wake epoch is kept (the margin is counted in kept epochs, as DeepSleepNet does).

Applied to the 39 Sleep-EDF-20 hypnograms this gives W 8285, N1 2804, N2 17799, N3 5703, REM 7717.

No filtering is applied unless ``l_freq``/``h_freq`` are given; channels recorded at another rate
(the 1-Hz Sleep-Cassette EMG envelope) are resampled to ``target_fs`` with a polyphase filter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sleeplib import STAGES
from sleeplib.data.raw import RawNight

__all__ = [
    "DATASETS",
    "RK_TO_LABEL",
    "RK_FROM_INT",
    "PREPARE_VERSION",
    "epoch_stages",
    "label_epochs",
    "label_counts_rule",
    "epoch_night",
    "prepare_params",
    "prepared_key",
    "prepared_dir",
    "load_raw_night",
    "prepare",
]

DATASETS = ("sleep-edf-20", "sleep-edf-78", "sleep-edf-st", "sample", "synthetic", "shhs")
"""Names accepted by :func:`prepare`."""

RK_TO_LABEL = {"W": 0, "1": 1, "2": 2, "3": 3, "4": 3, "R": 4}
"""R&K stage -> label index in :data:`sleeplib.STAGES` (M and ? have none: they are dropped)."""

RK_FROM_INT = {0: "W", 1: "1", 2: "2", 3: "3", 4: "4", 5: "R", 6: "?", 7: "M", 9: "?"}
"""Integer hypnogram coding of the reference CSVs (6 artefact, 7 movement, 9 unscored) -> R&K."""

PREPARE_VERSION = 1
"""Bump when the output of :func:`epoch_night` changes for the same parameters (invalidates caches)."""

DEFAULT_CHANNELS = ("EEG Fpz-Cz",)


# --------------------------------------------------------------------------------------------------
# The labelling rule (pure functions, no signals)
# --------------------------------------------------------------------------------------------------


def epoch_stages(annotations: pd.DataFrame, n_epochs: int, epoch_s: float = 30.0, t0: float = 0.0) -> np.ndarray:
    """R&K stage of each epoch ``[t0 + k*epoch_s, t0 + (k+1)*epoch_s)``, ``"?"`` where none applies.

    An epoch takes the stage of the annotation covering its midpoint (Sleep-EDF scoring is aligned to
    30-s epochs, so this is the stage of the whole epoch).

    Parameters
    ----------
    annotations : pandas.DataFrame
        ``onset``, ``duration`` (s) and ``stage`` (R&K codes).
    n_epochs : int
        Number of epochs on the grid.
    epoch_s, t0 : float
        Epoch length and start of the grid, in seconds.

    Returns
    -------
    numpy.ndarray of str
        ``(n_epochs,)`` R&K codes.
    """
    stages = np.full(n_epochs, "?", dtype=object)
    for onset, duration, stage in zip(annotations["onset"], annotations["duration"], annotations["stage"]):
        first = max(int(np.ceil((onset - t0) / epoch_s - 0.5)), 0)
        last = min(int(np.ceil((onset + duration - t0) / epoch_s - 0.5)), n_epochs)
        if last > first:
            # later annotations win on overlap, as they are sorted by onset
            stages[first:last] = stage
    return stages


def label_epochs(stages_per_epoch: Sequence, wake_margin_epochs: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Apply the DeepSleepNet/AttnSleep rule to a sequence of per-epoch R&K stages.

    Parameters
    ----------
    stages_per_epoch : sequence of str or int
        R&K codes (``'W','1','2','3','4','R','M','?'``) or the integer coding of
        :data:`RK_FROM_INT`, one per 30-s epoch.
    wake_margin_epochs : int or None
        Epochs of wake kept before the first and after the last sleep epoch (60 = 30 min);
        ``None`` keeps every scored epoch.

    Returns
    -------
    keep : numpy.ndarray
        int64 indices into ``stages_per_epoch`` of the kept epochs (increasing).
    y : numpy.ndarray
        int64 labels of the kept epochs (0..4 = W, N1, N2, N3, REM).
    """
    stages = np.asarray(stages_per_epoch, dtype=object)
    if stages.size and not isinstance(stages[0], str):
        try:
            stages = np.array([RK_FROM_INT[int(s)] for s in stages], dtype=object)
        except KeyError as exc:
            raise ValueError(f"unknown integer stage {exc.args[0]}; known codes: {RK_FROM_INT}") from None
    labels = np.array([RK_TO_LABEL.get(s, -1) for s in stages], dtype=np.int64)
    scored = np.flatnonzero(labels >= 0)
    y = labels[scored]
    sleep = np.flatnonzero(y != 0)
    if wake_margin_epochs is None or len(y) == 0:
        return scored, y
    if len(sleep) == 0:
        # a night without any sleep has no sleep period to keep
        return scored[:0], y[:0]
    # DeepSleepNet counts the margin on the epochs left after dropping M/?, so do we.
    start = max(int(sleep[0]) - int(wake_margin_epochs), 0)
    stop = min(int(sleep[-1]) + int(wake_margin_epochs) + 1, len(y))
    return scored[start:stop], y[start:stop]


def label_counts_rule(stages_per_epoch: Sequence, wake_margin_epochs: int = 60) -> dict[str, int]:
    """Epochs per stage (``{"W": ..., "N1": ..., ...}``) that :func:`label_epochs` keeps."""
    _, y = label_epochs(stages_per_epoch, wake_margin_epochs)
    return dict(zip(STAGES, np.bincount(y, minlength=len(STAGES)).tolist()))


# --------------------------------------------------------------------------------------------------
# Signals -> epochs
# --------------------------------------------------------------------------------------------------


def _samples_per_epoch(epoch_s: float, fs: float) -> int:
    n = epoch_s * fs
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"epoch_s * target_fs = {epoch_s} * {fs} is not a whole number of samples")
    return int(round(n))


def _resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling by a rational factor (exact rates such as 1 -> 100 or 125 -> 100 Hz)."""
    if fs_in == fs_out:
        return signal
    from scipy.signal import resample_poly

    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    if abs(float(ratio) - fs_out / fs_in) > 1e-9:
        raise ValueError(f"cannot resample {fs_in} Hz to {fs_out} Hz by a small rational factor")
    return resample_poly(signal, ratio.numerator, ratio.denominator, padtype="line")


def epoch_night(
    raw: RawNight,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    wake_margin_min: float | None = 30,
    epoch_s: float = 30,
    target_fs: float = 100,
    l_freq: float | None = None,
    h_freq: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one night into labelled 30-s epochs.

    The epoch grid starts at the first annotation (modulo ``epoch_s``). Signals are cropped to the
    span from the first to the last kept epoch *before* resampling/filtering, so the result depends
    only on that span (the bundled sample, which stores exactly this span, gives the same epochs).

    Parameters
    ----------
    raw : RawNight
        Signals in microvolts and R&K annotations.
    channels : sequence of str
        Channels to keep, in this order.
    wake_margin_min : float or None
        Minutes of wake kept before the first and after the last sleep epoch; None keeps all.
    epoch_s : float
        Epoch length in seconds.
    target_fs : float
        Output sampling rate; channels at another rate are resampled (polyphase).
    l_freq, h_freq : float or None
        Band-pass edges for :func:`mne.filter.filter_data`; no filtering when both are None.

    Returns
    -------
    x : numpy.ndarray
        float32 ``(N, epoch_s*target_fs)`` for one channel, ``(N, C, epoch_s*target_fs)`` for several.
    y : numpy.ndarray
        int64 ``(N,)`` labels 0..4.

    Raises
    ------
    ValueError
        For a channel the night lacks (listing those it has) or bad parameters.
    """
    channels = [channels] if isinstance(channels, str) else list(channels)
    if not channels:
        raise ValueError("channels is empty; name at least one, e.g. 'EEG Fpz-Cz'")
    missing = [ch for ch in channels if ch not in raw.signals]
    if missing:
        raise ValueError(f"{raw.record} has no channel(s) {missing}; available: {raw.channels}")
    if epoch_s <= 0 or target_fs <= 0:
        raise ValueError(f"epoch_s and target_fs must be positive (got {epoch_s}, {target_fs})")
    n_per_epoch = _samples_per_epoch(epoch_s, target_fs)

    duration = min(len(raw.signals[ch]) / raw.sfreq[ch] for ch in channels)
    t0 = float(raw.annotations["onset"].min() % epoch_s) if len(raw.annotations) else 0.0
    n_grid = max(int(np.floor((duration - t0) / epoch_s + 1e-9)), 0)  # epochs past the end are dropped
    stages = epoch_stages(raw.annotations, n_grid, epoch_s, t0)
    margin = None if wake_margin_min is None else int(round(wake_margin_min * 60 / epoch_s))
    keep, y = label_epochs(stages, margin)
    if len(keep) == 0:
        shape = (0, n_per_epoch) if len(channels) == 1 else (0, len(channels), n_per_epoch)
        return np.zeros(shape, np.float32), y

    span_start = t0 + keep[0] * epoch_s
    span_stop = t0 + (keep[-1] + 1) * epoch_s
    per_channel = []
    for ch in channels:
        fs = raw.sfreq[ch]
        a, b = int(round(span_start * fs)), int(round(span_stop * fs))
        signal = np.asarray(raw.signals[ch][a:b], dtype=np.float64)
        signal = _resample(signal, fs, target_fs)
        if l_freq is not None or h_freq is not None:
            import mne  # lazily: only when filtering was asked for

            signal = mne.filter.filter_data(signal, target_fs, l_freq, h_freq, verbose="error")
        n_span = int(keep[-1] - keep[0] + 1)
        signal = signal[: n_span * n_per_epoch]
        if len(signal) < n_span * n_per_epoch:  # resampling may round one sample short
            signal = np.pad(signal, (0, n_span * n_per_epoch - len(signal)), mode="edge")
        per_channel.append(signal.reshape(n_span, n_per_epoch)[keep - keep[0]])
    x = per_channel[0] if len(channels) == 1 else np.stack(per_channel, axis=1)
    return x.astype(np.float32), y


# --------------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------------


def _default_fs(dataset: str) -> float:
    # AttnSleep used SHHS C4-A1 at its native 125 Hz; Sleep-EDF EEG is 100 Hz.
    return 125.0 if dataset == "shhs" else 100.0


def _default_channels(dataset: str, channels: Sequence[str] | None) -> tuple[str, ...]:
    if channels is None:
        if dataset == "shhs":
            from sleeplib.data.shhs import DEFAULT_SHHS_CHANNELS

            return tuple(DEFAULT_SHHS_CHANNELS)
        return DEFAULT_CHANNELS
    return (channels,) if isinstance(channels, str) else tuple(channels)


def prepare_params(
    dataset: str,
    channels: Sequence[str] | None = None,
    wake_margin_min: float | None = 30,
    l_freq: float | None = None,
    h_freq: float | None = None,
    target_fs: float | None = None,
    epoch_s: float = 30,
    synthetic_epochs: int | None = None,
) -> dict:
    """All parameters that change a prepared night, normalised (the input of :func:`prepared_key`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    params = {
        "version": PREPARE_VERSION,
        "channels": list(_default_channels(dataset, channels)),
        "wake_margin_min": None if wake_margin_min is None else float(wake_margin_min),
        "epoch_s": float(epoch_s),
        "target_fs": float(target_fs if target_fs is not None else _default_fs(dataset)),
        "l_freq": None if l_freq is None else float(l_freq),
        "h_freq": None if h_freq is None else float(h_freq),
    }
    if dataset == "synthetic":
        from sleeplib.data.synthetic import DEFAULT_N_EPOCHS

        params["synthetic_epochs"] = int(synthetic_epochs or DEFAULT_N_EPOCHS)
    return params


def _channel_tag(channels: Sequence[str]) -> str:
    def short(ch: str) -> str:
        ch = re.sub(r"^(EEG|EOG|EMG)\s+", "", ch.strip())
        return re.sub(r"[^a-z0-9]+", "-", ch.lower()).strip("-") or "ch"

    tag = "+".join(short(ch) for ch in channels)
    return tag if len(tag) <= 40 else f"{len(channels)}ch"


def prepared_key(params: dict) -> str:
    """Readable channel tag plus a short hash of every parameter, e.g. ``fpz-cz_100hz_3f2a9c1d``."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{_channel_tag(params['channels'])}_{params['target_fs']:g}hz_{digest}"


def prepared_dir(
    dataset: str,
    channels: Sequence[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    **params,
) -> Path:
    """Folder where :func:`prepare` writes (and looks for) the nights of this configuration.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    channels : sequence of str, optional
        As given to :func:`prepare` (None: the dataset's default channel).
    data_dir : path-like, optional
        Data folder (default :func:`sleeplib.paths.data_dir`).
    **params
        The other preprocessing parameters of :func:`prepare` (``wake_margin_min``, ``l_freq``,
        ``h_freq``, ``target_fs``, ``synthetic_epochs``).
    """
    from sleeplib.paths import data_dir as resolve_data_dir

    key = prepared_key(prepare_params(dataset, channels, **params))
    return resolve_data_dir(data_dir) / "prepared" / dataset / key


# --------------------------------------------------------------------------------------------------
# One night (runs in a worker process)
# --------------------------------------------------------------------------------------------------


def _load_raw(job: dict) -> RawNight:
    kind = job["kind"]
    channels = job["params"]["channels"]
    if kind == "edf":
        from sleeplib.data.raw import read_edf_night

        return read_edf_night(job["psg"], job["hypnogram"], channels, record=job["record"],
                              subject=job["subject"], night=job["night"], dataset=job["dataset"])
    if kind == "sample":
        from sleeplib.data.sample import read_sample

        return read_sample(job.get("sample_path"))
    if kind == "synthetic":
        from sleeplib.data.synthetic import synthetic_night

        return synthetic_night(n_epochs=job["params"]["synthetic_epochs"], subject=job["subject"],
                               night=job["night"], seed=job["seed"], channels=channels)
    if kind == "shhs":
        from sleeplib.data.shhs import read_shhs_night

        return read_shhs_night(job["psg"], job["hypnogram"], channels, record=job["record"])
    raise ValueError(f"unknown job kind {kind!r}")


def _prepare_night(job: dict) -> Path:
    """Read, epoch and write one night; returns the written path."""
    from sleeplib.io import save_npz

    params = job["params"]
    raw = _load_raw(job)
    x, y = epoch_night(raw, params["channels"], wake_margin_min=params["wake_margin_min"],
                       epoch_s=params["epoch_s"], target_fs=params["target_fs"],
                       l_freq=params["l_freq"], h_freq=params["h_freq"])
    channels = np.array(params["channels"], dtype=str)
    return save_npz(
        job["out"],
        x=x, y=y, fs=np.float64(params["target_fs"]), ch_label=channels, channels=channels,
        record=np.str_(raw.record), subject=np.int64(raw.subject), night=np.int64(raw.night),
        dataset=np.str_(job["dataset"]), synthetic=np.bool_(raw.synthetic),
        params=np.str_(json.dumps(params, sort_keys=True)),
    )


def _jobs(dataset, subjects, nights, params, data_dir, mirror, progress, shhs_dir, out_dir, overwrite) -> list[dict]:
    """One job dict per night (the downloads happen here, in the parent process)."""
    base = {"dataset": dataset, "params": params}
    if dataset in ("sleep-edf-20", "sleep-edf-78", "sleep-edf-st"):
        from sleeplib.data.download import fetch_records
        from sleeplib.data.records import select_records

        table = select_records(dataset, subjects, nights)
        # Only nights still to prepare are fetched: a cached run needs neither network nor checksums.
        todo = table[[overwrite or not (out_dir / f"{r}.npz").is_file() for r in table["record"]]]
        fetched = fetch_records(todo, data_dir=data_dir, mirror=mirror, progress=progress) if len(todo) else []
        files = dict(zip(todo["record"], fetched))
        return [
            {**base, "kind": "edf", "record": row.record, "subject": int(row.subject), "night": int(row.night),
             "psg": str(files[row.record][0]) if row.record in files else None,
             "hypnogram": str(files[row.record][1]) if row.record in files else None}
            for row in table.itertuples(index=False)
        ]
    if dataset == "sample":
        from sleeplib.data.sample import SAMPLE_RECORD, SAMPLE_SUBJECT, SAMPLE_NIGHT

        if subjects is not None and _as_ints(subjects) != [SAMPLE_SUBJECT]:
            raise ValueError(
                f"the bundled sample holds subject {SAMPLE_SUBJECT} night {SAMPLE_NIGHT} only; got subjects={subjects!r}"
            )
        if nights is not None and _as_ints(nights, "nights") != [SAMPLE_NIGHT]:
            raise ValueError(f"the bundled sample holds night {SAMPLE_NIGHT} only; got nights={nights!r}")
        return [{**base, "kind": "sample", "record": SAMPLE_RECORD, "subject": SAMPLE_SUBJECT,
                 "night": SAMPLE_NIGHT}]
    if dataset == "synthetic":
        from sleeplib.data.synthetic import synthetic_record

        subject_ids = range(4) if subjects is None else _as_ints(subjects)
        night_ids = (1, 2) if nights is None else _as_ints(nights, "nights")
        return [
            {**base, "kind": "synthetic", "record": synthetic_record(s, n), "subject": s, "night": n,
             "seed": 1000 * s + n}
            for s in subject_ids for n in night_ids
        ]
    if dataset == "shhs":
        from sleeplib.data.shhs import find_shhs_nights

        if shhs_dir is None:
            raise ValueError("dataset 'shhs' needs shhs_dir: the folder holding the NSRR SHHS EDF and XML files")
        return [
            {**base, "kind": "shhs", "record": rec, "subject": subj, "night": 1, "psg": str(psg), "hypnogram": str(xml)}
            for rec, subj, psg, xml in find_shhs_nights(shhs_dir, None if subjects is None else _as_ints(subjects))
        ]
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


def load_raw_night(
    dataset: str,
    subject: int,
    night: int,
    channels: Sequence[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    shhs_dir: str | os.PathLike | None = None,
    synthetic_epochs: int | None = None,
) -> RawNight:
    """One night's raw signals and hypnogram, exactly as :func:`prepare` reads it before epoching.

    Same datasets, downloads (verified, only if missing) and synthetic seeds as :func:`prepare`,
    so that a notebook looking at raw signals sees the night it trains on.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    subject, night : int
        The night to read.
    channels : sequence of str, optional
        Channels to read (default: the dataset's, as in :func:`prepare`).
    data_dir, mirror, shhs_dir, synthetic_epochs :
        As in :func:`prepare`.
    """
    params = prepare_params(dataset, channels=channels, synthetic_epochs=synthetic_epochs)
    jobs = _jobs(dataset, [int(subject)], [int(night)], params, data_dir, mirror, False, shhs_dir,
                 out_dir=None, overwrite=True)
    jobs = [job for job in jobs if job["night"] == int(night)]
    if not jobs:
        raise ValueError(f"{dataset} has no subject {subject} night {night}")
    return _load_raw(jobs[0])


def _as_ints(values, what: str = "subjects") -> list[int]:
    """Subjects/nights in any form the CLI accepts (``"0-3 7"``, ``[0, 1]``, ``5``)."""
    from sleeplib.data.records import parse_nights, parse_subjects

    return parse_nights(values) if what == "nights" else parse_subjects(values)


def prepare(
    dataset: str,
    subjects=None,
    nights=None,
    channels: Sequence[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    n_jobs: int | None = None,
    progress: bool = True,
    shhs_dir: str | os.PathLike | None = None,
    wake_margin_min: float | None = 30,
    l_freq: float | None = None,
    h_freq: float | None = None,
    overwrite: bool = False,
    target_fs: float | None = None,
    synthetic_epochs: int | None = None,
) -> list[Path]:
    """Prepare nights: download what is missing, epoch, write one ``.npz`` per night.

    Output: ``<data_dir>/prepared/<dataset>/<key>/<record>.npz`` (see :func:`prepared_dir`) with keys
    ``x, y, fs, ch_label, channels, record, subject, night, dataset, synthetic, params``. Nights whose
    file exists are skipped (unless ``overwrite``); writes are atomic, so an interrupted run never
    leaves a half-written night.

    Parameters
    ----------
    dataset : str
        ``sleep-edf-20``, ``sleep-edf-78``, ``sleep-edf-st`` (downloaded), ``sample`` (the bundled
        real night, offline), ``synthetic`` (generated; subjects 0-3 and nights 1-2 by default) or
        ``shhs`` (EDF + NSRR XML from ``shhs_dir``).
    subjects, nights : optional
        Subject ids / nights (anything :func:`sleeplib.data.records.parse_subjects` accepts); all
        of the subset when None.
    channels : sequence of str, optional
        Channels to keep (default ``("EEG Fpz-Cz",)``; for SHHS ``("EEG",)``, i.e. C4-A1).
    data_dir, mirror : optional
        Data folder and download mirror (see :mod:`sleeplib.data.download`).
    n_jobs : int, optional
        Worker processes (default ``min(4, cpu count)``); 1 runs in this process.
    progress : bool
        Show tqdm progress bars.
    shhs_dir : path-like, optional
        Folder with SHHS ``*.edf`` and ``*-nsrr.xml`` files (dataset ``shhs`` only).
    wake_margin_min, l_freq, h_freq, target_fs : optional
        Preprocessing (see :func:`epoch_night`); ``target_fs`` defaults to 100 Hz (125 for SHHS).
    overwrite : bool
        Recompute nights already prepared.
    synthetic_epochs : int, optional
        Epochs per generated night (dataset ``synthetic`` only).

    Returns
    -------
    list of pathlib.Path
        The ``.npz`` of every requested night, in order.
    """
    from tqdm import tqdm  # text bars: they render in papermill HTML reports, widgets do not

    params = prepare_params(dataset, channels, wake_margin_min, l_freq, h_freq, target_fs,
                            synthetic_epochs=synthetic_epochs)
    out_dir = prepared_dir(dataset, params["channels"], data_dir, wake_margin_min=wake_margin_min,
                           l_freq=l_freq, h_freq=h_freq, target_fs=target_fs,
                           synthetic_epochs=synthetic_epochs)
    jobs = _jobs(dataset, subjects, nights, params, data_dir, mirror, progress, shhs_dir, out_dir, overwrite)
    for job in jobs:
        job["out"] = str(out_dir / f"{job['record']}.npz")
    todo = [job for job in jobs if overwrite or not Path(job["out"]).is_file()]
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Written next to the nights so that a folder says how it was made.
        from sleeplib.io import save_json

        save_json(out_dir / "params.json", {"dataset": dataset, **params})
    n_jobs = min(4, os.cpu_count() or 1) if n_jobs is None else int(n_jobs)
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1 (got {n_jobs})")
    n_workers = min(n_jobs, len(todo))
    desc = f"prepare {dataset}"
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="night", desc=desc, disable=not progress) as bar:
        if n_workers <= 1:
            for job in todo:
                bar.set_postfix_str(job["record"])
                _prepare_night(job)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                futures = {pool.submit(_prepare_night, job): job for job in todo}
                for future in as_completed(futures):
                    try:
                        future.result()
                    except Exception as exc:
                        job = futures[future]
                        raise RuntimeError(f"preparing {job['record']} of {dataset} failed: {exc}") from exc
                    bar.set_postfix_str(futures[future]["record"])
                    bar.update(1)
    return [Path(job["out"]) for job in jobs]
