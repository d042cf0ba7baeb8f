"""Benchmark of ``sleeplib.data.prepare.prepare``: nights prepared per second on this machine.

Cold = a fresh prepared cache (raw files already present); cached = the same call again, which
only checks that every night's file exists. Cases:

* ``sample``: the bundled real night (SC4001E0 window, 4 channels stored);
* ``synthetic``: the CI smoke cohort (4 subjects x 2 nights of 300 epochs);
* ``SC4001``: the full 22-h EDF from the ``../shared/sleep-edfx`` mirror, when present
  (its copy into the data folder is timed separately as "download").

Run: ``python benchmarks/prepare.py [--jobs N] [--mirror PATH]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sleeplib.data.prepare import prepare

DEFAULT_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "sleep-edfx"


def _time(call) -> tuple[float, list]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _report(name: str, n_nights: int, cold_s: float, cached_s: float, extra: str = "") -> None:
    print(f"{name:<28} {n_nights:>3} nights  cold {cold_s:7.2f} s = {n_nights / cold_s:7.2f} nights/s   "
          f"cached {cached_s:6.3f} s = {n_nights / cached_s:9.1f} nights/s{extra}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: prepare's default)")
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="folder laid out like sleep-edfx/1.0.0")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} (timings are wall-clock)")

    cases = [
        ("sample, Fpz-Cz", dict(dataset="sample")),
        ("sample, 4 channels", dict(dataset="sample",
                                    channels=("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "EMG submental"))),
        ("synthetic 4x2, Fpz-Cz", dict(dataset="synthetic")),
        ("synthetic 4x2, 4 channels", dict(dataset="synthetic",
                                           channels=("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "EMG submental"))),
    ]
    for name, kwargs in cases:
        with tempfile.TemporaryDirectory() as data_dir:
            cold, paths = _time(lambda: prepare(data_dir=data_dir, n_jobs=args.jobs, progress=False, **kwargs))
            cached, _ = _time(lambda: prepare(data_dir=data_dir, n_jobs=args.jobs, progress=False, **kwargs))
            _report(name, len(paths), cold, cached)

    psg = args.mirror / "sleep-cassette" / "SC4001E0-PSG.edf"
    if not psg.is_file():
        print(f"SC4001 skipped: no mirror at {args.mirror}")
        return 0
    from sleeplib.data.download import fetch_records
    from sleeplib.data.records import select_records

    with tempfile.TemporaryDirectory() as data_dir:
        table = select_records("sleep-edf-20", subjects=[0], nights=[1])
        download, _ = _time(lambda: fetch_records(table, data_dir=data_dir, mirror=args.mirror.as_uri(), progress=False))
        for name, channels in [("SC4001 EDF, Fpz-Cz", ("EEG Fpz-Cz",)),
                               ("SC4001 EDF, 4 channels", ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "EMG submental"))]:
            kwargs = dict(dataset="sleep-edf-20", subjects=[0], nights=[1], channels=channels, data_dir=data_dir,
                          mirror=args.mirror.as_uri(), n_jobs=args.jobs, progress=False)
            cold, paths = _time(lambda: prepare(**kwargs))
            cached, _ = _time(lambda: prepare(**kwargs))
            _report(name, len(paths), cold, cached, extra=f"   (download+verify {download:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
