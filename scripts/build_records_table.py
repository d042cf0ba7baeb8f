"""Generate ``sleeplib/data/records.csv``, the Sleep-EDF Expanded records table shipped with sleeplib.

Reads PhysioNet's ``SHA256SUMS.txt`` from a mirror of ``sleep-edfx/1.0.0/`` and the subject
spreadsheets ``SC-subjects.xls`` and ``ST-subjects.xls`` (at the mirror root, as PhysioNet serves
them, or in the folder given by ``--subjects-dir``).

Usage::

    python scripts/build_records_table.py /path/to/sleep-edfx \
        --subjects-dir /path/to/sleep-edfx-subjects [--output sleeplib/data/records.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sleeplib.data.records import build_records_table
from sleeplib.io import atomic_path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "sleeplib" / "data" / "records.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="folder laid out like sleep-edfx/1.0.0/ (holds SHA256SUMS.txt)")
    parser.add_argument("--subjects-dir", type=Path, default=None,
                        help="folder with SC-subjects.xls and ST-subjects.xls (default: the mirror folder)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"CSV to write (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)

    sums = args.mirror / "SHA256SUMS.txt"
    subjects_dir = args.subjects_dir or args.mirror
    inputs = [sums, subjects_dir / "SC-subjects.xls", subjects_dir / "ST-subjects.xls"]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        print(f"build_records_table: error: missing {', '.join(missing)}; give the mirror folder "
              "(with SHA256SUMS.txt) and --subjects-dir holding the two .xls files", file=sys.stderr)
        return 1
    table = build_records_table(*inputs)
    with atomic_path(args.output, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    counts = table.groupby("study").size().to_dict()
    print(f"wrote {args.output}: {len(table)} nights ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
