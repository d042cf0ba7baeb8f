"""Command line: ``sleeplib download | prepare | sample | run``.

Examples
--------
::

    sleeplib download --dataset sleep-edf-20 --subjects 0-4
    sleeplib download --dataset sleep-edf-20 --subjects 0 --mirror file:///data/sleep-edfx
    sleeplib prepare --dataset sleep-edf-20 --subjects 0-19 --channels "EEG Fpz-Cz" --jobs 2
    sleeplib prepare --dataset shhs --shhs-dir /data/shhs
    sleeplib sample --mirror /data/sleep-edfx
    sleeplib run --profile sample        # everything after `run` goes to sleeplib.workbook.main

Failures print one line ``sleeplib: error: <reason>`` on stderr and exit with status 1
(``--debug`` shows the traceback instead). Heavy modules are imported inside the commands so that
``sleeplib --help`` stays fast and works without mne.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["DATASETS", "build_parser", "main"]

DATASETS = ("sleep-edf-20", "sleep-edf-78", "sleep-edf-st", "sample", "synthetic", "shhs")
# Expected failures: reported as one line. Any exception class defined inside sleeplib counts too.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError, OSError)


class CommandError(Exception):
    """A command cannot run as asked (the message says what to do instead)."""


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="sleep-edf-20",
                        help="which data (default: %(default)s)")
    parser.add_argument("--subjects", nargs="+", default=None, metavar="ID",
                        help="subject ids, e.g. `0 1 2` or `0-19` (default: all of the dataset)")
    parser.add_argument("--nights", nargs="+", default=None, metavar="N",
                        help="nights 1 and/or 2 (default: both)")
    parser.add_argument("--channels", nargs="+", default=None, metavar="NAME",
                        help="EDF channel names (default: EEG Fpz-Cz; EEG for SHHS)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data folder (default: $SLEEPLIB_DATA, else data/ of the checkout)")
    parser.add_argument("--mirror", default=os.environ.get("SLEEPLIB_MIRROR") or None,
                        help="URL or folder laid out like PhysioNet's sleep-edfx/1.0.0/ "
                             "(default: $SLEEPLIB_MIRROR, else PhysioNet)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (reads ``SLEEPLIB_MIRROR`` for the ``--mirror`` default when called)."""
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS so that a subcommand's unset --debug does not overwrite `sleeplib --debug ...`.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")

    parser = argparse.ArgumentParser(prog="sleeplib", description="Sleep-staging workbook: data and runs.",
                                     parents=[debug])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    download = commands.add_parser("download", parents=[debug],
                                   help="download Sleep-EDF nights with SHA256 verification",
                                   description="Download PSG + hypnogram of the selected nights "
                                               "(--channels is accepted for symmetry; EDF files hold all channels).")
    _add_data_options(download)
    download.add_argument("--retries", type=int, default=3,
                          help="extra attempts per file after a network error or bad checksum (default: %(default)s)")

    prepare = commands.add_parser("prepare", parents=[debug],
                                  help="download what is missing and write 30-s epochs, one .npz per night")
    _add_data_options(prepare)
    prepare.add_argument("--jobs", type=int, default=None, help="parallel workers (default: automatic)")
    prepare.add_argument("--shhs-dir", type=Path, default=None,
                         help="folder with the NSRR SHHS EDF and XML files (for --dataset shhs)")

    sample = commands.add_parser("sample", parents=[debug],
                                 help="rebuild the bundled real sample night (data/sample/) from SC4001")
    sample.add_argument("--data-dir", type=Path, default=None, help="data folder for the download")
    sample.add_argument("--mirror", default=os.environ.get("SLEEPLIB_MIRROR") or None,
                        help="URL or folder laid out like sleep-edfx/1.0.0/ (default: $SLEEPLIB_MIRROR)")

    run = commands.add_parser("run", help="run the notebooks (arguments go to sleeplib.workbook)",
                              add_help=False)
    run.set_defaults(workbook_args=[])  # main() passes everything after `run` through unparsed
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    if not rows:
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def _selection(args: argparse.Namespace) -> tuple[list[int] | None, list[int] | None]:
    from sleeplib.data.records import parse_nights, parse_subjects

    subjects = parse_subjects(args.subjects) if args.subjects is not None else None
    nights = parse_nights(args.nights) if args.nights is not None else None
    return subjects, nights


