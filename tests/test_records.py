"""Records table of Sleep-EDF Expanded: shipped facts, subsets, selection and parsing errors."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pandas as pd
import pytest

from sleeplib.data.records import (
    COLUMNS,
    SUBSETS,
    build_records_table,
    parse_nights,
    parse_subjects,
    read_sha256sums,
    records_table,
    select_records,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return records_table()


# ---------------------------------------------------------------- shipped table facts
def test_columns_and_counts(table):
    assert list(table.columns) == list(COLUMNS)
    assert table["record"].is_unique
    assert (table["study"] == "SC").sum() == 153
    assert (table["study"] == "ST").sum() == 44
    # Sleep-EDF-78: 78 subjects with ids 0..82 (39, 68, 69, 78, 79 were never released)
    sc_subjects = set(table.loc[table.study == "SC", "subject"])
    assert len(sc_subjects) == 78
    assert set(range(83)) - sc_subjects == {39, 68, 69, 78, 79}
    assert table.loc[table.study == "ST", "subject"].nunique() == 22
    assert (table.loc[table.study == "ST"].groupby("subject").size() == 2).all()


def test_missing_sleep_cassette_nights(table):
    sc = table[table.study == "SC"]
    present = set(zip(sc.subject, sc.night))
    missing = {(s, n) for s in set(sc.subject) for n in (1, 2)} - present
    assert missing == {(13, 2), (36, 1), (52, 1)}


def test_hashes_paths_and_metadata(table):
    for col in ("psg_sha256", "hyp_sha256"):
        assert table[col].str.fullmatch(r"[0-9a-f]{64}").all(), col
    assert table["psg_sha256"].is_unique and table["hyp_sha256"].is_unique
    for row in table.itertuples():
        folder = "sleep-cassette" if row.study == "SC" else "sleep-telemetry"
        assert row.psg == f"{folder}/{row.record}-PSG.edf"
        assert re.fullmatch(rf"{folder}/{row.record[:7]}[A-Z0-9]-Hypnogram\.edf", row.hypnogram)
        code = "4" if row.study == "SC" else "7"
        assert row.record[:6] == f"{row.study}{code}{row.subject:02d}{row.night}"
    assert table["age"].between(18, 105).all()
    assert set(table["sex"]) == {"F", "M"}
    assert table["lights_off"].str.fullmatch(r"\d{2}:\d{2}:\d{2}").all()
    assert set(table.loc[table.study == "ST", "condition"]) == {"placebo", "temazepam"}
    assert (table.loc[table.study == "SC", "condition"] == "").all()
    # each ST subject has one placebo and one temazepam night
    assert (table[table.study == "ST"].groupby("subject")["condition"].nunique() == 2).all()


def test_known_subject_metadata(table):
    sc4001 = table.set_index("record").loc["SC4001E0"]
    assert (sc4001.subject, sc4001.night, sc4001.age, sc4001.sex, sc4001.lights_off) == (0, 1, 33, "F", "00:38:00")
    # ST sheet codes sex as M1/F2 (opposite of SC); subject 1 is a 60-year-old man
    st7011 = table.set_index("record").loc["ST7011J0"]
    assert (st7011.age, st7011.sex, st7011.condition) == (60, "M", "placebo")


def test_records_table_returns_a_copy(table):
    first = records_table()
    first.loc[0, "age"] = -1
    assert records_table().loc[0, "age"] != -1


# ---------------------------------------------------------------- against PhysioNet's files in ../shared
def test_sc4001_hashes_match_physionet_sha256sums(sleep_edfx_mirror, table):
    sums = read_sha256sums(sleep_edfx_mirror / "SHA256SUMS.txt")
    row = table.set_index("record").loc["SC4001E0"]
    assert row.psg_sha256 == sums["sleep-cassette/SC4001E0-PSG.edf"]
    assert row.hyp_sha256 == sums["sleep-cassette/SC4001EC-Hypnogram.edf"]
    for r in table.itertuples():
        assert sums[r.psg] == r.psg_sha256 and sums[r.hypnogram] == r.hyp_sha256


def test_records_match_physionet_records_list(sleep_edfx_mirror, table):
    listed = [line.strip() for line in (sleep_edfx_mirror / "RECORDS").read_text().splitlines() if line.strip()]
    assert sorted(listed) == sorted(table["psg"])


def test_shipped_csv_is_reproducible_from_sources(tmp_path, sleep_edfx_mirror, reference_dir, table):
    subjects_dir = reference_dir / "sleep-edfx-subjects"
    if not (subjects_dir / "SC-subjects.xls").exists():
        pytest.skip(f"subject spreadsheets missing from {subjects_dir}")
    rebuilt = build_records_table(
        sleep_edfx_mirror / "SHA256SUMS.txt", subjects_dir / "SC-subjects.xls", subjects_dir / "ST-subjects.xls"
    )
    pd.testing.assert_frame_equal(rebuilt, table)
    # and the generator script writes a byte-identical CSV
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "build_records_table.py"), run_name="build_records_table")
    out = tmp_path / "records.csv"
    assert script["main"]([str(sleep_edfx_mirror), "--subjects-dir", str(subjects_dir), "--output", str(out)]) == 0
    assert out.read_bytes() == (REPO_ROOT / "sleeplib" / "data" / "records.csv").read_bytes()


def test_build_script_reports_missing_inputs(tmp_path, capsys):
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "build_records_table.py"), run_name="build_records_table")
    assert script["main"]([str(tmp_path), "--output", str(tmp_path / "x.csv")]) == 1
    assert "SHA256SUMS.txt" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_build_rejects_unpaired_psg(tmp_path, reference_dir):
    sums = tmp_path / "SHA256SUMS.txt"
    sums.write_text(f"{'a' * 64} sleep-cassette/SC4001E0-PSG.edf\n")
    subjects_dir = reference_dir / "sleep-edfx-subjects"
    with pytest.raises(ValueError, match="SC4001E0-PSG.edf has no matching Hypnogram"):
        build_records_table(sums, subjects_dir / "SC-subjects.xls", subjects_dir / "ST-subjects.xls")


# ---------------------------------------------------------------- subsets and selection
def test_subsets():
    assert set(SUBSETS) == {"sleep-edf-20", "sleep-edf-78", "sleep-edf-st"}
    edf20 = select_records("sleep-edf-20")
    assert len(edf20) == 39 and sorted(edf20.subject.unique()) == list(range(20))
    assert len(select_records("sleep-edf-78")) == 153
    st = select_records("sleep-edf-st")
    assert len(st) == 44 and set(st.study) == {"ST"}


def test_select_by_subjects_and_nights():
    sel = select_records("sleep-edf-20", subjects="0-3 7", nights=[1])
    assert sel["record"].tolist() == ["SC4001E0", "SC4011E0", "SC4021E0", "SC4031E0", "SC4071E0"]
    assert len(select_records("sleep-edf-78", nights=1)) == 76  # 78 subjects; 36 and 52 lack night 1
    assert len(select_records("sleep-edf-78", nights="2")) == 77  # subject 13 lacks night 2
    # a known gap inside a multi-night request is filtered, not an error
    assert select_records("sleep-edf-20", subjects=[13], nights=[1, 2])["night"].tolist() == [1]


def test_select_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"subject 13 has no night 2 in sleep-edf-20; available nights: \[1\]"):
        select_records("sleep-edf-20", subjects=[13], nights=[2])
    with pytest.raises(ValueError, match=r"subjects 20, 25 not in sleep-edf-20; available subjects: 0-19"):
        select_records("sleep-edf-20", subjects=["20", "25"])
    with pytest.raises(ValueError, match=r"subject 39 not in sleep-edf-78; available subjects: 0-38, 40-67, 70-77, 80-82"):
        select_records("sleep-edf-78", subjects="39")
    with pytest.raises(ValueError, match=r"subject 3 not in sleep-edf-st; available subjects: 1-2, 4-22, 24"):
        select_records("sleep-edf-st", subjects=3)
    with pytest.raises(ValueError, match=r"unknown dataset 'sleep-edf-2013'; valid choices: sleep-edf-20, sleep-edf-78"):
        select_records("sleep-edf-2013")
    with pytest.raises(ValueError, match="not part of the Sleep-EDF records table"):
        select_records("sample")
    with pytest.raises(ValueError, match="night 3 does not exist"):
        select_records("sleep-edf-20", nights=[3])


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "value, expected",
    [
        ("0 1 2", [0, 1, 2]),
        ("0-4", [0, 1, 2, 3, 4]),
        (["0-3", "7"], [0, 1, 2, 3, 7]),
        ([1, 0, 1], [0, 1]),
        ("3,1", [1, 3]),
        (5, [5]),
        (["19", "0-1"], [0, 1, 19]),
    ],
)
def test_parse_subjects(value, expected):
    assert parse_subjects(value) == expected


def test_parse_subjects_full_range():
    assert parse_subjects("0-19") == list(range(20))


@pytest.mark.parametrize("value", ["a", "3-1", "1..3", ["0", "x"], [-1], "", [], True, 2.5, None])
def test_parse_subjects_rejects(value):
    with pytest.raises(ValueError):
        parse_subjects(value)


def test_parse_nights():
    assert parse_nights("1 2") == [1, 2]
    assert parse_nights(["2"]) == [2]
    with pytest.raises(ValueError, match="nights are 1 and 2"):
        parse_nights("0-2")
