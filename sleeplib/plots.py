"""Figures of the workbook, in the style of YASA: every function draws on ``ax`` and returns it.

Each function takes ``ax=None`` (a new figure is made then) and returns the axes it drew on, so
figures compose: ``plot_hypnogram(y_true, ax=ax); plot_hypnogram(y_pred, ax=ax, color="C1")``.
Nothing here calls ``plt.show()``; notebooks display figures themselves. This module never imports
MNE (spectra are computed with scipy, see :func:`sleeplib.explore.multitaper_spectrogram`).

Labels are the integers of :data:`sleeplib.STAGES` (0..4 = W, N1, N2, N3, REM); a negative label
(unscored) leaves a gap in a hypnogram.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sleeplib import STAGES

__all__ = [
    "HYPNOGRAM_ORDER",
    "STAGE_COLORS",
    "plot_class_distribution",
    "plot_confusion_matrix",
    "plot_epoch_traces",
    "plot_hypnogram",
    "plot_hypnogram_comparison",
    "plot_per_class_f1",
    "plot_psd_by_stage",
    "plot_spectrogram",
    "plot_training_curves",
]

#: Stages from the top of a hypnogram to its bottom (the clinical convention, REM just below wake).
HYPNOGRAM_ORDER = ("W", "REM", "N1", "N2", "N3")

#: One colour per stage, used by every figure so a stage looks the same everywhere.
STAGE_COLORS = {
    "W": "#f2b134",
    "N1": "#8fc1e3",
    "N2": "#3a7dbf",
    "N3": "#173f6e",
    "REM": "#d62728",
}

# Position of each label (0..4) on the hypnogram's y axis: W=0 (top) ... N3=4 (bottom).
_HYPNO_ROW = np.array([HYPNOGRAM_ORDER.index(stage) for stage in STAGES], dtype=float)


def _new_ax(ax, figsize=(10, 3)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return ax


def _hypnogram_rows(y) -> np.ndarray:
    """Labels -> y positions of :data:`HYPNOGRAM_ORDER`; unscored (negative) labels -> NaN."""
    y = np.asarray(y).astype(np.int64).ravel()
    if y.size and y.max() >= len(STAGES):
        raise ValueError(f"labels must be 0..{len(STAGES) - 1} ({', '.join(STAGES)}); got {y.max()}")
    rows = np.full(y.shape, np.nan)
    scored = y >= 0
    rows[scored] = _HYPNO_ROW[y[scored]]
    return rows


def plot_hypnogram(
    y,
    ax=None,
    epoch_s: float = 30.0,
    label: str | None = None,
    color: str = "k",
    highlight_rem: bool = True,
    lw: float = 1.5,
    alpha: float = 1.0,
    offset: float = 0.0,
):
    """Plot a hypnogram: stages W, REM, N1, N2, N3 from top to bottom against time in hours.

    Parameters
    ----------
    y : array-like of int
        One label per epoch (0..4 = W, N1, N2, N3, REM); negative values are unscored and drawn as gaps.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new ``10 x 3`` inch figure when omitted. Call again on the same axes to
        overlay a second hypnogram (e.g. a prediction).
    epoch_s : float
        Epoch length in seconds.
    label : str, optional
        Legend entry of this line.
    color : str
        Line colour.
    highlight_rem : bool
        Draw REM epochs as thick red segments (as YASA does), so REM periods stand out.
    lw, alpha : float
        Line width and opacity.
    offset : float
        Vertical shift in rows (e.g. ``0.1``), so that two overlaid hypnograms do not hide each other.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _new_ax(ax)
    rows = _hypnogram_rows(y) + offset
    n = rows.size
    # Epoch i spans [i, i+1) * epoch_s; repeat the last value so the final epoch has its full width.
    t_h = np.arange(n + 1) * epoch_s / 3600.0
    steps = np.append(rows, rows[-1] if n else np.nan)
    ax.step(t_h, steps, where="post", color=color, lw=lw, alpha=alpha, label=label)
    if highlight_rem and n:
        rem_row = HYPNOGRAM_ORDER.index("REM") + offset
        rem = np.where(np.asarray(y).ravel() == STAGES.index("REM"), rem_row, np.nan)
        rem = np.append(rem, np.nan)
        ax.step(t_h, rem, where="post", color=STAGE_COLORS["REM"], lw=lw * 2.5, alpha=alpha,
                solid_capstyle="butt")
    ax.set_yticks(range(len(HYPNOGRAM_ORDER)))
    ax.set_yticklabels(HYPNOGRAM_ORDER)
    ax.set_ylim(len(HYPNOGRAM_ORDER) - 0.5, -0.5)  # inverted: W on top
    ax.margins(x=0)  # the night fills the axes; overlays widen it to the longest hypnogram
    ax.set_xlabel("Time [h]")
    ax.set_ylabel("Stage")
    ax.spines[["top", "right"]].set_visible(False)
    if label is not None:
        ax.legend(loc="lower right", frameon=False, ncol=2)
    return ax


