"""One night of raw signals with its R&K hypnogram: the common input of :mod:`sleeplib.data.prepare`.

A :class:`RawNight` comes from an EDF pair (:func:`read_edf_night`, this module), from the bundled
sample (:func:`sleeplib.data.sample.read_sample`), from SHHS (:mod:`sleeplib.data.shhs`) or from the
generator (:func:`sleeplib.data.synthetic.synthetic_night`), so epoching is one code path for all.

MNE is imported lazily, inside :func:`read_edf_night` only.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "RK_STAGES",
    "RawNight",
    "EdfHeader",
    "read_edf_header",
    "check_edf_complete",
    "stage_from_description",
    "annotations_frame",
    "parse_record_name",
    "read_edf_signals",
    "read_edf_night",
    "check_hypnogram_matches",
]

RK_STAGES = ("W", "1", "2", "3", "4", "R", "M", "?")
"""R&K stage codes used in :attr:`RawNight.annotations` (``M`` movement, ``?`` unscored)."""

_DESCRIPTION_TO_STAGE = {
    "sleep stage w": "W",
    "sleep stage 1": "1",
    "sleep stage 2": "2",
    "sleep stage 3": "3",
    "sleep stage 4": "4",
    "sleep stage r": "R",
    "sleep stage ?": "?",
    "movement time": "M",
}


@dataclass
class RawNight:
    """Raw signals of one night and its hypnogram in R&K form.

    Attributes
    ----------
    record : str
        Record name (PhysioNet PSG stem, e.g. ``"SC4001E0"``).
    subject : int
        Subject id.
    night : int
        Night number (1 or 2).
    dataset : str
        Source dataset (``"sleep-edf"``, ``"sample"``, ``"synthetic"``, ``"shhs"``, ...).
    signals : dict of str to numpy.ndarray
        1-D float arrays in microvolts, one per channel, at the channel's own rate.
    sfreq : dict of str to float
        Sampling rate of each channel in Hz (Sleep-Cassette: EEG/EOG 100, EMG submental 1).
    annotations : pandas.DataFrame
        Columns ``onset`` (s from the start of ``signals``), ``duration`` (s) and ``stage``
        (one of :data:`RK_STAGES`), sorted by onset.
    synthetic : bool
        True only for generated data.
    meta : dict
        Provenance (source files, checksums, time offsets); free form.
    """

    record: str
    subject: int
    night: int
    dataset: str
    signals: dict[str, np.ndarray]
    sfreq: dict[str, float]
    annotations: pd.DataFrame
    synthetic: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(self.signals) ^ set(self.sfreq)
        if missing:
            raise ValueError(f"signals and sfreq must name the same channels; mismatch: {sorted(missing)}")
        for col in ("onset", "duration", "stage"):
            if col not in self.annotations.columns:
                raise ValueError(f"annotations need columns onset, duration, stage; {col!r} is missing")
        bad = set(self.annotations["stage"]) - set(RK_STAGES)
        if bad:
            raise ValueError(f"unknown stages {sorted(bad)} in annotations; use R&K codes {RK_STAGES}")

    @property
    def channels(self) -> list[str]:
        """Channel names, in insertion order."""
        return list(self.signals)

    @property
    def duration_s(self) -> float:
        """Length of the shortest channel in seconds (epochs beyond it are dropped)."""
        if not self.signals:
            return 0.0
        return float(min(len(sig) / self.sfreq[ch] for ch, sig in self.signals.items()))


# --------------------------------------------------------------------------------------------------
# EDF header (plain bytes, no MNE): completeness check and start time.
# --------------------------------------------------------------------------------------------------


@dataclass
class EdfHeader:
    """The fields of an EDF(+) header that the project needs."""

    path: Path
    start: dt.datetime | None
    header_bytes: int
    n_records: int
    record_duration: float
    labels: list[str]
    samples_per_record: list[int]
    physical_min: list[float]
    physical_max: list[float]
    digital_min: list[int]
    digital_max: list[int]
    physical_dim: list[str]

    @property
    def expected_bytes(self) -> int:
        """File size the header promises (16-bit samples)."""
        return self.header_bytes + self.n_records * 2 * sum(self.samples_per_record)

    def sfreq(self, label: str) -> float:
        """Sampling rate of one signal in Hz."""
        return self.samples_per_record[self.labels.index(label)] / self.record_duration


def _edf_start(date: str, time: str) -> dt.datetime | None:
    try:
        day, month, year = (int(v) for v in date.strip().split("."))
        hour, minute, second = (int(v) for v in time.strip().split("."))
    except ValueError:
        return None
    # EDF spec: two-digit years 85-99 are 1985-1999, 00-84 are 2000-2084.
    year += 1900 if year >= 85 else 2000
    try:
        return dt.datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


def read_edf_header(path: str | os.PathLike) -> EdfHeader:
    """Parse the fixed-width header of an EDF/EDF+ file.

    Parameters
    ----------
    path : str or path-like
        The EDF file.

    Returns
    -------
    EdfHeader

    Raises
    ------
    ValueError
        If the file is too short or its header is not EDF.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        fixed = fh.read(256)
        if len(fixed) < 256:
            raise ValueError(f"{path} is not an EDF file (only {len(fixed)} bytes); delete it and download it again")
        try:
            header_bytes = int(fixed[184:192].decode("ascii").strip())
            n_records = int(fixed[236:244].decode("ascii").strip())
            record_duration = float(fixed[244:252].decode("ascii").strip())
            n_signals = int(fixed[252:256].decode("ascii").strip())
        except ValueError as exc:
            raise ValueError(f"{path} does not have a valid EDF header ({exc}); delete it and download it again") from exc
        rest = fh.read(256 * n_signals)
    if len(rest) < 256 * n_signals:
        raise ValueError(f"{path}: the EDF header is truncated; delete the file and download it again")

    def field_values(offset: int, width: int) -> tuple[list[str], int]:
        values = [
            rest[offset + i * width: offset + (i + 1) * width].decode("latin-1").strip()
            for i in range(n_signals)
        ]
        return values, offset + n_signals * width

    offset = 0
    labels, offset = field_values(offset, 16)
    _, offset = field_values(offset, 80)  # transducer
    dims, offset = field_values(offset, 8)
    pmin, offset = field_values(offset, 8)
    pmax, offset = field_values(offset, 8)
    dmin, offset = field_values(offset, 8)
    dmax, offset = field_values(offset, 8)
    _, offset = field_values(offset, 80)  # prefiltering
    nsamp, offset = field_values(offset, 8)
    return EdfHeader(
        path=path,
        start=_edf_start(fixed[168:176].decode("ascii", "replace"), fixed[176:184].decode("ascii", "replace")),
        header_bytes=header_bytes,
        n_records=n_records,
        record_duration=record_duration,
        labels=labels,
        samples_per_record=[int(v) for v in nsamp],
        physical_min=[float(v) for v in pmin],
        physical_max=[float(v) for v in pmax],
        digital_min=[int(float(v)) for v in dmin],
        digital_max=[int(float(v)) for v in dmax],
        physical_dim=dims,
    )


