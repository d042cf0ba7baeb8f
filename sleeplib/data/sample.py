"""The bundled real sample: night 1 of subject 0 of Sleep-EDF Expanded (SC4001), shipped in ``data/sample/``.

It lets every notebook run offline on real data. :func:`build_sample` makes it from the PhysioNet
files (downloaded and checksum-verified through :func:`sleeplib.data.download.fetch_records`);
:func:`read_sample` turns it back into a :class:`~sleeplib.data.raw.RawNight`.

What is stored
--------------
* ``SC4001E0.npz`` (``numpy.savez_compressed``): for each of ``EEG Fpz-Cz``, ``EEG Pz-Oz``,
  ``EOG horizontal`` (100 Hz) and ``EMG submental`` (1 Hz) the EDF's own 16-bit digital values
  (``digital_<i>``, int16) with the EDF calibration (``gain``, ``offset``: microvolts = digital *
  gain + offset) and rate (``sfreq``). Storing the digital values makes the sample lossless with
  respect to the EDF.
* ``SC4001E0.json``: provenance (source files and their SHA256, window onset in the PSG, PSG start
  time, licence, citations) and the hypnogram inside the window (onset relative to the window).

The window is the span the DeepSleepNet/AttnSleep rule keeps: from 30 min before the first to
30 min after the last sleep epoch (841 epochs, 7 h).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sleeplib.data.raw import RawNight, annotations_frame

__all__ = [
    "SAMPLE_RECORD",
    "SAMPLE_SUBJECT",
    "SAMPLE_NIGHT",
    "SAMPLE_CHANNELS",
    "build_sample",
    "read_sample",
    "sample_path",
]

SAMPLE_RECORD = "SC4001E0"
SAMPLE_SUBJECT = 0
SAMPLE_NIGHT = 1
SAMPLE_CHANNELS = ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "EMG submental")

LICENSE = "Open Data Commons Attribution License v1.0 (ODC-By 1.0)"
CITATIONS = (
    "B. Kemp, A. H. Zwinderman, B. Tuk, H. A. C. Kamphuisen, J. J. L. Oberye. Analysis of a sleep-dependent "
    "neuronal feedback loop: the slow-wave microcontinuity of the EEG. IEEE Trans. Biomed. Eng. 47(9):1185-1194, 2000.",
    "A. L. Goldberger et al. PhysioBank, PhysioToolkit, and PhysioNet: components of a new research resource for "
    "complex physiologic signals. Circulation 101(23):e215-e220, 2000.",
)


def sample_path(folder: str | os.PathLike | None = None) -> Path:
    """Path of the sample's ``.npz`` (in ``folder``, default :func:`sleeplib.paths.sample_dir`)."""
    from sleeplib.paths import sample_dir

    return Path(folder if folder is not None else sample_dir()) / f"{SAMPLE_RECORD}.npz"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sample(
    mirror: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Fetch SC4001 and write the compact, lossless sample.

    Parameters
    ----------
    mirror : str or path-like, optional
        Where to download from (e.g. ``file:///work/shared/sleep-edfx``); see
        :func:`sleeplib.data.download.fetch_records`.
    data_dir : path-like, optional
        Data folder for the download.
    out_dir : path-like, optional
        Where to write; default :func:`sleeplib.paths.sample_dir` (``data/sample`` of the checkout).
    progress : bool
        Show download progress.

    Returns
    -------
    pathlib.Path
        The written ``.npz`` (its ``.json`` sits beside it).

    Raises
    ------
    RuntimeError
        If the EDF values cannot be represented exactly as int16 digital values (the sample would
        not be lossless).
    """
    from sleeplib import __version__
    from sleeplib.data.download import fetch_records
    from sleeplib.data.prepare import epoch_stages, label_epochs
    from sleeplib.data.raw import read_edf_header, read_edf_night
    from sleeplib.data.records import select_records
    from sleeplib.io import save_json, save_npz

    table = select_records("sleep-edf-20", subjects=[SAMPLE_SUBJECT], nights=[SAMPLE_NIGHT])
    [(psg, hyp)] = fetch_records(table, data_dir=data_dir, mirror=mirror, progress=progress)
    psg, hyp = Path(psg), Path(hyp)
    raw = read_edf_night(psg, hyp, SAMPLE_CHANNELS)
    header = read_edf_header(psg)

    # The window is exactly what the standard rule keeps (30 min of wake on each side).
    epoch_s = 30.0
    t0 = float(raw.annotations["onset"].min() % epoch_s)
    n_grid = int(np.floor((raw.duration_s - t0) / epoch_s))
    keep, _ = label_epochs(epoch_stages(raw.annotations, n_grid, epoch_s, t0), wake_margin_epochs=60)
    start_s = t0 + keep[0] * epoch_s
    stop_s = t0 + (keep[-1] + 1) * epoch_s

    arrays: dict[str, np.ndarray] = {}
    gains, offsets, rates = [], [], []
    for i, ch in enumerate(SAMPLE_CHANNELS):
        j = header.labels.index(ch)
        gain = (header.physical_max[j] - header.physical_min[j]) / (header.digital_max[j] - header.digital_min[j])
        offset = header.physical_min[j] - header.digital_min[j] * gain
        if header.physical_dim[j].lower() in ("mv",):
            gain, offset = gain * 1e3, offset * 1e3  # keep the stored calibration in microvolts
        fs = raw.sfreq[ch]
        segment = raw.signals[ch][int(round(start_s * fs)): int(round(stop_s * fs))]
        digital = np.round((segment - offset) / gain)
        error = np.abs(digital * gain + offset - segment).max()
        if error > 1e-6 * gain or digital.min() < -32768 or digital.max() > 32767:
            raise RuntimeError(
                f"{ch} of {psg} is not exactly 16-bit after calibration (max error {error:g} uV); "
                "the sample would not be lossless"
            )
        arrays[f"digital_{i}"] = digital.astype(np.int16)
        gains.append(gain)
        offsets.append(offset)
        rates.append(fs)

    ann = raw.annotations
    end = ann["onset"] + ann["duration"]
    inside = ann[(end > start_s) & (ann["onset"] < stop_s)]
    clipped = [
        [float(max(o, start_s) - start_s), float(min(o + d, stop_s) - max(o, start_s)), str(s)]
        for o, d, s in zip(inside["onset"], inside["duration"], inside["stage"])
    ]
    out = sample_path(out_dir)
    save_npz(
        out, compress=True, **arrays,
        channels=np.array(SAMPLE_CHANNELS), gain=np.array(gains), offset=np.array(offsets), sfreq=np.array(rates),
    )
    save_json(out.with_suffix(".json"), {
        "record": SAMPLE_RECORD, "subject": SAMPLE_SUBJECT, "night": SAMPLE_NIGHT,
        "source": "Sleep-EDF Database Expanded 1.0.0, PhysioNet (https://physionet.org/content/sleep-edfx/1.0.0/)",
        "psg_file": f"sleep-cassette/{psg.name}", "psg_sha256": _sha256(psg),
        "hypnogram_file": f"sleep-cassette/{hyp.name}", "hypnogram_sha256": _sha256(hyp),
        "psg_start": header.start.isoformat() if header.start else None,
        "window_onset_s": start_s, "window_duration_s": stop_s - start_s,
        "window_rule": "30 min before the first to 30 min after the last sleep epoch (DeepSleepNet/AttnSleep)",
        "channels": list(SAMPLE_CHANNELS), "sfreq": dict(zip(SAMPLE_CHANNELS, rates)),
        "storage": "EDF 16-bit digital values (int16); microvolts = digital * gain + offset",
        "annotations": {"columns": ["onset_s", "duration_s", "stage"], "rows": clipped},
        "license": LICENSE, "citations": list(CITATIONS),
        "built_by": f"sleeplib {__version__}: sleeplib.data.sample.build_sample()",
    })
    return out


def read_sample(path: str | os.PathLike | None = None) -> RawNight:
    """Read the bundled sample as a :class:`RawNight` (signals in microvolts, no MNE needed).

    Parameters
    ----------
    path : path-like, optional
        The sample's ``.npz`` or its folder; default ``data/sample/SC4001E0.npz`` of the checkout.

    Raises
    ------
    FileNotFoundError
        If the sample is missing (it is tracked in git; rebuild with ``sleeplib sample``).
    """
    path = Path(path) if path is not None else sample_path()
    if path.is_dir():
        path = sample_path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"the bundled sample is missing ({path} and {meta_path.name}); it ships with the repository "
            "checkout, or rebuild it with `sleeplib sample --mirror <PhysioNet mirror>`"
        )
    meta = json.loads(meta_path.read_text())
    with np.load(path, allow_pickle=False) as npz:
        channels = [str(c) for c in npz["channels"]]
        gains, offsets, rates = npz["gain"], npz["offset"], npz["sfreq"]
        signals = {
            ch: npz[f"digital_{i}"].astype(np.float64) * gains[i] + offsets[i] for i, ch in enumerate(channels)
        }
    rows = meta["annotations"]["rows"]
    annotations = annotations_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    provenance = {k: v for k, v in meta.items() if k != "annotations"}
    return RawNight(
        record=meta["record"], subject=int(meta["subject"]), night=int(meta["night"]), dataset="sample",
        signals=signals, sfreq={ch: float(rates[i]) for i, ch in enumerate(channels)}, annotations=annotations,
        synthetic=False, meta=provenance,
    )
