"""Singleton stores: one updatable value in one file (``Make_singleton``).

Layout of the store file (little-endian), format version 2::

    offset  size  field
         0     8  magic ``L2SSING\\0``
         8     2  format version
        10     2  flags: bit 0 DELETED (no value: n = 0)
        12     4  value size: bytes of the value codec, 0xFFFFFFFF if variable
        16     8  parts: the batch parts the store has taken (see ``batches``)
        24     8  n: length of the encoded value
        32     n  the encoded value
      32+n     4  crc32 of bytes 0..32+n

Version 1 (written before batches) has no flags and no parts field (its
value starts at 24); it is read as parts 0, and rewritten as version 2 by
the next write.

A write goes to ``<path>.tmp``, is fsynced, renamed over ``<path>`` and the
directory fsynced (not with ``fsync=False``: the rename may then be lost
to a power loss, leaving the old value): a reader or a crash sees the old
file or the new one. ``delete`` unlinks the file, or, once the store has
taken a batch's part, writes a DELETED file that keeps its count. The
writer lock is ``<path>.lock``; the batch link ``<path>.batch``.

A batch's part is not written to the file when it commits: the batch's
journal record holds it, the store's memory takes it, and the file catches
up at the next write, at a checkpoint (when the journal wants to drop a
segment) and at close, after the journal is made durable (so the file never
holds a part whose record a power loss can still take). A ``READ_WRITE``
load takes the journal's parts the file lacks; a ``READ_ONLY`` load or sync
reads them from the journal too.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from typing import Any, ClassVar, Generic, Self

from .. import batches, snapshots
from ..codecs import Codec
from ..engine import filesystem
from ..engine.framing import FORMAT_VERSION, Finding, crc_ok, pwrite_all, with_crc
from ..engine.interface import Prepared
from ..engine.lock import WriterLock
from ..errors import CannotLoadStore, CannotWriteToStore, ReadOnlyError
from ..mode import Mode
from .base import Store, V
from .layout import SINGLETON_MAGIC as MAGIC
from .layout import Kind, identity_path, link_path
from .stats import StoreStats

VARIABLE_SIZE = 0xFFFFFFFF
SINGLETON_VERSION = 2
_HEADER = struct.Struct("<8sHHIQQ")
HEADER_SIZE = 32
assert _HEADER.size == HEADER_SIZE
_HEADER_V1 = struct.Struct("<8sHHIQ")
HEADER_SIZE_V1 = 24
assert _HEADER_V1.size == HEADER_SIZE_V1
DELETED = 0x0001
#: A part's first byte: a write (the encoded value follows) or a delete.
_PART_WRITE, _PART_DELETE = b"\x01", b"\x02"


def _show_size(size: int) -> str:
    return "of variable size" if size == VARIABLE_SIZE else f"{size} B"


class _Cache:
    """The decoded value, shared by a store and its read-only views."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any | None = None


