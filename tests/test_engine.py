"""Unit tests of the engine modules, each on its own."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path

import construct
import pytest
from helpers.faults import FailingFileSystem, RecordingFileSystem
from helpers.legacy import data_file_bytes
from helpers.runs import assert_runs_tile

from l2_stores.engine import datafile, filesystem, framing, layout, lock, log
from l2_stores.engine import index as index_module
from l2_stores.engine.framing import HEADER_SIZE, Expected, FileHeader
from l2_stores.engine.index import Index
from l2_stores.engine.levels import Span
from l2_stores.errors import (
    CannotLoadStore,
    CannotReadFromStore,
    CannotWriteToStore,
    StoreLockedError,
)

EXPECTED = Expected("unit", key_size=8, value_size=4)


def key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def value(i: int) -> bytes:
    return (i * 31 % 2**32).to_bytes(4, "big")


# ------------------------------------------------------------------ framing


def test_crc_residue_detects_any_single_bit_flip() -> None:
    record = framing.with_crc(b"some record bytes")
    assert framing.crc_ok(record)
    for position in range(len(record)):
        for bit in range(8):
            flipped = bytearray(record)
            flipped[position] ^= 1 << bit
            assert not framing.crc_ok(bytes(flipped))


def test_header_round_trip_and_checks(tmp_path: os.PathLike[str]) -> None:
    header = FileHeader(b"L2SLOG\0\0", 8, 4, 0, generation=7, count=3, fanout_bits=2)
    raw = header.encode()
    assert len(raw) == HEADER_SIZE
    assert framing.decode_header(raw, b"L2SLOG\0\0", "f", EXPECTED) == header
    with pytest.raises(
        CannotLoadStore, match=r"expected key 8 B, value 5 B.*found key 8 B, value 4 B"
    ):
        framing.decode_header(raw, b"L2SLOG\0\0", "f", Expected("unit", 8, 5))
    with pytest.raises(CannotLoadStore, match="not a L2SDATA file"):
        framing.decode_header(raw, b"L2SDATA\0", "f", EXPECTED)
    with pytest.raises(CannotLoadStore, match="cut short"):
        framing.decode_header(raw[:40], b"L2SLOG\0\0", "f", EXPECTED)
    other_version = bytearray(raw)
    other_version[8:10] = (framing.FORMAT_VERSION + 1).to_bytes(2, "little")
    other_version[60:64] = zlib.crc32(bytes(other_version[:60])).to_bytes(4, "little")
    with pytest.raises(CannotLoadStore, match="format version 2 found, version 1 expected"):
        framing.decode_header(bytes(other_version), b"L2SLOG\0\0", "f", EXPECTED)
    flipped = bytearray(raw)
    flipped[30] ^= 1
    with pytest.raises(CannotLoadStore, match="checksum"):
        framing.decode_header(bytes(flipped), b"L2SLOG\0\0", "f", EXPECTED)


# ---------------------------------------------------------------------- log


def test_log_append_and_replay(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "log.00000000")
    writer = log.LogWriter.create(path, 0, EXPECTED, fsync=False)
    for i in range(10):
        writer.append_set(key(i), value(i), flush=i % 3 == 0)
    writer.append_remove(key(4), flush=False)
    writer.append_set(key(2), value(99), flush=True)
    writer.close()
    scan = log.read_log(path, EXPECTED)
    assert scan.records == 12 and scan.torn_bytes == 0
    expected = {key(i): value(i) for i in range(10)}
    expected[key(4)] = None
    expected[key(2)] = value(99)
    assert scan.bindings == expected
    assert os.path.getsize(path) == HEADER_SIZE + 12 * log.record_size(EXPECTED)


@pytest.mark.parametrize("tail", [b"\x01\x02\x03", bytes(17), bytes(log.record_size(EXPECTED))])
def test_log_torn_tail_is_dropped_then_cut(tmp_path: os.PathLike[str], tail: bytes) -> None:
    path = os.path.join(tmp_path, "log.00000000")
    writer = log.LogWriter.create(path, 0, EXPECTED, fsync=False)
    writer.append_set(key(1), value(1), flush=True)
    writer.close()
    with open(path, "ab") as file:
        file.write(tail)
    scan = log.read_log(path, EXPECTED)
    assert scan.bindings == {key(1): value(1)}
    assert scan.torn_bytes + scan.free_bytes == len(tail)
    assert scan.free_bytes == (len(tail) if not any(tail) else 0)  # zeros: free space
    log.LogWriter.reopen(path, scan, EXPECTED, fsync=False).close()
    assert os.path.getsize(path) == HEADER_SIZE + log.record_size(EXPECTED)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("fsync", [False, True])
def test_log_corruption_before_a_durable_point_is_an_error(
    tmp_path: os.PathLike[str], fsync: bool
) -> None:
    # fsync=True: each flush's first record says the records before it were
    # fsynced; fsync=False: the close's mark says so.
    path = os.path.join(tmp_path, "log.00000000")
    writer = log.LogWriter.create(path, 0, EXPECTED, fsync=fsync)
    for i in range(3):
        writer.append_set(key(i), value(i), flush=True)
    writer.mark()
    writer.close()
    size = log.record_size(EXPECTED)
    assert os.path.getsize(path) == HEADER_SIZE + (3 if fsync else 4) * size
    flip_byte(path, HEADER_SIZE + size + 3)
    with pytest.raises(CannotLoadStore, match=f"offset {HEADER_SIZE + size}"):
        log.read_log(path, EXPECTED)


def test_log_damage_after_the_last_durable_point_ends_the_log(
    tmp_path: os.PathLike[str],
) -> None:
    # Never fsynced: what a power loss can leave. The log ends before it,
    # records after it included (a point in time).
    path = os.path.join(tmp_path, "log.00000000")
    writer = log.LogWriter.create(path, 0, EXPECTED, fsync=False)
    for i in range(4):
        writer.append_set(key(i), value(i), flush=True)
    writer.close()
    size = log.record_size(EXPECTED)
    flip_byte(path, HEADER_SIZE + size + 3)
    scan = log.read_log(path, EXPECTED, whole=True)
    assert scan.bindings == {key(0): value(0)}
    assert (scan.end, scan.torn_bytes, scan.damaged) == (HEADER_SIZE + size, 3 * size, True)


def test_a_second_log_beside_an_unsealed_first_is_dropped(tmp_path: os.PathLike[str]) -> None:
    # A freeze seals the frozen log before the next log appears; a frozen log
    # without its seal lost its end to a power loss, and the later log's
    # writes go with it.
    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=1000)
    for i in range(5):
        index.put(key(i), value(i), flush=True)
    index.close()
    second = log.LogWriter.create(os.path.join(directory, layout.log_name(1)), 1, EXPECTED, False)
    second.append_set(key(100), value(100), flush=True)
    second.close()
    recovered = open_index(directory, buffer_size=1000)
    assert dict(recovered.items()) == {key(i): value(i) for i in range(5)}
    recovered.close()
    assert layout.scan(directory).logs == [0]


def seal(path: str) -> None:
    """End an existing log with a seal, as a freeze does."""
    scan = log.read_log(path, EXPECTED, whole=True)
    writer = log.LogWriter.reopen(path, scan, EXPECTED, False)
    writer.seal()
    writer.abandon()


def test_log_resumes_reading_after_earlier_scan(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "log.00000000")
    writer = log.LogWriter.create(path, 0, EXPECTED, fsync=False)
    writer.append_set(key(1), value(1), flush=True)
    scan = log.read_log(path, EXPECTED)
    writer.append_set(key(2), value(2), flush=True)
    writer.append_remove(key(1), flush=True)
    log.read_log(path, EXPECTED, scan=scan)
    assert scan.bindings == {key(1): None, key(2): value(2)}
    assert scan.records == 3
    writer.close()


# ----------------------------------------------------------------- datafile


def write_data(path: str, bindings: dict[bytes, bytes], generation: int = 1) -> None:
    """A data file of the format before runs."""
    with open(path, "wb") as file:
        file.write(data_file_bytes(EXPECTED, bindings, generation, key_hash=datafile.key_hash))


def test_fanout_bits_keep_buckets_small() -> None:
    assert datafile.fanout_bits_for(0) == 0
    assert datafile.fanout_bits_for(datafile.BUCKET_ROWS) == 0
    rows = datafile.BUCKET_ROWS
    for count in (rows + 1, 2 * rows + 1, 1000 * rows, 10**6, 5 * 10**6):
        bits = datafile.fanout_bits_for(count)
        assert count >> bits <= datafile.BUCKET_ROWS < count >> (bits - 1)


@pytest.mark.parametrize("count", [0, 1, 2, 64, 65, 3000, 5000])
def test_datafile_finds_every_key_and_no_other(tmp_path: os.PathLike[str], count: int) -> None:
    path = os.path.join(tmp_path, "data.00000001")
    bindings = {key(i): value(i) for i in range(0, 2 * count, 2)}
    write_data(path, bindings)
    data = datafile.DataFile(path, EXPECTED)
    assert data.count == count
    for i in range(2 * count + 2):
        assert data.find(key(i)) == (value(i) if i % 2 == 0 and i < 2 * count else None)
    assert dict(data.items()) == bindings
    hashes = [datafile.key_hash(k) for k, _ in data.items()]
    assert hashes == sorted(hashes)
    size = os.path.getsize(path)
    bits = datafile.fanout_bits_for(count)
    assert size == HEADER_SIZE + count * (4 + 8 + 4 + 4) + 8 * (2**bits + 1) + 4 * 2**bits + 4
    data.close()


def test_datafile_handles_hash_collisions(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A made-up hash: every key of the same first byte collides.
    monkeypatch.setattr(datafile, "key_hash", lambda k: k[0])
    bindings = {bytes([i % 3]) + key(i)[1:]: value(i) for i in range(200)}
    path = os.path.join(tmp_path, "data.00000001")
    write_data(path, bindings)
    data = datafile.DataFile(path, EXPECTED)
    for k, v in bindings.items():
        assert data.find(k) == v
    assert data.find(b"\x01" + bytes(7)) is None
    data.close()


def test_datafile_rejects_wrong_size_and_fanout(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "data.00000001")
    write_data(path, {key(i): value(i) for i in range(500)})
    original = Path(path).read_bytes()
    with open(path, "ab") as file:
        file.write(b"x")
    with pytest.raises(CannotLoadStore, match="expected for 500 rows"):
        datafile.DataFile(path, EXPECTED)
    corrupted = bytearray(original)
    corrupted[-20] ^= 1  # inside the bucket checksums
    Path(path).write_bytes(corrupted)
    with pytest.raises(CannotLoadStore, match="fan-out checksum"):
        datafile.DataFile(path, EXPECTED)


def test_datafile_read_errors_carry_offsets(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "data.00000001")
    bindings = {key(i): value(i) for i in range(100)}
    write_data(path, bindings)
    raw = bytearray(Path(path).read_bytes())
    rows_at = HEADER_SIZE + 4 * 100
    raw[rows_at + 9] ^= 0x10  # value byte of row 0
    Path(path).write_bytes(raw)
    data = datafile.DataFile(path, EXPECTED)
    first_key = next(iter(sorted(bindings, key=lambda k: (datafile.key_hash(k), k))))
    with pytest.raises(CannotReadFromStore, match=f"row 0 checksum mismatch .*offset {rows_at}"):
        data.find(first_key)
    data.close()
    raw[rows_at + 9] ^= 0x10
    raw[HEADER_SIZE + 2] ^= 0x01  # hash column
    Path(path).write_bytes(raw)
    data = datafile.DataFile(path, EXPECTED)
    with pytest.raises(CannotReadFromStore, match="hash column checksum"):
        data.find(first_key)
    data.close()


# ------------------------------------------------------------------- layout


def test_layout_scan_sorts_and_ignores_foreign_files(tmp_path: os.PathLike[str]) -> None:
    for name in [
        layout.data_name(3),
        layout.data_name(12),
        layout.log_name(12),
        layout.log_name(13),
        layout.temporary_name(14),
        "log.00000015.tmp",
        "notes.txt",
        "data.abc",
        layout.LOCK,
    ]:
        Path(tmp_path, name).touch()
    listing = layout.scan(os.fspath(tmp_path))
    assert listing.data == [3, 12]
    assert listing.logs == [12, 13]
    assert sorted(listing.temporaries) == ["data.00000014.tmp", "log.00000015.tmp"]
    assert listing.data_generation == 12


# --------------------------------------------------------------------- lock


def test_lock_is_exclusive_and_records_the_pid(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "lock")
    first = lock.WriterLock(path, "unit", os.fspath(tmp_path))
    assert lock.is_locked(path)
    assert lock.holder_pid(path) == os.getpid()
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        lock.WriterLock(path, "unit", os.fspath(tmp_path))
    first.release()
    assert not lock.is_locked(path)
    lock.WriterLock(path, "unit", os.fspath(tmp_path)).release()


def test_lock_file_is_rewritten_in_place_and_only_when_it_names_someone_else(
    tmp_path: os.PathLike[str],
) -> None:
    path = os.path.join(tmp_path, "lock")
    previous = os.umask(0o002)
    try:
        lock.WriterLock(path, "unit", os.fspath(tmp_path)).release()
    finally:
        os.umask(previous)
    assert os.stat(path).st_size == lock.LOCK_FILE_SIZE
    assert os.stat(path).st_mode & 0o777 == 0o664  # created as open() would, under the umask
    os.utime(path, ns=(10**9, 10**9))
    lock.WriterLock(path, "unit", os.fspath(tmp_path)).release()  # same pid: not written
    assert os.stat(path).st_mtime_ns == 10**9
    with open(path, "r+b") as file:  # another holder's record, then junk past it
        file.write(b"\xff" * 12 + (os.getpid() + 1).to_bytes(4, "little") + b"junk" + b"tail")
    assert lock.holder_pid(path) is None
    lock.WriterLock(path, "unit", os.fspath(tmp_path)).release()
    assert os.stat(path).st_size == lock.LOCK_FILE_SIZE
    assert lock.holder_pid(path) == os.getpid()
    with open(path, "wb"):  # emptied
        pass
    held = lock.WriterLock(path, "unit", os.fspath(tmp_path))
    assert lock.holder_pid(path) == os.getpid()
    held.release()


# -------------------------------------------------------------------- index


def open_index(directory: str, buffer_size: int = 4, readonly: bool = False) -> Index:
    return Index(directory, EXPECTED, readonly=readonly, buffer_size=buffer_size)


def test_index_merges_and_recovers(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "index")
    index = open_index(directory)
    for i in range(50):
        index.put(key(i), value(i), flush=True)
    index.remove(key(7), flush=True)
    index.wait_merge()
    assert index.generation > 0
    assert index.get(key(7)) is None and index.get(key(8)) == value(8)
    index.close()
    listing = layout.scan(directory)
    assert listing.runs and listing.logs == [listing.runs[-1].hi + 1]
    again = open_index(directory)
    assert dict(again.items()) == {key(i): value(i) for i in range(50) if i != 7}
    again.close()


def test_index_restarts_a_merge_cut_short(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=1000)
    for i in range(30):
        index.put(key(i), value(i), flush=True)
    index.close()
    # What a kill during a merge leaves: the first log sealed, a second log
    # beside it and a half-written run.
    seal(os.path.join(directory, layout.log_name(0)))
    second = log.LogWriter.create(os.path.join(directory, layout.log_name(1)), 1, EXPECTED, False)
    second.append_set(key(100), value(100), flush=True)
    second.append_set(key(3), value(333), flush=True)
    second.close()
    with open(os.path.join(directory, layout.temporary_run_name(Span(0, 0))), "wb") as file:
        file.write(b"half a run")
    recovered = open_index(directory, buffer_size=1000)
    recovered.wait_merge()
    model = {key(i): value(i) for i in range(30)}
    model[key(100)] = value(100)
    model[key(3)] = value(333)
    assert dict(recovered.items()) == model
    listing = layout.scan(directory)
    # the merge prepared the next log under a temporary name; close deletes it
    assert listing.runs == [Span(0, 0)] and listing.logs == [1]
    assert listing.temporaries == [layout.log_name(2) + ".tmp"]
    recovered.close()
    assert layout.scan(directory).temporaries == []


def test_index_freezes_into_the_log_a_merge_prepared(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=10)
    for i in range(10):  # the first freeze creates log 1; its merge prepares log 2
        index.put(key(i), value(i), flush=True)
    index.wait_merge()
    assert layout.scan(directory).temporaries == [layout.log_name(2) + ".tmp"]

    def no_create() -> None:
        raise AssertionError("the writer created a log although a spare was ready")

    index.hooks.add("create_log", no_create)
    for i in range(10, 20):  # the second freeze renames the spare into place
        index.put(key(i), value(i), flush=True)
    index.wait_merge()
    assert layout.scan(directory).logs == [2]
    assert log.read_log(os.path.join(directory, layout.log_name(2)), EXPECTED).generation == 2
    index.put(key(20), value(20), flush=True)
    index.close()
    again = open_index(directory, buffer_size=10)
    assert dict(again.items()) == {key(i): value(i) for i in range(21)}
    again.close()
    assert layout.scan(directory).temporaries == []


def test_index_creates_the_log_itself_when_no_spare_can_be_prepared(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = os.path.join(tmp_path, "index")
    created: list[int] = []

    def no_room() -> None:
        raise OSError("no room for a spare")

    index = open_index(directory, buffer_size=5)
    index.hooks.add("prepare_spare", no_room)
    index.hooks.add("create_log", lambda: created.append(index.generation))
    for i in range(30):
        index.put(key(i), value(i), flush=True)
        if i % 5 == 4:
            index.wait_merge()
    assert layout.scan(directory).temporaries == []  # no spare was ever made
    index.close()
    # one log per freeze, each created by the writer itself (after its run is in)
    assert len(created) == 6
    again = open_index(directory, buffer_size=5)
    assert dict(again.items()) == {key(i): value(i) for i in range(30)}
    again.close()


def test_a_log_that_cannot_be_created_leaves_the_store_writable(
    tmp_path: os.PathLike[str],
) -> None:
    directory = os.path.join(tmp_path, "index")
    failures = [1]

    def no_room() -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "no room for a log")

    index = open_index(directory, buffer_size=100)  # no flush: the GC freezes the log
    for i in range(10):
        index.put(key(i), value(i), flush=True)
    index.begin_gc()
    index.hooks.add("create_log", no_room)
    with pytest.raises(CannotWriteToStore, match="no room for a log"):
        index.collect({})
    assert failures == [0]
    for i in range(10, 20):  # into the log the GC could not freeze
        index.put(key(i), value(i), flush=True)
    index.close()
    again = open_index(directory, buffer_size=100)
    assert dict(again.items()) == {key(i): value(i) for i in range(20)}
    again.close()


def test_a_seal_that_fails_leaves_the_store_writable(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "index")
    failing = FailingFileSystem("fsync")

    armed = [True]

    def fail_the_seal() -> None:  # the next log's header is fsynced, then the seal
        if armed.pop() if armed else False:
            failing.passes, failing.failures = 1, 1

    index = Index(directory, EXPECTED, readonly=False, buffer_size=4, fsync=True)
    index.hooks.add("create_log", fail_the_seal)
    with filesystem.installed(failing):
        for i in range(4):  # the fourth fills the log: its freeze fails, logged
            index.put(key(i), value(i), flush=True)
        assert (failing.passes, failing.failures) == (0, 0)
        assert layout.scan(directory).logs == [0]  # the next log went with the seal
        for i in range(4, 12):
            index.put(key(i), value(i), flush=True)
    index.close()
    again = open_index(directory)
    assert dict(again.items()) == {key(i): value(i) for i in range(12)}
    again.close()


def test_a_merge_syncs_the_directory_before_its_data_file_supersedes_the_log(
    tmp_path: os.PathLike[str],
) -> None:
    # Without fsync, a spare is renamed into place with no directory sync: the
    # merge's sync must come before its rename, or a power loss could keep
    # the run of log.D and lose log.D+1's name.
    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=5)
    recorder = RecordingFileSystem()
    with filesystem.installed(recorder):
        for i in range(5):
            index.put(key(i), value(i), flush=True)
        index.wait_merge()
    index.close()
    events = [
        f"{call} {what}" for call, what in recorder.calls if call in ("rename", "fsync_directory")
    ]
    data = layout.run_name(Span(0, 0))
    assert events[-3:] == ["fsync_directory index", f"rename {data}", "fsync_directory index"]


def test_with_fsync_the_writer_syncs_the_directory_of_a_spare_it_installs(
    tmp_path: os.PathLike[str],
) -> None:
    directory = os.path.join(tmp_path, "index")
    index = Index(directory, EXPECTED, readonly=False, buffer_size=5, fsync=True)
    for i in range(5):
        index.put(key(i), value(i), flush=True)
    index.wait_merge()
    recorder = RecordingFileSystem()
    with filesystem.installed(recorder):
        for i in range(5, 10):  # this freeze installs the spare log 2
            index.put(key(i), value(i), flush=True)
        synced_by = [
            thread for call, thread in recorder.threads if call == "fsync_directory"
        ]
        assert synced_by[:1] == [threading.current_thread().name]
        assert recorder.named("rename")[:1] == [layout.log_name(2)]
        index.wait_merge()
    index.close()


def test_a_spare_that_cannot_be_prepared_never_stops_the_merge(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[int] = []

    def no_memory() -> None:
        refused.append(1)
        raise MemoryError("no memory for a spare")

    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=5)
    index.hooks.add("prepare_spare", no_memory)
    done = threading.Event()

    def writer() -> None:
        for i in range(30):
            index.put(key(i), value(i), flush=True)
        index.wait_merge()
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    thread.join(60)
    assert done.is_set(), "a writer hangs on a merge whose thread died"
    assert refused  # the flushes tried to prepare spares, and failed
    assert dict(index.items()) == {key(i): value(i) for i in range(30)}
    index.close()


def test_index_readonly_sees_flushed_state_after_sync(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "index")
    writer = open_index(directory, buffer_size=3)
    reader = open_index(directory, readonly=True)
    assert dict(reader.items()) == {}
    model = {}
    for round_ in range(5):
        for i in range(7):
            k = key(round_ * 5 + i)
            writer.put(k, value(round_), flush=True)
            model[k] = value(round_)
        reader.sync()
        assert dict(reader.items()) == model
    writer.close()
    reader.close()


def test_index_readonly_on_missing_directory_creates_nothing(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "nothing", "here")
    reader = open_index(directory, readonly=True)
    assert reader.get(key(1)) is None and list(reader.items()) == []
    reader.sync()
    reader.close()
    assert not os.path.exists(os.path.join(tmp_path, "nothing"))


def test_writers_are_paced_near_the_log_cap_and_wait_at_it(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def held_write() -> None:
        assert release.wait(30), "the test never released the merge"

    directory = os.path.join(tmp_path, "index")
    index = open_index(directory, buffer_size=4)  # paced from 11 records, capped at 12
    index.hooks.add("flush_write", held_write)
    try:
        assert not index.pacing
        for i in range(4):  # the fourth put freezes the log and starts the (held) merge
            index.put(key(i), value(i), flush=True)
        assert not index.pacing  # the new log is far from its cap: no store need call reserve
        waits: list[float | None] = []
        real_wait = index._merge_ready.wait

        def recorded_wait(timeout: float | None = None) -> bool:
            waits.append(timeout)
            return real_wait(timeout)

        monkeypatch.setattr(index._merge_ready, "wait", recorded_wait)
        for i in range(4, 15):  # the new log from 0 to 11 records: below the pace, no wait
            index.reserve()
            index.put(key(i), value(i), flush=True)
            assert index.pacing == (i == 14)  # from 11 records on, stores call reserve
        assert waits == []
        index.reserve()  # 11 records: one short wait for the merge, which is still held
        assert waits == [index_module.PACE_SECONDS]
        index.put(key(15), value(15), flush=True)  # 12 records: the cap
        waiter = threading.Thread(target=index.reserve)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "a writer at the cap must wait for the merge"
        assert waits[-1] is None
        release.set()
        waiter.join(30)
        assert not waiter.is_alive()
        index.put(key(16), value(16), flush=True)  # switches the merge in, freezes the full log
        index.wait_merge()
        assert all(index.get(key(i)) == value(i) for i in range(17))
    finally:
        release.set()
        index.close()


def test_close_waits_for_a_merge_thread_still_deleting_what_its_switch_superseded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge thread deletes the superseded log after leaving the
    exclusive section; close() returns only once they are gone."""
    from l2_stores import make_indexable

    entered, release = threading.Event(), threading.Event()

    def held() -> None:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(10)

    cls = make_indexable("deleting", construct.Bytes(4), construct.Bytes(4))
    directory = tmp_path / "store"
    store = cls.load(directory, index_buffer_size=8)
    store._engine.hooks.add("delete", held)
    for i in range(8):
        store.add(i.to_bytes(4, "big"), b"vvvv")  # the 8th freezes the log: a merge
    for i in range(8, 16):
        store.add(i.to_bytes(4, "big"), b"vvvv")  # the 16th: a second merge, superseding data 1
    assert entered.wait(10), "no merge thread reached its deletion"
    for _ in range(1000):  # the second merge switched too: close has no switch to make
        if not store._engine._merging:
            break
        threading.Event().wait(0.01)
    assert not store._engine._merging
    timer = threading.Timer(0.2, release.set)
    timer.start()
    store.close()  # waits for the held deletion
    names = sorted(os.listdir(directory))
    timer.join()
    assert_runs_tile(directory)
    assert len([n for n in names if n.startswith("log.")]) == 1, names
    with cls.load(directory) as again:
        assert sorted(again.keys()) == [i.to_bytes(4, "big") for i in range(16)]
