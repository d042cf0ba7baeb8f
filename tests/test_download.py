"""Downloads with pooch: SHA256 verification, mirrors (HTTP, file://, folder), corruption, offline.

PhysioNet is unreachable here; ``../shared/sleep-edfx`` is a byte-identical subset of it holding
SC4001 only, served over loopback HTTP or used as a ``file://`` mirror.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sleeplib.data import download
from sleeplib.data.download import (
    PHYSIONET_URL,
    ChecksumMismatchError,
    DownloadError,
    MirrorUnreachableError,
    fetch_file,
    fetch_records,
    fetch_records_status,
    local_path,
    resolve_mirror,
)
from sleeplib.data.records import records_table, select_records

HYP = "sleep-cassette/SC4001EC-Hypnogram.edf"
PSG = "sleep-cassette/SC4001E0-PSG.edf"


@pytest.fixture(scope="module")
def sc4001():
    return select_records("sleep-edf-20", subjects=[0], nights=[1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _corrupt_mirror(tmp_path: Path, source_mirror: Path, how: str) -> Path:
    """A mirror folder whose SC4001 hypnogram is truncated or has one flipped bit."""
    mirror = tmp_path / f"mirror-{how}"
    (mirror / "sleep-cassette").mkdir(parents=True)
    data = bytearray((source_mirror / HYP).read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    (mirror / HYP).write_bytes(bytes(data))
    return mirror


# ---------------------------------------------------------------- mirrors
def test_resolve_mirror_sources(monkeypatch, sleep_edfx_mirror):
    monkeypatch.delenv("SLEEPLIB_MIRROR", raising=False)
    assert resolve_mirror() == PHYSIONET_URL
    monkeypatch.setenv("SLEEPLIB_MIRROR", "http://example.org/sleep-edfx")
    assert resolve_mirror() == "http://example.org/sleep-edfx/"
    assert resolve_mirror("https://a.b/c/") == "https://a.b/c/"  # argument wins over the environment
    as_uri = sleep_edfx_mirror.resolve().as_uri() + "/"
    assert resolve_mirror(sleep_edfx_mirror) == as_uri
    assert resolve_mirror(str(sleep_edfx_mirror)) == as_uri
    assert resolve_mirror(as_uri) == as_uri


def test_resolve_mirror_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mirror folder .* does not exist"):
        resolve_mirror(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_mirror((tmp_path / "absent").as_uri())
    with pytest.raises(ValueError, match="unsupported mirror 'gopher://x'"):
        resolve_mirror("gopher://x")


def test_local_path_layout(tmp_path):
    assert local_path(PSG, tmp_path) == tmp_path.resolve() / "sleep-edfx" / "1.0.0" / "sleep-cassette" / "SC4001E0-PSG.edf"
    with pytest.raises(ValueError, match="invalid database path"):
        local_path("../etc/passwd", tmp_path)


# ---------------------------------------------------------------- successful downloads
def test_http_mirror_downloads_and_verifies_sc4001(tmp_path, serve_folder, sleep_edfx_mirror, sc4001,
                                                   closed_port_url):
    url = serve_folder(sleep_edfx_mirror)
    fetched = fetch_records_status(sc4001, data_dir=tmp_path, mirror=url, progress=False, retries=0)
    assert len(fetched) == 1
    night = fetched[0]
    assert (night.record, night.psg_status, night.hyp_status) == ("SC4001E0", "downloaded", "downloaded")
    assert night.psg == tmp_path.resolve() / "sleep-edfx" / "1.0.0" / PSG
    assert night.hypnogram == tmp_path.resolve() / "sleep-edfx" / "1.0.0" / HYP
    # independent check of the bytes against the table (itself checked against PhysioNet's SHA256SUMS)
    assert _sha256(night.psg) == sc4001.psg_sha256.iloc[0]
    assert _sha256(night.hypnogram) == sc4001.hyp_sha256.iloc[0]
    assert night.psg.stat().st_size == (sleep_edfx_mirror / PSG).stat().st_size
    # nothing but the two files (no temporary leftovers)
    assert _files(tmp_path) == sorted([night.psg, night.hypnogram])
    # present files with the right hash are not fetched again: an unreachable mirror is never contacted
    again = fetch_records_status(sc4001, data_dir=tmp_path, mirror=closed_port_url, progress=False, retries=0)
    assert (again[0].psg_status, again[0].hyp_status) == ("present", "present")


@pytest.mark.parametrize("as_uri", [True, False], ids=["file-url", "plain-folder"])
def test_local_mirror(tmp_path, sleep_edfx_mirror, sc4001, as_uri):
    mirror = sleep_edfx_mirror.resolve().as_uri() if as_uri else str(sleep_edfx_mirror)
    pairs = fetch_records(sc4001, data_dir=tmp_path, mirror=mirror, progress=False)
    psg, hyp = pairs[0]
    assert _sha256(psg) == sc4001.psg_sha256.iloc[0] and _sha256(hyp) == sc4001.hyp_sha256.iloc[0]
    assert not psg.is_symlink()  # a copy, so the data folder stands on its own


def test_env_mirror_and_record_names(tmp_path, monkeypatch, sleep_edfx_mirror):
    monkeypatch.setenv("SLEEPLIB_MIRROR", sleep_edfx_mirror.resolve().as_uri())
    pairs = fetch_records(["SC4001E0"], data_dir=tmp_path, progress=False)
    assert pairs[0][1].name == "SC4001EC-Hypnogram.edf" and pairs[0][1].is_file()


def test_stale_local_file_is_replaced(tmp_path, sleep_edfx_mirror, sc4001):
    target = local_path(HYP, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the hypnogram")
    path = fetch_file(HYP, sc4001.hyp_sha256.iloc[0], data_dir=tmp_path, mirror=sleep_edfx_mirror, progress=False)
    assert path == target and _sha256(path) == sc4001.hyp_sha256.iloc[0]


# ---------------------------------------------------------------- failures
@pytest.mark.parametrize("how", ["truncated", "bitflip"])
def test_corrupted_http_download_leaves_nothing(tmp_path, serve_folder, sleep_edfx_mirror, sc4001, how):
    url = serve_folder(_corrupt_mirror(tmp_path, sleep_edfx_mirror, how))
    data = tmp_path / "data"
    with pytest.raises(ChecksumMismatchError, match=r"SHA256 mismatch for sleep-cassette/SC4001EC-Hypnogram.edf"):
        fetch_file(HYP, sc4001.hyp_sha256.iloc[0], data_dir=data, mirror=url, progress=False, retries=0)
    assert _files(data) == []  # pooch's temporary file was removed, and no target was written


def test_corrupted_file_mirror_retries_then_fails(tmp_path, monkeypatch, sleep_edfx_mirror, sc4001):
    mirror = _corrupt_mirror(tmp_path, sleep_edfx_mirror, "bitflip")
    calls = []
    original = download.FileCopyDownloader.__call__

    def counting(self, url, output_file, pooch_obj=None, check_only=False):
        calls.append(url)
        return original(self, url, output_file, pooch_obj, check_only)

    monkeypatch.setattr(download.FileCopyDownloader, "__call__", counting)
    data = tmp_path / "data"
    with pytest.raises(ChecksumMismatchError, match="corrupted or truncated"):
        fetch_file(HYP, sc4001.hyp_sha256.iloc[0], data_dir=data, mirror=mirror.as_uri(), progress=False,
                   retries=2, backoff_s=0.0)
    assert len(calls) == 3  # one attempt plus two retries
    assert _files(data) == []


def test_offline_gives_clear_error(tmp_path, closed_port_url, sc4001):
    with pytest.raises(MirrorUnreachableError) as info:
        fetch_records(sc4001, data_dir=tmp_path, mirror=closed_port_url, progress=False, retries=1, backoff_s=0.0)
    message = str(info.value)
    assert message.startswith(f"could not reach {closed_port_url}sleep-cassette/SC4001E0-PSG.edf (")
    for hint in ("--mirror URL", "SLEEPLIB_MIRROR", "file:///path/to/sleep-edfx", "--dataset sample"):
        assert hint in message
    assert isinstance(info.value, ConnectionError)
    assert _files(tmp_path) == []


def test_missing_file_on_http_mirror(tmp_path, serve_folder, sleep_edfx_mirror):
    url = serve_folder(sleep_edfx_mirror)
    row = records_table().set_index("record").loc["SC4002E0"]
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_file(row.psg, row.psg_sha256, data_dir=tmp_path, mirror=url, progress=False, retries=3)
    assert _files(tmp_path) == []


def test_missing_file_on_local_mirror(tmp_path, sleep_edfx_mirror):
    row = records_table().set_index("record").loc["SC4002E0"]
    with pytest.raises(FileNotFoundError, match="not in the mirror"):
        fetch_file(row.psg, row.psg_sha256, data_dir=tmp_path, mirror=sleep_edfx_mirror, progress=False)
    assert _files(tmp_path) == []


def test_unwritable_data_dir(tmp_path, sleep_edfx_mirror, sc4001):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a path below a regular file cannot be created, even by root (chmod would not stop root)
    with pytest.raises(PermissionError, match="pass --data-dir or set SLEEPLIB_DATA"):
        fetch_records(sc4001, data_dir=blocker / "data", mirror=sleep_edfx_mirror, progress=False)


def test_bad_inputs(tmp_path, sc4001):
    with pytest.raises(ValueError, match=r"lacks columns \['psg_sha256'"):
        fetch_records(sc4001.drop(columns=["psg_sha256"]), data_dir=tmp_path, mirror=PHYSIONET_URL)
    with pytest.raises(ValueError, match=r"unknown records \['SC9999E0'\]"):
        fetch_records(["SC9999E0"], data_dir=tmp_path, mirror=PHYSIONET_URL)
    with pytest.raises(ValueError, match="invalid SHA256"):
        fetch_file(HYP, "abc", data_dir=tmp_path, mirror=PHYSIONET_URL)
    with pytest.raises(ValueError, match="invalid database path"):
        fetch_file("/etc/passwd", "0" * 64, data_dir=tmp_path, mirror=PHYSIONET_URL)
    assert _files(tmp_path) == []


def test_file_copy_downloader_rejects_other_schemes(tmp_path):
    with pytest.raises(ValueError, match="only handles file://"):
        download.FileCopyDownloader()("http://x/y", tmp_path / "out")
    assert download.FileCopyDownloader()((tmp_path / "nothing").as_uri(), None, check_only=True) is False
