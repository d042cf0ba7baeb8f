"""Tests of sleeplib.data.dataset: loading prepared nights and subject-wise folds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sleeplib import STAGES
from sleeplib.data.dataset import SleepNights, load_nights, subject_folds
from sleeplib.io import save_npz


def _write_night(folder, subject, night, n_epochs, n_chans=1, fs=100.0, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n_epochs, int(30 * fs)) if n_chans == 1 else (n_epochs, n_chans, int(30 * fs))
    record = f"SC4{subject:02d}{night}E0"
    channels = np.array(["EEG Fpz-Cz", "EEG Pz-Oz"][:n_chans] if n_chans <= 2 else [f"c{i}" for i in range(n_chans)])
    return save_npz(
        folder / f"{record}.npz",
        x=rng.normal(size=shape).astype(np.float32),
        y=rng.integers(0, 5, n_epochs).astype(np.int64),
        fs=np.float64(fs), ch_label=channels, channels=channels, record=np.str_(record),
        subject=np.int64(subject), night=np.int64(night), dataset=np.str_("synthetic"),
        synthetic=np.bool_(True),
    )


@pytest.fixture()
def folder(tmp_path):
    for i, (subject, night, n) in enumerate([(3, 1, 7), (1, 2, 5), (1, 1, 4), (2, 1, 6)]):
        _write_night(tmp_path, subject, night, n, seed=i)
    return tmp_path


def test_load_nights_sorted_and_arrays(folder):
    nights = load_nights(folder)
    assert len(nights) == 4
    assert [(n.subject, n.night) for n in nights] == [(1, 1), (1, 2), (2, 1), (3, 1)]
    assert nights.subjects.tolist() == [1, 2, 3]
    assert nights.synthetic and nights.fs == 100.0 and nights.channels == ("EEG Fpz-Cz",)
    x, y, night_index = nights.arrays()
    assert x.shape == (22, 3000) and x.dtype == np.float32
    assert y.dtype == np.int64 and night_index.tolist() == [0] * 4 + [1] * 5 + [2] * 6 + [3] * 7
    # the concatenation keeps each night's own epochs in order
    np.testing.assert_array_equal(x[4:9], nights[1].x)


def test_select_and_label_counts(folder):
    nights = load_nights(folder)
    one = nights.select(subjects=[1])
    assert isinstance(one, SleepNights) and len(one) == 2 and one.subjects.tolist() == [1]
    assert nights.select(records=["SC4021E0"]).records == ["SC4021E0"]
    assert len(nights.select(subjects=[1], records=["SC4021E0"])) == 0
    counts = nights.label_counts()
    assert list(counts.columns[-6:]) == [*STAGES, "total"]
    assert counts.loc["total", "total"] == 22
    _, y, _ = nights.arrays()
    assert counts.loc["total", list(STAGES)].tolist() == np.bincount(y, minlength=5).tolist()


def test_load_from_list_of_paths_and_multichannel(tmp_path):
    paths = [_write_night(tmp_path, s, 1, 3, n_chans=2) for s in (0, 1)]
    nights = load_nights(paths)
    x, _, _ = nights.arrays()
    assert x.shape == (6, 2, 3000) and nights.channels == ("EEG Fpz-Cz", "EEG Pz-Oz")


def test_mixed_shapes_raise(tmp_path):
    _write_night(tmp_path, 0, 1, 3, n_chans=1)
    _write_night(tmp_path, 1, 1, 3, n_chans=2)
    with pytest.raises(ValueError, match="different epoch shapes"):
        load_nights(tmp_path).arrays()


def test_empty_folder_error_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="sleeplib prepare"):
        load_nights(tmp_path)
    with pytest.raises(FileNotFoundError, match="sleeplib prepare"):
        load_nights(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="sleeplib prepare"):
        load_nights([])


def test_not_a_prepared_night(tmp_path):
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        load_nights(tmp_path)


@pytest.mark.parametrize("n_subjects,n_folds", [(20, 20), (20, 10), (78, 10), (7, 3), (5, 1)])
def test_subject_folds_partition(n_subjects, n_folds):
    subjects = np.repeat(np.arange(100, 100 + n_subjects), 2)  # two nights per subject
    for kwargs in ({}, {"seed": 0}, {"permutation": np.random.default_rng(1).permutation(n_subjects)}):
        folds = subject_folds(subjects, n_folds, **kwargs)
        assert len(folds) == n_folds
        flat = np.concatenate(folds)
        assert len(flat) == n_subjects == len(set(flat.tolist()))  # never a subject in two folds
        assert sorted(flat.tolist()) == list(range(100, 100 + n_subjects))
        sizes = [len(f) for f in folds]
        assert max(sizes) - min(sizes) <= 1


def test_subject_folds_order():
    assert [f.tolist() for f in subject_folds([5, 3, 9, 3, 1], 2)] == [[1, 3], [5, 9]]
    # the permutation applies to the sorted subjects [1, 3, 5, 9]
    assert [f.tolist() for f in subject_folds([5, 3, 9, 1], 2, permutation=[3, 2, 1, 0])] == [[9, 5], [3, 1]]
    a = subject_folds(range(20), 5, seed=7)
    b = subject_folds(range(20), 5, seed=7)
    c = subject_folds(range(20), 5, seed=8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_subject_folds_bad_input():
    with pytest.raises(ValueError, match="n_folds"):
        subject_folds(range(3), 4)
    with pytest.raises(ValueError, match="n_folds"):
        subject_folds(range(3), 0)
    with pytest.raises(ValueError, match="permutation"):
        subject_folds(range(3), 2, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="permutation"):
        subject_folds(range(3), 2, permutation=[0, 1])


def test_dataset_does_not_import_mne():
    code = "import sys, sleeplib.data.dataset; print('mne' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