def check_edf_complete(path: str | os.PathLike) -> EdfHeader:
    """Raise if the file is shorter than its header says (an interrupted download).

    MNE only warns in this case and silently reads fewer records, which would shift labels; we
    refuse instead.

    Returns
    -------
    EdfHeader
        The parsed header, when the file is complete.
    """
    header = read_edf_header(path)
    size = Path(path).stat().st_size
    if header.n_records >= 0 and size < header.expected_bytes:
        raise ValueError(
            f"{header.path} is truncated: its header promises {header.n_records} data records "
            f"({header.expected_bytes} bytes) but the file has {size} bytes. Delete it and download "
            "it again (e.g. `sleeplib download ...`)."
        )
    return header


# --------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------


def stage_from_description(description: str) -> str | None:
    """Map a hypnogram annotation (``"Sleep stage 3"``, ``"Movement time"``) to its R&K code.

    Returns ``None`` for annotations that are not sleep stages (e.g. lights off).
    """
    return _DESCRIPTION_TO_STAGE.get(str(description).strip().lower())


def annotations_frame(onsets: Iterable[float], durations: Iterable[float], stages: Iterable[str]) -> pd.DataFrame:
    """Build a sorted annotations table (``onset``, ``duration``, ``stage``)."""
    frame = pd.DataFrame({
        "onset": np.asarray(list(onsets), dtype=np.float64),
        "duration": np.asarray(list(durations), dtype=np.float64),
        "stage": pd.Series(list(stages), dtype=object),
    })
    return frame.sort_values("onset", kind="stable").reset_index(drop=True)


