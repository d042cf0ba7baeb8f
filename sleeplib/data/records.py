"""Records table of the Sleep-EDF Database Expanded 1.0.0 and its named subsets.

The table ships as package data (``sleeplib/data/records.csv``), generated once from PhysioNet's
``SHA256SUMS.txt`` and the subject spreadsheets by ``scripts/build_records_table.py`` (which calls
:func:`build_records_table`). One row per night (PSG + hypnogram pair):

========== ================================================================================
column     meaning
========== ================================================================================
record     PhysioNet's PSG stem, e.g. ``SC4001E0`` (the record name used everywhere)
study      ``SC`` (Sleep Cassette, age study) or ``ST`` (Sleep Telemetry, temazepam study)
subject    integer subject id (SC: 0..82, ST: 1..24)
night      1 or 2
psg        PSG path relative to the database root, e.g. ``sleep-cassette/SC4001E0-PSG.edf``
hypnogram  hypnogram path relative to the database root
psg_sha256 SHA256 of the PSG file (from PhysioNet's ``SHA256SUMS.txt``)
hyp_sha256 SHA256 of the hypnogram file
age        age in years at the time of the recording
sex        ``F`` or ``M``
lights_off lights-off clock time ``HH:MM:SS``
condition  ST only: ``placebo`` or ``temazepam``; empty for SC
========== ================================================================================

This module never imports mne.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

__all__ = [
    "COLUMNS",
    "SUBSETS",
    "build_records_table",
    "parse_nights",
    "parse_subjects",
    "records_table",
    "select_records",
    "subset_table",
]

COLUMNS = (
    "record",
    "study",
    "subject",
    "night",
    "psg",
    "hypnogram",
    "psg_sha256",
    "hyp_sha256",
    "age",
    "sex",
    "lights_off",
    "condition",
)

#: Named subsets of the records table: dataset name -> (study, subject ids or None for all).
#: ``sleep-edf-20`` is the Sleep-EDF-2013 selection used by DeepSleepNet/AttnSleep (SC subjects
#: 0-19, 39 nights because subject 13 has only night 1); ``sleep-edf-78`` is every SC night (153
#: nights of 78 subjects with ids 0..82; subjects 36 and 52 lack night 1);
#: ``sleep-edf-st`` is every Sleep Telemetry night (44).
SUBSETS: dict[str, dict] = {
    "sleep-edf-20": {"study": "SC", "subjects": tuple(range(20))},
    "sleep-edf-78": {"study": "SC", "subjects": None},
    "sleep-edf-st": {"study": "ST", "subjects": None},
}

# Datasets that prepare() knows but that are not Sleep-EDF subsets of this table.
_OTHER_DATASETS = ("sample", "synthetic", "shhs")

_FILE_RE = re.compile(
    r"^(?P<folder>sleep-cassette|sleep-telemetry)/"
    r"(?P<stem>(?P<study>SC|ST)(?P<code>[47])(?P<subject>\d{2})(?P<night>\d)[A-Z][A-Z0-9])"
    r"-(?P<kind>PSG|Hypnogram)\.edf$"
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Reading the shipped table
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _load_shipped_table() -> pd.DataFrame:
    with resources.files("sleeplib.data").joinpath("records.csv").open("r", encoding="utf-8") as fh:
        table = pd.read_csv(
            fh,
            dtype={"record": str, "study": str, "psg": str, "hypnogram": str, "psg_sha256": str,
                   "hyp_sha256": str, "sex": str, "lights_off": str, "condition": str},
            keep_default_na=False,
        )
    for col in ("subject", "night", "age"):
        table[col] = table[col].astype("int64")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise RuntimeError(
            f"the shipped records.csv lacks columns {missing}; regenerate it with "
            "scripts/build_records_table.py"
        )
    return table


def records_table() -> pd.DataFrame:
    """Return the full records table (197 nights: 153 Sleep Cassette + 44 Sleep Telemetry).

    Returns
    -------
    pandas.DataFrame
        One row per night with the columns listed in the module docstring, sorted by study,
        subject and night. A fresh copy each call, so callers may modify it.
    """
    return _load_shipped_table().copy()


# --------------------------------------------------------------------------------------------
# Parsing user input
# --------------------------------------------------------------------------------------------
def _parse_int_list(value, what: str) -> list[int]:
    """Parse ``"0 1 2"``, ``"0-19"``, ``"0,3"``, ``["0-3", "7"]``, ``[0, 1]`` or ``5`` to sorted ints."""
    if value is None:
        raise ValueError(f"no {what} given")
    if isinstance(value, bool):
        raise ValueError(f"invalid {what} {value!r}: expected integers such as 0 1 2 or a range 0-19")
    if isinstance(value, int):
        items: Iterable = [value]
    elif isinstance(value, str):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise ValueError(
                f"invalid {what} {value!r}: expected integers such as 0 1 2 or a range 0-19"
            ) from None
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"invalid {what} {item!r}: expected an integer")
        if isinstance(item, int) or (hasattr(item, "__index__") and not isinstance(item, str)):
            number = int(item)
            if number < 0:
                raise ValueError(f"invalid {what} {number}: ids are non-negative")
            out.add(number)
            continue
        if not isinstance(item, str):
            raise ValueError(f"invalid {what} {item!r}: expected integers such as 0 1 2 or a range 0-19")
        for token in re.split(r"[\s,]+", item.strip()):
            if not token:
                continue
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
            if match is None:
                raise ValueError(
                    f"invalid {what} {token!r}: use integers such as '0 1 2', a range such as "
                    "'0-19', or both ('0-3 7')"
                )
            start = int(match.group(1))
            stop = int(match.group(2)) if match.group(2) is not None else start
            if stop < start:
                raise ValueError(f"invalid {what} range {token!r}: the end is before the start")
            out.update(range(start, stop + 1))
    if not out:
        raise ValueError(f"no {what} given in {value!r}")
    return sorted(out)


def parse_subjects(value) -> list[int]:
    """Parse a subject selection into a sorted list of unique subject ids.

    Parameters
    ----------
    value : str, int or sequence of str/int
        ``"0 1 2"``, ``"0-19"``, ``"0,1"``, ``["0-3", "7"]`` (as given by ``--subjects``),
        ``[0, 1]`` or a single int.

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        For tokens that are not integers or ranges, reversed ranges and negative ids.

    Examples
    --------
    >>> parse_subjects(["0-3", "7"])
    [0, 1, 2, 3, 7]
    """
    return _parse_int_list(value, "subjects")


def parse_nights(value) -> list[int]:
    """Parse a night selection (``"1 2"``, ``[1]``, ``"1-2"``) into a sorted list; nights are 1 and 2.

    Raises
    ------
    ValueError
        For anything but 1 and 2.
    """
    nights = _parse_int_list(value, "nights")
    bad = [n for n in nights if n not in (1, 2)]
    if bad:
        raise ValueError(f"night {bad[0]} does not exist: Sleep-EDF nights are 1 and 2")
    return nights


# --------------------------------------------------------------------------------------------
# Selecting subsets
# --------------------------------------------------------------------------------------------
def _format_ids(ids: Sequence[int]) -> str:
    """Compact text for a list of ids: ``0-12, 14-19``."""
    ids = sorted(ids)
    parts: list[str] = []
    start = prev = None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def subset_table(dataset: str) -> pd.DataFrame:
    """All nights of a named subset (see :data:`SUBSETS`).

    Raises
    ------
    ValueError
        For an unknown dataset name, listing the valid ones.
    """
    if dataset not in SUBSETS:
        valid = ", ".join(SUBSETS)
        if dataset in _OTHER_DATASETS:
            raise ValueError(
                f"dataset {dataset!r} is not part of the Sleep-EDF records table (valid: {valid}); "
                f"it is handled by sleeplib.data.prepare.prepare"
            )
        raise ValueError(f"unknown dataset {dataset!r}; valid choices: {valid}")
    spec = SUBSETS[dataset]
    table = records_table()
    table = table[table["study"] == spec["study"]]
    if spec["subjects"] is not None:
        table = table[table["subject"].isin(spec["subjects"])]
    return table.reset_index(drop=True)


def select_records(dataset: str, subjects=None, nights=None) -> pd.DataFrame:
    """Select nights of a named Sleep-EDF subset.

    Parameters
    ----------
    dataset : {'sleep-edf-20', 'sleep-edf-78', 'sleep-edf-st'}
        Named subset (see :data:`SUBSETS`).
    subjects : str, int or sequence, optional
        Subject ids in any form :func:`parse_subjects` accepts; all subjects of the subset when None.
    nights : str, int or sequence, optional
        Nights (1 and/or 2); every available night when None.

    Returns
    -------
    pandas.DataFrame
        The selected rows of :func:`records_table`, sorted by subject and night.

    Raises
    ------
    ValueError
        For an unknown dataset; a subject that is not in the subset; a night other than 1 or 2;
        an explicitly requested subject that has none of the requested nights (for example
        ``"subject 13 has no night 2 in sleep-edf-20; available nights: [1]"``). When only some of
        the requested nights exist for a subject (``--nights 1 2`` with subject 13), the available
        ones are returned, because that is a filter over a known gap, not a typo.
    """
    table = subset_table(dataset)
    available_subjects = sorted(table["subject"].unique().tolist())
    wanted_nights = parse_nights(nights) if nights is not None else None
    if subjects is None:
        selected = table
        if wanted_nights is not None:
            selected = selected[selected["night"].isin(wanted_nights)]
    else:
        wanted_subjects = parse_subjects(subjects)
        unknown = [s for s in wanted_subjects if s not in available_subjects]
        if unknown:
            noun = "subject" if len(unknown) == 1 else "subjects"
            raise ValueError(
                f"{noun} {_format_ids(unknown)} not in {dataset}; available subjects: "
                f"{_format_ids(available_subjects)}"
            )
        selected = table[table["subject"].isin(wanted_subjects)]
        if wanted_nights is not None:
            for subject in wanted_subjects:
                has = sorted(selected.loc[selected["subject"] == subject, "night"].tolist())
                if not set(has) & set(wanted_nights):
                    missing = " or ".join(str(n) for n in wanted_nights)
                    raise ValueError(
                        f"subject {subject} has no night {missing} in {dataset}; available nights: {has}"
                    )
            selected = selected[selected["night"].isin(wanted_nights)]
    if selected.empty:
        raise ValueError(f"the selection is empty: {dataset} has no night {wanted_nights}")
    return selected.sort_values(["subject", "night"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Building the table (used by scripts/build_records_table.py and by the reproducibility test)
# --------------------------------------------------------------------------------------------
def read_sha256sums(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``SHA256SUMS.txt`` (``<hex>  <relative path>`` per line) into ``{path: hex}``."""
    sums: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _HEX64.match(parts[0].lower()):
            raise ValueError(f"{path}:{lineno}: expected '<sha256 hex> <path>', got {line!r}")
        # sha256sum marks binary mode with a leading '*' on the name.
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def _clock(value) -> str:
    """Spreadsheet time cell -> ``HH:MM:SS``."""
    if isinstance(value, _dt.datetime):
        value = value.time()
    if isinstance(value, _dt.time):
        return value.strftime("%H:%M:%S")
    if isinstance(value, float) and 0 <= value < 1:  # Excel day fraction
        seconds = round(value * 86400)
        return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    text = str(value).strip()
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):
        hh, mm, *ss = text.split(":")
        return f"{int(hh):02d}:{mm}:{ss[0] if ss else '00'}"
    raise ValueError(f"cannot read a lights-off time from {value!r}")


