import errno
import os

import pytest

from hicache_ha.backends.base import BackendContext
from hicache_ha.backends.errors import BackendError, BackendRejected, BackendUnavailable
from hicache_ha.backends.file_backend import FileBackend
from hicache_ha.config import parse


def make(tmp_path, **extra):
    cfg = parse({"backends": [{"name": "f", "type": "file", "path": str(tmp_path / "d"), **extra}]},
                environ={}).backends[0]
    return FileBackend.from_config(cfg, BackendContext())


def all_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    b = make(tmp_path)
    b.set([f"k{i}" for i in range(20)], [b"x" * 1000] * 20)
    files = all_files(tmp_path / "d")
    assert len(files) == 20 and all(f.endswith(".page") for f in files)


def test_capacity_evicts_least_recently_used(tmp_path):
    b = make(tmp_path, capacity_bytes=3000)
    b.set(["a", "b", "c"], [b"1" * 1000] * 3)
    b.get(["a"])  # a is now the most recently used
    b.set(["d"], [b"4" * 1000])
    assert b.exists(["a"]) == 1 and b.exists(["d"]) == 1
    assert b.get(["b"]) == [None]
    assert sum(os.path.getsize(f) for f in all_files(tmp_path / "d")) <= 3000


def test_capacity_counts_pages_already_on_disk(tmp_path):
    make(tmp_path).set(["old1", "old2"], [b"o" * 1000] * 2)
    b = make(tmp_path, capacity_bytes=2500)
    b.set(["new"], [b"n" * 1000])
    assert sum(os.path.getsize(f) for f in all_files(tmp_path / "d")) <= 2500


def test_a_page_larger_than_the_capacity_is_rejected(tmp_path):
    with pytest.raises(BackendRejected, match="exceeds capacity"):
        make(tmp_path, capacity_bytes=10).set(["k"], [b"x" * 100])


def test_unsafe_keys_are_hashed_into_safe_names(tmp_path):
    b = make(tmp_path)
    b.set(["../../etc/passwd"], [b"no"])
    assert bytes(b.get(["../../etc/passwd"])[0]) == b"no"
    assert all(str(tmp_path / "d") in f for f in all_files(tmp_path))


@pytest.mark.parametrize("code, kind, words", [
    (errno.ENOSPC, BackendRejected, "free space"),
    (errno.EDQUOT, BackendRejected, "quota"),
    (errno.EACCES, BackendError, "owner, mode"),
    (errno.EIO, BackendError, "write"),
    (errno.ENOTCONN, BackendUnavailable, "mount"),
])
def test_os_errors_map_to_outcome_kinds_and_leave_nothing_behind(tmp_path, monkeypatch, code, kind, words):
    b = make(tmp_path)
    b.set(["warm"], [b"w"])

    def failing_writev(fd, bufs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "writev", failing_writev)
    with pytest.raises(kind, match=words) as info:
        b.set(["k"], [b"x" * 10])
    assert type(info.value) is kind
    assert b.exists(["k"]) == 0
    assert not [f for f in all_files(tmp_path / "d") if f.endswith(".tmp")]
