"""The append-only log of recent bindings.

Layout of ``log.<generation>`` (integers little-endian)::

    offset  size  field
         0    64  file header (see ``framing``), magic ``L2SLOG\\0\\0``
        64     R  record 0
      64+R     R  record 1 ...

    record (R = 1 + key size + value size + 4 bytes):
         0     1  op: bits 0-6 the operation, bit 7 SYNCED (version 3)
                    1 = set, 2 = remove,
                    3 = mark (no binding: a point where everything before was durable),
                    4 = seal (no binding: the last record of a log frozen for a merge),
                    5 = begin, 6 = end (no binding: they enclose a batch's part, version 4)
         1     K  key (zeros for a mark or a seal)
       1+K     V  value (zeros for a remove, a mark or a seal)
     1+K+V     4  crc32 of the 1+K+V bytes before it

SYNCED on a record says that every record written before it, and every
value those records point at (an indexed file's values), was durable when it
was written: with ``fsync=True``, the first record of each flush has it; a
clean close writes a mark, which always has it, after an fsync. So a
damaged record that has a SYNCED record after it was fsynced: corruption. A
damaged record with none after it may be a power loss's damage, since the
bytes after the last fsync reach the disk in any order, torn, or not at all:
the log ends before it, at a point in time (RocksDB's point-in-time
recovery), and the writer's load cuts everything after it off, durably.

A seal ends a log that was frozen for a merge. The next log's records follow
the frozen log's in time, so a frozen log whose seal did not survive a power
loss lost its tail, and the next log is dropped with it.

Format versions (the header's version field):

- 1: the file ends at its last record, or in a torn one.
- 2: the file may also end in zero-filled *free space*, allocated ahead so
  that the C put writes records through a shared map, without a system
  call. A writer's close cuts the free space off.
- 3: version 2 with SYNCED flags, marks and seals. Versions 1 and 2 are
  read as version 3 logs that have none (their frozen logs need no seal),
  and appended to as they are.
- 4 (written since): version 3 with *parts*. A batch's part (its writes to
  this store, see ``batches``) is a begin record, its sets and removes, and
  an end record, written at once. Its bindings count only once its end is
  read: a part cut short (a kill while it was written, a reader reading
  while it is) binds nothing, and the records stop at its begin. A store
  counts its parts (``LogScan.parts``, and the runs' header) so that the
  batch journal knows which of its batches the store holds. Older logs are
  appended to as they are, but take no part: a part goes to a new log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from ..errors import CannotLoadStore, CannotWriteToStore
from . import filesystem
from .accel import (
    LogTailBase,
    accelerated_log_format,
    accelerated_mappable,
    accelerated_replay_log,
)
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    Finding,
    crc32,
    decode_header,
    framed,
    parse_header,
    pwrite_all,
    write_framed,
)

logger = logging.getLogger(__name__)

MAGIC = b"L2SLOG\0\0"
#: The version new logs are written with, and the versions read.
LOG_VERSION = 4
LOG_VERSIONS = (1, 2, 3, 4)
#: The first version with SYNCED flags, marks and seals.
SEALED_VERSION = 3
#: The first version with parts (begin and end records).
PARTS_VERSION = 4
OP_SET = 1
OP_REMOVE = 2
OP_MARK = 3
OP_SEAL = 4
OP_BEGIN = 5
OP_END = 6
#: Flag of the op byte: everything written before this record was durable.
SYNCED = 0x80
OP_MASK = 0x7F
if accelerated_log_format not in (
    None,
    (OP_SET, OP_REMOVE, OP_MARK, OP_SEAL, OP_BEGIN, OP_END, SYNCED),
):
    raise ImportError(f"_accel reads log op bytes {accelerated_log_format}: rebuild it")
_OP_SET_BYTE = bytes([OP_SET])
_OP_REMOVE_BYTE = bytes([OP_REMOVE])
_OP_END_BYTE = bytes([OP_END])

#: Pending bytes of unflushed appends (``flush=False``) handed to the OS
#: once they reach this size, to bound memory.
PENDING_LIMIT = 1 << 20


def record_size(expected: Expected) -> int:
    """Bytes of one log record for the given encoding sizes."""
    return 1 + expected.key_size + expected.value_size + CRC_SIZE


#: The most bytes a log allocates ahead for the C put to write through a map.
MAP_LIMIT = 16 << 20


@dataclass
class LogScan:
    """What reading a log file found."""

    generation: int
    bindings: dict[bytes, bytes | None] = field(default_factory=dict)
    records: int = 0
    end: int = HEADER_SIZE
    #: Bytes after the records that are not free space: a record torn by a
    #: kill, or what a power loss left of records never fsynced.
    torn_bytes: int = 0
    #: Zero-filled bytes after the records (free space of a version 2 log).
    free_bytes: int = 0
    #: Whether records (or parts of them) follow a damaged one: a power loss's damage.
    damaged: bool = False
    version: int = LOG_VERSION
    #: Offset of the last record with the SYNCED flag (a mark included), if any.
    synced_at: int | None = None
    #: Whether the records end with a seal (the log was frozen for a merge).
    sealed: bool = False
    #: The parts taken whole (see the version 4 format).
    parts: int = 0
    #: Bytes of good records of a part left open at the end (counted in
    #: ``torn_bytes``): a kill cut it short, or a writer is writing it.
    open_part: int = 0


#: Bytes of log records read at a time (about): a reader's sync reads up to
#: the end of the records, not the free space after them.
READ_CHUNK = 1 << 16


class Replayed(NamedTuple):
    """Where a replay of a buffer of records stopped, and what it saw."""

    #: The end of the last record it took (before an open part's begin).
    position: int
    #: The position of the last record with the SYNCED flag (a mark included)
    #: before ``position`` (-1: none).
    synced_at: int
    #: Whether it stopped after a seal.
    sealed: bool
    #: The parts it took whole (their end records).
    parts: int
    #: The end of the last good record: past ``position`` when a part is open
    #: there (its end record not in the buffer, or a bad record before it).
    valid_end: int


def _replay_in_python(
    buffer: bytes | memoryview, size: int, key_size: int, bindings: dict[bytes, bytes | None]
) -> Replayed:
    complete = len(buffer) - len(buffer) % size
    key_end = 1 + key_size
    value_end = size - CRC_SIZE
    position = 0
    synced_at = -1
    parts = 0
    part: dict[bytes, bytes | None] | None = None  # an open part's bindings
    part_start = part_synced_at = -1
    while position < complete:
        record = bytes(buffer[position : position + size])
        op = record[0] & OP_MASK
        if crc32(record) != CRC_RESIDUE or not OP_SET <= op <= OP_END:
            break
        if (op == OP_END and part is None) or (op >= OP_MARK and op != OP_END and part is not None):
            break  # an end outside a part; a mark, seal or begin inside one
        if op <= OP_REMOVE:
            target = bindings if part is None else part
            target[record[1:key_end]] = record[key_end:value_end] if op == OP_SET else None
        if op == OP_BEGIN:
            part, part_start, part_synced_at = {}, position, synced_at
        if record[0] & SYNCED or op == OP_MARK:
            synced_at = position
        position += size
        if op == OP_END:
            assert part is not None
            bindings.update(part)
            part = None
            parts += 1
        if op == OP_SEAL:
            return Replayed(position, synced_at, True, parts, position)
    if part is not None:
        return Replayed(part_start, part_synced_at, False, parts, position)
    return Replayed(position, synced_at, False, parts, position)


def _replay(
    buffer: bytes | memoryview, expected: Expected, bindings: dict[bytes, bytes | None]
) -> Replayed:
    """Replay the whole records of ``buffer`` up to the first bad one, a seal, or an
    open part's begin (see :class:`Replayed`)."""
    size = record_size(expected)
    if accelerated_replay_log is not None:  # the same loop in C
        return Replayed(
            *accelerated_replay_log(buffer, expected.key_size, expected.value_size, bindings)
        )
    return _replay_in_python(buffer, size, expected.key_size, bindings)


