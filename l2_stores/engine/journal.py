"""The batch journal: one commit point for a batch's writes to several stores.

A journal is a directory (``l2_stores.journal``, see ``batches``) that
holds::

    lock               the writer lock: one process commits at a time
    journal.<N>        segments, N decimal, eight digits, in order

A segment is the common file header (``framing``: magic ``L2SJRNL\\0``,
generation = N, tag = the journal's id), then records (little-endian)::

    offset  size  field
         0     4  magic ``L2SB``
         4     1  flags: bit 0 SYNCED (every byte before the record was
                  durable when it was written)
         5     3  zero
         8     8  seq: 1, 2, 3, ... over the whole journal
        16     4  n: bytes of the payload
        20     n  payload: u16 parts, then per part u64 participant,
                  u64 ordinal, u32 length and that many bytes
      20+n     4  crc32 of bytes 0 .. 20+n

A record is a committed batch: every store's part, each named by the
participant id its link file gives it (``Link``) and the ordinal of the part
among the store's parts (1, 2, ...). Its part bytes are the store's to
encode. A record is written at once and fsynced when the batch asks; the
stores then take their parts (``Index.apply_part``). A store holds its part
once its own files do; the journal keeps a record until every store in it
holds its part durably (``trim``).

Reading stops at the first record whose magic, length or checksum fails:
bytes after it were never fsynced, what a kill or a power loss cut short
(the writer's open cuts them off), unless a SYNCED record follows, which
makes it corruption (``CannotLoadStore`` with file and offset).

A participant that will never take parts again (a store migrated to a new
one, see ``migration``) is retired: a file ``retired.<participant>`` holds
the parts it took (u64, then the crc32 of those 8 bytes), written
durably; ``trim`` counts them as held durably, so the records of a store
that is gone do not keep the journal from shrinking.

Link file (``<index directory>/batch``, or ``<singleton file>.batch``): the
common file header (magic ``L2SLINK\\0``, count = the participant id, tag =
the journal's id), then u16 n, the journal's path relative to the link's
directory (n bytes of UTF-8), u16 m, its absolute path (m bytes), and the
crc32 of what follows the header. Written once, durably, before the first
record that names the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import CannotLoadStore, CannotWriteToStore
from . import filesystem
from .framing import (
    CRC_SIZE,
    HEADER_SIZE,
    FileHeader,
    Finding,
    crc_ok,
    parse_header,
    pwrite_all,
    with_crc,
)
from .lock import WriterLock

MAGIC = b"L2SJRNL\0"
LINK_MAGIC = b"L2SLINK\0"
RECORD_MAGIC = b"L2SB"
RECORD_HEAD = struct.Struct("<4sB3xQI")
RECORD_HEAD_SIZE = 20
assert RECORD_HEAD.size == RECORD_HEAD_SIZE
PART_HEAD = struct.Struct("<QQI")
PARTS_COUNT = struct.Struct("<H")
SYNCED = 0x01
#: A segment this large is the last one appended to: the next record starts a new one.
SEGMENT_BYTES = 8 << 20
#: Zeros written ahead of the records at a time (fsynced), so that an fsync of records
#: written into them has no file size to make durable.
ALLOCATE_STEP = 1 << 20
#: The most parts one record holds (the payload's u16).
MAX_PARTS = 0xFFFF
LOCK = "lock"
#: The link file's name in an index directory (a singleton's is ``<file>.batch``).
LINK = "batch"
_SEGMENT = re.compile(r"journal\.(\d{8})")
_RETIRED = re.compile(r"retired\.(\d+)")
RETIRED_PARTS = struct.Struct("<Q")
_LINK_PATH = struct.Struct("<H")


def holds_journal(directory: str) -> bool:
    """Whether ``directory`` is a batch journal (it holds a segment)."""
    try:
        return any(_SEGMENT.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return False


def segment_name(number: int) -> str:
    """File name of segment ``number``."""
    return f"journal.{number:08d}"


class Part(NamedTuple):
    """A store's part of a committed batch."""

    participant: int
    ordinal: int
    data: bytes


