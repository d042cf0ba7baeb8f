"""The bundled sample (data/sample/) is small, attributed, and equivalent to the PhysioNet EDF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sleeplib.data.prepare import epoch_night, prepare
from sleeplib.data.raw import read_edf_night
from sleeplib.data.sample import SAMPLE_CHANNELS, build_sample, read_sample, sample_path


@pytest.fixture(scope="module")
def sample():
    path = sample_path()
    if not path.is_file():
        pytest.fail(f"the bundled sample {path} is missing: it is tracked in git; rebuild with build_sample()")
    return read_sample()


def test_sample_is_small_and_documented(sample, repo_root):
    path = sample_path()
    assert path.stat().st_size < 15e6
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["psg_file"] == "sleep-cassette/SC4001E0-PSG.edf"
    assert len(meta["psg_sha256"]) == 64 and "Attribution" in meta["license"]
    assert any("Kemp" in c for c in meta["citations"]) and any("Goldberger" in c for c in meta["citations"])
    readme = (repo_root / "data" / "README.md").read_text()
    for needle in ("Open Data Commons Attribution", "Kemp", "Goldberger", "build_sample", "prepared/"):
        assert needle in readme, f"data/README.md should mention {needle!r}"


def test_sample_night(sample):
    assert (sample.record, sample.subject, sample.night, sample.dataset) == ("SC4001E0", 0, 1, "sample")
    assert not sample.synthetic and list(sample.signals) == list(SAMPLE_CHANNELS)
    assert sample.sfreq["EMG submental"] == 1.0 and sample.sfreq["EEG Fpz-Cz"] == 100.0
    assert sample.duration_s == 841 * 30
    x, y = epoch_night(sample, ["EEG Fpz-Cz"])
    assert np.bincount(y, minlength=5).tolist() == [188, 58, 250, 220, 125]


def test_prepare_sample_offline(tmp_path):
    paths = prepare("sample", data_dir=tmp_path, progress=False)
    with np.load(paths[0]) as npz:
        assert npz["x"].shape == (841, 3000) and str(npz["record"]) == "SC4001E0"
        assert not bool(npz["synthetic"]) and str(npz["dataset"]) == "sample"


@pytest.mark.slow
def test_sample_equals_edf(sample, sc4001_files, tmp_path):
    """prepare('sample') gives the same labels as the EDF, and signals equal within float32 rounding."""
    psg, hyp = sc4001_files
    channels = list(SAMPLE_CHANNELS)
    raw = read_edf_night(psg, hyp, channels)
    assert (raw.record, raw.subject, raw.night, raw.synthetic) == ("SC4001E0", 0, 1, False)
    assert raw.sfreq == {"EEG Fpz-Cz": 100.0, "EEG Pz-Oz": 100.0, "EOG horizontal": 100.0, "EMG submental": 1.0}
    x_edf, y_edf = epoch_night(raw, channels)
    assert np.bincount(y_edf, minlength=5).tolist() == [188, 58, 250, 220, 125]
    [path] = prepare("sample", channels=channels, data_dir=tmp_path, progress=False)
    with np.load(path) as npz:
        x_sample, y_sample = npz["x"], npz["y"]
    np.testing.assert_array_equal(y_sample, y_edf)
    assert x_sample.shape == x_edf.shape == (841, 4, 3000)
    # identical up to float32 rounding (EEG/EOG samples; EMG after the same resampling)
    np.testing.assert_allclose(x_sample, x_edf, rtol=1e-6, atol=1e-5)
    # the stored digital values reproduce the EDF exactly; check provenance hashes match the file
    meta = json.loads(sample_path().with_suffix(".json").read_text())
    import hashlib

    assert hashlib.sha256(psg.read_bytes()).hexdigest() == meta["psg_sha256"]


@pytest.mark.slow
def test_build_sample_reproduces_bundled(sleep_edfx_mirror, tmp_path):
    out = build_sample(mirror=sleep_edfx_mirror.as_uri(), data_dir=tmp_path / "data", out_dir=tmp_path / "sample",
                       progress=False)
    rebuilt, bundled = np.load(out), np.load(sample_path())
    for i in range(len(SAMPLE_CHANNELS)):
        np.testing.assert_array_equal(rebuilt[f"digital_{i}"], bundled[f"digital_{i}"])
    np.testing.assert_array_equal(rebuilt["gain"], bundled["gain"])
    a = json.loads(out.with_suffix(".json").read_text())
    b = json.loads(sample_path().with_suffix(".json").read_text())
    assert a["annotations"] == b["annotations"] and a["window_onset_s"] == b["window_onset_s"]


def test_missing_sample_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sleeplib sample"):
        read_sample(tmp_path)