def _cmd_download(args: argparse.Namespace) -> int:
    if args.dataset in ("sample", "synthetic"):
        what = ("the sample night is bundled with sleeplib (rebuild it with `sleeplib sample`)"
                if args.dataset == "sample" else "synthetic data are generated, not downloaded")
        print(f"nothing to download: {what}")
        return 0
    if args.dataset == "shhs":
        raise CommandError(
            "SHHS cannot be downloaded by sleeplib (NSRR requires a data access agreement); download it "
            "with NSRR's tools and run `sleeplib prepare --dataset shhs --shhs-dir FOLDER`"
        )
    from sleeplib.data.download import fetch_records_status, resolve_mirror
    from sleeplib.data.records import select_records

    subjects, nights = _selection(args)
    table = select_records(args.dataset, subjects=subjects, nights=nights)
    source = resolve_mirror(args.mirror)
    print(f"fetching {len(table)} night(s) of {args.dataset} from {source}", file=sys.stderr)
    fetched = fetch_records_status(table, data_dir=args.data_dir, mirror=source, progress=True,
                                   retries=args.retries)
    rows = []
    for night, row in zip(fetched, table.itertuples(index=False)):
        status = "downloaded" if "downloaded" in (night.psg_status, night.hyp_status) else "present"
        rows.append({"record": night.record, "subject": row.subject, "night": row.night,
                     "psg_MB": f"{night.psg.stat().st_size / 1e6:.1f}", "status": status})
    _print_table(rows, ["record", "subject", "night", "psg_MB", "status"])
    n_new = sum(r["status"] == "downloaded" for r in rows)
    folder = fetched[0].psg.parent.parent if fetched else None
    print(f"{len(rows)} nights verified (SHA256) in {folder}: {n_new} downloaded, {len(rows) - n_new} already present")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "shhs" and args.shhs_dir is None:
        raise CommandError("--dataset shhs needs --shhs-dir FOLDER (NSRR's SHHS EDF and XML files)")
    subjects, nights = _selection(args)
    prepare = _lazy("sleeplib.data.prepare", "prepare")
    paths = prepare(args.dataset, subjects=subjects, nights=nights, channels=tuple(args.channels) if args.channels else None,
                    data_dir=args.data_dir, mirror=args.mirror, n_jobs=args.jobs, progress=True,
                    shhs_dir=args.shhs_dir)
    paths = [Path(p) for p in paths]
    rows = [{"night": p.stem, "epochs": _count_epochs(p), "file": p.name} for p in paths]
    _print_table(rows, ["night", "epochs"])
    folder = paths[0].parent if paths else None
    print(f"{len(paths)} nights of {args.dataset} prepared in {folder}")
    return 0


def _count_epochs(path: Path) -> str:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return str(len(npz["y"]))
    except (OSError, KeyError, ValueError):
        return "?"


def _cmd_sample(args: argparse.Namespace) -> int:
    build_sample = _lazy("sleeplib.data.sample", "build_sample")
    result = build_sample(mirror=args.mirror, data_dir=args.data_dir)
    print(f"sample written: {result}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    workbook_main = _lazy("sleeplib.workbook", "main")
    try:
        code = workbook_main(list(args.workbook_args))
    except SystemExit as exc:  # its argparse exits on --help and on usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code or 0)


def _lazy(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:  # includes a missing optional dependency (papermill, mne, ...)
        raise CommandError(f"cannot import {module}.{name} ({exc}); is sleeplib installed with its extras?") from exc
    except AttributeError as exc:
        raise CommandError(f"{module} has no {name}; this sleeplib checkout is incomplete") from exc


_COMMANDS = {"download": _cmd_download, "prepare": _cmd_prepare, "sample": _cmd_sample, "run": _cmd_run}


def _is_user_error(exc: BaseException) -> bool:
    """Expected failures get one line; anything else is a bug and keeps its traceback."""
    if isinstance(exc, _USER_ERRORS + (CommandError,)):
        return True
    return any(cls.__module__.startswith("sleeplib.") for cls in type(exc).__mro__ if cls is not object)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # KeyError-style reprs and FileNotFoundError(errno, msg, name) become readable.
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 1 on a reported error, 2 on bad usage, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `run` belongs to sleeplib.workbook, options included (argparse's REMAINDER
    # would still try to match options such as --profile against sleeplib's own).
    first_word = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    workbook_args: list[str] = []
    if first_word is not None and argv[first_word] == "run":
        argv, workbook_args = argv[: first_word + 1], argv[first_word + 1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command == "run":
        args.workbook_args = workbook_args
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("sleeplib: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not _is_user_error(exc):
            raise
        print(f"sleeplib: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
