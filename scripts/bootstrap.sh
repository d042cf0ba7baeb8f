# Sourced by run_all.sh and run_tests.sh: make sure .venv exists and holds sleeplib and its stack.
# Re-installs only when pyproject.toml changed since the last install (a stamp in .venv records it).
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLEEPLIB_VENV:-$_here/.venv}"
PY="$VENV/bin/python"
_stamp="$VENV/.sleeplib-installed"
_want="$(sha256sum "$_here/pyproject.toml" | cut -c1-16)"
if [ ! -x "$PY" ]; then
    echo "[bootstrap] creating $VENV" >&2
    "${PYTHON:-python3}" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[bootstrap] installing torch==2.13.0 and sleeplib[dev] into $VENV (first run: a few minutes)" >&2
    # torch first and pinned: an unpinned resolve would pull the newest CUDA build (gigabytes).
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$_here[dev]"
    # the kernel papermill runs the notebooks with
    "$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sleeplib)" >/dev/null
    echo "$_want" > "$_stamp"
fi