class Record(NamedTuple):
    """A committed batch."""

    seq: int
    parts: tuple[Part, ...]


def encode_record(seq: int, parts: Iterable[Part], synced: bool) -> bytes:
    """The bytes of the record of batch ``seq``."""
    parts = tuple(parts)
    if len(parts) > MAX_PARTS:
        raise ValueError(f"a batch of {len(parts)} stores: at most {MAX_PARTS}")
    payload = b"".join(
        [PARTS_COUNT.pack(len(parts))]
        + [
            PART_HEAD.pack(part.participant, part.ordinal, len(part.data)) + part.data
            for part in parts
        ]
    )
    head = RECORD_HEAD.pack(RECORD_MAGIC, SYNCED if synced else 0, seq, len(payload))
    return with_crc(head + payload)


def _decode_payload(payload: bytes) -> tuple[Part, ...] | None:
    """The parts of a record's payload, or None when they do not add up."""
    if len(payload) < PARTS_COUNT.size:
        return None
    (count,) = PARTS_COUNT.unpack_from(payload)
    at = PARTS_COUNT.size
    parts = []
    for _ in range(count):
        if at + PART_HEAD.size > len(payload):
            return None
        participant, ordinal, length = PART_HEAD.unpack_from(payload, at)
        at += PART_HEAD.size
        if at + length > len(payload):
            return None
        parts.append(Part(participant, ordinal, payload[at : at + length]))
        at += length
    return tuple(parts) if at == len(payload) else None


def decode_record(buffer: bytes | memoryview, at: int) -> tuple[Record, int, bool] | None:
    """The record at ``at`` of ``buffer``, where it ends and whether it is SYNCED; None
    when no whole, sound record starts there."""
    if at + RECORD_HEAD_SIZE + CRC_SIZE > len(buffer):
        return None
    magic, flags, seq, length = RECORD_HEAD.unpack_from(buffer, at)
    end = at + RECORD_HEAD_SIZE + length + CRC_SIZE
    if magic != RECORD_MAGIC or end > len(buffer) or not crc_ok(buffer[at:end]):
        return None
    parts = _decode_payload(bytes(buffer[at + RECORD_HEAD_SIZE : end - CRC_SIZE]))
    if parts is None:
        return None
    return Record(seq, parts), end, bool(flags & SYNCED)


@dataclass
class _Segment:
    """What the journal knows of one segment without reading it again."""

    number: int
    path: str
    end: int = HEADER_SIZE
    #: The highest ordinal of each participant's parts in the segment.
    ordinals: dict[int, int] = field(default_factory=dict)

    def note(self, record: Record) -> None:
        for part in record.parts:
            if part.ordinal > self.ordinals.get(part.participant, 0):
                self.ordinals[part.participant] = part.ordinal


def _corruption(path: str, offset: int, synced_at: int) -> CannotLoadStore:
    return CannotLoadStore(
        f"corrupted journal record (file {path}, offset {offset}): a record written after "
        f"it was fsynced (offset {synced_at})",
        name="batch journal",
        path=path,
        offset=offset,
    )


def _read_segment(path: str, journal_id: int | None) -> tuple[FileHeader, list[Record], int, int]:
    """A segment's header, its records, where they end and how many bytes other than
    zeros (the room allocated ahead) follow them."""
    with open(path, "rb") as file:
        data = file.read()
    header = parse_header(data, MAGIC, path, "batch journal")
    if journal_id is not None and header.tag != journal_id:
        raise CannotLoadStore(
            f"segment of another journal (id {header.tag:#x}, {journal_id:#x} expected; "
            f"file {path}, offset 0)",
            name="batch journal",
            path=path,
            offset=0,
        )
    records = []
    at = HEADER_SIZE
    while (decoded := decode_record(data, at)) is not None:
        record, at, _ = decoded
        records.append(record)
    if at < len(data) and any(data[at:]):
        for found in re.finditer(re.escape(RECORD_MAGIC), data[at + 1 :]):
            later = decode_record(data, at + 1 + found.start())
            if later is not None and later[2]:
                raise _corruption(path, at, at + 1 + found.start())
    return header, records, at, len(data.rstrip(b"\0")) - at if any(data[at:]) else 0