def part_spans(path: str, expected: Expected, end: int) -> list[tuple[int, int]]:
    """Where each whole part of the log at ``path`` begins and ends, up to ``end`` (the
    end of its good records, as a scan found them)."""
    size = record_size(expected)
    spans = []
    begin = None
    with open(path, "rb") as file, filesystem.naming(path):
        records = os.pread(file.fileno(), end - HEADER_SIZE, HEADER_SIZE)
    for at in range(0, len(records) - len(records) % size, size):
        op = records[at] & OP_MASK
        if op == OP_BEGIN:
            begin = HEADER_SIZE + at
        elif op == OP_END and begin is not None:
            spans.append((begin, HEADER_SIZE + at + size))
            begin = None
    return spans


def _good_synced_record(record: bytes) -> bool:
    return (
        crc32(record) == CRC_RESIDUE
        and OP_SET <= record[0] & OP_MASK <= OP_END
        and bool(record[0] & SYNCED or record[0] & OP_MASK == OP_MARK)
    )


_NONZERO = re.compile(rb"[^\x00]")


def _synced_record_in(rest: bytes, size: int) -> int | None:
    """Offset in ``rest`` of the first whole record with the SYNCED flag, slot by slot."""
    position = 0
    while (found := _NONZERO.search(rest, position)) is not None:
        slot = found.start() - found.start() % size
        if _good_synced_record(rest[slot : slot + size]):
            return slot
        position = slot + size
    return None


