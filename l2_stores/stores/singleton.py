"""Singleton stores: one updatable value in one file (``Make_singleton``).

Layout of the store file (little-endian)::

    offset  size  field
         0     8  magic ``L2SSING\\0``
         8     2  format version
        10     2  reserved, zero
        12     4  value size: bytes of the value codec, 0xFFFFFFFF if variable
        16     8  n: length of the encoded value
        24     n  the encoded value
      24+n     4  crc32 of bytes 0..24+n

A write goes to ``<path>.tmp``, is fsynced, renamed over ``<path>`` and the
directory fsynced: a reader or a crash sees the old file or the new one.
``delete`` unlinks the file. The writer lock is ``<path>.lock``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from typing import Any, ClassVar, Self

from ..codecs import Codec
from ..engine import filesystem
from ..engine.framing import FORMAT_VERSION, Finding, crc_ok, pwrite_all, with_crc
from ..engine.lock import WriterLock
from ..errors import CannotLoadStore, CannotWriteToStore
from ..mode import Mode
from .base import Store

MAGIC = b"L2SSING\0"
VARIABLE_SIZE = 0xFFFFFFFF
_HEADER = struct.Struct("<8sHHIQ")
HEADER_SIZE = 24
assert _HEADER.size == HEADER_SIZE


def _show_size(size: int) -> str:
    return "of variable size" if size == VARIABLE_SIZE else f"{size} B"


class _Cache:
    """The decoded value, shared by a store and its read-only views."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any | None = None


class SingletonStore(Store):
    """One value, or none, kept in one file and cached in memory."""

    value_codec: ClassVar[Any]
    _value: ClassVar[Codec]

    def __init__(self, path: str, mode: Mode) -> None:
        super().__init__(path, mode)
        self._lock: WriterLock | None = None
        self._cache = _Cache()

    @classmethod
    def load(cls, path: str | os.PathLike[str], mode: Mode = Mode.READ_WRITE) -> Self:
        """Open the singleton stored in file ``path`` (parent directories are
        created in ``READ_WRITE``)."""
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be a Mode, got {mode!r}")
        store = cls(os.fspath(path), mode)
        if mode is Mode.READ_WRITE:
            directory = os.path.dirname(os.path.abspath(store.path))
            try:
                filesystem.make_directories(directory)
            except OSError as error:
                raise CannotLoadStore(
                    f"cannot create directory: {error}", name=cls.name, path=store.path
                ) from error
            store._lock = WriterLock(store.path + ".lock", cls.name, store.path)
        try:
            store._cache.value = store._read_file()
        except BaseException:
            store._release()
            raise
        if mode is Mode.READ_WRITE:  # a write cut short by a crash
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(store.path + ".tmp")
        return store

    @property
    def _value_size(self) -> int:
        size = self._value.size
        return VARIABLE_SIZE if size is None else size

    def _read_file(self) -> Any | None:
        found = read_singleton_file(self.path, self.name)
        if found is None:
            return None
        value_size, encoded = found
        if value_size != self._value_size:
            raise CannotLoadStore(
                f"encoding sizes differ: expected value {_show_size(self._value_size)}, "
                f"found value {_show_size(value_size)} (file {self.path}, offset 12)",
                name=self.name,
                path=self.path,
            )
        return self._decode(self._value, encoded)

    def read(self) -> Any | None:
        """The value, or None when nothing was written or after ``delete``."""
        with self._waiter.task():
            self._check_open()
            return self._cache.value

    def _read_nowait(self) -> Any:
        return self._in_task_nowait(lambda: self._cache.value)

    def write(self, value: Any) -> None:
        """Replace the value, atomically and durably."""
        self._check_writable("write")
        encoded = self._encode(self._value, value)
        record = with_crc(
            _HEADER.pack(MAGIC, FORMAT_VERSION, 0, self._value_size, len(encoded)) + encoded
        )
        decoded = self._decode(self._value, encoded)
        with self._waiter.force_idle():
            self._check_open()
            temporary = self.path + ".tmp"
            try:
                fd = filesystem.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                try:
                    pwrite_all(fd, record, 0)
                    filesystem.fsync(fd)
                finally:
                    os.close(fd)
                filesystem.rename(temporary, self.path)
            except OSError as error:
                with contextlib.suppress(OSError):
                    filesystem.unlink(temporary)
                raise self._write_error("write", error) from error
            self._cache.value = decoded  # the file is in place
            self._fsync_directory("write")

    def delete(self) -> None:
        """Remove the value."""
        self._check_writable("delete")
        with self._waiter.force_idle():
            self._check_open()
            try:
                filesystem.unlink(self.path)
            except FileNotFoundError:
                self._cache.value = None
                return
            except OSError as error:
                raise self._write_error("delete", error) from error
            self._cache.value = None  # the file is gone
            self._fsync_directory("delete")

    def _write_error(self, operation: str, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(f"cannot {operation}: {error}", name=self.name, path=self.path)

    def _fsync_directory(self, operation: str) -> None:
        try:
            filesystem.fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        except OSError as error:
            raise self._write_error(f"make the {operation} durable", error) from error

    def sync(self) -> None:
        """``READ_ONLY``: read the value the writer last wrote."""
        with self._waiter.force_idle():
            self._check_open()
            self._cache.value = self._read_file()

    def _close_resources(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def read_singleton_file(path: str, name: str = "") -> tuple[int, bytes] | None:
    """``(value size, encoded value)`` of the singleton file at ``path``; None if absent.

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

    if len(raw) < HEADER_SIZE + 4:
        raise fail(f"file cut short: {len(raw)} bytes", 0)
    magic, version, _, value_size, length = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise fail(f"not a singleton file: magic {magic!r}", 0)
    if len(raw) != HEADER_SIZE + length + 4 or not crc_ok(raw):
        raise fail("checksum mismatch or wrong length", HEADER_SIZE)
    if version != FORMAT_VERSION:
        raise fail(f"format version {version} found, version {FORMAT_VERSION} expected", 8)
    return value_size, raw[HEADER_SIZE:-4]


def check_singleton_file(path: str, name: str = "") -> Iterator[Finding]:
    """Check the singleton file at ``path``: framing, version and checksum."""
    try:
        read_singleton_file(path, name)
    except CannotLoadStore as error:
        yield Finding(path, error.offset or 0, error.reason.split(" (file ", 1)[0])
