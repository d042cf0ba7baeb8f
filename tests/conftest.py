"""Shared pytest fixtures for the sleeplib test suite.

The read-only data folder ``shared/`` sits beside the repository root (``../shared``). It holds a
byte-identical PhysioNet subset (``sleep-edfx/``) and real reference labels (``reference/``).
Tests that need it take the ``shared_dir`` fixture (or one of the narrower fixtures below), which
skips with a clear reason when the folder is absent, e.g. on a machine without the shared data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}; it is provided as ../shared beside the repository root")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Root of the source checkout (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo_root>/../shared``; skips the test when it is missing."""
    return _require(SHARED_DIR, "the shared data folder")


@pytest.fixture(scope="session")
def sleep_edfx_mirror(shared_dir: Path) -> Path:
    """The local PhysioNet subset ``shared/sleep-edfx`` laid out like ``sleep-edfx/1.0.0/``."""
    return _require(shared_dir / "sleep-edfx", "the Sleep-EDF mirror subset")


@pytest.fixture(scope="session")
def sc4001_files(sleep_edfx_mirror: Path) -> tuple[Path, Path]:
    """``(psg, hypnogram)`` paths of SC4001, the one full night in the mirror."""
    psg = _require(sleep_edfx_mirror / "sleep-cassette" / "SC4001E0-PSG.edf", "SC4001E0-PSG.edf")
    hyp = _require(sleep_edfx_mirror / "sleep-cassette" / "SC4001EC-Hypnogram.edf", "SC4001EC-Hypnogram.edf")
    return psg, hyp


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    """``shared/reference`` (Sleep-EDF-20 hypnogram CSVs, subject spreadsheets)."""
    return _require(shared_dir / "reference", "the reference labels folder")


def _quiet_handler(directory: Path):
    import functools
    import http.server

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
            pass  # keep test output clean

    return functools.partial(QuietHandler, directory=str(directory))


@pytest.fixture
def serve_folder():
    """Factory: ``serve_folder(path) -> "http://127.0.0.1:<port>/"`` serving ``path`` over loopback HTTP.

    A stand-in for PhysioNet in tests (the real site is unreachable here). Servers stop at teardown.
    """
    import http.server
    import threading

    servers = []

    def start(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(Path(directory)))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """``http://127.0.0.1:<port>/`` where nothing listens (an offline stand-in)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The socket is closed on leaving the block; nothing listens on the port afterwards.
    return f"http://127.0.0.1:{port}/"
