"""Download Sleep-EDF Expanded files with SHA256 verification, retries and mirrors (via pooch).

Files land under ``<data_dir>/sleep-edfx/1.0.0/<relative path>``, mirroring PhysioNet's layout.
The source is, in order: the ``mirror`` argument, the ``SLEEPLIB_MIRROR`` environment variable,
PhysioNet. A mirror is any folder laid out like ``sleep-edfx/1.0.0/`` reachable as ``https://``,
``http://``, ``ftp://``, ``file://`` or a plain local path.

Every file goes through :func:`pooch.retrieve`, which downloads to a temporary file in the target
folder, checks its SHA256 and only then moves it into place; a corrupted or truncated download is
deleted and raises :class:`ChecksumMismatchError`. A file that is already present with the right
hash is not downloaded again. This module never imports mne.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pandas as pd
import pooch
from pooch.downloaders import choose_downloader
from tqdm import tqdm  # text bars: they render in papermill HTML reports, widgets do not

from sleeplib.paths import ENV_MIRROR, data_dir as resolve_data_dir

__all__ = [
    "PHYSIONET_URL",
    "ChecksumMismatchError",
    "DownloadError",
    "FetchedRecord",
    "FileCopyDownloader",
    "MirrorUnreachableError",
    "fetch_file",
    "fetch_records",
    "fetch_records_status",
    "local_path",
    "resolve_mirror",
]

PHYSIONET_URL = "https://physionet.org/files/sleep-edfx/1.0.0/"
#: Folder under the data directory that mirrors ``https://physionet.org/files/sleep-edfx/1.0.0/``.
DATABASE_SUBDIR = Path("sleep-edfx") / "1.0.0"
#: First wait between attempts in seconds; doubled after each failed attempt.
RETRY_BACKOFF_S = 1.0

_OFFLINE_HINT = (
    "use --mirror URL or SLEEPLIB_MIRROR (e.g. a local copy of PhysioNet's sleep-edfx folder, "
    "file:///path/to/sleep-edfx) or run on the bundled sample with --dataset sample"
)

log = logging.getLogger(__name__)


class DownloadError(OSError):
    """A file could not be fetched (base class of the errors below)."""


class MirrorUnreachableError(DownloadError, ConnectionError):
    """The server could not be reached at all (offline, wrong host, closed port)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the expected SHA256; nothing was kept."""


class FetchedRecord(NamedTuple):
    """One fetched night: local paths and what was done for each file."""

    record: str
    psg: Path
    hypnogram: Path
    psg_status: str  # "downloaded" or "present"
    hyp_status: str


# --------------------------------------------------------------------------------------------
# Mirrors and local paths
# --------------------------------------------------------------------------------------------
def resolve_mirror(mirror: str | os.PathLike | None = None) -> str:
    """Return the base URL to download from, always ending with ``/``.

    Parameters
    ----------
    mirror : str or path, optional
        URL (``https://``, ``http://``, ``ftp://``, ``file://``) or local folder laid out like
        ``sleep-edfx/1.0.0/``. Falls back to ``$SLEEPLIB_MIRROR``, then :data:`PHYSIONET_URL`.

    Raises
    ------
    ValueError
        For an unsupported URL scheme.
    FileNotFoundError
        For a local mirror folder (or ``file://`` URL) that does not exist.
    """
    if mirror is None or str(mirror).strip() == "":
        mirror = os.environ.get(ENV_MIRROR, "").strip() or PHYSIONET_URL
    text = os.fspath(mirror).strip()
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        return text.rstrip("/") + "/"
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path))
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # plain path (or a Windows drive)
        folder = Path(text).expanduser().resolve()
    else:
        raise ValueError(
            f"unsupported mirror {text!r}: give an http(s)://, ftp:// or file:// URL or a local folder"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"mirror folder {folder} does not exist; point --mirror / {ENV_MIRROR} at a folder laid out "
            "like PhysioNet's sleep-edfx/1.0.0/ (holding sleep-cassette/, sleep-telemetry/)"
        )
    return folder.as_uri().rstrip("/") + "/"


def _check_relpath(relpath: str) -> PurePosixPath:
    rel = PurePosixPath(str(relpath).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"invalid database path {relpath!r}: expected e.g. sleep-cassette/SC4001E0-PSG.edf")
    return rel


def local_path(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``relpath`` (e.g. ``sleep-cassette/SC4001E0-PSG.edf``) is stored locally.

    Does not create anything.
    """
    return resolve_data_dir(data_dir, create=False) / DATABASE_SUBDIR / Path(*_check_relpath(relpath).parts)


# --------------------------------------------------------------------------------------------
# file:// downloader
# --------------------------------------------------------------------------------------------
class FileCopyDownloader:
    """Pooch downloader for ``file://`` URLs: copies the file so that pooch then verifies its hash.

    Pooch's own downloaders handle http(s), ftp and sftp only. This follows their call signature
    ``downloader(url, output_file, pooch, check_only=False)``.

    Parameters
    ----------
    progressbar : bool
        Show a tqdm byte counter while copying.
    chunk_size : int
        Bytes per read.
    """

    def __init__(self, progressbar: bool = False, chunk_size: int = 1024 * 1024):
        self.progressbar = progressbar
        self.chunk_size = chunk_size

    def __call__(self, url: str, output_file, pooch_obj=None, check_only: bool = False):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "file":
            raise ValueError(f"FileCopyDownloader only handles file:// URLs, got {url!r}")
        source = Path(urllib.request.url2pathname(parsed.path))
        if check_only:
            return source.is_file()
        if not source.is_file():
            raise FileNotFoundError(f"{source} is not in the mirror; is the mirror complete?")
        total = source.stat().st_size
        with open(source, "rb") as src, _open_output(output_file) as dst, tqdm(
            total=total, unit="B", unit_scale=True, desc=source.name, leave=False, disable=not self.progressbar
        ) as bar:
            while chunk := src.read(self.chunk_size):
                dst.write(chunk)
                bar.update(len(chunk))
        return None


class _open_output:
    """Open ``output_file`` for binary writing, or use it as is when pooch passes a file object."""

    def __init__(self, output_file):
        self.output_file = output_file
        self.owned = not hasattr(output_file, "write")

    def __enter__(self):
        self.fh = open(self.output_file, "wb") if self.owned else self.output_file
        return self.fh

    def __exit__(self, *exc):
        if self.owned:
            self.fh.close()
        return False


def _downloader_for(url: str, progress: bool):
    if urllib.parse.urlparse(url).scheme == "file":
        return FileCopyDownloader(progressbar=progress)
    return choose_downloader(url, progressbar=progress)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
def _is_network_error(exc: BaseException) -> bool:
    import socket

    import requests  # pooch depends on requests; imported lazily like pooch does

    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, TimeoutError,
                            ConnectionError, socket.gaierror))