_RECORD_RE = re.compile(r"^(?P<study>S[CT])(?P<group>\d)(?P<subject>\d\d)(?P<night>\d)")


def parse_record_name(name: str) -> tuple[str, int, int]:
    """``"SC4001E0-PSG.edf"`` -> ``("SC4001E0", 0, 1)``: record, subject and night.

    Sleep-EDF names are ``SC4ssN..`` / ``ST7ssN..`` with ``ss`` the subject and ``N`` the night.
    Other names give subject -1 and night 1.
    """
    stem = Path(name).name.split("-")[0].split(".")[0]
    match = _RECORD_RE.match(stem)
    if match is None:
        return stem, -1, 1
    return stem, int(match["subject"]), int(match["night"])


def check_hypnogram_matches(
    annotations: pd.DataFrame, psg_duration_s: float, psg_path: Path | str, hyp_path: Path | str, tolerance_s: float = 30.0
) -> None:
    """Raise ``ValueError`` when the hypnogram does not belong to the recording.

    A hypnogram matches when at least one scored stage overlaps the signal and no annotation starts
    more than ``tolerance_s`` after the signal's end. (Trailing unscored ``?`` spans that start at the
    end and run past it are common in Sleep-EDF and are fine; they are dropped anyway.)
    """
    if annotations.empty:
        raise ValueError(f"{hyp_path} has no sleep-stage annotations; is it really the hypnogram of {psg_path}?")
    late = annotations[annotations["onset"] > psg_duration_s + tolerance_s]
    scored = annotations[~annotations["stage"].isin(["?", "M"])]
    overlap = scored[(scored["onset"] < psg_duration_s) & (scored["onset"] + scored["duration"] > 0)]
    if len(late) or overlap.empty:
        what = (
            f"{len(late)} annotation(s) start after the recording ends (first at {late['onset'].iloc[0]:.0f} s)"
            if len(late) else "no scored stage overlaps the recording"
        )
        raise ValueError(
            f"hypnogram {hyp_path} does not match {psg_path}: the recording lasts {psg_duration_s:.0f} s but "
            f"{what}. Check that both files are of the same night (SC4ssN: same subject ss and night N)."
        )