@dataclass(frozen=True)
class _Stop:
    """What the bytes where a replay stopped are."""

    torn: int = 0  #: bytes of a torn record, or of what a power loss left after it
    free: int = 0  #: zero-filled bytes after the records
    damaged: bool = False  #: bytes other than zeros after the first bad record
    corrupt_at: int | None = None  #: offset in the rest of a SYNCED record after a bad one


def _classify_stop(rest: bytes, size: int, remaining: int) -> _Stop:
    """Classify ``rest``, the bytes from where a replay stopped (a bad record, or a seal).

    ``remaining`` counts the bytes from there to the end of the file. A
    SYNCED record after the stop means the bytes before it were durable:
    corruption. Otherwise zeros are free space (or a record never written),
    and anything else is a record cut short, torn, or left by a power loss.
    """
    synced = _synced_record_in(rest, size)
    if synced is not None:
        return _Stop(corrupt_at=synced)
    if not any(rest):
        return _Stop(free=remaining)
    record = rest[:size]
    after = rest[size:]
    if any(after):
        return _Stop(torn=remaining, damaged=True)
    return _Stop(torn=min(len(record), remaining), free=remaining - min(len(record), remaining))


#: A reader that finds a bad record followed by a SYNCED one reads again this
#: many times, a millisecond apart, before calling it corrupt: its read may
#: have copied a writer's stores into the map half-way (a page before them,
#: the next one after).
_SETTLE_ATTEMPTS = 3


def read_log(
    path: str,
    expected: Expected,
    into: dict[bytes, bytes | None] | None = None,
    scan: LogScan | None = None,
    *,
    whole: bool = False,
    limit: int | None = None,
) -> LogScan:
    """Replay the records of the log at ``path``.

    Bindings go into ``into`` (a remove as ``None``). With ``scan`` from an
    earlier call, reading resumes at ``scan.end``. What follows the records
    is counted in ``torn_bytes`` and ``free_bytes`` and left alone; a
    damaged record with a SYNCED record after it raises
    :class:`CannotLoadStore` with its offset. ``whole``: the caller holds
    the writer's lock, so the file does not change meanwhile and every byte
    after the records is read. ``limit``: the records end there, whatever
    follows (a load cutting the log at a point in time).
    """
    with open(path, "rb") as file, filesystem.naming(path):
        if scan is None:
            head = file.read(HEADER_SIZE)
            header = decode_header(head, MAGIC, path, expected, LOG_VERSIONS)
            bindings = into if into is not None else {}
            scan = LogScan(header.generation, bindings, version=header.version)
        for attempt in range(1 if whole else _SETTLE_ATTEMPTS):
            if attempt:
                time.sleep(0.001)
            stop = _read_records(file, expected, scan, whole, limit)
            if stop.corrupt_at is None:
                break
    if stop.corrupt_at is not None:
        raise CannotLoadStore(
            f"corrupted log record (file {path}, offset {scan.end}): a record written "
            f"after it was fsynced (offset {scan.end + stop.corrupt_at})",
            name=expected.name,
            path=path,
            offset=scan.end,
        )
    scan.torn_bytes, scan.free_bytes, scan.damaged = stop.torn, stop.free, stop.damaged
    return scan