def _fetch_one(relpath: str, sha256: str, data_dir: Path, base_url: str, progress: bool, retries: int,
               backoff_s: float) -> tuple[Path, str]:
    """Fetch one file; return its local path and ``"downloaded"`` or ``"present"``."""
    rel = _check_relpath(relpath)
    sha256 = str(sha256).strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"invalid SHA256 {sha256!r} for {relpath}: expected 64 hexadecimal characters")
    target = data_dir / DATABASE_SUBDIR / Path(*rel.parts)
    if target.is_file() and pooch.file_hash(str(target)) == sha256:
        return target, "present"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(
            f"cannot create {target.parent} ({exc.strerror or exc}); pass --data-dir or set SLEEPLIB_DATA "
            "to a writable folder"
        ) from exc
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(
            f"{target.parent} is not writable; pass --data-dir or set SLEEPLIB_DATA to a writable folder"
        )
    url = base_url + urllib.parse.quote(str(rel))
    attempts = 1 + max(0, int(retries))
    pooch_log = pooch.get_logger()
    previous_level = pooch_log.level
    if not progress:
        pooch_log.setLevel(logging.WARNING)  # its "Downloading data from ..." lines are progress noise
    try:
        return _retrieve_with_retries(url, rel, sha256, target, progress, attempts, backoff_s)
    finally:
        pooch_log.setLevel(previous_level)


def _retrieve_with_retries(url: str, rel: PurePosixPath, sha256: str, target: Path, progress: bool,
                           attempts: int, backoff_s: float) -> tuple[Path, str]:
    import requests

    for attempt in range(attempts):
        try:
            pooch.retrieve(
                url, known_hash=f"sha256:{sha256}", fname=target.name, path=target.parent,
                downloader=_downloader_for(url, progress), progressbar=progress,
            )
            return target, "downloaded"
        except requests.exceptions.HTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status is not None and 400 <= status < 500:
                # A client error will not go away by retrying (404: the mirror lacks the file).
                raise DownloadError(
                    f"{url} answered HTTP {status}; the mirror does not serve {rel} "
                    f"(an incomplete mirror?); {_OFFLINE_HINT}"
                ) from exc
            error: Exception = DownloadError(f"downloading {url} failed ({exc})")
            cause = exc
        except FileNotFoundError:
            raise  # a file:// mirror without the file: retrying cannot help
        except ValueError as exc:
            # pooch raises ValueError when the hash of the temporary file does not match; it has
            # already deleted that file, so nothing that looks valid is left behind.
            error = ChecksumMismatchError(
                f"SHA256 mismatch for {rel} from {url}: the file was corrupted or truncated and was "
                f"discarded (expected {sha256}). Check the mirror or try again. [{exc}]"
            )
            cause = exc
        except Exception as exc:  # noqa: BLE001 - classified just below, re-raised otherwise
            if not _is_network_error(exc):
                raise
            reason = _short_reason(exc)
            error = MirrorUnreachableError(f"could not reach {url} ({reason}); {_OFFLINE_HINT}")
            cause = exc
        if attempt < attempts - 1:
            wait = backoff_s * 2**attempt
            log.warning("attempt %d/%d for %s failed (%s); retrying in %.1f s", attempt + 1, attempts, rel,
                        type(cause).__name__, wait)
            time.sleep(wait)
    raise error from cause


