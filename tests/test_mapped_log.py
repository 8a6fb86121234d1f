"""Logs written through a shared map (version 2 and 3): free space, torn stores, closes, marks."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import construct
import pytest

from l2_stores import CannotLoadStore, Mode, make_indexable
from l2_stores.engine import log
from l2_stores.engine.accel import accelerated_mappable
from l2_stores.engine.framing import HEADER_SIZE, Expected

Store = make_indexable("mapped", construct.Bytes(8), construct.Bytes(8))
RECORD = 1 + 8 + 8 + 4


def mappable(directory: Path) -> bool:
    """Whether logs in ``directory`` are written through a map here (accelerator, file system)."""
    if accelerated_mappable is None:
        return False
    fd = os.open(directory, os.O_RDONLY)
    try:
        return accelerated_mappable(fd)
    finally:
        os.close(fd)


needs_map = pytest.mark.skipif(
    not mappable(Path(os.environ.get("TMPDIR", "/tmp"))),
    reason="logs are written, not mapped, without the accelerator or on this file system",
)


def key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def only_log(directory: Path) -> Path:
    (found,) = directory.glob("log.*")
    return found


def log_version(path: Path) -> int:
    return int(struct.unpack_from("<H", path.read_bytes(), 8)[0])


@needs_map
def test_a_new_log_is_the_current_version_allocated_ahead_and_mapped(tmp_path: Path) -> None:
    with Store.load(tmp_path / "s", index_buffer_size=100) as store:
        writer = store._engine._log
        assert writer is not None
        ahead = 3 * 100 * RECORD  # LOG_CAP_FACTOR times the buffer
        assert writer._mapped_size == HEADER_SIZE + ahead
        assert os.path.getsize(writer.path) == HEADER_SIZE + ahead
        for i in range(10):
            store.add(key(i), key(i))
        assert writer._end == HEADER_SIZE + 10 * RECORD
    path = only_log(tmp_path / "s")
    assert log_version(path) == log.LOG_VERSION
    # the close cuts the free space, after a mark (the log was fsynced)
    assert path.stat().st_size == HEADER_SIZE + 11 * RECORD
    assert path.read_bytes()[-RECORD] == log.OP_MARK | log.SYNCED
    with Store.load(tmp_path / "s", Mode.READ_ONLY) as again:
        assert dict(again.items()) == {key(i): key(i) for i in range(10)}


@needs_map
def test_a_reader_beside_a_mapped_writer_sees_each_add_after_sync(tmp_path: Path) -> None:
    with (
        Store.load(tmp_path / "s", index_buffer_size=1000) as writer,
        Store.load(tmp_path / "s", Mode.READ_ONLY) as reader,
    ):
        for i in range(50):
            writer.add(key(i), key(i + 1))
            reader.sync()
            assert reader.find(key(i)) == key(i + 1)
            assert reader.find(key(i + 1)) is None


def test_records_past_the_map_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A map that ends mid-record: records that fit are stored with zeros after
    them, the rest are written past it; all load, in order."""
    monkeypatch.setattr(log, "MAP_LIMIT", HEADER_SIZE + 3 * RECORD + RECORD // 2)
    with Store.load(tmp_path / "s", index_buffer_size=1000) as store:
        for i in range(10):
            store.add(key(i), key(i))
        store.add(key(2), b"replaced")
    assert only_log(tmp_path / "s").stat().st_size == HEADER_SIZE + 12 * RECORD  # and a mark
    with Store.load(tmp_path / "s") as again:
        expected = {key(i): key(i) for i in range(10)}
        expected[key(2)] = b"replaced"
        assert dict(again.items()) == expected


def test_a_bad_record_before_other_records_is_corruption(tmp_path: Path) -> None:
    """Free space after the damage does not make it torn: the close's mark follows it."""
    directory = tmp_path / "s"
    with Store.load(directory) as store:
        for i in range(5):
            store.add(key(i), key(i))
    path = only_log(directory)
    raw = bytearray(path.read_bytes() + bytes(10 * RECORD))  # as if killed: free space stays
    raw[HEADER_SIZE + 3 * RECORD + 2] ^= 0x10  # the fourth of five records
    path.write_bytes(bytes(raw))
    for mode in (Mode.READ_ONLY, Mode.READ_WRITE):
        with pytest.raises(CannotLoadStore, match=f"offset {HEADER_SIZE + 3 * RECORD}"):
            Store.load(directory, mode)
    assert path.read_bytes() == bytes(raw), "a refused load touched the log"


def test_a_bad_last_record_of_a_closed_log_is_corruption(tmp_path: Path) -> None:
    """The close's mark after it says it was fsynced: not a store cut short."""
    directory = tmp_path / "s"
    with Store.load(directory) as store:
        for i in range(5):
            store.add(key(i), key(i))
    path = only_log(directory)
    original = path.read_bytes()
    raw = bytearray(original)
    raw[-RECORD - 1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CannotLoadStore, match=f"offset {HEADER_SIZE + 4 * RECORD}"):
        Store.load(directory, Mode.READ_ONLY)
    # The mark itself binds nothing: damaged, it is a record a kill may cut short.
    raw = bytearray(original)
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with Store.load(directory) as store:
        assert dict(store.items()) == {key(i): key(i) for i in range(5)}


KILLED_MID_STORE_CHILD = """
import os, sys, time
import construct
from l2_stores import make_indexable
Store = make_indexable("mapped", construct.Bytes(8), construct.Bytes(8))
store = Store.load(sys.argv[1], index_buffer_size=1000)
for i in range(20):
    store.add(i.to_bytes(8, "big"), i.to_bytes(8, "big"))
writer = store._engine._log
# what a kill in the middle of the 21st store leaves: the op, the key and
# half the value are in the page cache, the rest of the record is not
os.pwrite(writer._fd, b"\\x01" + (99).to_bytes(8, "big") + b"\\x07" * 4, writer._end)
print(writer._mapped_size, flush=True)
time.sleep(60)
"""


def test_a_store_cut_short_by_a_kill_is_dropped_then_written_over(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_STORE_CHILD, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    mapped = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait()
    path = only_log(directory)
    if mapped:
        assert path.stat().st_size > HEADER_SIZE + 21 * RECORD, "the free space stays"
    expected = {key(i): key(i) for i in range(20)}
    scan = log.read_log(str(path), Expected("mapped", 8, 8))
    assert scan.bindings == expected
    assert scan.end == HEADER_SIZE + 20 * RECORD
    if mapped:
        assert scan.torn_bytes == RECORD and scan.free_bytes > 0
    with Store.load(directory, Mode.READ_ONLY) as reader:
        assert dict(reader.items()) == expected
    with Store.load(directory) as store:
        assert dict(store.items()) == expected
        store.add(key(99), key(99))
    assert path.stat().st_size == HEADER_SIZE + 22 * RECORD  # and the close's mark
    with Store.load(directory) as again:
        assert dict(again.items()) == {**expected, key(99): key(99)}


def set_log_version(path: Path, version: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:10] = struct.pack("<H", version)
    raw[60:64] = zlib.crc32(bytes(raw[:60])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def test_a_version_1_log_is_read_and_appended_to_without_a_map(tmp_path: Path) -> None:
    """Logs of the first format are still loaded; they stay version 1 and get no free space."""
    directory = tmp_path / "s"
    with Store.load(directory) as store:
        for i in range(5):
            store.add(key(i), key(i))
    path = only_log(directory)
    path.write_bytes(path.read_bytes()[:-RECORD])  # a version 1 log has no mark
    set_log_version(path, 1)
    with Store.load(directory) as store:
        writer = store._engine._log
        assert writer is not None and writer._mapped_size == 0
        assert path.stat().st_size == HEADER_SIZE + 5 * RECORD
        for i in range(5, 8):
            store.add(key(i), key(i))
    assert log_version(path) == 1
    assert path.stat().st_size == HEADER_SIZE + 8 * RECORD, "no mark in a version 1 log"
    # a half-written record followed by zeros: what a kill or a power loss leaves
    raw = path.read_bytes()
    path.write_bytes(raw + raw[HEADER_SIZE : HEADER_SIZE + 10] + bytes(2 * RECORD))
    with Store.load(directory, Mode.READ_ONLY) as reader:
        assert len(dict(reader.items())) == 8


def test_check_log_notes_free_space_and_a_torn_store(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with Store.load(directory) as store:
        for i in range(3):
            store.add(key(i), key(i))
    path = only_log(directory)
    assert list(log.check_log(str(path))) == []
    raw = path.read_bytes()
    path.write_bytes(raw + bytes(4 * RECORD))
    (note,) = log.check_log(str(path))
    assert not note.problem and "free" in note.what
    path.write_bytes(raw + raw[HEADER_SIZE : HEADER_SIZE + 7] + bytes(4 * RECORD))
    (note,) = log.check_log(str(path))
    assert not note.problem and "half-written" in note.what
    bad = raw[HEADER_SIZE : HEADER_SIZE + RECORD - 1] + b"\x01"
    path.write_bytes(raw + bad + raw[-5:])  # never fsynced: what a power loss leaves
    (note,) = log.check_log(str(path))
    assert not note.problem and "power loss" in note.what
    path.write_bytes(raw + bad + raw[-RECORD:])  # a mark after it: it was fsynced
    (problem,) = log.check_log(str(path))
    assert problem.problem


def crafted_log(path: Path, records: list[bytes], tail: bytes) -> None:
    """A version 3 log of ``records`` (whole, valid) followed by ``tail``."""
    writer = log.LogWriter.create(str(path), 0, Expected("mapped", 8, 8), fsync=False)
    writer.close()
    path.write_bytes(path.read_bytes()[:HEADER_SIZE] + b"".join(records) + tail)


def record(i: int, op: int = 1) -> bytes:
    body = bytes([op]) + key(i) + key(i + 100)
    return body + zlib.crc32(body).to_bytes(4, "little")


@pytest.mark.parametrize("count", range(8))
def test_the_end_of_the_records_is_found_across_read_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """Chunks of three records: the stop may fall on any record of a chunk, or on the
    record after it, which is read with the chunk to tell a torn store from corruption
    (a SYNCED record after a bad one)."""
    monkeypatch.setattr(log, "READ_CHUNK", 3 * RECORD)
    expected_bindings = {key(i): key(i + 100) for i in range(count)}
    records = [record(i) for i in range(count)]
    path = tmp_path / "log.00000000"
    wanted = Expected("mapped", 8, 8)
    half = record(99)[:9] + bytes(RECORD - 9)
    cases = {
        "free": (bytes(5 * RECORD), 0, 5 * RECORD),
        "half-stored": (half + bytes(4 * RECORD), RECORD, 4 * RECORD),
        "half-stored-at-the-map-end": (half + bytes(1), RECORD, 1),
        "cut-short": (record(99)[:7], 7, 0),
        "nothing": (b"", 0, 0),
    }
    for tail, torn, free in cases.values():
        crafted_log(path, records, tail)
        scan = log.read_log(str(path), wanted)
        assert scan.bindings == expected_bindings
        assert (scan.end, scan.torn_bytes, scan.free_bytes) == (
            HEADER_SIZE + count * RECORD,
            torn,
            free,
        )
    bad = record(99)[:-1] + b"\x00"
    for tail in (bad, bad + record(98), bad + bytes(RECORD) + record(98)):
        crafted_log(path, records, tail)
        scan = log.read_log(str(path), wanted)  # never fsynced: the log ends before it
        assert scan.bindings == expected_bindings
        assert scan.torn_bytes + scan.free_bytes == len(tail)
    synced = record(98, log.OP_SET | log.SYNCED)
    for tail in (bad + synced, bad + record(97) + synced):
        crafted_log(path, records, tail)
        with pytest.raises(CannotLoadStore, match=f"offset {HEADER_SIZE + count * RECORD}"):
            log.read_log(str(path), wanted)


def test_a_zero_record_ends_a_log_never_fsynced(tmp_path: Path) -> None:
    """A power loss without fsync can leave a page of the free space unwritten before
    one that was written: the log ends at the first zero record (the state of a
    moment before the loss), the check notes the bytes after it, and the writer
    cuts them off. Before the close's mark, the same zeros are corruption."""
    directory = tmp_path / "s"
    with Store.load(directory) as store:
        for i in range(10):
            store.add(key(i), key(i))
    path = only_log(directory)
    closed = bytearray(path.read_bytes())
    closed[HEADER_SIZE + 4 * RECORD : HEADER_SIZE + 5 * RECORD] = bytes(RECORD)
    path.write_bytes(bytes(closed))
    for mode in (Mode.READ_ONLY, Mode.READ_WRITE):
        with pytest.raises(CannotLoadStore, match=f"offset {HEADER_SIZE + 4 * RECORD}"):
            Store.load(directory, mode)
    assert path.read_bytes() == bytes(closed)
    killed = closed[:-RECORD] + bytes(3 * RECORD)  # no mark: as a kill leaves it
    path.write_bytes(bytes(killed))
    (note,) = log.check_log(str(path))
    assert not note.problem and "power loss" in note.what
    with Store.load(directory, Mode.READ_ONLY) as reader:
        assert dict(reader.items()) == {key(i): key(i) for i in range(4)}
    assert path.read_bytes() == bytes(killed)
    with Store.load(directory) as store:
        assert dict(store.items()) == {key(i): key(i) for i in range(4)}
        store.add(key(20), key(20))
    with Store.load(directory) as store:
        assert dict(store.items()) == {**{key(i): key(i) for i in range(4)}, key(20): key(20)}


def test_a_reader_at_the_end_is_not_misled_by_a_record_half_written() -> None:
    """A reader stops before a record a writer is storing: torn for now, read later."""
    assert log._classify_stop(b"", RECORD, 0) == log._Stop()
    assert log._classify_stop(record(1)[:5], RECORD, 5) == log._Stop(torn=5)
    half = record(1)[:9] + bytes(RECORD - 9)
    assert log._classify_stop(half + bytes(RECORD), RECORD, 2 * RECORD) == log._Stop(
        torn=RECORD, free=RECORD
    )


def test_a_forked_child_closing_the_store_leaves_the_parent_log_whole(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with Store.load(directory, index_buffer_size=1000) as store:
        store.add(key(0), key(0))
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                store.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert status == 0
        for i in range(1, 50):
            store.add(key(i), key(i))
    with Store.load(directory) as again:
        assert dict(again.items()) == {key(i): key(i) for i in range(50)}
