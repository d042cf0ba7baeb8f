"""Tests of the labelling rule, epoching and the prepare() cache (sleeplib.data.prepare, .raw)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from sleeplib import STAGES
from sleeplib.data.dataset import load_nights
from sleeplib.data.prepare import (
    epoch_night,
    label_counts_rule,
    label_epochs,
    prepare,
    prepared_dir,
)
from sleeplib.data.raw import RawNight, annotations_frame, read_edf_night

def _night(stages, fs=100.0, emg_fs=1.0, offset_s=0.0, extra_s=0.0):
    """A RawNight whose signal value in each epoch encodes the epoch index (to check alignment)."""
    n = len(stages)
    duration = offset_s + n * 30 + extra_s
    t = np.arange(int(duration * fs)) / fs
    eeg = np.floor((t - offset_s) / 30)  # value = epoch index on the annotation grid
    emg = np.full(int(duration * emg_fs), 2.0)
    runs = np.flatnonzero(np.r_[True, np.asarray(stages[1:]) != np.asarray(stages[:-1])])
    durations = np.diff(np.r_[runs, n]) * 30
    ann = annotations_frame(offset_s + runs * 30.0, durations, np.asarray(stages, dtype=object)[runs])
    return RawNight("T0011", 1, 1, "test", {"EEG": eeg, "EMG": emg}, {"EEG": fs, "EMG": emg_fs}, ann)


# ---------------------------------------------------------------------------------------------- rule


def test_rule_keeps_margin_and_drops_movement():
    stages = ["W"] * 100 + ["1", "2", "M", "3", "4", "?", "R"] + ["W"] * 100
    keep, y = label_epochs(stages, wake_margin_epochs=60)
    assert y.tolist() == [0] * 60 + [1, 2, 3, 3, 4] + [0] * 60
    assert keep[60:65].tolist() == [100, 101, 103, 104, 106]
    assert keep[0] == 40 and keep[-1] == 106 + 60
    # integer coding of the reference CSVs gives the same
    ints = [0] * 100 + [1, 2, 7, 3, 4, 9, 5] + [0] * 100
    assert np.array_equal(label_epochs(ints, 60)[1], y)
    assert label_counts_rule(stages) == {"W": 120, "N1": 1, "N2": 1, "N3": 2, "REM": 1}
    # no margin: every scored epoch kept; no sleep at all: nothing kept
    assert len(label_epochs(stages, None)[1]) == 205
    assert len(label_epochs(["W"] * 10, 60)[1]) == 0


def test_rule_margin_counts_kept_epochs_like_deepsleepnet():
    # M/? are removed first, so the 2-epoch margin before sleep reaches over the M (epoch 3) to
    # epoch 2; counting in recording time would keep epoch 4 only
    stages = ["W", "W", "W", "M", "W", "2", "W"]
    keep, y = label_epochs(stages, wake_margin_epochs=2)
    assert keep.tolist() == [2, 4, 5, 6] and y.tolist() == [0, 0, 2, 0]


def test_rule_bad_code():
    with pytest.raises(ValueError, match="unknown integer stage"):
        label_epochs([0, 8, 1])


def test_reference_hypnograms_give_published_counts(reference_dir):
    folder = reference_dir / "sleep-edf-20-hypnograms"
    files = sorted(folder.glob("*.csv"))
    assert len(files) == 39, f"expected the 39 Sleep-EDF-20 hypnograms in {folder}"
    totals = dict.fromkeys(STAGES, 0)
    for path in files:
        per_second = pd.read_csv(path, header=None).iloc[:, 0].to_numpy()
        counts = label_counts_rule(per_second[::30])  # files start on an epoch boundary
        if path.name.startswith("SC4001E0"):
            assert counts == {"W": 188, "N1": 58, "N2": 250, "N3": 220, "REM": 125}
        for stage, count in counts.items():
            totals[stage] += count
    assert totals == {"W": 8285, "N1": 2804, "N2": 17799, "N3": 5703, "REM": 7717}


# ---------------------------------------------------------------------------------------------- epochs


def test_epoch_night_alignment_and_shapes():
    stages = ["W"] * 70 + ["2", "2", "M", "R"] + ["W"] * 70 + ["?"] * 3
    raw = _night(stages, offset_s=12.0, extra_s=40.0)  # grid starts 12 s into the signal
    x, y = epoch_night(raw, ["EEG"])
    assert x.shape == (123, 3000) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y, minlength=5).tolist() == [120, 0, 2, 0, 1]
    # each kept epoch holds exactly the samples of its annotation epoch
    kept_index = x[:, 0]
    assert np.all(x == kept_index[:, None])
    assert kept_index[60] == 70 and kept_index[62] == 73  # M at 72 dropped
    x2, _ = epoch_night(raw, ["EEG", "EMG"])
    assert x2.shape == (123, 2, 3000)
    np.testing.assert_allclose(x2[:, 1], 2.0, atol=1e-2)  # 1-Hz channel resampled to 100 Hz


def test_epochs_beyond_signal_dropped():
    stages = ["W"] * 5 + ["2"] * 5 + ["W"] * 5
    raw = _night(stages)
    raw.signals["EEG"] = raw.signals["EEG"][: int(12.5 * 3000)]  # signal ends mid-epoch 12
    x, y = epoch_night(raw, ["EEG"], wake_margin_min=None)
    assert len(y) == 12 and x[-1, 0] == 11


def test_epoch_night_125hz_and_filter():
    stages = ["W"] * 3 + ["2"] * 4 + ["W"] * 3
    raw = _night(stages, fs=125.0)
    x, y = epoch_night(raw, ["EEG"], target_fs=125)
    assert x.shape == (10, 3750)
    x100, _ = epoch_night(raw, ["EEG"], target_fs=100)
    assert x100.shape == (10, 3000)
    rng = np.random.default_rng(0)
    raw.signals["EEG"] = rng.normal(size=raw.signals["EEG"].size) + 50.0
    unfiltered, _ = epoch_night(raw, ["EEG"], target_fs=125)
    filtered, _ = epoch_night(raw, ["EEG"], target_fs=125, l_freq=0.5, h_freq=30.0)
    assert abs(unfiltered.mean() - 50.0) < 1.0
    assert abs(filtered.mean()) < 1.0  # the DC offset of 50 uV is removed by the high-pass
    assert filtered.std() < 0.8 * unfiltered.std()  # white noise above 30 Hz is removed by the low-pass


def test_epoch_night_errors():
    raw = _night(["W", "2", "W"])
    with pytest.raises(ValueError, match="available"):
        epoch_night(raw, ["EEG Fpz-Cz"])
    with pytest.raises(ValueError, match="whole number"):
        epoch_night(raw, ["EEG"], target_fs=100.01)


# ---------------------------------------------------------------------------------------------- real EDF


def test_edf_errors(sc4001_files, tmp_path):
    psg, hyp = sc4001_files
    with pytest.raises(ValueError, match="available channels.*EEG Fpz-Cz"):
        read_edf_night(psg, hyp, ["EEG C3-A2"])
    truncated = tmp_path / "SC4001E0-PSG.edf"
    with open(psg, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(1_000_000))
    with pytest.raises(ValueError, match="truncated.*download it again"):
        read_edf_night(truncated, hyp, ["EEG Fpz-Cz"])


def test_hypnogram_of_another_night(sc4001_files, tmp_path):
    """A hypnogram shifted past the end of the PSG is refused with both file names."""
    from sleeplib.data.raw import check_hypnogram_matches

    ann = annotations_frame([0.0, 90000.0], [30.0, 30.0], ["W", "2"])
    with pytest.raises(ValueError, match="does not match.*PSG"):
        check_hypnogram_matches(ann, 79500.0, "a-PSG.edf", "b-Hypnogram.edf")
    ann = annotations_frame([0.0], [79500.0], ["?"])
    with pytest.raises(ValueError, match="no scored stage overlaps"):
        check_hypnogram_matches(ann, 79500.0, "a-PSG.edf", "b-Hypnogram.edf")


# ---------------------------------------------------------------------------------------------- prepare()


def test_prepare_synthetic_cache(tmp_path):
    start = time.perf_counter()
    # short nights keep this test fast; benchmarks/prepare.py times the default 300-epoch cohort
    paths = prepare("synthetic", data_dir=tmp_path, progress=False, n_jobs=2, synthetic_epochs=100)
    cold = time.perf_counter() - start
    assert len(paths) == 8 and all(p.is_file() for p in paths)
    assert paths[0].parent == prepared_dir("synthetic", data_dir=tmp_path, synthetic_epochs=100)
    assert paths[0].parent != prepared_dir("synthetic", data_dir=tmp_path)
    assert paths[0].parent.parent == tmp_path / "prepared" / "synthetic"
    assert paths[0].parent.name.startswith("fpz-cz_100hz_")
    with np.load(paths[0]) as npz:
        assert {"x", "y", "fs", "ch_label", "channels", "record", "subject", "night", "dataset",
                "synthetic"} <= set(npz.files)
        assert npz["x"].dtype == np.float32 and npz["x"].shape[1:] == (3000,)
        assert bool(npz["synthetic"]) and str(npz["dataset"]) == "synthetic" and float(npz["fs"]) == 100.0
    nights = load_nights(paths[0].parent)
    assert nights.subjects.tolist() == [0, 1, 2, 3] and len(nights) == 8 and nights.synthetic
    mtimes = [p.stat().st_mtime_ns for p in paths]
    start = time.perf_counter()
    again = prepare("synthetic", data_dir=tmp_path, progress=False, synthetic_epochs=100)
    cached = time.perf_counter() - start
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == mtimes  # skipped, not rewritten
    assert cached < cold
    # a different parameter is a different folder; overwrite recomputes
    other = prepare("synthetic", subjects=[1], nights=[2], data_dir=tmp_path, progress=False, wake_margin_min=10,
                    synthetic_epochs=100)
    assert len(other) == 1 and other[0].parent != paths[0].parent and other[0].name == "SYN012.npz"
    prepare("synthetic", subjects="0", nights=1, data_dir=tmp_path, progress=False, overwrite=True, n_jobs=1,
            synthetic_epochs=100)
    assert paths[0].stat().st_mtime_ns != mtimes[0]
    # no temporary files left behind
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]


def test_prepare_key_depends_on_every_param(tmp_path):
    base = prepared_dir("sleep-edf-20", data_dir=tmp_path)
    variants = [
        prepared_dir("sleep-edf-20", channels=["EEG Fpz-Cz", "EEG Pz-Oz"], data_dir=tmp_path),
        prepared_dir("sleep-edf-20", data_dir=tmp_path, wake_margin_min=None),
        prepared_dir("sleep-edf-20", data_dir=tmp_path, l_freq=0.3),
        prepared_dir("sleep-edf-20", data_dir=tmp_path, h_freq=35.0),
        prepared_dir("sleep-edf-20", data_dir=tmp_path, target_fs=125),
        prepared_dir("sleep-edf-78", data_dir=tmp_path),
    ]
    assert len({base, *variants}) == 7
    assert variants[0].name.startswith("fpz-cz+pz-oz_")
    assert prepared_dir("sleep-edf-20", data_dir=tmp_path) == base  # deterministic


def test_prepare_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("sleep-edf-99", data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="shhs_dir"):
        prepare("shhs", data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="subject 0"):
        prepare("sample", subjects=[3], data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="n_jobs"):
        prepare("synthetic", subjects=[0], nights=[1], data_dir=tmp_path, progress=False, n_jobs=0)


@pytest.mark.slow
def test_prepare_sleep_edf_from_mirror(sleep_edfx_mirror, tmp_path):
    paths = prepare("sleep-edf-20", subjects=[0], nights=[1], data_dir=tmp_path,
                    mirror=sleep_edfx_mirror.as_uri(), progress=False)
    assert [p.name for p in paths] == ["SC4001E0.npz"]
    night = load_nights(paths)[0]
    assert (night.record, night.subject, night.night, night.synthetic) == ("SC4001E0", 0, 1, False)
    assert night.x.shape == (841, 3000) and night.fs == 100.0
    assert np.bincount(night.y, minlength=5).tolist() == [188, 58, 250, 220, 125]
    # microvolts: Fpz-Cz has a standard deviation of tens of uV, not volts or nanovolts
    assert 5 < night.x.std() < 200
    # the 4-channel EDF read (EMG at its native 1 Hz) is checked against the sample in test_sample.py
    # a cached night needs neither the raw files nor the mirror
    downloaded = list((tmp_path / "sleep-edfx").rglob("*.edf"))
    assert len(downloaded) == 2
    for edf in downloaded:
        edf.unlink()
    again = prepare("sleep-edf-20", subjects=[0], nights=[1], data_dir=tmp_path,
                    mirror=(tmp_path / "no-such-mirror").as_uri(), progress=False)
    assert again == paths


def test_load_raw_night_is_the_night_prepare_writes(tmp_path):
    """Raw signals shown in the notebooks come from the same reader, seeds and channels as prepare()."""
    from sleeplib.data.dataset import load_night
    from sleeplib.data.prepare import load_raw_night

    (path,) = prepare("synthetic", subjects=[1], nights=[2], data_dir=tmp_path, synthetic_epochs=60, progress=False)
    raw = load_raw_night("synthetic", 1, 2, synthetic_epochs=60)
    x, y = epoch_night(raw)
    prepared = load_night(path)
    np.testing.assert_array_equal(y, prepared.y)
    np.testing.assert_array_equal(x, prepared.x)
    with pytest.raises(ValueError, match="subject 13 has no night 2"):
        load_raw_night("sleep-edf-20", 13, 2, data_dir=tmp_path)
