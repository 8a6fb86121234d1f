"""Writes that fail (disk full, no thread to be had) leave the store as it was.

Faults are injected by wrapping ``os`` in the engine modules; each test
checks memory and, after a reload, the disk.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import construct
import pytest
from helpers.faults import FailingFileSystem

import l2_stores.engine.index as index_module
import l2_stores.engine.log as log_module
from l2_stores import (
    CannotWriteToStore,
    StoreError,
    make_indexable,
    make_indexable_removable,
    make_singleton,
)
from l2_stores.engine import filesystem

Store = make_indexable_removable("failures", construct.Bytes(4), construct.Bytes(4))


class FailingOs:
    """``os`` whose named calls raise ENOSPC while ``failures`` is positive."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        function = getattr(os, name)
        if name not in self.names:
            return function

        def failing(*args: Any, **kwargs: Any) -> Any:
            if self.failures > 0:
                self.failures -= 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return function(*args, **kwargs)

        return failing


@pytest.fixture
def failing_log_writes(monkeypatch: pytest.MonkeyPatch) -> FailingOs:
    """Log writes fail while ``failures`` is positive, as on a full disk."""
    fake = FailingOs("pwrite")

    def failing(write: Any) -> Any:
        def write_or_fail(*args: Any) -> Any:
            if fake.failures > 0:
                fake.failures -= 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args)

        return write_or_fail

    monkeypatch.setattr(log_module, "pwrite_all", failing(log_module.pwrite_all))
    monkeypatch.setattr(log_module, "write_framed", failing(log_module.write_framed))
    return fake


def test_a_failed_remove_never_takes_effect_later(
    tmp_path: Path, failing_log_writes: FailingOs
) -> None:
    store = Store.load(tmp_path / "s")
    store.add(b"kkkk", b"v1v1")
    store.add(b"xxxx", b"x1x1", flush=False)  # pending
    failing_log_writes.failures = 1
    with pytest.raises(CannotWriteToStore, match="No space left"):
        store.remove(b"kkkk")
    assert store.find(b"kkkk") == b"v1v1"
    store.flush()  # the pending add goes out, the failed remove does not
    store.close()
    with Store.load(tmp_path / "s") as again:
        assert again.find(b"kkkk") == b"v1v1"
        assert again.find(b"xxxx") == b"x1x1"


def test_a_failed_freeze_keeps_the_pending_records(
    tmp_path: Path, failing_log_writes: FailingOs
) -> None:
    store = Store.load(tmp_path / "s", index_buffer_size=4)
    for i in range(3):
        store.add(bytes([i]) * 4, b"vvvv", flush=False)
    failing_log_writes.failures = 1
    # Fills the log; the freeze's flush fails, is logged, and the add stands.
    store.add(b"\x03" * 4, b"vvvv", flush=False)
    store.add(b"\x04" * 4, b"vvvv", flush=False)  # space is back: freeze, merge
    store.flush()
    store.close()
    with Store.load(tmp_path / "s") as again:
        assert sorted(again.keys()) == [bytes([i]) * 4 for i in range(5)]


def test_no_merge_thread_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.load(tmp_path / "s", index_buffer_size=4)
    real_start = index_module.start_thread

    def refuse(*args: Any) -> int:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(index_module, "start_thread", refuse)
    for i in range(8):  # the 4th add cannot start its merge: logged, the adds stand
        store.add(bytes([i]) * 4, b"vvvv")
    with pytest.raises(CannotWriteToStore, match="merge thread"):
        store.add(b"\x09" * 4, b"vvvv")  # needs room: the frozen log must merge first
    assert store.find(b"\x09" * 4) is None
    monkeypatch.setattr(index_module, "start_thread", real_start)
    store.add(b"\x09" * 4, b"vvvv")
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hung"
    with Store.load(tmp_path / "s") as again:
        assert len(list(again.keys())) == 9


def test_os_errors_surface_as_store_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = make_indexable("oserrors", construct.Bytes(4), construct.Bytes(4))
    fsyncing = plain.load(tmp_path / "a", fsync=True)
    failing = FailingFileSystem("fsync")
    with filesystem.installed(failing):
        failing.failures = 1
        with pytest.raises(CannotWriteToStore):
            fsyncing.flush()
    fsyncing.close()
    broken = FailingOs("listdir")
    broken.failures = 1
    monkeypatch.setattr(index_module.layout, "os", broken)
    with pytest.raises(StoreError, match="No space left"):
        plain.load(tmp_path / "a")