def plot_hypnogram_comparison(y_true, y_pred, ax=None, epoch_s: float = 30.0,
                              labels: tuple[str, str] = ("expert", "predicted")):
    """Overlay a true and a predicted hypnogram and mark the epochs where they disagree.

    Parameters
    ----------
    y_true, y_pred : array-like of int
        Labels of the same epochs (0..4 = W, N1, N2, N3, REM).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    epoch_s : float
        Epoch length in seconds.
    labels : (str, str)
        Legend entries of the two hypnograms.

    Returns
    -------
    matplotlib.axes.Axes
        The title gives the epoch-wise agreement (accuracy).
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} epochs but y_pred has {y_pred.size}; they must match")
    ax = _new_ax(ax)
    plot_hypnogram(y_true, ax=ax, epoch_s=epoch_s, label=labels[0], color="k", lw=1.5)
    # Shifted down a little and semi-transparent so that agreement shows as a doubled line.
    plot_hypnogram(y_pred, ax=ax, epoch_s=epoch_s, label=labels[1], color="C1", lw=1.2,
                   alpha=0.8, offset=0.12, highlight_rem=False)
    wrong = np.flatnonzero((y_true != y_pred) & (y_true >= 0))
    if wrong.size:
        # A rug under the N3 row: where the errors cluster in the night.
        t_h = (wrong + 0.5) * epoch_s / 3600.0
        ax.plot(t_h, np.full(t_h.shape, len(HYPNOGRAM_ORDER) - 0.62), "|", color="C3", ms=6, alpha=0.6,
                label="disagreement")
        ax.set_ylim(len(HYPNOGRAM_ORDER) - 0.4, -0.5)
    scored = y_true >= 0
    agreement = float(np.mean(y_true[scored] == y_pred[scored])) if scored.any() else float("nan")
    ax.set_title(f"{labels[0]} vs {labels[1]}: agreement {agreement:.1%} of {int(scored.sum())} epochs")
    # Outside the axes: inside, it would hide the end of the night.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return ax


def plot_spectrogram(
    signal,
    sfreq: float,
    ax=None,
    method: str = "multitaper",
    win_s: float = 30.0,
    fmin: float = 0.0,
    fmax: float = 25.0,
    time_bandwidth: float = 6.0,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "RdBu_r",
    colorbar: bool = True,
):
    """Spectrogram of one channel, in dB, from ``fmin`` to ``fmax`` Hz against time in hours.

    Parameters
    ----------
    signal : array-like of float
        One channel in microvolts (e.g. EEG Fpz-Cz over the night).
    sfreq : float
        Sampling rate in Hz.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    method : {"multitaper", "welch"}
        Spectral estimate of each window; see :func:`sleeplib.explore.multitaper_spectrogram`.
    win_s : float
        Window length in seconds; 30 s windows align with the epochs of a hypnogram.
    fmin, fmax : float
        Frequency range shown.
    time_bandwidth : float
        Multitaper time-bandwidth product ``2 NW`` (``time_bandwidth - 1`` tapers; smoothing of
        ``time_bandwidth / win_s`` Hz, 0.2 Hz by default).
    vmin, vmax : float, optional
        Colour limits in dB; by default the 2nd and 98th percentiles, so that artefacts do not wash
        out the colour scale.
    cmap : str
        Colour map (YASA's default).
    colorbar : bool
        Add a colour bar labelled in dB.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from sleeplib.explore import multitaper_spectrogram

    times, freqs, psd = multitaper_spectrogram(signal, sfreq, win_s=win_s, method=method,
                                               time_bandwidth=time_bandwidth, fmin=fmin, fmax=fmax)
    ax = _new_ax(ax)
    power_db = 10 * np.log10(np.maximum(psd, np.finfo(float).tiny))
    if vmin is None or vmax is None:
        lo, hi = np.percentile(power_db, [2, 98]) if power_db.size else (0.0, 1.0)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    t_h = times / 3600.0
    half = win_s / 2 / 3600.0
    df = freqs[1] - freqs[0] if freqs.size > 1 else 1.0
    image = ax.imshow(
        power_db.T, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
        extent=(t_h[0] - half if t_h.size else 0, t_h[-1] + half if t_h.size else 1,
                freqs[0] - df / 2 if freqs.size else fmin, freqs[-1] + df / 2 if freqs.size else fmax),
    )
    ax.set_ylim(fmin, fmax)
    ax.set_xlabel("Time [h]")
    ax.set_ylabel("Frequency [Hz]")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="Power [dB re 1 µV²/Hz]", pad=0.01, fraction=0.04)
    return ax