def read_edf_signals(
    psg_path: str | os.PathLike, channels: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, float], EdfHeader]:
    """Read EDF channels in microvolts, each at its own rate (with MNE).

    MNE upsamples slow channels (such as the 1-Hz Sleep-Cassette EMG envelope) when they are read
    together with fast ones, so channels are read in groups of equal rate.

    Returns
    -------
    signals : dict of str to numpy.ndarray
        float64 microvolts, in the order of ``channels``.
    sfreq : dict of str to float
        Rate of each channel.
    header : EdfHeader

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file; truncated file; a channel the file lacks (the message lists those present).
    """
    import mne  # lazily: training code must not need MNE

    psg_path = Path(psg_path)
    if not psg_path.is_file():
        raise FileNotFoundError(f"{psg_path} does not exist; download it with `sleeplib download ...`")
    channels = [channels] if isinstance(channels, str) else list(channels)
    if not channels:
        raise ValueError("channels is empty; name at least one EDF signal, e.g. 'EEG Fpz-Cz'")
    header = check_edf_complete(psg_path)
    missing = [ch for ch in channels if ch not in header.labels]
    if missing:
        raise ValueError(f"{psg_path.name} has no channel(s) {missing}; available channels: {header.labels}")
    signals: dict[str, np.ndarray] = {}
    sfreq: dict[str, float] = {}
    by_rate: dict[float, list[str]] = {}
    for ch in channels:
        by_rate.setdefault(header.sfreq(ch), []).append(ch)
    for rate, group in by_rate.items():
        raw = mne.io.read_raw_edf(psg_path, include=group, preload=True, verbose="error")
        if abs(raw.info["sfreq"] - rate) > 1e-9:
            raise RuntimeError(f"MNE read {group} of {psg_path} at {raw.info['sfreq']} Hz, expected {rate} Hz")
        for ch in group:
            # MNE returns volts; the whole project works in microvolts.
            signals[ch] = raw.get_data(picks=[ch])[0] * 1e6
            sfreq[ch] = float(rate)
    return {ch: signals[ch] for ch in channels}, {ch: sfreq[ch] for ch in channels}, header


def read_edf_night(
    psg_path: str | os.PathLike,
    hyp_path: str | os.PathLike,
    channels: Sequence[str] = ("EEG Fpz-Cz",),
    *,
    record: str | None = None,
    subject: int | None = None,
    night: int | None = None,
    dataset: str = "sleep-edf",
) -> RawNight:
    """Read a PSG EDF and its hypnogram EDF+ into a :class:`RawNight` (with MNE).

    Each channel keeps its own sampling rate (see :func:`read_edf_signals`).

    Parameters
    ----------
    psg_path, hyp_path : str or path-like
        The ``*-PSG.edf`` and ``*-Hypnogram.edf`` files.
    channels : sequence of str
        EDF signal labels to read, e.g. ``("EEG Fpz-Cz", "EOG horizontal")``.
    record, subject, night : optional
        Override what :func:`parse_record_name` derives from the PSG file name.
    dataset : str
        Stored in :attr:`RawNight.dataset`.

    Returns
    -------
    RawNight
        Signals in microvolts; annotation onsets relative to the PSG start.

    Raises
    ------
    ValueError
        If the PSG is truncated, lacks a channel (the message lists those present), or the hypnogram
        does not match the recording.
    """
    import mne  # lazily: training code must not need MNE

    psg_path, hyp_path = Path(psg_path), Path(hyp_path)
    if not hyp_path.is_file():
        raise FileNotFoundError(f"{hyp_path} does not exist; download it with `sleeplib download ...`")
    signals, sfreq, header = read_edf_signals(psg_path, channels)
    hyp_header = check_edf_complete(hyp_path)
    psg_duration = header.n_records * header.record_duration

    mne_annotations = mne.read_annotations(hyp_path)
    # Onsets are relative to the hypnogram's own start; shift them when it starts later than the PSG.
    shift = 0.0
    if header.start is not None and hyp_header.start is not None:
        shift = (hyp_header.start - header.start).total_seconds()
    rows = [
        (float(onset) + shift, float(duration), stage)
        for onset, duration, desc in zip(mne_annotations.onset, mne_annotations.duration, mne_annotations.description)
        if (stage := stage_from_description(desc)) is not None
    ]
    annotations = annotations_frame(*zip(*rows)) if rows else annotations_frame([], [], [])
    check_hypnogram_matches(annotations, psg_duration, psg_path, hyp_path)

    parsed_record, parsed_subject, parsed_night = parse_record_name(psg_path.name)
    return RawNight(
        record=record or parsed_record,
        subject=parsed_subject if subject is None else int(subject),
        night=parsed_night if night is None else int(night),
        dataset=dataset,
        signals=signals,
        sfreq=sfreq,
        annotations=annotations,
        synthetic=False,
        meta={"psg": str(psg_path), "hypnogram": str(hyp_path), "hypnogram_shift_s": shift,
              "start": header.start.isoformat() if header.start else None},
    )
