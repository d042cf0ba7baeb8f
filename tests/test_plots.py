"""Every figure of sleeplib.plots draws on a given axes, returns it, and works on synthetic inputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from sleeplib import STAGES, plots
from sleeplib.explore import multitaper_spectrogram

# Synthetic inputs only: these tests check drawing, not data.
RNG = np.random.default_rng(0)
Y = np.repeat([0, 1, 2, 3, 2, 4, 0], [20, 5, 30, 25, 10, 15, 5])


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_hypnogram_returns_given_axes_with_stage_order(ax):
    out = plots.plot_hypnogram(Y, ax=ax, label="expert")
    assert out is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == list(plots.HYPNOGRAM_ORDER)
    # W is drawn at the top: the y axis is inverted.
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    xdata = ax.lines[0].get_xdata()
    assert xdata[-1] == pytest.approx(len(Y) * 30 / 3600)


def test_hypnogram_rem_highlight_only_on_rem_epochs(ax):
    plots.plot_hypnogram(Y, ax=ax)
    rem_line = ax.lines[1]
    ydata = np.asarray(rem_line.get_ydata(), dtype=float)[:-1]
    assert np.isfinite(ydata).sum() == int((Y == STAGES.index("REM")).sum())


def test_hypnogram_makes_axes_and_accepts_gaps():
    y = Y.copy()
    y[3:6] = -1  # unscored epochs
    ax = plots.plot_hypnogram(y, epoch_s=30)
    assert ax is not None and np.isnan(np.asarray(ax.lines[0].get_ydata(), dtype=float)[3:6]).all()


def test_hypnogram_rejects_out_of_range_labels(ax):
    with pytest.raises(ValueError, match="labels must be 0..4"):
        plots.plot_hypnogram([0, 7], ax=ax)


def test_hypnogram_comparison_titles_agreement(ax):
    y_pred = Y.copy()
    y_pred[:10] = 2
    out = plots.plot_hypnogram_comparison(Y, y_pred, ax=ax)
    assert out is ax
    expected = np.mean(Y == y_pred)
    assert f"{expected:.1%}" in ax.get_title()
    with pytest.raises(ValueError, match="must match"):
        plots.plot_hypnogram_comparison(Y, y_pred[:-1], ax=ax)


@pytest.mark.parametrize("method", ["multitaper", "welch"])
def test_spectrogram_in_db_up_to_25_hz(ax, method):
    sfreq, n_epochs = 100.0, 12
    t = np.arange(int(n_epochs * 30 * sfreq)) / sfreq
    signal = 20 * np.sin(2 * np.pi * 10 * t) + RNG.standard_normal(t.size)
    out = plots.plot_spectrogram(signal, sfreq, ax=ax, method=method)
    assert out is ax
    assert ax.get_ylim() == (0.0, 25.0)
    image = ax.images[0]
    assert image.get_array().shape[1] == n_epochs  # one column per 30-s window
    assert "dB" in ax.figure.axes[-1].get_ylabel()  # the colour bar


def test_multitaper_spectrogram_finds_the_tone_and_parseval():
    sfreq = 100.0
    t = np.arange(int(3 * 30 * sfreq)) / sfreq
    signal = 10 * np.sin(2 * np.pi * 11 * t)
    times, freqs, psd = multitaper_spectrogram(signal, sfreq, fmax=None)
    assert times.tolist() == [15.0, 45.0, 75.0]
    assert np.all(freqs[psd.argmax(axis=1)] == pytest.approx(11.0, abs=0.1))
    # One-sided PSD integrates to the signal's variance (50 for amplitude 10).
    power = psd.sum(axis=1) * (freqs[1] - freqs[0])
    assert power == pytest.approx(np.full(3, 50.0), rel=0.02)


def test_psd_by_stage_accepts_curves_and_epoch_arrays(ax):
    freqs = np.linspace(0, 30, 61)
    curves = {s: 1.0 / (1 + freqs) * (k + 1) for k, s in enumerate(STAGES)}
    out = plots.plot_psd_by_stage(freqs, curves, ax=ax)
    assert out is ax and len(ax.lines) == 5
    fig, ax2 = plt.subplots()
    per_epoch = {"W": RNG.random((7, 61)) + 0.1, "N3": RNG.random((4, 61)) + 0.1}
    plots.plot_psd_by_stage(freqs, per_epoch, ax=ax2, db=False)
    assert [line.get_label() for line in ax2.lines] == ["W (n=7)", "N3 (n=4)"]
    with pytest.raises(ValueError, match="frequencies"):
        plots.plot_psd_by_stage(freqs[:-1], curves, ax=ax)


def test_epoch_traces_one_panel_per_stage_and_channel():
    channels = ["EEG Fpz-Cz", "EOG horizontal", "EMG submental"]
    rates = {"EEG Fpz-Cz": 100.0, "EOG horizontal": 100.0, "EMG submental": 1.0}
    epochs = {s: [RNG.standard_normal(3000), RNG.standard_normal(3000), RNG.random(30)] for s in STAGES}
    axes = plots.plot_epoch_traces(epochs, rates, channels)
    assert axes.shape == (5, 3)
    assert axes[0, 2].get_title() == "EMG submental"
    assert axes[4, 2].lines[0].get_xdata()[-1] == pytest.approx(29.0)
    # Given axes are used as they are.
    fig, given = plt.subplots(2, 1)
    out = plots.plot_epoch_traces({"W": RNG.standard_normal((1, 3000)), "REM": RNG.standard_normal((1, 3000))},
                                  100.0, ["EEG"], axes=given)
    assert out[0, 0] is given[0] and out[1, 0] is given[1]


def test_class_distribution_per_subject_and_cohort(ax):
    counts = pd.DataFrame(
        {"subject": [0, 0, 1], "night": [1, 2, 1], "W": [10, 20, 5], "N1": [1, 2, 3], "N2": [30, 20, 40],
         "N3": [5, 5, 5], "REM": [9, 8, 7], "total": [55, 55, 60]},
        index=pd.Index(["A", "B", "C"], name="record"),
    )
    counts.loc["total"] = counts.sum()
    out = plots.plot_class_distribution(counts, ax=ax)
    assert out is ax
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0\n(n=110)", "1\n(n=60)", "cohort\n(n=170)"]
    assert ax.get_xlabel() == "subject"
    # Each bar stacks to 100 %.
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x(), 3)
        tops[x] = max(tops.get(x, 0), patch.get_y() + patch.get_height())
    assert all(v == pytest.approx(100) for v in tops.values())


def test_confusion_matrix_normalised_and_counts(ax):
    cm = np.array([[50, 2, 1, 0, 3], [5, 10, 8, 0, 4], [1, 3, 90, 6, 2], [0, 0, 9, 40, 0], [2, 3, 4, 0, 30]])
    out = plots.plot_confusion_matrix(cm, ax=ax)
    assert out is ax
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == f"{50 / 56 * 100:.0f}%\n50"
    fig, ax2 = plt.subplots()
    plots.plot_confusion_matrix(cm, ax=ax2, normalize=False, colorbar=True)
    assert ax2.texts[0].get_text() == "50"
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix(cm[:3, :3], ax=ax)


def test_per_class_f1_ours_vs_paper(ax):
    table = pd.DataFrame({"f1": [0.9, 0.4, 0.85, 0.8, 0.75]}, index=pd.Index(STAGES, name="stage"))
    paper = {"W": 89.7, "N1": 42.6, "N2": 88.8, "N3": 90.2, "REM": 79.7}  # percent, as papers print
    out = plots.plot_per_class_f1(table, ax=ax, reference=paper)
    assert out is ax
    heights = [p.get_height() for p in ax.patches]
    assert heights[:5] == pytest.approx([90, 40, 85, 80, 75])
    assert heights[5:] == pytest.approx(list(paper.values()))
    fig, ax2 = plt.subplots()
    several = pd.DataFrame({"paper A": paper, "paper B": paper})
    plots.plot_per_class_f1(table["f1"], ax=ax2, reference=several)
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == ["ours", "paper A", "paper B"]


def test_training_curves_loss_left_scores_right(ax):
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [1.2, 0.9, 0.7, 0.6],
                            "val_loss": [1.1, 0.95, 0.9, 0.93], "val_acc": [0.5, 0.6, 0.7, 0.69],
                            "lr": [1e-3] * 4})
    out = plots.plot_training_curves(history, ax=ax)
    assert out is ax
    assert [line.get_label() for line in ax.lines if not line.get_label().startswith("_")] == ["train_loss", "val_loss"]
    assert [line.get_label() for line in ax.right_ax.lines] == ["val_acc"]
    assert ax.lines[-1].get_xdata()[0] == 3  # best val_loss marked at epoch 3


# --------------------------------------------------------------------------------------------------
# sleeplib.explore: the computations behind the explore notebook's figures and tables
# --------------------------------------------------------------------------------------------------
from sleeplib import explore  # noqa: E402


def _stage_epochs(sfreq=100.0, n_per_stage=6):
    """Synthetic epochs whose dominant frequency depends on the stage (W 10 Hz, N1 6, N2 13, N3 1, REM 5)."""
    tones = {0: 10.0, 1: 6.0, 2: 13.0, 3: 1.0, 4: 5.0}
    t = np.arange(int(30 * sfreq)) / sfreq
    y = np.repeat(np.arange(5), n_per_stage)
    x = np.stack([20 * np.sin(2 * np.pi * tones[int(label)] * t + RNG.uniform(0, 6)) + RNG.standard_normal(t.size)
                  for label in y])
    return x, y


def test_psd_by_stage_groups_epochs_and_finds_peaks():
    x, y = _stage_epochs()
    freqs, psd = explore.psd_by_stage(x, y, 100.0, max_epochs_per_stage=4)
    assert list(psd) == list(STAGES)
    assert all(v.shape == (4, freqs.size) for v in psd.values())
    assert freqs[psd["N2"].mean(axis=0).argmax()] == pytest.approx(13.0, abs=0.3)
    freqs_mt, psd_mt = explore.psd_by_stage(x, y, 100.0, method="multitaper")
    assert freqs_mt[psd_mt["W"].mean(axis=0).argmax()] == pytest.approx(10.0, abs=0.3)


def test_typical_epochs_prefers_epochs_inside_a_run():
    x, y = _stage_epochs()
    x[1] = 50 * RNG.standard_normal(x.shape[1])  # an atypical W epoch
    chosen = explore.typical_epochs(x, y, 100.0)
    assert set(chosen) == set(STAGES)
    assert all(y[i] == STAGES.index(stage) for stage, i in chosen.items())
    assert chosen["W"] != 1
    # Not at the edge of a run: both neighbours share the stage.
    assert all(y[i - 1] == y[i] == y[i + 1] for i in chosen.values())


def test_label_rule_counts_on_a_synthetic_night():
    from sleeplib.data.prepare import epoch_night
    from sleeplib.data.synthetic import synthetic_night

    raw = synthetic_night(n_epochs=120, subject=0, night=1)
    table = explore.label_rule_counts(raw)
    _, y = epoch_night(raw)
    assert table.loc["total", "after wake crop"] == len(y)
    assert table.loc[list(STAGES), "after wake crop"].tolist() == np.bincount(y, minlength=5).tolist()
    assert table.loc["total", "R&K annotations"] >= table.loc["total", "after mapping"] >= len(y)


def test_label_rule_counts_sc4001_matches_the_published_rule(sc4001_files):
    # Real data from ../shared: SC4001E0 gives 841 epochs, W 188, N1 58, N2 250, N3 220, REM 125.
    from sleeplib.data.raw import read_edf_night

    raw = read_edf_night(*sc4001_files, channels=["EEG Fpz-Cz"])
    table = explore.label_rule_counts(raw)
    assert table.loc[list(STAGES), "after wake crop"].tolist() == [188, 58, 250, 220, 125]
    assert table.loc["W", "R&K annotations"] > 1000  # the day-long recording is mostly wake before the crop


def test_cohort_demographics_one_row_per_subject():
    from sleeplib.data.records import select_records

    per_subject, summary = explore.cohort_demographics(select_records("sleep-edf-20", "0-2"))
    assert per_subject.index.tolist() == [0, 1, 2]
    assert per_subject["nights"].tolist() == [2, 2, 2]
    assert summary.loc[0, "subjects"] == 3 and summary.loc[0, "female"] + summary.loc[0, "male"] == 3
    assert explore.selected_records("synthetic") is None


def test_prepared_summary_reads_labels_and_totals(tmp_path):
    from sleeplib.io import save_npz

    for record, subject, y in (("A", 0, [0, 0, 2, 3]), ("B", 1, [4, 2, 2])):
        save_npz(tmp_path / f"{record}.npz", x=np.zeros((len(y), 30), np.float32), y=np.array(y), fs=1.0,
                 record=np.str_(record), subject=np.int64(subject), night=np.int64(1), synthetic=np.bool_(True))
    table = explore.prepared_summary(sorted(tmp_path.glob("*.npz")))
    assert table.index.tolist() == ["A", "B", "total"]
    assert table.loc["total", ["W", "N1", "N2", "N3", "REM", "epochs"]].tolist() == [2, 0, 3, 1, 1, 7]
    assert bool(table.loc["total", "synthetic"]) is True
    ax = plots.plot_class_distribution(table)  # the summary feeds the class-distribution figure directly
    assert ax.get_xticklabels()[-1].get_text() == "cohort\n(n=7)"


def test_synthetic_banner():
    assert explore.SYNTHETIC_BANNER in explore.synthetic_banner(True)
    assert explore.synthetic_banner(False) == ""