def _short_reason(exc: BaseException) -> str:
    """A one-line reason from a requests/urllib3 error chain, e.g. 'Connection refused'."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Network is unreachable", "timed out", "Connection reset"):
        if marker.lower() in text.lower():
            return marker
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def fetch_file(relpath: str, sha256: str, data_dir: str | os.PathLike | None = None,
               mirror: str | os.PathLike | None = None, progress: bool = True, retries: int = 3,
               *, backoff_s: float = RETRY_BACKOFF_S) -> Path:
    """Fetch one database file and verify its SHA256.

    Parameters
    ----------
    relpath : str
        Path relative to the database root, e.g. ``sleep-cassette/SC4001E0-PSG.edf``.
    sha256 : str
        Expected SHA256 (64 hex characters).
    data_dir : path, optional
        Data folder (see :func:`sleeplib.paths.data_dir`); the file goes to
        ``<data_dir>/sleep-edfx/1.0.0/<relpath>``.
    mirror : str or path, optional
        See :func:`resolve_mirror`.
    progress : bool
        Show tqdm progress bars.
    retries : int
        Extra attempts after a network error or checksum mismatch, with exponential backoff.
    backoff_s : float
        First wait between attempts in seconds, doubled each time.

    Returns
    -------
    pathlib.Path
        The verified local file.

    Raises
    ------
    MirrorUnreachableError
        When the server cannot be reached (the message says how to use a mirror or the sample).
    ChecksumMismatchError
        When the downloaded bytes have the wrong hash (nothing is kept).
    DownloadError
        For HTTP errors such as 404.
    FileNotFoundError
        When a local mirror lacks the file.
    PermissionError
        When the data folder cannot be written.
    """
    folder = resolve_data_dir(data_dir)
    path, _ = _fetch_one(relpath, sha256, folder, resolve_mirror(mirror), progress, retries, backoff_s)
    return path


_REQUIRED_COLUMNS = ("record", "psg", "hypnogram", "psg_sha256", "hyp_sha256")


def _as_records_df(records) -> pd.DataFrame:
    if isinstance(records, pd.Series):
        records = records.to_frame().T
    if isinstance(records, str):
        records = [records]
    if not isinstance(records, pd.DataFrame):
        from sleeplib.data.records import records_table

        names = list(records)
        table = records_table().set_index("record", drop=False)
        unknown = [n for n in names if n not in table.index]
        if unknown:
            raise ValueError(f"unknown records {unknown}; record names look like SC4001E0 or ST7011J0")
        return table.loc[names].reset_index(drop=True)
    missing = [c for c in _REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(
            f"the records table lacks columns {missing}; pass rows of sleeplib.data.records.records_table() "
            "or select_records()"
        )
    return records


def fetch_records_status(records, data_dir: str | os.PathLike | None = None,
                         mirror: str | os.PathLike | None = None, progress: bool = True, retries: int = 3,
                         *, backoff_s: float = RETRY_BACKOFF_S) -> list[FetchedRecord]:
    """Like :func:`fetch_records`, but return a :class:`FetchedRecord` per night, saying what was done."""
    table = _as_records_df(records)
    folder = resolve_data_dir(data_dir)
    base_url = resolve_mirror(mirror)
    fetched: list[FetchedRecord] = []
    with tqdm(total=2 * len(table), unit="file", desc="sleep-edfx", disable=not progress) as bar:
        for row in table.itertuples(index=False):
            bar.set_postfix_str(row.record)
            psg, psg_status = _fetch_one(row.psg, row.psg_sha256, folder, base_url, progress, retries, backoff_s)
            bar.update(1)
            hyp, hyp_status = _fetch_one(row.hypnogram, row.hyp_sha256, folder, base_url, progress, retries,
                                         backoff_s)
            bar.update(1)
            fetched.append(FetchedRecord(row.record, psg, hyp, psg_status, hyp_status))
    return fetched


def fetch_records(records, data_dir: str | os.PathLike | None = None, mirror: str | os.PathLike | None = None,
                  progress: bool = True, retries: int = 3, *,
                  backoff_s: float = RETRY_BACKOFF_S) -> list[tuple[Path, Path]]:
    """Fetch the PSG and hypnogram of each night, verifying SHA256; skip files already present.

    Parameters
    ----------
    records : pandas.DataFrame or sequence of str
        Rows of :func:`sleeplib.data.records.records_table` (e.g. from ``select_records``), needing
        the columns ``record, psg, hypnogram, psg_sha256, hyp_sha256``; or record names.
    data_dir, mirror, progress, retries, backoff_s
        See :func:`fetch_file`.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        ``(psg, hypnogram)`` per night, in the order of ``records``.

    Raises
    ------
    MirrorUnreachableError, ChecksumMismatchError, DownloadError, FileNotFoundError, PermissionError
        See :func:`fetch_file`.
    ValueError
        For a table without the needed columns, or unknown record names.
    """
    return [(r.psg, r.hypnogram) for r in fetch_records_status(
        records, data_dir=data_dir, mirror=mirror, progress=progress, retries=retries, backoff_s=backoff_s)]
