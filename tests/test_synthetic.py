"""The synthetic generator is plausible enough for smoke runs, repeatable, and marked synthetic."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sleeplib.data.prepare import epoch_night, label_counts_rule
from sleeplib.data.synthetic import SYNTHETIC_CHANNELS, synthetic_hypnogram, synthetic_night

ALL = list(SYNTHETIC_CHANNELS)


@pytest.fixture(scope="module")
def epochs():
    """Two nights of two subjects, all channels, epoched like real data."""
    xs, ys = [], []
    for subject in (0, 1):
        x, y = epoch_night(synthetic_night(300, subject=subject, night=1), ALL)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _band_power(x, lo, hi, fs=100.0):
    spectrum = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / fs)
    total = spectrum[..., (freqs >= 0.5) & (freqs < 30)].sum(-1)
    return spectrum[..., (freqs >= lo) & (freqs < hi)].sum(-1) / total


def test_night_is_marked_and_shaped():
    raw = synthetic_night(120, seed=5, subject=3, night=2)
    assert raw.synthetic and raw.dataset == "synthetic" and (raw.subject, raw.night) == (3, 2)
    assert raw.record == "SYN032"
    assert raw.sfreq == {"EEG Fpz-Cz": 100.0, "EEG Pz-Oz": 100.0, "EOG horizontal": 100.0, "EMG submental": 1.0}
    assert all(len(sig) == 120 * 30 * raw.sfreq[ch] for ch, sig in raw.signals.items())
    ann = raw.annotations
    assert ann["onset"].iloc[0] == 0 and (ann["onset"] + ann["duration"]).iloc[-1] == 120 * 30
    assert np.all(np.diff(ann["onset"]) > 0)


def test_repeatable_and_channel_subset_independent():
    a = synthetic_night(100, seed=1)
    b = synthetic_night(100, seed=1)
    c = synthetic_night(100, seed=2)
    for ch in ALL:
        np.testing.assert_array_equal(a.signals[ch], b.signals[ch])
    assert not np.allclose(a.signals["EEG Fpz-Cz"], c.signals["EEG Fpz-Cz"])
    only = synthetic_night(100, seed=1, channels=["EEG Fpz-Cz"])
    assert list(only.signals) == ["EEG Fpz-Cz"]
    np.testing.assert_array_equal(only.signals["EEG Fpz-Cz"], a.signals["EEG Fpz-Cz"])
    with pytest.raises(ValueError, match="available"):
        synthetic_night(100, channels=["EEG C3-A2"])


def test_hypnogram_proportions_and_cycles():
    counts = np.zeros(5)
    n3_early = n3_late = rem_early = rem_late = 0
    for seed in range(10):
        stages = synthetic_hypnogram(900, seed)
        counts += list(label_counts_rule(stages).values())
        sleep = np.flatnonzero(stages != "W")
        half = (sleep[0] + sleep[-1]) // 2
        n3_early += np.isin(stages[:half], ["3", "4"]).sum()
        n3_late += np.isin(stages[half:], ["3", "4"]).sum()
        rem_early += (stages[:half] == "R").sum()
        rem_late += (stages[half:] == "R").sum()
    share = counts / counts.sum()
    # Sleep-EDF-20 has W .20, N1 .07, N2 .42, N3 .13, REM .18; accept a loose neighbourhood
    assert 0.10 < share[0] < 0.35 and 0.02 < share[1] < 0.15 and 0.30 < share[2] < 0.55
    assert 0.07 < share[3] < 0.25 and 0.08 < share[4] < 0.28
    assert n3_early > 2 * n3_late and rem_late > 1.3 * rem_early  # SWS early, REM late
    with pytest.raises(ValueError, match="too short"):
        synthetic_hypnogram(10)


def test_relative_delta_separates_n3_from_wake(epochs):
    x, y = epochs
    delta = _band_power(x[:, 0], 0.5, 2.0)
    mask = np.isin(y, [0, 3])
    assert roc_auc_score(y[mask] == 3, delta[mask]) > 0.95


def test_stage_typical_rhythms(epochs):
    x, y = epochs
    alpha_pz = _band_power(x[:, 1], 8, 12)
    sigma = _band_power(x[:, 0], 12, 15)
    theta = _band_power(x[:, 0], 4, 7)
    emg = x[:, 3].mean(-1)
    eog_rms = x[:, 2].std(-1)
    mean = lambda v, k: v[y == k].mean()  # noqa: E731
    assert mean(alpha_pz, 0) > 2 * max(mean(alpha_pz, k) for k in (1, 2, 3, 4))  # alpha in W
    assert mean(sigma, 2) > 1.5 * mean(sigma, 1)  # spindles in N2
    assert mean(theta, 1) > mean(theta, 0) and mean(theta, 1) > mean(theta, 3)  # theta in N1
    assert mean(emg, 0) > mean(emg, 2) > mean(emg, 4)  # tone: W > NREM > REM
    assert mean(eog_rms, 4) > mean(eog_rms, 2)  # rapid eye movements
    # amplitude in microvolts, comparable to Sleep-EDF Fpz-Cz (tens of uV; N3 larger)
    assert 5 < x[y == 0, 0].std() < 60 and x[y == 3, 0].std() > 1.5 * x[y == 0, 0].std()
