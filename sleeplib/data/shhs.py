"""Sleep Heart Health Study (SHHS, NSRR): EDF + NSRR XML annotations -> :class:`~sleeplib.data.raw.RawNight`.

SHHS is not redistributable: request access at https://sleepdata.org/datasets/shhs and point
``prepare("shhs", shhs_dir=...)`` at the folder holding the ``shhs1-<nsrrid>.edf`` files and their
``shhs1-<nsrrid>-nsrr.xml`` annotations (any sub-folder layout; NSRR's is
``polysomnography/edfs/shhs1/`` and ``polysomnography/annotations-events-nsrr/shhs1/``).

AttnSleep (Eldele et al., 2021) used the ``EEG`` channel (C4-A1) at its native 125 Hz, so 30-s epochs
have 3750 samples; that is the default here.

NSRR XML: ``PSGAnnotation/ScoredEvents/ScoredEvent`` elements with ``EventType`` ``Stages|Stages``,
``EventConcept`` such as ``Wake|0``, ``Stage 1 sleep|1`` ... ``Stage 4 sleep|4``, ``REM sleep|5``,
``Movement|6``, ``Unscored|9``, and ``Start``/``Duration`` in seconds.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from sleeplib.data.raw import RawNight, annotations_frame, check_hypnogram_matches, read_edf_signals

__all__ = ["DEFAULT_SHHS_CHANNELS", "SHHS_FS", "read_nsrr_stages", "read_shhs_night", "find_shhs_nights"]

DEFAULT_SHHS_CHANNELS = ("EEG",)
"""C4-A1, as used by AttnSleep."""

SHHS_FS = 125.0
"""Native rate of the SHHS EEG channels."""

_NSRR_CODE_TO_RK = {0: "W", 1: "1", 2: "2", 3: "3", 4: "4", 5: "R", 6: "M", 9: "?"}


def read_nsrr_stages(xml_path: str | os.PathLike) -> pd.DataFrame:
    """Sleep stages of an NSRR XML file as an annotations table (``onset``, ``duration``, ``stage``).

    Raises
    ------
    ValueError
        If the file is not NSRR XML, or holds no stage events or an unknown stage code.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml_path} is not valid XML ({exc}); download the NSRR annotation again") from exc
    onsets, durations, stages = [], [], []
    for event in root.iter("ScoredEvent"):
        event_type = (event.findtext("EventType") or "").strip()
        if not event_type.lower().startswith("stages"):
            continue
        concept = (event.findtext("EventConcept") or "").strip()
        match = re.search(r"\|\s*(\d+)\s*$", concept)
        if match is None or int(match.group(1)) not in _NSRR_CODE_TO_RK:
            raise ValueError(
                f"{xml_path}: unknown stage concept {concept!r}; expected e.g. 'Wake|0', 'Stage 2 sleep|2', 'REM sleep|5'"
            )
        onsets.append(float(event.findtext("Start")))
        durations.append(float(event.findtext("Duration")))
        stages.append(_NSRR_CODE_TO_RK[int(match.group(1))])
    if not stages:
        raise ValueError(
            f"{xml_path} has no ScoredEvent with EventType 'Stages|Stages'; is it an NSRR annotation file "
            "(…-nsrr.xml)?"
        )
    return annotations_frame(onsets, durations, stages)


def _nsrrid(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else -1


def read_shhs_night(
    psg_path: str | os.PathLike,
    xml_path: str | os.PathLike,
    channels: Sequence[str] = DEFAULT_SHHS_CHANNELS,
    record: str | None = None,
) -> RawNight:
    """Read one SHHS night (EDF with MNE, stages from the NSRR XML).

    Parameters
    ----------
    psg_path : path-like
        ``shhs1-<nsrrid>.edf``.
    xml_path : path-like
        ``shhs1-<nsrrid>-nsrr.xml``.
    channels : sequence of str
        EDF labels, default ``("EEG",)`` (C4-A1 at 125 Hz).
    record : str, optional
        Record name; default the EDF stem. The subject id is the nsrrid (the stem's trailing digits).

    Returns
    -------
    RawNight
        ``dataset="shhs"``, night 1.
    """
    psg_path, xml_path = Path(psg_path), Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"{xml_path} does not exist; get the NSRR annotations of {psg_path.name}")
    signals, sfreq, header = read_edf_signals(psg_path, channels)
    annotations = read_nsrr_stages(xml_path)
    check_hypnogram_matches(annotations, header.n_records * header.record_duration, psg_path, xml_path)
    record = record or psg_path.stem
    return RawNight(
        record=record, subject=_nsrrid(psg_path.stem), night=1, dataset="shhs", signals=signals, sfreq=sfreq,
        annotations=annotations, synthetic=False, meta={"psg": str(psg_path), "hypnogram": str(xml_path)},
    )


def find_shhs_nights(
    shhs_dir: str | os.PathLike, subjects: Iterable[int] | None = None
) -> list[tuple[str, int, Path, Path]]:
    """Pair every SHHS EDF under ``shhs_dir`` with its ``-nsrr.xml``.

    Parameters
    ----------
    shhs_dir : path-like
        Folder searched recursively.
    subjects : iterable of int, optional
        nsrrids to keep; all when None.

    Returns
    -------
    list of (record, subject, edf_path, xml_path)
        Sorted by record.

    Raises
    ------
    FileNotFoundError
        If the folder is missing, has no EDF, a requested subject is absent, or an EDF lacks its XML.
    """
    shhs_dir = Path(shhs_dir)
    if not shhs_dir.is_dir():
        raise FileNotFoundError(f"shhs_dir {shhs_dir} is not a folder; point it at your NSRR SHHS download")
    edfs = sorted(p for p in shhs_dir.rglob("*") if p.suffix.lower() == ".edf")
    xmls = {p.name[: -len("-nsrr.xml")]: p for p in shhs_dir.rglob("*-nsrr.xml")}
    if not edfs:
        raise FileNotFoundError(f"no .edf files under {shhs_dir}; download SHHS from https://sleepdata.org/datasets/shhs")
    wanted = None if subjects is None else {int(s) for s in subjects}
    nights = []
    for edf in edfs:
        subject = _nsrrid(edf.stem)
        if wanted is not None and subject not in wanted:
            continue
        xml = xmls.get(edf.stem)
        if xml is None:
            raise FileNotFoundError(f"{edf} has no annotation file {edf.stem}-nsrr.xml under {shhs_dir}")
        nights.append((edf.stem, subject, edf, xml))
    if wanted is not None:
        absent = sorted(wanted - {n[1] for n in nights})
        if absent:
            raise FileNotFoundError(f"no SHHS EDF for subject(s) {absent} under {shhs_dir}")
    return nights