def _read_excel(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise FileNotFoundError(f"subject spreadsheet not found: {path}")
    with warnings.catch_warnings():
        # pandas 3 deprecates the xlrd engine, but xlrd is the reader of legacy .xls we depend on.
        warnings.simplefilter("ignore")
        return pd.read_excel(path, header=None, engine="xlrd")


def read_sc_subjects(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``SC-subjects.xls`` -> columns subject, night, age, sex (F/M), lights_off.

    The sheet codes sex as ``F=1`` (so 2 is male).
    """
    raw = _read_excel(Path(path))
    header = [str(h).strip().lower() for h in raw.iloc[0]]
    if not (header[0].startswith("subject") and header[1].startswith("night") and header[2].startswith("age")):
        raise ValueError(f"{path}: unexpected header {list(raw.iloc[0])}; expected subject, night, age, sex, LightsOff")
    rows = raw.iloc[1:].dropna(how="all")
    return pd.DataFrame(
        {
            "subject": rows[0].astype(int).to_numpy(),
            "night": rows[1].astype(int).to_numpy(),
            "age": rows[2].astype(int).to_numpy(),
            "sex": rows[3].astype(int).map({1: "F", 2: "M"}).to_numpy(),
            "lights_off": [_clock(v) for v in rows[4]],
            "condition": "",
        }
    )


def read_st_subjects(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``ST-subjects.xls`` -> one row per night: subject, night, age, sex, lights_off, condition.

    The sheet has one row per subject after two header rows: ``Nr, Age, M1/F2`` (so sex 1 is male,
    the opposite of the SC sheet), then for the placebo night and the temazepam night each its
    night number and lights-off time.
    """
    raw = _read_excel(Path(path))
    second_header = [str(h).strip().lower() for h in raw.iloc[1]]
    if not (second_header[0] == "nr" and "m1/f2" in second_header[2] and "night" in second_header[3]):
        raise ValueError(f"{path}: unexpected header rows; expected 'Nr, Age, M1/F2, night nr, lights off, ...'")
    rows = raw.iloc[2:].dropna(how="all")
    out = []
    for _, row in rows.iterrows():
        base = {"subject": int(row[0]), "age": int(row[1]), "sex": {1: "M", 2: "F"}[int(row[2])]}
        for night_col, time_col, condition in ((3, 4, "placebo"), (5, 6, "temazepam")):
            out.append({**base, "night": int(row[night_col]), "lights_off": _clock(row[time_col]),
                        "condition": condition})
    return pd.DataFrame(out)[["subject", "night", "age", "sex", "lights_off", "condition"]]


def build_records_table(
    sha256sums: str | os.PathLike, sc_subjects: str | os.PathLike, st_subjects: str | os.PathLike
) -> pd.DataFrame:
    """Build the records table from PhysioNet's checksums and the two subject spreadsheets.

    PSG and hypnogram files are paired by the first 7 characters of their stem (``SC4001E0`` with
    ``SC4001EC``): study, subject (2 digits) and night (1 digit) as in ``SC4ssN`` / ``ST7ssN``.

    Parameters
    ----------
    sha256sums : path
        PhysioNet's ``SHA256SUMS.txt`` of sleep-edfx 1.0.0.
    sc_subjects, st_subjects : path
        ``SC-subjects.xls`` and ``ST-subjects.xls``.

    Returns
    -------
    pandas.DataFrame
        The table with :data:`COLUMNS`, sorted by study, subject, night.

    Raises
    ------
    ValueError
        When a PSG has no hypnogram (or vice versa), a key is duplicated, or a night has no
        spreadsheet row.
    """
    sums = read_sha256sums(sha256sums)
    pairs: dict[str, dict] = {}
    for relpath, digest in sums.items():
        match = _FILE_RE.match(relpath)
        if match is None:
            continue
        key = match.group("stem")[:7]
        entry = pairs.setdefault(
            key,
            {"study": match.group("study"), "subject": int(match.group("subject")),
             "night": int(match.group("night"))},
        )
        kind = match.group("kind")
        if kind in entry:
            raise ValueError(f"two {kind} files for {key}: {entry[kind]['path']} and {relpath}")
        entry[kind] = {"path": relpath, "stem": match.group("stem"), "sha256": digest}
    rows = []
    for key, entry in pairs.items():
        if "PSG" not in entry or "Hypnogram" not in entry:
            have = entry.get("PSG", entry.get("Hypnogram"))["path"]
            raise ValueError(f"{have} has no matching {'Hypnogram' if 'PSG' in entry else 'PSG'} file")
        rows.append(
            {"record": entry["PSG"]["stem"], "study": entry["study"], "subject": entry["subject"],
             "night": entry["night"], "psg": entry["PSG"]["path"], "hypnogram": entry["Hypnogram"]["path"],
             "psg_sha256": entry["PSG"]["sha256"], "hyp_sha256": entry["Hypnogram"]["sha256"]}
        )
    files = pd.DataFrame(rows)
    subjects = pd.concat(
        [read_sc_subjects(sc_subjects).assign(study="SC"), read_st_subjects(st_subjects).assign(study="ST")],
        ignore_index=True,
    )
    if subjects.duplicated(["study", "subject", "night"]).any():
        dup = subjects[subjects.duplicated(["study", "subject", "night"], keep=False)]
        raise ValueError(f"duplicate spreadsheet rows for {dup[['study', 'subject', 'night']].values.tolist()}")
    table = files.merge(
        subjects, on=["study", "subject", "night"], how="left", validate="one_to_one", indicator=True
    )
    orphan = table[table["_merge"] != "both"]
    if not orphan.empty:
        raise ValueError(f"no spreadsheet row (age, sex, lights off) for {orphan['record'].tolist()}")
    table = table.drop(columns="_merge")
    table["age"] = table["age"].astype("int64")
    return table[list(COLUMNS)].sort_values(["study", "subject", "night"]).reset_index(drop=True)
