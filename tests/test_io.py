import os
import stat

import numpy as np
import pytest

from sleeplib.io import atomic_path, save_json, save_npz


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_until_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": np.arange(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1.5,"b":[0,1]}'


def test_save_npz_roundtrip(tmp_path):
    path = save_npz(tmp_path / "a.npz", x=np.ones(3, np.float32))
    assert path.name == "a.npz"
    np.testing.assert_array_equal(np.load(path)["x"], np.ones(3))