def _read_records(
    file: BinaryIO, expected: Expected, scan: LogScan, whole: bool, limit: int | None
) -> _Stop:
    """Replay the records from ``scan.end`` on, in chunks, and classify where they stop."""
    size = record_size(expected)
    step = max(1, READ_CHUNK // size) * size
    fd = file.fileno()
    file_size = os.fstat(fd).st_size
    while not scan.sealed:  # a chunk, and one record more to tell a torn store from corruption
        wanted = step if limit is None else min(step, limit - scan.end)
        buffer = os.pread(fd, wanted + size, scan.end)
        replayed = _replay(memoryview(buffer)[:wanted], expected, scan.bindings)
        position = replayed.position
        if replayed.synced_at >= 0:
            scan.synced_at = scan.end + replayed.synced_at
        scan.records += position // size
        scan.parts += replayed.parts
        scan.end += position
        scan.sealed = replayed.sealed
        if position < wanted == step < len(buffer) and replayed.valid_end >= wanted - wanted % size:
            step *= 2  # a part runs on past the chunk: read it whole
            continue
        if position < wanted or len(buffer) <= wanted or scan.end == limit:
            break
    else:
        buffer, position = b"", 0
        replayed = Replayed(0, -1, True, 0, 0)
    scan.open_part = replayed.valid_end - position
    rest = buffer[replayed.valid_end :]
    remaining = max(len(buffer) - position, file_size - scan.end)
    if limit is not None:
        return _Stop(torn=remaining, damaged=any(rest))
    if whole or any(rest[:size]):  # a bad record, not free space: is a SYNCED one after it?
        file.seek(scan.end + len(buffer) - position)
        rest += file.read()
    stop = _classify_stop(rest, size, remaining - scan.open_part)
    if not scan.open_part:
        return stop
    if stop.corrupt_at is not None:
        return _Stop(corrupt_at=stop.corrupt_at + scan.open_part)
    return _Stop(torn=stop.torn + scan.open_part, free=stop.free, damaged=stop.damaged)


class SpareLog:
    """An empty log prepared ahead under a temporary name, its header fsynced.

    A merge prepares the next log this way, so that the writer that freezes
    the log only renames it into place.
    """

    def __init__(self, temporary: str, path: str, fd: int, generation: int) -> None:
        self.temporary = temporary
        self.path = path
        self.generation = generation
        #: Bytes allocated ahead at the start of the file (0: none).
        self.allocated = 0
        self._fd = fd

    @classmethod
    def prepare(cls, path: str, generation: int, expected: Expected, ahead: int = 0) -> SpareLog:
        """Write the header of log ``path`` at ``path.tmp`` and fsync it.

        ``ahead``: bytes of records to allocate for writing through a map,
        where the file system allows it (see :func:`allocate_ahead`).
        """
        header = FileHeader(
            MAGIC,
            expected.key_size,
            expected.value_size,
            expected.header_size,
            generation,
            version=LOG_VERSION,
        )
        temporary = path + ".tmp"
        fd = filesystem.open_file(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        spare = cls(temporary, path, fd, generation)
        try:
            os.write(fd, header.encode())
            filesystem.fsync(fd)
            spare.allocated = allocate_ahead(fd, HEADER_SIZE, ahead)
        except BaseException:
            spare.discard()
            raise
        return spare

    def take_fd(self) -> int:
        """The file descriptor, now the caller's to close."""
        fd, self._fd = self._fd, -1
        return fd

    def discard(self) -> None:
        """Close and delete the temporary file (a leftover is deleted at the next load)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            filesystem.unlink(self.temporary)


def allocate_ahead(fd: int, end: int, ahead: int) -> int:
    """Allocate the log's first ``end + ahead`` bytes on disk, to be written through a map.

    Returns the bytes allocated, or 0 when the log is to be written with
    system calls: no accelerator, nothing asked, a file system where a store
    into a map could meet a full disk (and kill the process with SIGBUS), or
    no room now. ``end + ahead`` is capped at :data:`MAP_LIMIT`.
    """
    size = min(end + ahead, MAP_LIMIT)
    if ahead <= 0 or size <= end or accelerated_mappable is None or not accelerated_mappable(fd):
        return 0
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.ftruncate(fd, end)  # whatever was allocated goes; writes take over
        return 0
    return size


class LogWriter(LogTailBase):  # type: ignore[misc]
    """Appends records to one log file; the writer owns the file's tail.

    With the accelerator, the tail (``_fd``, ``_end``, ``records``,
    ``_fsync``, ``_pending``) lives in the C base, which the index's C put
    appends through (only without ``fsync``, so never a SYNCED record): into
    the file's map when ``allocated`` bytes were allocated ahead (the Python
    paths still write, which the map sees), else with one ``pwritev``.
    """

    def __init__(
        self,
        path: str,
        fd: int,
        generation: int,
        expected: Expected,
        end: int,
        records: int,
        fsync: bool,
        allocated: int = 0,
        *,
        version: int = LOG_VERSION,
        synced_end: int = 0,
    ) -> None:
        self.path = path
        self.generation = generation
        self.records = records
        self.version = version
        self._fd = fd
        self._expected = expected
        self._end = end
        self._fsync = bool(fsync)
        self._pending = bytearray()
        self._zero_key = bytes(expected.key_size)
        self._zero_value = bytes(expected.value_size)
        #: Where the bytes known durable (store-wide, see ``SYNCED``) end; 0: unknown.
        self._synced_end = synced_end
        #: The file's size when it was allocated ahead (0: none); the close cuts it to the end.
        self._allocated = allocated
        self._owner = os.getpid()
        #: Where a part written by open_part, its end not yet written, begins (-1: none).
        self._open_part = -1
        if allocated:
            try:
                self._map(allocated)
            except OSError:
                logger.debug("%s: cannot map; appends are written", path, exc_info=True)

    @classmethod
    def create(
        cls, path: str, generation: int, expected: Expected, fsync: bool, ahead: int = 0
    ) -> LogWriter:
        """Create a new, empty log file; it appears whole (header written) or not at all.

        The header and the directory entry are fsynced whatever ``fsync`` says,
        so that no power loss leaves a log without a header beside the data
        file that replaced its predecessor.
        """
        spare = SpareLog.prepare(path, generation, expected, ahead)
        return cls.install(spare, expected, fsync, True)

    @classmethod
    def install(
        cls, spare: SpareLog, expected: Expected, fsync: bool, sync_directory: bool
    ) -> LogWriter:
        """Rename a prepared ``spare`` into place and append to it; on error it is discarded.

        ``sync_directory`` (or ``fsync``) fsyncs the directory entry too;
        without it, the caller makes the name durable later (a merge syncs
        the directory before renaming the data file that supersedes the
        previous log). With ``fsync``, everything before its first record is
        durable by then (the frozen log's seal is fsynced before it takes
        records), so that record is SYNCED.
        """
        try:
            filesystem.rename(spare.temporary, spare.path)
            if fsync or sync_directory:
                filesystem.fsync_directory(os.path.dirname(spare.path))
        except BaseException:
            spare.discard()
            raise
        fd = spare.take_fd()
        return cls(
            spare.path,
            fd,
            spare.generation,
            expected,
            HEADER_SIZE,
            0,
            fsync,
            spare.allocated,
            synced_end=HEADER_SIZE if fsync else 0,
        )

    @classmethod
    def reopen(
        cls, path: str, scan: LogScan, expected: Expected, fsync: bool, ahead: int = 0
    ) -> LogWriter:
        """Open an existing log for appending after ``scan``; what follows the records is cut off.

        A cut of anything but free space is fsynced: records appended from
        there must not be followed, after a power loss, by the old bytes they
        replaced. A version 2 or 3 log gets ``ahead`` bytes allocated again;
        a version 1 log is only ever written to.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            with filesystem.naming(path):
                size = record_size(expected)
                last_op = os.pread(fd, 1, scan.end - size) if scan.end > HEADER_SIZE else b""
                if scan.torn_bytes or scan.free_bytes:
                    os.ftruncate(fd, scan.end)
                    if scan.torn_bytes or fsync:
                        filesystem.fsync(fd)
                allocated = allocate_ahead(fd, scan.end, ahead) if scan.version >= 2 else 0
        except BaseException:
            os.close(fd)
            raise
        ends_with_mark = last_op == bytes([OP_MARK | SYNCED])
        return cls(
            path,
            fd,
            scan.generation,
            expected,
            scan.end,
            scan.records,
            fsync,
            allocated,
            version=scan.version,
            synced_end=scan.end if ends_with_mark else 0,
        )

    def _op(self, op: int) -> bytes:
        """The op byte of a record written now at the end, or first of the pending ones."""
        if self._fsync and self._end == self._synced_end and self.version >= SEALED_VERSION:
            return bytes([op | SYNCED])
        return bytes([op])

    def append_set(self, key: bytes, value: bytes, flush: bool) -> None:
        """Append a binding of ``key`` to ``value``."""
        if flush and not self._pending and not self._fsync:
            # _append's first branch, inlined: this is every flushed add.
            try:
                size = write_framed(self._fd, self._end, _OP_SET_BYTE, key, value)
            except OSError as error:
                raise self._failed_write(error) from error
            self._end += size
            self.records += 1
        else:
            self._append(flush, OP_SET, key, value)

    def append_remove(self, key: bytes, flush: bool) -> None:
        """Append the removal of ``key``."""
        self._append(flush, OP_REMOVE, key, self._zero_value)

    def _append(self, flush: bool, op: int, key: bytes, value: bytes) -> None:
        """Append the record of ``op``; if this raises, the record is not in the log."""
        if flush and not self._pending:
            try:
                size = write_framed(self._fd, self._end, self._op(op), key, value)
                if self._fsync:
                    filesystem.fsync(self._fd)
            except OSError as error:
                raise self._failed_write(error) from error
            self._end += size
            if self._fsync:
                self._synced_end = self._end
        else:
            mark = len(self._pending)
            self._pending += framed(self._op(op) if not mark else bytes([op]), key, value)
            if flush or len(self._pending) >= PENDING_LIMIT:
                try:
                    self.flush()
                except BaseException:
                    del self._pending[mark:]
                    raise
        self.records += 1

    def open_part(self, ops: Sequence[tuple[bytes, bytes | None]]) -> int:
        """Write a batch's part without its end: a begin record, a set for each ``(key,
        value)`` of ``ops`` (a remove for a None value), and zeros where the end record
        goes, in one write (flushed, not fsynced). Until :meth:`end_part` writes the end
        into that room (which the disk can no longer refuse), the part binds nothing.
        Returns where the end goes; if this raises, nothing of the part is in the log."""
        assert self.version >= PARTS_VERSION
        zero_key, zero_value = self._zero_key, self._zero_value
        pending = bytes(self._pending)  # records of flush=False writes go first, same write
        records = [
            framed(self._op(OP_BEGIN) if not pending else bytes([OP_BEGIN]), zero_key, zero_value)
        ]
        for key, value in ops:
            if value is None:
                records.append(framed(_OP_REMOVE_BYTE, key, zero_value))
            else:
                records.append(framed(_OP_SET_BYTE, key, value))
        records.append(bytes(record_size(self._expected)))
        data = pending + b"".join(records)
        start = self._end
        # Recorded before the write, so that an interrupt just after it leaves the part
        # to cancel_part (which takes back nothing while the end has not moved).
        self._open_part = start + len(pending)
        self.records += len(records)
        self._end = start + len(data)
        try:
            pwrite_all(self._fd, data, start)
        except BaseException as error:
            self._open_part, self._end = -1, start  # the pending records stay pending
            self.records -= len(records)
            if isinstance(error, OSError):
                raise self._failed_write(error) from error
            with contextlib.suppress(OSError):  # interrupted: none of what it wrote stays
                self._free(start, len(data))
            raise
        self._pending.clear()
        return self._end - len(records[-1])

    def end_part(self, at: int) -> None:
        """Write the end record of the part :meth:`open_part` wrote: it binds from now on.
        If this raises, the part is taken back."""
        try:
            pwrite_all(self._fd, framed(_OP_END_BYTE, self._zero_key, self._zero_value), at)
        except OSError as error:
            with contextlib.suppress(OSError):
                self.cancel_part()
            raise self._write_error(error) from error
        self._open_part = -1

    def cancel_part(self) -> None:
        """Take back the part :meth:`open_part` wrote (zeros over it: free space again)."""
        start, self._open_part = self._open_part, -1
        if start < 0 or start >= self._end:  # none, or not written yet
            return
        size = record_size(self._expected)
        self.records -= (self._end - start) // size
        try:
            self._free(start, self._end - start)
        finally:
            self._end = start

    def _free(self, start: int, size: int) -> None:
        """Zeros over ``size`` bytes at ``start``: free space again (the file cut there,
        unless it was allocated ahead)."""
        pwrite_all(self._fd, bytes(size), start)
        if not self._allocated:
            os.ftruncate(self._fd, start)

    def seal(self) -> None:
        """End the log, after its pending records, with a seal: it is frozen for a merge."""
        if self.version >= SEALED_VERSION:
            self._append(True, OP_SEAL, self._zero_key, self._zero_value)
        else:
            self.flush()

    def mark(self) -> bool:
        """Flush, make the log durable and record that with a mark (the caller made the
        values durable); whether the log is durable to its end now.

        Does nothing more than the flush when nothing was written since the
        last durable point: a store closed and reopened without writes gains
        no record. A failed fsync or write of the mark is only logged: the
        mark spares the next load some checks, nothing depends on it.
        """
        if self._fd < 0:
            return False
        self.flush()
        if self.version < SEALED_VERSION or self._end <= max(self._synced_end, HEADER_SIZE):
            return self._end <= max(self._synced_end, HEADER_SIZE)
        try:
            if not self._fsync:
                filesystem.fsync(self._fd)
            size = write_framed(
                self._fd, self._end, bytes([OP_MARK | SYNCED]), self._zero_key, self._zero_value
            )
        except OSError:
            logger.warning("%s: cannot mark the log durable", self.path, exc_info=True)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            return False
        self._end += size
        self.records += 1
        self._synced_end = self._end
        return True

    def flush(self) -> None:
        """Hand every pending record to the OS (and to the disk with ``fsync``).

        On error the pending records stay pending, for a later flush.
        """
        if self._pending:
            self._write(bytes(self._pending))
            self._pending.clear()
        elif self._fsync:
            try:
                filesystem.fsync(self._fd)
            except OSError as error:
                raise self._write_error(error) from error
            self._synced_end = self._end

    def _write(self, data: bytes) -> None:
        try:
            pwrite_all(self._fd, data, self._end)
            if self._fsync:
                filesystem.fsync(self._fd)
        except OSError as error:
            raise self._failed_write(error) from error
        self._end += len(data)
        if self._fsync:
            self._synced_end = self._end

    def _failed_write(self, error: OSError) -> CannotWriteToStore:
        """Cut what the failed write left behind, so no later append follows it."""
        self._unmap()  # a store past the cut would raise SIGBUS
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._end)
        return self._write_error(error)

    def _write_error(self, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(
            f"cannot append to log {self.path}: {error}", name=self._expected.name, path=self.path
        )

    def close(self) -> None:
        """Flush, cut off the free space and close the file; if the flush fails, it stays open."""
        if self._fd < 0:
            return
        self.flush()
        if self._allocated and os.getpid() == self._owner:  # not in a child forked meanwhile
            self._unmap()
            with contextlib.suppress(OSError):  # the free space is harmless if it stays
                os.ftruncate(self._fd, self._end)
        self.abandon()

    def abandon(self) -> None:
        """Close the file without flushing (after a failed :meth:`close`), free space left."""
        self._unmap()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def salvage_log(path: str, name: str, lost: list[Finding]) -> dict[bytes, bytes | None]:
    """The bindings of the log at ``path`` (None: removed), replayed past damaged records:
    each record whose checksum verifies counts, in order, a batch's part at its end only;
    what cannot be read is added to ``lost``. For salvage: not a store's load path.

    After a damaged record, the records that follow are held until it is known whether
    they were in a part: an end record drops them (the part lost its begin or a record),
    a begin, mark or seal applies them (they were not), the log's end drops them.
    """
    bindings: dict[bytes, bytes | None] = {}
    try:
        with open(path, "rb") as file, filesystem.naming(path):
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name, LOG_VERSIONS)
            buffer = file.read()
    except (CannotLoadStore, OSError) as error:
        offset = getattr(error, "offset", None) or 0
        lost.append(Finding(path, offset, f"log not read: {getattr(error, 'reason', error)}"))
        return bindings
    key_end = 1 + header.key_size
    size = key_end + header.value_size + CRC_SIZE
    complete = len(buffer) - len(buffer) % size
    view = memoryview(buffer)[:complete]
    at = 0
    while at < complete:
        replayed = _replay_in_python(view[at:], size, header.key_size, bindings)
        if replayed.sealed:
            break
        if replayed.valid_end > replayed.position:
            lost.append(
                Finding(path, HEADER_SIZE + at + replayed.position,
                        "a batch's part without its end: not taken")
            )  # fmt: skip
        at += replayed.valid_end
        if at >= complete or not any(view[at:complete]):
            break  # the end, or zeros never written
        lost.append(Finding(path, HEADER_SIZE + at, "log record unreadable"))
        at += size
        held: list[bytes] = []  # records after the damage, until their part is known
        while at < complete and any(view[at:complete]):  # (zeros: never written)
            record = bytes(view[at : at + size])
            op = record[0] & OP_MASK
            if crc32(record) != CRC_RESIDUE or not OP_SET <= op <= OP_END:
                lost.append(Finding(path, HEADER_SIZE + at, "log record unreadable"))
            elif op == OP_END:
                lost.append(
                    Finding(path, HEADER_SIZE + at,
                            f"the end of a batch's part that lost records: {len(held)} "
                            "records before it not taken")
                )  # fmt: skip
                held = []
                at += size
                break
            elif op <= OP_REMOVE:
                held.append(record)
            else:  # a begin, mark or seal: the held records were in no part
                break
            at += size
        else:
            if held:
                lost.append(Finding(path, HEADER_SIZE + at, f"{len(held)} records after "
                                    "damage, perhaps of a part cut short: not taken"))  # fmt: skip
            break
        for record in held:
            value = record[key_end : size - CRC_SIZE] if record[0] & OP_MASK == OP_SET else None
            bindings[record[1:key_end]] = value
    return bindings