def read_records(directory: str) -> list[Record]:
    """The records of the journal at ``directory`` as they are now, for a reader (no lock;
    a record being appended, a segment being deleted are skipped)."""
    try:
        names = sorted(name for name in os.listdir(directory) if _SEGMENT.fullmatch(name))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as file:
                data = file.read()
        except FileNotFoundError:
            continue  # trimmed meanwhile: every part in it is in its store
        at = HEADER_SIZE
        while (decoded := decode_record(data, at)) is not None:
            record, at, _ = decoded
            records.append(record)
    return records


class Journal:
    """A batch journal directory, opened by the one process that commits to it."""

    def __init__(self, directory: str, *, create: bool) -> None:
        self.directory = directory
        if create:
            filesystem.make_directories(directory)
        elif not os.path.isdir(directory):
            raise CannotLoadStore("no batch journal there", name="batch journal", path=directory)
        self._lock = WriterLock(os.path.join(directory, LOCK), "batch journal", directory)
        #: Held briefly by every write and sync; never while waiting for anything else.
        self._io = threading.Lock()
        self._fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        numbers = sorted(
            int(match.group(1))
            for name in os.listdir(self.directory)
            if (match := _SEGMENT.fullmatch(name))
        )
        self._segments: list[_Segment] = []
        self.id: int = 0
        self.last_seq = 0
        journal_id: int | None = None
        for number in numbers:
            path = os.path.join(self.directory, segment_name(number))
            header, records, end, rest = _read_segment(path, journal_id)
            journal_id = header.tag
            segment = _Segment(number, path, end)
            for record in records:
                segment.note(record)
                self.last_seq = max(self.last_seq, record.seq)
            self._segments.append(segment)
            if rest > 0 and number != numbers[-1]:
                raise CannotLoadStore(
                    f"journal segment cut short before a later one (file {path}, offset {end})",
                    name="batch journal",
                    path=path,
                    offset=end,
                )
        if journal_id is None:
            self.id = secrets.randbits(63) + 1
            self._new_segment(1)
        else:
            self.id = journal_id
            last = self._segments[-1]
            self._fd = filesystem.open_file(last.path, os.O_RDWR)
            size = os.fstat(self._fd).st_size
            if rest > 0:  # a torn tail: zeros over it, room for the next records
                pwrite_all(self._fd, bytes(size - last.end), last.end)
            filesystem.fsync(self._fd)  # what a kill left in the page cache: durable now
            self._allocated = size
        #: Segments started since the journal was opened (the batches trim after each).
        self.rotations = 0
        #: Retired participants and the parts they took (see ``retire``).
        self.retired = self._read_retired()
        #: Where the bytes known durable end in the last segment.
        self._synced_end = self._segments[-1].end
        self._synced_seq = self.last_seq

    def _new_segment(self, number: int) -> None:
        """Start segment ``number`` (durably: header, room ahead and name), the one appended
        to."""
        path = os.path.join(self.directory, segment_name(number))
        temporary = path + ".tmp"
        fd = filesystem.open_file(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            header = FileHeader(MAGIC, 0, 0, 0, number, tag=self.id)
            pwrite_all(fd, header.encode() + bytes(ALLOCATE_STEP - HEADER_SIZE), 0)
            filesystem.fsync(fd)
            filesystem.rename(temporary, path)
            filesystem.fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(_Segment(number, path))
        self._synced_end = HEADER_SIZE
        self._allocated = ALLOCATE_STEP

    # ------------------------------------------------------------ writing

    def append(self, parts: Iterable[Part], *, fsync: bool) -> int:
        """Write the record of a batch of ``parts``; return its seq. Once this returns the
        batch is committed (durably with ``fsync``); if it raises, it is not."""
        with self._io:
            return self._append(parts, fsync)

    def _append(self, parts: Iterable[Part], fsync: bool) -> int:
        if self._fd < 0:
            raise CannotWriteToStore("journal closed", name="batch journal", path=self.directory)
        try:
            if self._segments[-1].end >= SEGMENT_BYTES:
                self._sync()  # the segment ends whole before the next
                self._new_segment(self._segments[-1].number + 1)
                self.rotations += 1
            segment = self._segments[-1]
            seq = self.last_seq + 1
            parts = tuple(parts)
            needed = RECORD_HEAD_SIZE + PARTS_COUNT.size + CRC_SIZE
            needed += sum(PART_HEAD.size + len(part.data) for part in parts)
            if fsync and segment.end + needed > self._allocated:
                self._allocate(segment, needed)  # (no fsync: the file just grows)
            data = encode_record(seq, parts, synced=self._synced_end == segment.end)
            try:
                pwrite_all(self._fd, data, segment.end)
                if fsync:
                    filesystem.fsync(self._fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, segment.end)
                raise
        except OSError as error:
            raise CannotWriteToStore(
                f"cannot write the batch journal: {error}",
                name="batch journal",
                path=self.directory,
            ) from error
        segment.end += len(data)
        segment.note(Record(seq, parts))
        self.last_seq = seq
        if fsync:
            self._synced_end, self._synced_seq = segment.end, seq
        return seq

    def _allocate(self, segment: _Segment, needed: int) -> None:
        """Write zeros (fsynced) past the end, room for ``needed`` bytes and a step more: an
        fsync of the records written into them has no size to make durable (a third of
        its time, measured). Only for commits that fsync: for the others, writing and
        fsyncing a MiB of zeros every few hundred commits cost more than the records."""
        target = segment.end + needed + ALLOCATE_STEP
        target -= target % ALLOCATE_STEP
        start = max(self._allocated, segment.end)  # never over a record
        pwrite_all(self._fd, bytes(target - start), start)
        self._allocated = target
        filesystem.fsync(self._fd)
        self._synced_end, self._synced_seq = segment.end, self.last_seq

    def sync_through(self, seq: int) -> None:
        """Make the records up to ``seq`` durable (an fsync if they are not yet)."""
        with self._io:
            if seq > self._synced_seq:
                self._sync()

    def sync(self) -> None:
        """Make every record durable."""
        self.sync_through(self.last_seq)

    def _sync(self) -> None:
        if self._fd >= 0 and self._synced_seq < self.last_seq:
            filesystem.fsync(self._fd)
            self._synced_end, self._synced_seq = self._segments[-1].end, self.last_seq

    def trim(self, durable: Mapping[int, int]) -> int:
        """Delete the segments before the last whose every part is durably held by its
        store: ``durable`` maps a participant to its durable parts (absent: unknown).
        Returns the segments deleted."""
        with self._io:
            return self._trim(durable)

    def _trim(self, durable: Mapping[int, int]) -> int:
        gone = []
        retired = self.retired
        for segment in self._segments[:-1]:
            if any(
                ordinal > max(durable.get(participant, 0), retired.get(participant, 0))
                for participant, ordinal in segment.ordinals.items()
            ):
                break
            gone.append(segment)
        for segment in gone:
            filesystem.unlink(segment.path)
        if gone:
            filesystem.fsync_directory(self.directory)
            del self._segments[: len(gone)]
        return len(gone)

    def retire(self, participant: int, parts: int) -> None:
        """Record, durably, that ``participant`` took ``parts`` parts and will take no
        more (its store is gone): ``trim`` then treats them as held."""
        path = os.path.join(self.directory, f"retired.{participant}")
        temporary = path + ".tmp"
        fd = filesystem.open_file(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            pwrite_all(fd, with_crc(RETIRED_PARTS.pack(parts)), 0)
            filesystem.fsync(fd)
        finally:
            os.close(fd)
        filesystem.rename(temporary, path)
        filesystem.fsync_directory(self.directory)
        with self._io:
            self.retired[participant] = parts

    def _read_retired(self) -> dict[int, int]:
        """The retired participants (a damaged file retires nothing: its records stay)."""
        retired = {}
        for name in os.listdir(self.directory):
            if (match := _RETIRED.fullmatch(name)) is None:
                continue
            with open(os.path.join(self.directory, name), "rb") as file:
                data = file.read()
            if len(data) == RETIRED_PARTS.size + CRC_SIZE and crc_ok(data):
                (retired[int(match.group(1))],) = RETIRED_PARTS.unpack_from(data)
        return retired

    # ------------------------------------------------------------ reading

    def records(self) -> Iterator[Record]:
        """The records, in order, as the segments hold them now."""
        for segment in list(self._segments):
            try:
                with open(segment.path, "rb") as file:
                    data = file.read(segment.end)
            except FileNotFoundError:
                continue  # trimmed meanwhile: every part in it is in its store
            at = HEADER_SIZE
            while at < segment.end and (decoded := decode_record(data, at)) is not None:
                record, at, _ = decoded
                yield record

    def parts_of(self, participant: int) -> dict[int, bytes]:
        """The parts of ``participant`` the journal holds, by ordinal."""
        return {
            part.ordinal: part.data
            for record in self.records()
            for part in record.parts
            if part.participant == participant
        }

    @property
    def segments(self) -> list[str]:
        """The paths of the segments, oldest first."""
        return [segment.path for segment in self._segments]

    def close(self) -> None:
        """Make the records durable, close the segment and release the lock; idempotent."""
        with self._io:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self._sync()
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            self._lock.release()


# ------------------------------------------------------------------ links


@dataclass(frozen=True)
class Link:
    """What a store's link file says: its journal and its id there."""

    path: str  #: the link file
    journal_id: int
    participant: int
    relative: str  #: the journal directory, relative to the link's directory
    absolute: str

    def journal_directory(self) -> str | None:
        """The journal directory, found by its relative path first, else its absolute one."""
        base = os.path.dirname(os.path.abspath(self.path))
        for candidate in (os.path.normpath(os.path.join(base, self.relative)), self.absolute):
            if os.path.isdir(candidate):
                return candidate
        return None


def read_link(path: str, name: str) -> Link | None:
    """The link file at ``path``, or None when there is none."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    header = parse_header(data, LINK_MAGIC, path, name)
    body = data[HEADER_SIZE:]
    try:
        if not crc_ok(body):
            raise ValueError("checksum mismatch")
        (length,) = _LINK_PATH.unpack_from(body, 0)
        relative = body[2 : 2 + length].decode()
        (other,) = _LINK_PATH.unpack_from(body, 2 + length)
        absolute = body[4 + length : 4 + length + other].decode()
        if 4 + length + other + CRC_SIZE != len(body):
            raise ValueError("sizes disagree")
    except (ValueError, struct.error) as error:
        raise CannotLoadStore(
            f"damaged batch link: {error} (file {path}, offset {HEADER_SIZE})",
            name=name,
            path=path,
            offset=HEADER_SIZE,
        ) from error
    return Link(path, header.tag, header.count, relative, absolute)


def write_link(path: str, journal: Journal) -> Link:
    """Link the store whose link file is ``path`` to ``journal``, durably, with a new id."""
    participant = secrets.randbits(63) + 1
    absolute = os.path.abspath(journal.directory)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(path)))
    raw = [text.encode() for text in (relative, absolute)]
    body = b"".join(_LINK_PATH.pack(len(part)) + part for part in raw)
    header = FileHeader(LINK_MAGIC, 0, 0, 0, 0, count=participant, tag=journal.id)
    temporary = path + ".tmp"
    fd = filesystem.open_file(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        pwrite_all(fd, header.encode() + with_crc(body), 0)
        filesystem.fsync(fd)
    finally:
        os.close(fd)
    filesystem.rename(temporary, path)
    filesystem.fsync_directory(os.path.dirname(os.path.abspath(path)))
    return Link(path, journal.id, participant, relative, absolute)


def check_link(path: str, name: str) -> Iterator[Finding]:
    """The findings of a link file: its header and checksum."""
    try:
        read_link(path, name)
    except CannotLoadStore as error:
        yield Finding(path, error.offset or 0, error.reason)
