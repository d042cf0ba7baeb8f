#!/usr/bin/env bash
# Run every notebook headless into reports/ (HTML + executed .ipynb + index.html).
#   ./run_all.sh            # profile "sample": the bundled real night, offline
#   ./run_all.sh smoke      # synthetic data, seconds (what CI runs through the tests)
#   ./run_all.sh full       # the papers' settings (downloads Sleep-EDF; hours on CPU, minutes on a GPU)
# Extra arguments go to `python -m sleeplib.workbook`, e.g. --notebooks 00 01.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec "$PY" -m sleeplib.workbook "${1:-sample}" "${@:2}"