def test_singleton_delete_failure_keeps_cache_truthful(tmp_path: Path) -> None:
    head = make_singleton("head_failures", construct.Bytes(4))
    store = head.load(tmp_path / "head")
    store.write(b"abcd")
    failing = FailingFileSystem("unlink")
    with filesystem.installed(failing):
        failing.failures = 1
        with pytest.raises(CannotWriteToStore, match="cannot delete"):
            store.delete()
    assert store.read() == b"abcd"  # the file is still there
    store.delete()
    assert store.read() is None
    store.close()
    with head.load(tmp_path / "head") as again:
        assert again.read() is None


FILE_SIZE_CHILD = """
import os, resource, signal, sys
import construct
from l2_stores import CannotWriteToStore, make_indexable, make_indexed_file
from l2_stores.engine import log
log.MAP_LIMIT = 0  # the log is written, never mapped: the write is what is cut short

kind, directory, target, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if kind == "indexable":
    cls = make_indexable("fsize", construct.Bytes(4), construct.Bytes(4))
else:
    cls = make_indexed_file("fsize", construct.Bytes(4), construct.GreedyBytes, construct.Bytes(4))
store = cls.load(directory)
if kind == "indexed-warm":  # the next append takes the C path, into reserved blocks
    store.append(b"warm", b"W" * 100, b"hhhh")
before = os.path.getsize(target)
resource.setrlimit(resource.RLIMIT_FSIZE, (before + limit, resource.RLIM_INFINITY))
try:
    if kind == "indexable":
        store.add(b"late", b"LATE")
    else:
        store.append(b"late", b"L" * 100, b"hhhh")
except CannotWriteToStore as error:
    print("refused", "File too large" in str(error), os.path.getsize(target) == before)
store.close()
"""


@pytest.mark.parametrize("kind", ["indexable", "indexed", "indexed-warm"])
def test_a_write_cut_short_by_the_disk_leaves_no_partial_record(tmp_path: Path, kind: str) -> None:
    """A real short write (a file-size limit cuts the record mid-way, then EFBIG):
    the refused write is cut off the file, and the store loads without it."""
    import subprocess
    import sys

    from l2_stores import make_indexed_file

    directory = tmp_path / "store"
    if kind == "indexable":
        cls: Any = make_indexable("fsize", construct.Bytes(4), construct.Bytes(4))
    else:
        cls = make_indexed_file(
            "fsize", construct.Bytes(4), construct.GreedyBytes, construct.Bytes(4)
        )
    with cls.load(directory) as store:
        for i in range(3):
            if kind == "indexable":
                store.add(bytes([i]) * 4, b"vvvv")
            else:
                store.append(bytes([i]) * 4, b"v" * 100, b"hhhh")
    if kind == "indexable":
        target = next(directory.glob("log.*"))
    else:
        target = next(directory.glob("values.*"))
    out = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_CHILD, kind, str(directory), str(target), "5"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["refused", "True", "True"], out.stderr
    with cls.load(directory) as again:
        warm = [b"warm"] if kind == "indexed-warm" else []
        assert sorted(again.keys()) == sorted([bytes([i]) * 4 for i in range(3)] + warm)
        if kind != "indexable":
            assert again.read(b"\x02" * 4) == (b"v" * 100, b"hhhh")
        if warm:
            assert again.read(b"warm") == (b"W" * 100, b"hhhh")


ALLOCATION_REFUSED_CHILD = """
import os, resource, signal, sys
import construct
from l2_stores import make_indexable
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
store = make_indexable("fsize", construct.Bytes(4), construct.Bytes(4)).load(sys.argv[1])
log = store._engine._log
for i in range(20):
    store.add(bytes([i]) * 4, b"vvvv")
print(log._mapped_size, os.path.getsize(log.path))
store.close()
"""


def test_a_log_that_cannot_be_allocated_ahead_is_written(tmp_path: Path) -> None:
    """When the disk refuses the free space a log asks for (a file-size limit here,
    a full disk in life), the log is written with system calls: nothing is
    mapped, nothing is left allocated, and every add lands."""
    import subprocess
    import sys

    directory = tmp_path / "store"
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATION_REFUSED_CHILD, str(directory)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    mapped, size = (int(word) for word in out.stdout.split())
    assert mapped == 0
    assert size == log_module.HEADER_SIZE + 20 * (1 + 4 + 4 + 4)
    cls = make_indexable("fsize", construct.Bytes(4), construct.Bytes(4))
    with cls.load(directory) as again:
        assert dict(again.items()) == {bytes([i]) * 4: b"vvvv" for i in range(20)}
