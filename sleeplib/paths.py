"""Where data, prepared caches and reports live.

Resolution order for the data folder: explicit argument, then the ``SLEEPLIB_DATA``
environment variable, then ``data/`` of the source checkout (the course layout),
then ``~/sleeplib_data`` for an installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "SLEEPLIB_DATA"
ENV_MIRROR = "SLEEPLIB_MIRROR"
ENV_REPORTS = "SLEEPLIB_REPORTS"

_PACKAGE_ROOT = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_ROOT.parent


def repo_root() -> Path | None:
    """The source checkout this package was installed from (editable install), if any."""
    if (_CHECKOUT / "pyproject.toml").exists() and (_CHECKOUT / "notebooks").is_dir():
        return _CHECKOUT
    return None


def data_dir(path: str | os.PathLike | None = None, *, create: bool = True) -> Path:
    """Return the data folder, creating it, with a clear error when it cannot be written."""
    if path is None:
        path = os.environ.get(ENV_DATA) or None
    if path is None:
        root = repo_root()
        path = root / "data" if root is not None else Path.home() / "sleeplib_data"
    path = Path(path).expanduser().resolve()
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"cannot create the data directory {path} ({exc.strerror}); "
                f"pass --data-dir or set {ENV_DATA} to a writable folder"
            ) from exc
        if not os.access(path, os.W_OK):
            raise PermissionError(
                f"the data directory {path} is not writable; "
                f"pass --data-dir or set {ENV_DATA} to a writable folder"
            )
    return path


def sample_dir() -> Path:
    """Folder of the bundled real sample (tracked in git, shipped with the checkout)."""
    root = repo_root()
    return (root if root is not None else _CHECKOUT) / "data" / "sample"


def reports_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder for executed notebooks, HTML and ``<stem>.json`` key results."""
    if path is None:
        path = os.environ.get(ENV_REPORTS) or None
    if path is None:
        root = repo_root()
        path = root / "reports" if root is not None else Path.cwd() / "reports"
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
