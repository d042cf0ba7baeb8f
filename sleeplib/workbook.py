"""Run the workbook's notebooks headless and collect their reports.

``run_all.sh [PROFILE]`` calls :func:`main`. Each notebook in ``notebooks/`` is executed in order by
papermill with the parameters of ``params/<PROFILE>.yaml`` (its ``_all`` section, then the section
named after the notebook's stem), written to ``reports/<stem>.ipynb`` and rendered to
``reports/<stem>.html``. A failing notebook still gets its HTML, so the error can be read in the
browser, and the run exits non-zero. ``reports/index.html`` lists every notebook with its status,
duration and the key figures it saved with :func:`save_report`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .io import atomic_path, save_json
from .paths import repo_root, reports_dir as _reports_dir

PROFILES = ("smoke", "sample", "full")


def _root() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError(
            "the workbook's notebooks/ and params/ folders were not found next to the sleeplib package; "
            "run from a source checkout installed with `pip install -e .`"
        )
    return root


def notebooks_dir() -> Path:
    return _root() / "notebooks"


def notebook_paths(names: Sequence[str] | None = None) -> list[Path]:
    """Notebooks in run order (their numeric prefix), optionally only those whose stem starts with a name."""
    paths = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if names:
        chosen = [p for p in paths if any(p.stem == n or p.stem.startswith(n) for n in names)]
        unknown = [n for n in names if not any(p.stem == n or p.stem.startswith(n) for p in paths)]
        if unknown:
            raise ValueError(
                f"no notebook matches {unknown}; available: {[p.stem for p in paths]}"
            )
        paths = chosen
    return paths


def load_profile(profile: str, stem: str) -> dict[str, Any]:
    """Parameters for one notebook: the profile's ``_all`` section updated by its own section."""
    import yaml

    path = _root() / "params" / f"{profile}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}; available: {available}")
    spec = yaml.safe_load(path.read_text()) or {}
    params = dict(spec.get("_all") or {})
    params.update(spec.get(stem) or {})
    params["profile"] = profile
    return params


def save_report(
    stem: str,
    results: dict[str, Any],
    *,
    key: dict[str, Any] | None = None,
    profile: str | None = None,
    synthetic: bool | None = None,
    reports_dir: str | os.PathLike | None = None,
) -> Path:
    """Save a notebook's results as ``reports/<stem>.json``.

    Parameters
    ----------
    stem : str
        The notebook's file stem, e.g. ``"11_attnsleep"``.
    results : dict
        Everything worth keeping (tables as records, figures measured). Training notebooks put a
        bool ``results["comparable_to_paper"]`` here; ``index.html`` flags a False one.
    key : dict, optional
        The few figures shown in ``reports/index.html`` (e.g. ``{"accuracy": 0.84}``).
    profile : str, optional
        The profile the notebook ran with.
    synthetic : bool, optional
        True when the data were generated, so no reader mistakes them for a result.
    """
    payload = {
        "notebook": stem,
        "profile": profile,
        "synthetic_data": synthetic,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sleeplib_version": __version__,
        "key": key or {},
        "results": results,
    }
    return save_json(Path(_reports_dir(reports_dir)) / f"{stem}.json", payload)


@dataclass
class NotebookRun:
    stem: str
    status: str  # "ok" or "failed"
    seconds: float
    error: str = ""
    key: dict[str, Any] = field(default_factory=dict)
    synthetic: bool | None = None
    comparable: bool | None = None  # the notebook's own "comparable_to_paper" verdict, if it gives one