def check_log(path: str, name: str = "") -> Iterator[Finding]:
    """Check every record of the log at ``path``: header, framing, op codes, checksums.

    What a load drops (a torn tail, records a power loss damaged after the
    last fsync) is a note, not a problem; a damaged record with a SYNCED one
    after it is.
    """
    with open(path, "rb") as file, filesystem.naming(path):
        try:
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name, LOG_VERSIONS)
        except CannotLoadStore as error:
            yield Finding(path, 0, error.reason)
            return
        buffer = file.read()
    size = 1 + header.key_size + header.value_size + CRC_SIZE
    replayed = _replay_in_python(buffer, size, header.key_size, {})
    position, sealed = replayed.position, replayed.sealed
    rest = buffer[replayed.valid_end :]
    open_part = replayed.valid_end - position
    offset = HEADER_SIZE + position
    if open_part:
        yield Finding(
            path,
            offset,
            f"a batch's part cut short at the end ({open_part} bytes of whole records "
            "without their end record: dropped at the next writer load)",
            False,
        )
    if not rest:
        return
    offset += open_part
    stop = _classify_stop(rest, size, len(rest))
    if stop.corrupt_at is not None:
        yield Finding(
            path,
            offset,
            "log record checksum mismatch or bad op code, with a record written after "
            f"it was fsynced (offset {offset + stop.corrupt_at})",
        )
    elif stop.damaged:
        yield Finding(
            path,
            offset,
            f"{stop.torn} bytes from a damaged record on, never fsynced: what a power "
            "loss left (dropped at the next writer load)",
            False,
        )
    elif stop.torn == size:
        yield Finding(
            path,
            offset,
            "half-written record at the end (torn; dropped at the next writer load)",
            False,
        )
    elif stop.torn:
        yield Finding(
            path,
            offset,
            f"torn record at the end, {stop.torn} of {size} bytes "
            "(dropped at the next writer load)",
            False,
        )
    elif sealed or header.version < 2:
        what = f"{stop.free} zero bytes after the last record (dropped at the next writer load)"
        yield Finding(path, offset, what, False)
    else:
        what = f"zero-filled space after the last record ({stop.free} bytes: free, or torn)"
        yield Finding(path, offset, what, False)
