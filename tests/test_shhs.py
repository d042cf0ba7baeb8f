"""SHHS reader: a small EDF + NSRR XML written by the test itself (no SHHS data is redistributable)."""

from __future__ import annotations

import numpy as np
import pytest

from sleeplib.data.dataset import load_nights
from sleeplib.data.prepare import prepare
from sleeplib.data.shhs import find_shhs_nights, read_nsrr_stages, read_shhs_night

# (concept, epochs): 10 min wake, N1, N2, N3 (as NSRR stage 3 and 4), REM, movement, wake, unscored
SCHEDULE = [("Wake|0", 4), ("Stage 1 sleep|1", 2), ("Stage 2 sleep|2", 4), ("Stage 3 sleep|3", 2),
            ("Stage 4 sleep|4", 1), ("REM sleep|5", 3), ("Movement|6", 1), ("Wake|0", 3), ("Unscored|9", 2)]
N_EPOCHS = sum(n for _, n in SCHEDULE)
EXPECTED_Y = [0] * 4 + [1] * 2 + [2] * 4 + [3] * 3 + [4] * 3 + [0] * 3


def _write_xml(path, schedule=SCHEDULE):
    events = ['<ScoredEvent><EventType>Recording Start Time</EventType><EventConcept>Recording Start Time'
              '</EventConcept><Start>0</Start><Duration>%d</Duration></ScoredEvent>' % (N_EPOCHS * 30)]
    onset = 0
    for concept, n in schedule:
        events.append(f"<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>{concept}</EventConcept>"
                      f"<Start>{onset:.1f}</Start><Duration>{n * 30:.1f}</Duration></ScoredEvent>")
        onset += n * 30
    events.append("<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea"
                  "</EventConcept><Start>100</Start><Duration>12</Duration></ScoredEvent>")
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<PSGAnnotation><SoftwareVersion>Compumedics'
                    "</SoftwareVersion><EpochLength>30</EpochLength><ScoredEvents>"
                    + "".join(events) + "</ScoredEvents></PSGAnnotation>")


@pytest.fixture(scope="module")
def shhs_dir(tmp_path_factory):
    edfio = pytest.importorskip("edfio")
    root = tmp_path_factory.mktemp("shhs")
    edf_dir = root / "polysomnography" / "edfs" / "shhs1"
    xml_dir = root / "polysomnography" / "annotations-events-nsrr" / "shhs1"
    edf_dir.mkdir(parents=True)
    xml_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    seconds = N_EPOCHS * 30
    t = np.arange(seconds * 125) / 125
    eeg = 40 * np.sin(2 * np.pi * 1.0 * t) + rng.normal(0, 5, t.size)  # a known microvolt signal
    signals = [
        edfio.EdfSignal(eeg, 125, label="EEG", physical_dimension="uV", physical_range=(-250, 250)),
        edfio.EdfSignal(rng.normal(0, 10, t.size), 125, label="EEG(sec)", physical_dimension="uV",
                        physical_range=(-250, 250)),
        edfio.EdfSignal(rng.normal(0, 10, seconds * 50), 50, label="EOG(L)", physical_dimension="uV",
                        physical_range=(-250, 250)),
    ]
    edfio.Edf(signals, data_record_duration=1).write(edf_dir / "shhs1-200001.edf")
    _write_xml(xml_dir / "shhs1-200001-nsrr.xml")
    return root


def test_read_nsrr_stages(tmp_path):
    _write_xml(tmp_path / "a-nsrr.xml")
    ann = read_nsrr_stages(tmp_path / "a-nsrr.xml")
    assert ann["stage"].tolist() == ["W", "1", "2", "3", "4", "R", "M", "W", "?"]
    assert ann["onset"].tolist()[:3] == [0.0, 120.0, 180.0] and ann["duration"].iloc[0] == 120.0
    (tmp_path / "b-nsrr.xml").write_text("<PSGAnnotation><ScoredEvents/></PSGAnnotation>")
    with pytest.raises(ValueError, match="Stages"):
        read_nsrr_stages(tmp_path / "b-nsrr.xml")
    _write_xml(tmp_path / "c-nsrr.xml", [("Stage 7 sleep|7", 2)])
    with pytest.raises(ValueError, match="unknown stage concept"):
        read_nsrr_stages(tmp_path / "c-nsrr.xml")


def test_read_shhs_night(shhs_dir):
    [(record, subject, edf, xml)] = find_shhs_nights(shhs_dir)
    assert (record, subject) == ("shhs1-200001", 200001)
    raw = read_shhs_night(edf, xml, ["EEG", "EOG(L)"])
    assert raw.sfreq == {"EEG": 125.0, "EOG(L)": 50.0} and raw.dataset == "shhs"
    # microvolts preserved within the 16-bit resolution of the EDF (500 uV / 65535)
    t = np.arange(raw.signals["EEG"].size) / 125
    residual = raw.signals["EEG"] - 40 * np.sin(2 * np.pi * t)
    assert 3 < residual.std() < 7
    with pytest.raises(ValueError, match="available channels"):
        read_shhs_night(edf, xml, ["EEG C4-A1"])
    with pytest.raises(FileNotFoundError, match="subject"):
        find_shhs_nights(shhs_dir, subjects=[999])


def test_prepare_shhs_125hz(shhs_dir, tmp_path):
    paths = prepare("shhs", shhs_dir=shhs_dir, data_dir=tmp_path, progress=False, wake_margin_min=None)
    nights = load_nights(paths)
    night = nights[0]
    assert night.x.shape == (len(EXPECTED_Y), 3750) and night.fs == 125.0 and night.channels == ("EEG",)
    assert night.y.tolist() == EXPECTED_Y and night.subject == 200001 and not night.synthetic
    # two channels at different native rates, resampled to 100 Hz
    two = prepare("shhs", shhs_dir=shhs_dir, data_dir=tmp_path, progress=False, channels=["EEG", "EOG(L)"],
                  target_fs=100, wake_margin_min=None)
    x = load_nights(two)[0].x
    assert x.shape == (len(EXPECTED_Y), 2, 3000)
    assert two[0].parent != paths[0].parent