def _to_html(nb_path: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(nb_path, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    with atomic_path(html_path, suffix=".html") as tmp:
        tmp.write_text(body, encoding="utf-8")


def run_notebook(path: Path, profile: str, out_dir: Path, kernel: str = "python3") -> NotebookRun:
    """Execute one notebook with papermill; always write its ``.ipynb`` and ``.html``."""
    import papermill as pm

    stem = path.stem
    params = load_profile(profile, stem)
    params["reports_dir"] = str(out_dir)
    out_nb = out_dir / f"{stem}.ipynb"
    report_json = out_dir / f"{stem}.json"
    if report_json.exists():
        report_json.unlink()  # a stale report must not be shown as this run's
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        pm.execute_notebook(
            str(path),
            str(out_nb),
            parameters=params,
            kernel_name=kernel,
            cwd=str(path.parent),
            progress_bar=False,
            log_output=False,
        )
    except Exception as exc:  # papermill raises PapermillExecutionError; anything else is a failure too
        status = "failed"
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    if out_nb.exists():
        _to_html(out_nb, out_dir / f"{stem}.html")
    key, synthetic, comparable = {}, None, None
    if report_json.exists():
        data = json.loads(report_json.read_text())
        key, synthetic = data.get("key", {}), data.get("synthetic_data")
        comparable = (data.get("results") or {}).get("comparable_to_paper")
    elif status == "ok":
        status, error = "failed", f"the notebook did not write {report_json.name}"
    return NotebookRun(stem, status, seconds, error, key, synthetic, comparable)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_index(runs: Sequence[NotebookRun], profile: str, out_dir: Path) -> Path:
    """``reports/index.html``: one row per notebook with status, duration and key figures."""
    rows = []
    for r in runs:
        colour = "#1a7f37" if r.status == "ok" else "#cf222e"
        figures = ", ".join(f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in r.key.items())
        if r.synthetic:
            figures = "<b>SYNTHETIC DATA (smoke test, not a result)</b>" + (f"; {figures}" if figures else "")
        elif r.comparable is False:
            figures = "<b>not comparable to the paper</b> (see the report's caveats)" + (f"; {figures}" if figures else "")
        rows.append(
            f"<tr><td><a href='{r.stem}.html'>{r.stem}</a></td>"
            f"<td style='color:{colour}'>{r.status}</td><td>{r.seconds:.1f} s</td>"
            f"<td>{figures}</td><td>{html.escape(r.error)}</td></tr>"
        )
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sleep-staging workbook: reports ({profile})</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}} table{{border-collapse:collapse}}</style></head>
<body><h1>Sleep-staging workbook: reports</h1>
<p>Profile <b>{html.escape(profile)}</b>, run {stamp}, sleeplib {__version__}.</p>
<table><tr><th>notebook</th><th>status</th><th>duration</th><th>key figures</th><th>error</th></tr>
{''.join(rows)}
</table></body></html>
"""
    path = out_dir / "index.html"
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def run_workbook(
    profile: str = "sample",
    notebooks: Sequence[str] | None = None,
    reports_dir: str | os.PathLike | None = None,
    kernel: str = "python3",
) -> list[NotebookRun]:
    """Execute the notebooks in order and write the reports and their index."""
    out_dir = _reports_dir(reports_dir)
    load_profile(profile, "")  # fail early on an unknown profile
    runs = []
    for path in notebook_paths(notebooks):
        print(f"[{profile}] {path.stem} ...", flush=True)
        run = run_notebook(path, profile, out_dir, kernel)
        print(f"[{profile}] {path.stem}: {run.status} in {run.seconds:.1f} s {run.error}", flush=True)
        runs.append(run)
        write_index(runs, profile, out_dir)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sleeplib run", description="Execute the workbook's notebooks headless into reports/."
    )
    parser.add_argument("profile", nargs="?", default="sample", help=f"one of {PROFILES} (default sample)")
    parser.add_argument("--notebooks", nargs="+", help="only these notebooks (stems or prefixes, e.g. 00 01)")
    parser.add_argument("--reports-dir", help="where to write reports (default: reports/)")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    try:
        runs = run_workbook(args.profile, args.notebooks, args.reports_dir, args.kernel)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sleeplib run: error: {exc}", file=sys.stderr)
        return 2
    failed = [r.stem for r in runs if r.status != "ok"]
    out = _reports_dir(args.reports_dir)
    print(f"reports: {out / 'index.html'}")
    if failed:
        print(f"failed notebooks: {', '.join(failed)} (see their HTML in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