class SingletonStore(Store, Generic[V]):
    """One value, or none, kept in one file and cached in memory."""

    value_codec: ClassVar[Any]
    _value: ClassVar[Codec]
    _kind = "singleton"
    _roles = ("value",)

    def __init__(self, path: str, mode: Mode) -> None:
        super().__init__(path, mode)
        self._lock: WriterLock | None = None
        self._cache = _Cache()
        self._bytes_written = 0
        self._fsync = True
        #: The batch parts taken, and those a power loss can no longer take.
        self._parts = 0
        self._durable_parts = 0
        #: The parts the file holds (it may lag: a batch's part is taken in memory).
        self._file_parts = 0
        self._batch: batches.Membership | None = None
        #: Why writes are refused (``_refuse_writes``); None: they are not.
        self._refusal: str | None = None
        #: A rename or unlink not made durable yet (``fsync=False``).
        self._unsynced = False
        #: What the file lacks: the encoded value (None: deleted) of the parts taken since
        #: it was written, as a one-tuple; None when the file is up to date.
        self._behind: tuple[bytes | None] | None = None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mode: Mode = Mode.READ_WRITE, *, fsync: bool = True
    ) -> Self:
        """Open the singleton stored in file ``path`` (parent directories are
        created in ``READ_WRITE``).

        ``fsync``: a write reaches stable storage before it returns (default
        True); with False the file is still fsynced before its rename (a power
        loss leaves the old value or the new one), but not the directory.
        """
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be a Mode, got {mode!r}")
        store = cls(os.fspath(path), mode)
        store._fsync = bool(fsync)
        if mode is Mode.READ_WRITE and cls._checks_identity:
            store._finish_cut_short_switch()
        unrecorded = store._check_identity()
        if mode is Mode.READ_WRITE:
            directory = os.path.dirname(os.path.abspath(store.path))
            try:
                filesystem.make_directories(directory)
            except OSError as error:
                raise CannotLoadStore(
                    f"cannot create directory: {error}", name=cls.name, path=store.path
                ) from error
            store._lock = WriterLock(store.path + ".lock", cls.name, store.path)
        membership = None
        try:
            if mode is Mode.READ_WRITE:
                membership = batches.attach(store._link_path(), cls.name, store.path)
            store._cache.value = store._read_file()
            store._record_identity(unrecorded)  # once the file is known to fit the codec
            store._file_parts = store._parts
            if mode is Mode.READ_WRITE:  # a write cut short by a crash
                with contextlib.suppress(FileNotFoundError):
                    filesystem.unlink(store.path + ".tmp")
            if membership is not None:
                # The file's name may not be durable (an fsync=False write, then a kill):
                # it is now, before the journal may drop the parts the file holds.
                store._fsync_directory("load")
                membership.catch_up(store)
                store._join(membership)
        except BaseException:
            if membership is not None:
                membership.abandon()
            store._release()
            raise
        return store._loaded()

    def _finish_cut_short_switch(self) -> None:
        """Finish a migration's (or an import's) switch to this class that a kill cut short."""
        from ..migration import finish_cut_short_switch  # (here: migration builds on stores)

        try:
            finish_cut_short_switch(self.path, self.name, self._identity())
        except OSError as error:
            raise CannotLoadStore(
                f"cannot finish the switch a migration began: {error}",
                name=self.name,
                path=self.path,
            ) from error

    @property
    def _value_size(self) -> int:
        size = self._value.size
        return VARIABLE_SIZE if size is None else size

    def _read_file(self, parts_limit: int | None = None) -> Any | None:
        found = read_singleton_file(self.path, self.name)
        if found is None:
            value_size, encoded, self._parts = self._value_size, None, 0
        else:
            value_size, encoded, self._parts = found
        if self.mode is Mode.READ_ONLY:  # the parts the file lacks are in the journal
            self._durable_parts = self._parts
            part = batches.latest_part(self._link_path(), self.name, self._parts, parts_limit)
            if part is not None:
                self._parts, data = part
                encoded = data[1:] if data[:1] == _PART_WRITE else None
        if encoded is None:
            return None
        if value_size != self._value_size:
            raise CannotLoadStore(
                f"encoding sizes differ: expected value {_show_size(self._value_size)}, "
                f"found value {_show_size(value_size)} (file {self.path}, offset 12)",
                name=self.name,
                path=self.path,
            )
        return self._decode(self._value, encoded)

    def stats(self) -> StoreStats:
        """The store's figures now: its value (bindings 1 or 0), its files' bytes, and the
        bytes its writes sent to storage since the load (see :class:`StoreStats`)."""
        with self._waiter.task():
            self._check_open()
            bindings = 0 if self._cache.value is None else 1
            written = self._bytes_written
        disk = {"value": 0, "other": 0}
        for path, kind in ((self.path, "value"), (self.path + ".lock", "other")):
            with contextlib.suppress(FileNotFoundError):
                disk[kind] += os.path.getsize(path)
        for path in (self._link_path(), identity_path(self.path, Kind.SINGLETON)):
            with contextlib.suppress(FileNotFoundError):
                disk["other"] += os.path.getsize(path)
        return StoreStats(
            name=self.name,
            path=self.path,
            kind=self._kind,
            mode=self.mode.value,
            bindings=bindings,
            disk_bytes=disk,
            bytes_written=written,
        )

    def read(self) -> V | None:
        """The value, or None when nothing was written or after ``delete``."""
        with self._waiter.task():
            self._check_open()
            return self._cache.value

    def _read_nowait(self) -> Any:
        return self._in_task_nowait(lambda: self._cache.value)

    def write(self, value: V) -> None:
        """Replace the value, atomically (and durably with ``fsync``)."""
        self._check_writable("write")
        encoded = self._encode(self._value, value)
        decoded = self._decode(self._value, encoded)
        with self._waiter.force_idle():
            self._check_open()
            self._check_not_refused()
            self._replace(encoded, decoded, self._parts, "write")
            if self._fsync:
                self._fsync_directory("write")

    def delete(self) -> None:
        """Remove the value."""
        self._check_writable("delete")
        with self._waiter.force_idle():
            self._check_open()
            self._check_not_refused()
            if self._parts or self._batch is not None:  # the file keeps the parts' count
                self._replace(None, None, self._parts, "delete")
                if self._fsync:
                    self._fsync_directory("delete")
                return
            try:
                filesystem.unlink(self.path)
            except FileNotFoundError:
                self._cache.value = None
                return
            except OSError as error:
                raise self._write_error("delete", error) from error
            self._cache.value = None  # the file is gone
            self._unsynced = True
            if self._fsync:
                self._fsync_directory("delete")

    def _replace(self, encoded: bytes | None, decoded: Any, parts: int, operation: str) -> None:
        """Put a new file in place: ``encoded`` (None: DELETED) with ``parts`` (exclusive)."""
        if self._batch is not None and parts > self._durable_parts:
            try:
                self._batch.sync_journal()  # the file must not outlive the parts' records
            except OSError as error:
                raise self._write_error(operation, error) from error
        temporary = self._write_temporary(encoded, parts, operation)
        self._rename_into_place(temporary, decoded, parts, operation)
        self._behind = None

    def _write_temporary(self, encoded: bytes | None, parts: int, operation: str) -> str:
        """Write the file of ``encoded`` (None: DELETED) with ``parts`` to ``.tmp``, fsynced."""
        flags = DELETED if encoded is None else 0
        body = b"" if encoded is None else encoded
        record = with_crc(
            _HEADER.pack(MAGIC, SINGLETON_VERSION, flags, self._value_size, parts, len(body)) + body
        )
        temporary = self.path + ".tmp"
        try:
            fd = filesystem.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                pwrite_all(fd, record, 0)
                self._bytes_written += len(record)
                filesystem.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                filesystem.unlink(temporary)
            raise self._write_error(operation, error) from error
        return temporary

    def _rename_into_place(self, temporary: str, decoded: Any, parts: int, operation: str) -> None:
        try:
            filesystem.rename(temporary, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                filesystem.unlink(temporary)
            raise self._write_error(operation, error) from error
        self._cache.value = decoded  # the file is in place
        self._parts = self._file_parts = parts
        self._unsynced = True

    def _checkpoint(self) -> None:
        """Write the parts taken since the file was, durably (the journal may then drop them)."""
        with self._waiter.force_idle():
            if self._lifetime.closed or self._behind is None:
                return
            self._replace(self._behind[0], self._cache.value, self._parts, "checkpoint")
            self._fsync_directory("checkpoint")

    def _write_error(self, operation: str, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(f"cannot {operation}: {error}", name=self.name, path=self.path)

    def _fsync_directory(self, operation: str) -> None:
        try:
            filesystem.fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        except OSError as error:
            raise self._write_error(f"make the {operation} durable", error) from error
        self._durable_parts = self._file_parts
        self._unsynced = False

    # -- batches (see ``batches``)

    def _link_path(self) -> str:
        return link_path(self.path, Kind.SINGLETON)

    def _part_count(self) -> int:
        return self._parts

    def _durable_part_count(self) -> int:
        return self._durable_parts

    def _batch_fsync(self) -> bool:
        return self._fsync

    def _join(self, membership: batches.Membership) -> None:
        self._batch = membership

    def _batch_view(self, batch: batches.Batch) -> SingletonBatchView:
        return SingletonBatchView(batch, self)

    def _snapshot_view(self, snapshot: snapshots.Snapshot) -> SingletonSnapshotView:
        with self._waiter.task():
            self._check_open()
            return SingletonSnapshotView(snapshot, self, self._cache.value)

    def _before_exclusive(self) -> None:
        pass

    def _refuse_writes(self, reason: str) -> None:
        self._refusal = reason

    def _check_not_refused(self) -> None:
        if self._refusal is not None:
            raise CannotWriteToStore(self._refusal, name=self.name, path=self.path)

    def _limit_parts(self, parts: int) -> bool:
        with self._waiter.force_idle():
            self._check_open()
            self._cache.value = self._read_file(parts)
            return self._parts <= parts

    def _prepare_part(self, data: bytes) -> _PreparedValue:
        """The part's value, taken in memory by ``finish`` (the journal holds it)."""
        encoded = data[1:] if data[:1] == _PART_WRITE else None
        decoded = None if encoded is None else self._decode(self._value, encoded)
        return _PreparedValue(self, encoded, decoded)

    def _take_part(self, data: bytes) -> None:
        with self._waiter.force_idle():
            self._check_open()
            self._prepare_part(data).finish()

    def sync(self) -> None:
        """``READ_ONLY``: read the value the writer last wrote."""
        with self._waiter.force_idle():
            self._check_open()
            if self.mode is Mode.READ_ONLY:
                self._check_identity_unchanged()
            self._cache.value = self._read_file()

    def _close_resources(self) -> None:
        try:
            if self._behind is not None:
                with contextlib.suppress(CannotWriteToStore):
                    self._replace(self._behind[0], self._cache.value, self._parts, "close")
            if self._unsynced:  # a close makes every write durable, whatever fsync says
                with contextlib.suppress(CannotWriteToStore):
                    self._fsync_directory("close")
        finally:
            self._release()
            if self._batch is not None:
                self._batch.leave(self)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def read_singleton_file(path: str, name: str = "") -> tuple[int, bytes | None, int] | None:
    """``(value size, encoded value or None when DELETED, parts)`` of the singleton file at
    ``path``; None if absent.

    Raises :class:`CannotLoadStore` when the file is cut short, corrupted or of
    another format.
    """
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CannotLoadStore(f"cannot read: {error}", name=name, path=path) from error

    def fail(what: str, offset: int) -> CannotLoadStore:
        return CannotLoadStore(
            f"{what} (file {path}, offset {offset})", name=name, path=path, offset=offset
        )

    if len(raw) < HEADER_SIZE_V1 + 4:
        raise fail(f"file cut short: {len(raw)} bytes", 0)
    magic, version, flags, value_size, length = _HEADER_V1.unpack_from(raw)
    if magic != MAGIC:
        raise fail(f"not a singleton file: magic {magic!r}", 0)
    if version not in (FORMAT_VERSION, SINGLETON_VERSION):
        raise fail(
            f"format version {version} found, version {FORMAT_VERSION} or "
            f"{SINGLETON_VERSION} expected",
            8,
        )
    header_size, parts = HEADER_SIZE_V1, 0
    if version == SINGLETON_VERSION:
        if len(raw) < HEADER_SIZE + 4:
            raise fail(f"file cut short: {len(raw)} bytes", 0)
        _, _, _, _, parts, length = _HEADER.unpack_from(raw)
        header_size = HEADER_SIZE
    else:
        flags = 0
    if len(raw) != header_size + length + 4 or not crc_ok(raw):
        raise fail("checksum mismatch or wrong length", header_size)
    return value_size, None if flags & DELETED else raw[header_size:-4], parts


def check_singleton_file(path: str, name: str = "") -> Iterator[Finding]:
    """Check the singleton file at ``path``: framing, version and checksum."""
    try:
        read_singleton_file(path, name)
    except CannotLoadStore as error:
        yield Finding(path, error.offset or 0, error.reason.split(" (file ", 1)[0])


class _PreparedValue(Prepared):
    """A singleton's part, not taken yet."""

    def __init__(self, store: SingletonStore[Any], encoded: bytes | None, decoded: Any) -> None:
        self._store = store
        self._encoded = encoded
        self._decoded = decoded

    def make_room(self) -> None:
        pass

    def write(self) -> None:
        pass  # (the journal holds the value until a checkpoint writes it)

    def end(self) -> None:
        pass

    def take(self) -> None:
        store = self._store
        store._cache.value = self._decoded
        store._parts += 1
        store._behind = (self._encoded,)

    def cancel(self) -> None:
        pass


class SingletonBatchView(batches.BatchView):
    """A singleton inside a batch: its write or delete held by the batch, its read the
    store's value unless the batch wrote one."""

    _store: SingletonStore[Any]

    def __init__(self, batch: batches.Batch, store: SingletonStore[Any]) -> None:
        super().__init__(batch, store)
        self._written: bytes | None = None  # encoded; None with _deleted: a delete
        self._deleted = False

    def _has_writes(self) -> bool:
        return self._written is not None or self._deleted

    def _encode_part(self) -> bytes:
        return _PART_DELETE if self._deleted else _PART_WRITE + (self._written or b"")

    def write(self, value: Any) -> None:
        """Replace the value when the batch commits."""
        self._check_open()
        self._written = self._store._encode(self._store._value, value)
        self._deleted = False

    def delete(self) -> None:
        """Remove the value when the batch commits."""
        self._check_open()
        self._written, self._deleted = None, True

    def read(self) -> Any | None:
        """The batch's value if it wrote one (None after its delete), else the store's."""
        self._check_open()
        if self._deleted:
            return None
        if self._written is None:
            return self._store.read()
        return self._store._decode(self._store._value, self._written)


class SingletonSnapshotView:
    """A singleton's value when a snapshot was taken."""

    def __init__(
        self, snapshot: snapshots.Snapshot, store: SingletonStore[Any], value: Any
    ) -> None:
        self._snapshot = snapshot
        self._store = store
        self._value = value

    def read(self) -> Any | None:
        """The value then, or None."""
        self._snapshot.check_open(self._store)
        return self._value

    def _refuse(self, *_: Any, **__: Any) -> None:
        store = self._store
        raise ReadOnlyError("cannot write: a snapshot", name=store.name, path=store.path)

    write = delete = _refuse