def _stage_dict(data) -> dict[str, np.ndarray]:
    if isinstance(data, pd.DataFrame):
        return {str(c): data[c].to_numpy() for c in data.columns}
    return {str(k): np.asarray(v) for k, v in dict(data).items()}


def plot_psd_by_stage(freqs, psd_by_stage, ax=None, db: bool = True, fmin: float = 0.5, fmax: float = 25.0,
                      band: bool = True):
    """Power spectral density of each stage, one line per stage in its colour.

    Parameters
    ----------
    freqs : array-like of float
        Frequencies in Hz, ``(F,)``.
    psd_by_stage : mapping of str to array, or pandas.DataFrame
        Stage name -> PSD in µV²/Hz: ``(F,)`` for a curve, or ``(n_epochs, F)`` for the epochs of
        that stage (drawn as the median with its 25-75 % band). A DataFrame has one column per stage.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    db : bool
        Plot ``10 log10(PSD)`` (dB); otherwise PSD on a log axis.
    fmin, fmax : float
        Frequency range shown.
    band : bool
        Draw the interquartile band of 2-D inputs.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _new_ax(ax, figsize=(6, 4))
    freqs = np.asarray(freqs, dtype=float)
    keep = (freqs >= fmin) & (freqs <= fmax)
    stages = _stage_dict(psd_by_stage)
    ordered = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    for stage in ordered:
        psd = np.asarray(stages[stage], dtype=float)
        if psd.ndim == 1:
            psd = psd[None, :]
        if psd.shape[-1] != freqs.size:
            raise ValueError(f"PSD of {stage} has {psd.shape[-1]} frequencies but freqs has {freqs.size}")
        if psd.shape[0] == 0:
            continue
        values = 10 * np.log10(np.maximum(psd[:, keep], np.finfo(float).tiny)) if db else psd[:, keep]
        centre = np.median(values, axis=0)
        color = STAGE_COLORS.get(stage)
        n_text = f" (n={psd.shape[0]})" if psd.shape[0] > 1 else ""
        ax.plot(freqs[keep], centre, color=color, lw=2, label=f"{stage}{n_text}")
        if band and psd.shape[0] > 1:
            lo, hi = np.percentile(values, [25, 75], axis=0)
            ax.fill_between(freqs[keep], lo, hi, color=color, alpha=0.15, lw=0)
    if not db:
        ax.set_yscale("log")
    ax.set_xlim(fmin, fmax)
    ax.set_xlabel("Frequency [Hz]")
    ax.set_ylabel("PSD [dB re 1 µV²/Hz]" if db else "PSD [µV²/Hz]")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def plot_epoch_traces(epochs_by_stage, sfreq, channels: Sequence[str], axes=None, epoch_s: float | None = None):
    """One example epoch of each stage, one panel per stage (rows) and channel (columns).

    Parameters
    ----------
    epochs_by_stage : mapping of str to array or sequence of arrays
        Stage name -> the epoch's signals: a ``(C, T)`` array, or one 1-D array per channel (channels
        may have different rates, e.g. a 1-Hz EMG envelope beside 100-Hz EEG).
    sfreq : float, sequence of float or mapping of str to float
        Sampling rate of every channel, one per channel, or channel name -> rate.
    channels : sequence of str
        Channel names, in the order of the signals.
    axes : array of matplotlib.axes.Axes, optional
        ``(n_stages, n_channels)`` axes; a new figure when omitted.
    epoch_s : float, optional
        Only used to set the x range; by default the length of the first trace.

    Returns
    -------
    numpy.ndarray of matplotlib.axes.Axes
        ``(n_stages, n_channels)``. Within a column all panels share the y range, so amplitudes of
        different stages compare directly.
    """
    channels = list(channels)
    stages = [s for s in STAGES if s in epochs_by_stage] + [s for s in epochs_by_stage if s not in STAGES]
    if not stages:
        raise ValueError("epochs_by_stage is empty; pass at least one stage")
    if isinstance(sfreq, Mapping):
        rates = [float(sfreq[ch]) for ch in channels]
    elif np.ndim(sfreq) == 0:
        rates = [float(sfreq)] * len(channels)
    else:
        rates = [float(r) for r in sfreq]
    if axes is None:
        _, axes = plt.subplots(len(stages), len(channels), figsize=(4.2 * len(channels), 1.3 * len(stages) + 0.6),
                               sharex=True, sharey="col", squeeze=False, constrained_layout=True)
    axes = np.asarray(axes, dtype=object).reshape(len(stages), len(channels))
    for i, stage in enumerate(stages):
        signals = epochs_by_stage[stage]
        if len(signals) != len(channels):
            raise ValueError(f"stage {stage} has {len(signals)} signals but {len(channels)} channels were named")
        for j, (ch, rate) in enumerate(zip(channels, rates)):
            trace = np.asarray(signals[j], dtype=float).ravel()
            t = np.arange(trace.size) / rate
            ax = axes[i, j]
            ax.plot(t, trace, color=STAGE_COLORS.get(stage, "k"), lw=0.6)
            ax.spines[["top", "right"]].set_visible(False)
            if i == 0:
                ax.set_title(ch)
            if j == 0:
                ax.set_ylabel(f"{stage}\n[µV]")
            if i == len(stages) - 1:
                ax.set_xlabel("Time [s]")
            if epoch_s is not None:
                ax.set_xlim(0, epoch_s)
            elif trace.size:
                ax.set_xlim(0, trace.size / rate)
    return axes


def plot_class_distribution(counts_df, ax=None, by: str | None = "subject", normalize: bool = True):
    """Stage proportions per subject (stacked bars) and over the whole cohort (last bar).

    Parameters
    ----------
    counts_df : pandas.DataFrame
        One row per night (or subject) with one column per stage name, e.g.
        :meth:`sleeplib.data.dataset.SleepNights.label_counts`; a row labelled ``"total"`` and
        columns other than the stages are ignored.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    by : str or None
        Column to group the rows by before plotting (nights of one subject summed); ``None`` or a
        missing column plots one bar per row.
    normalize : bool
        Bars as percentages of each subject's epochs (so subjects with few epochs compare), with
        the epoch count in the tick label; otherwise raw counts.

    Returns
    -------
    matplotlib.axes.Axes
    """
    table = counts_df.copy()
    table = table[[str(i) != "total" for i in table.index]]
    stages = [s for s in STAGES if s in table.columns]
    if not stages:
        raise ValueError(f"counts_df has no stage columns {STAGES}; columns: {list(counts_df.columns)}")
    if by is not None and by in table.columns:
        per_group = table.groupby(by)[stages].sum()
        # Ids read back from tables with a total row come as floats (0.0); show them as integers.
        per_group.index = [str(int(g)) if isinstance(g, float) and float(g).is_integer() else str(g)
                           for g in per_group.index]
        ax_xlabel = by
    else:
        per_group = table[stages].copy()
        per_group.index = [str(i) for i in per_group.index]
        ax_xlabel = table.index.name or ""
    per_group.loc["cohort"] = per_group.sum()
    totals = per_group.sum(axis=1)
    values = per_group.div(totals.replace(0, np.nan), axis=0).fillna(0) * 100 if normalize else per_group
    ax = _new_ax(ax, figsize=(max(5.0, 0.5 * len(per_group) + 3), 4))
    x = np.arange(len(values), dtype=float)
    x[-1] += 0.5  # a gap before the cohort bar, so it is not read as one more subject
    bottom = np.zeros(len(values))
    for stage in stages:
        bars = ax.bar(x, values[stage].to_numpy(), bottom=bottom, color=STAGE_COLORS[stage], label=stage,
                      edgecolor="white", lw=0.5)
        bars.patches[-1].set_hatch("//")
        bottom += values[stage].to_numpy()
    ax.set_xticks(x)
    ax.set_xticklabels([f"{name}\n(n={int(n)})" for name, n in totals.items()],
                       rotation=90 if len(values) > 8 else 0, fontsize=8 if len(values) > 8 else None)
    ax.set_ylabel("Epochs [%]" if normalize else "Epochs")
    ax.set_xlabel(ax_xlabel)
    if normalize:
        ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def plot_confusion_matrix(cm, ax=None, normalize: bool = True, labels: Sequence[str] = STAGES,
                          cmap: str = "Blues", colorbar: bool = False):
    """Confusion matrix as a heat map (rows: true stage, columns: predicted stage).

    Parameters
    ----------
    cm : array-like of int, ``(K, K)``
        Counts, e.g. :func:`sleeplib.metrics.confusion_matrix`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    normalize : bool
        Colour and annotate each row as percentages of that true stage (recall on the diagonal),
        with the count below; otherwise counts only.
    labels : sequence of str
        Class names of the rows and columns.
    cmap : str
        Colour map.
    colorbar : bool
        Add a colour bar.

    Returns
    -------
    matplotlib.axes.Axes
    """
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(labels):
        raise ValueError(f"cm must be ({len(labels)}, {len(labels)}) for labels {list(labels)}; got {cm.shape}")
    ax = _new_ax(ax, figsize=(4.8, 4.2))
    if normalize:
        row_sums = cm.sum(axis=1, keepdims=True)
        shown = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0) * 100
        annot = np.array([[f"{p:.0f}%\n{int(c)}" for p, c in zip(pr, cr)] for pr, cr in zip(shown, cm)])
        vmax = 100
    else:
        shown = cm
        annot = np.array([[f"{int(c)}" for c in row] for row in cm])
        vmax = None
    sns.heatmap(shown, annot=annot, fmt="", cmap=cmap, vmin=0, vmax=vmax, cbar=colorbar, square=True,
                xticklabels=list(labels), yticklabels=list(labels), ax=ax, annot_kws={"fontsize": 8},
                linewidths=0.5, linecolor="white")
    ax.set_xlabel("Predicted stage")
    ax.set_ylabel("True stage")
    ax.tick_params(axis="y", rotation=0)
    return ax


def _f1_series(values) -> pd.Series:
    """Per-class F1 as a Series indexed by stage, in [0, 1] (percentages are divided by 100)."""
    if isinstance(values, pd.DataFrame):
        if "f1" not in values.columns:
            raise ValueError(f"the per-class table needs an 'f1' column; columns: {list(values.columns)}")
        values = values["f1"]
    series = pd.Series(values, dtype=float) if not isinstance(values, pd.Series) else values.astype(float)
    series.index = [str(i) for i in series.index]
    if series.max() > 1.0:  # papers report F1 in percent
        series = series / 100.0
    return series


def plot_per_class_f1(table, ax=None, reference=None, label: str = "ours", reference_label: str = "paper"):
    """Per-class F1 as grouped bars: ours beside one or more references (e.g. a paper's table).

    Parameters
    ----------
    table : pandas.DataFrame, pandas.Series or mapping
        Our per-class F1: a DataFrame with an ``f1`` column indexed by stage (as
        :func:`sleeplib.metrics.per_class_table` returns), or stage -> F1. Values in [0, 1] or in %.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    reference : mapping, pandas.Series or pandas.DataFrame, optional
        Stage -> F1 of a reference, or a DataFrame with one column per reference (stages as index).
    label, reference_label : str
        Legend entries (``reference_label`` is unused when ``reference`` is a DataFrame: its column
        names are used).

    Returns
    -------
    matplotlib.axes.Axes
    """
    series = {label: _f1_series(table)}
    if reference is not None:
        if isinstance(reference, pd.DataFrame) and "f1" not in reference.columns:
            for col in reference.columns:
                series[str(col)] = _f1_series(reference[col])
        else:
            series[reference_label] = _f1_series(reference)
    frame = pd.DataFrame(series)
    order = [s for s in STAGES if s in frame.index] + [s for s in frame.index if s not in STAGES]
    frame = frame.loc[order]
    ax = _new_ax(ax, figsize=(6, 3.5))
    width = 0.8 / frame.shape[1]
    x = np.arange(len(frame))
    for k, col in enumerate(frame.columns):
        bars = ax.bar(x + (k - (frame.shape[1] - 1) / 2) * width, frame[col].to_numpy() * 100, width,
                      label=col, color=f"C{k}", alpha=1.0 if k == 0 else 0.6)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels(frame.index)
    ax.set_ylabel("F1 [%]")
    ax.set_ylim(0, 105)
    ax.legend(frameon=False, ncol=frame.shape[1], loc="upper center", bbox_to_anchor=(0.5, 1.15))
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def plot_training_curves(history_df, ax=None, x: str = "epoch", best: str | None = "auto"):
    """Loss (left axis) and score columns (right axis) against epochs of training.

    Parameters
    ----------
    history_df : pandas.DataFrame
        One row per epoch. Columns whose name contains ``loss`` go on the left axis; other numeric
        columns (accuracy, macro-F1, kappa, ...) on a right axis; columns named like ``lr`` or
        ``time`` are skipped. Train and validation versions of one metric share a colour, train dashed.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.
    x : str
        Column holding the epoch number; the row index when absent.
    best : str, None or "auto"
        Mark the row where this column is best (minimum for a loss, maximum otherwise); ``"auto"``
        picks a validation loss column if one exists.

    Returns
    -------
    matplotlib.axes.Axes
        The loss axes (the score axes is ``ax.right_ax`` when drawn).
    """
    ax = _new_ax(ax, figsize=(7, 3.5))
    history = pd.DataFrame(history_df)
    xs = history[x].to_numpy() if x in history.columns else history.index.to_numpy()
    skip = {x, "lr", "learning_rate", "time", "seconds", "fold"}
    numeric = [c for c in history.columns
               if c not in skip and pd.api.types.is_numeric_dtype(history[c]) and not c.startswith("time")]
    loss_cols = [c for c in numeric if "loss" in c.lower()]
    score_cols = [c for c in numeric if c not in loss_cols]

    def base(name: str) -> str:
        for prefix in ("train_", "val_", "valid_", "test_"):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    colours: dict[str, str] = {}
    for c in loss_cols + score_cols:
        colours.setdefault(base(c), f"C{len(colours)}")

    def draw(axis, cols):
        for c in cols:
            axis.plot(xs, history[c].to_numpy(), color=colours[base(c)],
                      ls="--" if c.startswith("train") else "-", marker="o" if len(xs) < 30 else None, ms=3,
                      label=c)

    draw(ax, loss_cols)
    ax.set_xlabel(x.capitalize() if x in history.columns else "Epoch")
    ax.set_ylabel("Loss")
    handles, names = ax.get_legend_handles_labels()
    if score_cols:
        right = ax.twinx()
        draw(right, score_cols)
        right.set_ylabel("Score")
        ax.right_ax = right
        h2, n2 = right.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    if best == "auto":
        candidates = [c for c in loss_cols if c.startswith(("val", "valid"))]
        best = candidates[0] if candidates else None
    if best is not None and best in history.columns and len(history):
        values = history[best].to_numpy(dtype=float)
        i = int(np.nanargmin(values) if "loss" in best.lower() else np.nanargmax(values))
        ax.axvline(xs[i], color="grey", ls=":", lw=1)
        # Text on the side of the line with more room, so it stays inside the axes.
        right_half = (xs[i] - xs[0]) > 0.5 * (xs[-1] - xs[0]) if len(xs) > 1 else False
        ax.annotate(f"best {best}\n@ {xs[i]}", (xs[i], 0.98), xycoords=("data", "axes fraction"),
                    ha="right" if right_half else "left", va="top", fontsize=8, color="grey",
                    xytext=(-3 if right_half else 3, 0), textcoords="offset points")
    if handles:
        ax.legend(handles, names, frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=min(4, len(handles)))
    ax.spines[["top"]].set_visible(False)
    return ax
