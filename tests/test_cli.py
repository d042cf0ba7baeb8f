"""Command line: exit codes, one-line errors, summaries, and wiring to prepare/sample/workbook."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sleeplib import cli

# Import pooch now, at collection: its logger keeps the stderr it sees at import, and a stream
# captured by one test's capsys is closed in the next.
import sleeplib.data.download  # noqa: E402,F401  isort:skip

REPO_ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("sleep-edfx:", "\r"))]
    error_lines = [line for line in lines if line.startswith("sleeplib: error: ")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    return error_lines[0]


@pytest.fixture
def fake_module(monkeypatch):
    """Install a stand-in for a sibling module (prepare, sample, workbook) and record its calls."""

    def install(name: str, attr: str, func):
        module = types.ModuleType(name)
        setattr(module, attr, func)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return install


# ---------------------------------------------------------------- download
def test_download_then_present(tmp_path, sleep_edfx_mirror, capsys):
    argv = ["download", "--dataset", "sleep-edf-20", "--subjects", "0", "--nights", "1",
            "--mirror", sleep_edfx_mirror.resolve().as_uri(), "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "SC4001E0" in out and "downloaded" in out and "1 downloaded, 0 already present" in out
    assert (tmp_path / "sleep-edfx" / "1.0.0" / "sleep-cassette" / "SC4001E0-PSG.edf").is_file()
    assert cli.main(argv) == 0
    assert "0 downloaded, 1 already present" in capsys.readouterr().out


def test_download_offline_one_line(tmp_path, closed_port_url, capsys):
    code = cli.main(["download", "--subjects", "0", "--nights", "1", "--mirror", closed_port_url,
                     "--data-dir", str(tmp_path), "--retries", "0"])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"sleeplib: error: could not reach {closed_port_url}")
    assert "--mirror URL or SLEEPLIB_MIRROR" in line and "--dataset sample" in line


def test_download_mirror_from_environment(tmp_path, monkeypatch, closed_port_url, capsys):
    monkeypatch.setenv("SLEEPLIB_MIRROR", closed_port_url)
    assert cli.main(["download", "--subjects", "0", "--nights", "1", "--data-dir", str(tmp_path),
                     "--retries", "0"]) == 1
    assert closed_port_url in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subjects", "13", "--nights", "2"], "subject 13 has no night 2 in sleep-edf-20; available nights: [1]"),
        (["--subjects", "20"], "subject 20 not in sleep-edf-20; available subjects: 0-19"),
        (["--subjects", "0-x"], "invalid subjects '0-x'"),
        (["--nights", "3"], "night 3 does not exist"),
        (["--dataset", "shhs"], "SHHS cannot be downloaded by sleeplib"),
    ],
)
def test_download_bad_selection(tmp_path, capsys, args, message):
    assert cli.main(["download", "--data-dir", str(tmp_path), *args]) == 1
    assert message in _one_error_line(capsys.readouterr().err)


def test_download_unwritable_data_dir(tmp_path, sleep_edfx_mirror, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = cli.main(["download", "--subjects", "0", "--nights", "1", "--mirror", str(sleep_edfx_mirror),
                     "--data-dir", str(blocker / "data")])
    assert code == 1
    assert "pass --data-dir or set SLEEPLIB_DATA" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("dataset", ["sample", "synthetic"])
def test_download_nothing_to_do(dataset, capsys):
    assert cli.main(["download", "--dataset", dataset]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert cli.main(["download", "--dataset", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


# ---------------------------------------------------------------- prepare, sample, run (delegation)
def test_prepare_passes_options_and_summarises(tmp_path, fake_module, capsys):
    calls = []

    def prepare(dataset, **kwargs):
        calls.append((dataset, kwargs))
        out = tmp_path / "SC4001E0.npz"
        np.savez(out, x=np.zeros((3, 3000), np.float32), y=np.array([0, 2, 4]))
        return [out]

    fake_module("sleeplib.data.prepare", "prepare", prepare)
    code = cli.main(["prepare", "--dataset", "sleep-edf-20", "--subjects", "0-1", "5", "--nights", "1",
                     "--channels", "EEG Fpz-Cz", "EEG Pz-Oz", "--data-dir", str(tmp_path), "--mirror", "file:///m",
                     "--jobs", "2"])
    assert code == 0
    dataset, kwargs = calls[0]
    assert dataset == "sleep-edf-20"
    assert kwargs == {"subjects": [0, 1, 5], "nights": [1], "channels": ("EEG Fpz-Cz", "EEG Pz-Oz"),
                      "data_dir": tmp_path, "mirror": "file:///m", "n_jobs": 2, "progress": True, "shhs_dir": None}
    out = capsys.readouterr().out
    assert "SC4001E0" in out and "3" in out and "1 nights of sleep-edf-20 prepared" in out


def test_prepare_defaults(fake_module, monkeypatch):
    monkeypatch.delenv("SLEEPLIB_MIRROR", raising=False)
    seen = {}
    fake_module("sleeplib.data.prepare", "prepare", lambda dataset, **kw: seen.update(kw, dataset=dataset) or [])
    assert cli.main(["prepare", "--dataset", "synthetic"]) == 0
    assert seen["dataset"] == "synthetic" and seen["channels"] is None  # the dataset picks its default channel
    assert seen["subjects"] is None and seen["nights"] is None and seen["mirror"] is None


def test_prepare_shhs_needs_folder(capsys):
    assert cli.main(["prepare", "--dataset", "shhs"]) == 1
    assert "--shhs-dir" in _one_error_line(capsys.readouterr().err)


def test_errors_from_sleeplib_classes_are_one_line(fake_module, capsys):
    error_class = type("PrepareError", (Exception,), {"__module__": "sleeplib.data.prepare"})

    def prepare(dataset, **kwargs):
        raise error_class("channel 'EEG X' not in SC4001E0;\navailable: EEG Fpz-Cz")

    fake_module("sleeplib.data.prepare", "prepare", prepare)
    assert cli.main(["prepare", "--dataset", "sample"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "sleeplib: error: channel 'EEG X' not in SC4001E0; available: EEG Fpz-Cz"
    # --debug shows the traceback instead (the exception propagates)
    with pytest.raises(error_class):
        cli.main(["--debug", "prepare", "--dataset", "sample"])
    with pytest.raises(error_class):
        cli.main(["prepare", "--dataset", "sample", "--debug"])


def test_unexpected_bugs_keep_their_traceback(fake_module):
    def prepare(dataset, **kwargs):
        raise KeyError("bug")

    fake_module("sleeplib.data.prepare", "prepare", prepare)
    with pytest.raises(KeyError):
        cli.main(["prepare", "--dataset", "sample"])


def test_sample_command(fake_module, tmp_path, capsys):
    seen = {}
    fake_module("sleeplib.data.sample", "build_sample", lambda **kw: seen.update(kw) or tmp_path / "sample")
    assert cli.main(["sample", "--mirror", "/m", "--data-dir", str(tmp_path)]) == 0
    assert seen == {"mirror": "/m", "data_dir": tmp_path}
    assert str(tmp_path / "sample") in capsys.readouterr().out


def test_run_passes_arguments_through(fake_module):
    seen = []
    fake_module("sleeplib.workbook", "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["run", "smoke", "--notebooks", "00", "01", "--debug"]) == 3
    assert seen == [["smoke", "--notebooks", "00", "01", "--debug"]]


def test_run_help_is_the_workbooks(fake_module):
    def main(argv):
        raise SystemExit(0)

    fake_module("sleeplib.workbook", "main", main)
    assert cli.main(["run", "--help"]) == 0


# ---------------------------------------------------------------- a real process
def test_subprocess_exit_code_and_single_line():
    proc = subprocess.run(
        [sys.executable, "-m", "sleeplib.cli", "download", "--subjects", "13", "--nights", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "sleeplib: error: subject 13 has no night 2 in sleep-edf-20; available nights: [1]"
