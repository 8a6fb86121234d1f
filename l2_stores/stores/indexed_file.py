"""Indexed files: fixed-size keys to variable-size values with a fixed-size header.

A store directory holds ``index/`` (the index engine, whose entries are
``offset u64 | length u32 | file number u32 | header``) and the values files
``values.<number>`` (see ``engine.values`` and ``engine.value_files``).
``header`` and ``mem`` read only the index; ``read`` reads the index, then
the value's record with one ``pread``.

GC copies the retained values into a new values file, then merges the index
with their new places; the old values files are deleted once the merged
index is in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from types import MethodType
from typing import Any, ClassVar, Self

from .. import batches, snapshots
from ..codecs import Codec
from ..engine.accel import AcceleratedIndexedAppend
from ..engine.files import index_bytes, index_header, stored_generation
from ..engine.framing import HEADER_SIZE, Expected
from ..engine.index import GcMergeRenamed, Index
from ..engine.interface import EnginePart, Prepared
from ..engine.interface import Snapshot as EngineSnapshot
from ..engine.run import sorted_in_steps
from ..engine.value_files import ValueFiles, ValuesOnDisk, list_values, values_name
from ..engine.values import POINTER
from ..errors import (
    CannotLoadStore,
    CodecError,
    DecodingError,
    StoreLockedError,
)
from ..idle_waiter import exclusive_write
from ..mode import Mode
from .base import WOULD_BLOCK, EngineSnapshotView, H, K, MappingReads, V, WouldBlock
from .collector import Collectable, Lookup
from .indexable import DEFAULT_INDEX_BUFFER_SIZE
from .layout import IDENTITY, INDEX_DIRECTORY
from .lru import Cache, lru_cache

logger = logging.getLogger("l2_stores.indexed_file")

DEFAULT_CACHE_SIZE = 1_000
DEFAULT_CACHE_BYTES = 512 * 1024
#: Largest value that asyncio reads or appends on the event loop itself.
INLINE_VALUE_SIZE = 16 * 1024
_RELOAD_ATTEMPTS = 50


def _file_order(item: tuple[bytes, bytes]) -> tuple[int, int]:
    """(file number, offset) of an index entry: the order of a sequential copy."""
    offset, _, number = POINTER.unpack_from(item[1])
    return number, offset


class IndexedFileBase(Collectable[K, tuple[V, H]]):
    """What both indexed-file kinds share: everything but ``append``."""

    key_codec: ClassVar[Any]
    value_codec: ClassVar[Any]
    header_codec: ClassVar[Any]
    _key: ClassVar[Codec]
    _value: ClassVar[Codec]
    _header: ClassVar[Codec]
    _values: ValueFiles
    _cache: Cache
    _gc_copy: int | None = None
    _roles = ("key", "value", "header")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = Mode.READ_WRITE,
        *,
        index_buffer_size: int = DEFAULT_INDEX_BUFFER_SIZE,
        cache_size: int = DEFAULT_CACHE_SIZE,
        fsync: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> Self:
        """Open the indexed file at directory ``path``.

        ``index_buffer_size``: index bindings kept in memory before a merge
        (default 10,000; up to three times as many while a merge runs).
        ``cache_size``: recently read or appended (value, header) pairs kept
        in an LRU cache (default 1,000).
        ``fsync``: every value and every flush reaches stable storage.
        ``cache_bytes``: the most bytes of values and headers the cache holds
        (default 512 KiB); a pair larger than this is not cached.
        """
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be a Mode, got {mode!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be at least 0, got {cache_size}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be at least 0, got {cache_bytes}")
        cache = lru_cache(cache_size, cache_bytes)
        directory = os.fspath(path)
        store = cls(directory, mode)
        header_size = cls._header.size or 0
        expected = Expected(cls.name, cls._key.size or 0, POINTER.size + header_size, header_size)
        readonly = mode is Mode.READ_ONLY
        unrecorded = store._check_identity()
        index_existed = os.path.isdir(os.path.join(directory, INDEX_DIRECTORY))
        values_existed = bool(list_values(directory)[0])
        store._fsync = bool(fsync)
        membership = store._attach_batches(os.path.join(directory, INDEX_DIRECTORY))
        try:
            store._engine = Index(
                os.path.join(directory, INDEX_DIRECTORY),
                expected,
                readonly=readonly,
                buffer_size=index_buffer_size,
                fsync=fsync,
                exclusive=store._waiter.force_idle,
                referenced=ValuesOnDisk(directory),
                committed=membership.committed if membership is not None else None,
            )
        except StoreLockedError as error:  # name the store, not its index directory
            if membership is not None:
                membership.abandon()
            raise StoreLockedError(error.reason, name=cls.name, path=directory) from None
        except BaseException:
            if membership is not None:
                membership.abandon()
            raise
        try:
            if not values_existed:
                store._refuse_index_without_values()
            store._open_values(expected, readonly, fsync)
            if store._values.has_values and not index_existed:
                raise CannotLoadStore(
                    f"{directory} holds values but the index directory is missing",
                    name=cls.name,
                    path=directory,
                )
            if not readonly:
                store._drop_unreferenced_tail()
            store._record_identity(unrecorded)
        except OSError as error:
            store._close_resources(durable=False)
            if membership is not None:
                membership.abandon()
            raise CannotLoadStore(f"cannot load: {error}", name=cls.name, path=directory) from error
        except BaseException:
            store._close_resources(durable=False)
            if membership is not None:
                membership.abandon()
            raise
        store._cache = cache
        store._catch_up(membership)
        store._bind_fast_paths()
        return store._loaded()

    def _disk_bytes(self) -> dict[str, int]:
        found = index_bytes(os.path.join(self.path, INDEX_DIRECTORY))
        found["values"] = 0
        numbers, _ = list_values(self.path)
        for number in numbers:
            with contextlib.suppress(FileNotFoundError):  # a GC may delete one meanwhile
                found["values"] += os.path.getsize(os.path.join(self.path, values_name(number)))
        with contextlib.suppress(FileNotFoundError):
            found["other"] += os.path.getsize(os.path.join(self.path, IDENTITY))
        return found

    def _bytes_written_beside(self) -> int:
        return self._values.bytes_written()

    def _more_stats(self) -> dict[str, Any]:
        cache = self._cache
        return super()._more_stats() | {"cache_hits": cache.hits, "cache_misses": cache.misses}

    def _bind_fast_paths(self) -> None:
        # A view is a copy: it must not keep the writer's append.
        self.__dict__.pop("append", None)
        if (
            not self._writable
            or self._is_view
            or AcceleratedIndexedAppend is None
            or type(self).append is not IndexedFileBase.append
            or self._bytes_key_size < 0
            or self._bytes_header_size < 0
            or not self._greedy_bytes_value
        ):
            return
        append = AcceleratedIndexedAppend(self._engine.put, self._cache)
        self._values.follow_target(append.retarget)
        fast = exclusive_write(
            self._waiter,
            self._lifetime,
            self._engine,
            append,
            (self._bytes_key_size, -1, self._bytes_header_size),
            # through a proxy: a store must not refer to itself (see IndexableStore)
            MethodType(IndexedFileBase.append, weakref.proxy(self)),
        )
        if fast is not None:
            self.append = fast  # type: ignore[method-assign,assignment]

    def _open_values(self, expected: Expected, readonly: bool, fsync: bool) -> None:
        """Open the values files the index points into.

        A read-only load retries when a writer's GC committed meanwhile, since
        that deletes the files the index just read may point into.
        """
        engine = self._engine
        for _ in range(_RELOAD_ATTEMPTS):
            generation = engine.generation
            self._values = ValueFiles(
                self.path, expected, readonly=readonly, fsync=fsync, floor=engine.tag
            )
            if not readonly or not self._index_moved_since(generation):
                return
            self._values.close()
            engine.sync()
        raise CannotLoadStore("files kept changing while loading", name=self.name, path=self.path)

    def _index_moved_since(self, generation: int) -> bool:
        return stored_generation(os.path.join(self.path, INDEX_DIRECTORY)) != generation

    def _refuse_index_without_values(self) -> None:
        """No crash leaves index entries without a values file: refuse, create nothing."""
        if next(iter(self._engine.items()), None) is not None:
            raise CannotLoadStore(
                "the index has entries but there is no values file",
                name=self.name,
                path=self.path,
            )

    def _drop_unreferenced_tail(self) -> None:
        """Cut orphans and torn bytes after the last record the index points at.

        Only the target (the file appends go to) can have them. Pointers into
        files that are not there refuse the load.
        """
        values = self._values
        target = values.target
        assert target is not None
        if target.end == HEADER_SIZE:
            return
        last = target.last_record()
        if last is not None:
            offset, key, length = last
            entry = self._engine.get(key)
            if entry is not None and POINTER.unpack_from(entry) == (offset, length, target.number):
                return  # the file ends with a live record: nothing to cut
        referenced_end = HEADER_SIZE
        live = set(values.numbers)
        for _, entry in self._engine.items():
            offset, length, number = POINTER.unpack_from(entry)
            if number == target.number:
                referenced_end = max(referenced_end, target.record_end(offset, length))
            elif number not in live:
                raise CannotLoadStore(
                    f"the index points into values file {number}, which is missing",
                    name=self.name,
                    path=self.path,
                )
        if referenced_end > target.end:
            raise CannotLoadStore(
                f"the index points past the end of {target.path} "
                f"(offset {referenced_end}, file of {target.end} bytes)",
                name=self.name,
                path=self.path,
            )
        if referenced_end < target.end:
            logger.warning(
                "%s: dropping %d unreferenced bytes at the end of %s",
                self.name,
                target.end - referenced_end,
                target.path,
            )
            target.cut(referenced_end)

    # -- reads

    def mem(self, key: K) -> bool:
        """True when ``key`` has a value."""
        encoded = self._encode(self._key, key)
        with self._waiter.task():
            self._check_open()
            return self._engine.get(encoded) is not None

    def header(self, key: K) -> H | None:
        """The header of ``key``'s value, or None; never reads the value."""
        raw_key: Any = key  # as given: the codec decides what it takes
        if type(raw_key) is bytes and len(raw_key) == self._bytes_key_size:
            encoded = raw_key
        else:
            encoded = self._encode(self._key, key)
        waiter = self._waiter
        waiter.enter_task()
        try:
            if self._lifetime.closed:
                self._raise_closed()
            entry = self._engine.get(encoded)
        finally:
            waiter.exit_task()
        if entry is None:
            return None
        try:
            header: H = self._header.decode(entry[POINTER.size :])
        except DecodingError as error:
            raise self._decoding_error(error) from error
        return header

    def read(self, key: K) -> tuple[V, H] | None:
        """The ``(value, header)`` of ``key``, or None."""
        raw_key: Any = key  # as given: the codec decides what it takes
        if type(raw_key) is bytes and len(raw_key) == self._bytes_key_size:
            encoded = raw_key
        else:
            encoded = self._encode(self._key, key)
        cache = self._cache
        waiter = self._waiter
        waiter.enter_task()
        try:
            if self._lifetime.closed:
                self._raise_closed()
            raw = cache.get(encoded)
            if raw is None:
                entry = self._engine.get(encoded)
                if entry is None:
                    return None
                raw = self._read_raw(encoded, entry)
                # Cached inside the task: no append can slip in between.
                cache.put(encoded, raw)
        finally:
            waiter.exit_task()
        try:
            return self._value.decode(raw[0]), self._header.decode(raw[1])
        except DecodingError as error:
            raise self._decoding_error(error) from error

    def _header_nowait(self, key: Any) -> Any:
        encoded = self._encode(self._key, key)
        entry = self._in_task_nowait(partial(self._engine.get, encoded))
        if entry is None or isinstance(entry, WouldBlock):
            return entry
        return self._decode(self._header, entry[POINTER.size :])

    def _read_nowait(self, key: Any) -> Any:
        """``read`` when cached, absent or small (``INLINE_VALUE_SIZE``); else WOULD_BLOCK."""
        encoded = self._encode(self._key, key)

        def lookup() -> tuple[bytes, bytes] | WouldBlock | None:
            raw = self._cache.get(encoded)
            if raw is not None:
                return raw
            entry = self._engine.get(encoded)
            if entry is None:
                return None
            if POINTER.unpack_from(entry)[1] > INLINE_VALUE_SIZE:
                return WOULD_BLOCK
            raw = self._read_raw(encoded, entry)
            self._cache.put(encoded, raw)
            return raw

        raw = self._in_task_nowait(lookup)
        if raw is None or isinstance(raw, WouldBlock):
            return raw
        return self._decode(self._value, raw[0]), self._decode(self._header, raw[1])

    def _read_raw(self, key: bytes, entry: bytes) -> tuple[bytes, bytes]:
        offset, length, number = POINTER.unpack_from(entry)
        return self._values.read(number, offset, length, key), entry[POINTER.size :]

    def keys(
        self, start: K | None = None, stop: K | None = None, *, reverse: bool = False
    ) -> Iterator[K]:
        """The keys with a value now and ``start <= key < stop`` (None: open), in key order
        (``reverse``: descending), each once."""
        return self._keys(self._snapshot(start, stop, reverse))

    def _keys(self, snapshot: Iterator[tuple[bytes, bytes]]) -> Iterator[Any]:
        for key, _ in snapshot:
            yield self._decode(self._key, key)

    def items(
        self, start: K | None = None, stop: K | None = None, *, reverse: bool = False
    ) -> Iterator[tuple[K, tuple[V, H]]]:
        """The ``(key, (value, header))`` pairs now with ``start <= key < stop``, as ``keys``."""
        # the values files pinned: readable even after a GC deleted them
        return self._items(*self._raw_items(start, stop, reverse))

    def _keys_nowait(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[Any] | WouldBlock:
        snapshot = self._snapshot_nowait(start, stop, reverse)
        return snapshot if isinstance(snapshot, WouldBlock) else self._keys(snapshot)

    def _items_nowait(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[tuple[Any, tuple[Any, Any]]] | WouldBlock:
        low, high = self._bounds(start, stop)
        taken = self._in_task_nowait(
            lambda: (self._ordered(low, high, reverse), self._values.pin())
        )
        if isinstance(taken, WouldBlock):
            return taken
        snapshot, pinned = taken
        return self._items(snapshot, pinned)

    def _point_read(self, key: K) -> tuple[V, H] | None:
        return self.read(key)

    def _items(
        self, snapshot: Iterator[tuple[bytes, bytes]], pinned: dict[int, Any]
    ) -> Iterator[tuple[Any, tuple[Any, Any]]]:
        for key, entry in snapshot:
            value = self._read_pinned(key, entry, pinned)
            header = self._decode(self._header, entry[POINTER.size :])
            yield self._decode(self._key, key), (self._decode(self._value, value), header)

    # -- writes

    def append(self, key: K, value: V, header: H, *, flush: bool = True) -> None:
        """Append ``value`` with ``header`` for ``key``; a later append for the key wins."""
        raw_key: Any = key  # as given: the codecs decide what they take
        raw_value: Any = value
        raw_header: Any = header
        if not self._writable:
            self._check_writable("append")
        try:
            if type(raw_key) is bytes and len(raw_key) == self._bytes_key_size:
                encoded_key = raw_key
            else:
                encoded_key = self._key.encode(key)
            if type(raw_value) is bytes and self._greedy_bytes_value:
                encoded_value = raw_value
            else:
                encoded_value = self._value.encode(value)
            if type(raw_header) is bytes and len(raw_header) == self._bytes_header_size:
                encoded_header = raw_header
            else:
                encoded_header = self._header.encode(header)
        except CodecError as error:
            raise self._codec_error(error) from error
        engine = self._engine
        if engine.pacing:
            engine.reserve()
        waiter = self._waiter
        waiter.enter_exclusive()
        try:
            if self._lifetime.closed:
                self._raise_closed()
            target = self._values.target  # changed only in exclusive sections
            assert target is not None
            entry = target.append_entry(encoded_key, encoded_value, encoded_header)
            engine.put(encoded_key, entry, flush)
            self._cache.put(encoded_key, (encoded_value, encoded_header))
        finally:
            waiter.exit_exclusive()

    #: The append of a value with its header, whatever the kind's own ``append``.
    _append = append

    def _append_nowait(self, key: Any, value: Any, header: Any, flush: bool) -> bool:
        """``append`` if it needs no wait, no fsync and the value is small; True if done."""
        self._check_writable("append")
        encoded_key = self._encode(self._key, key)
        encoded_value = self._encode(self._value, value)
        encoded_header = self._encode(self._header, header)
        if len(encoded_value) > INLINE_VALUE_SIZE:
            return False

        def append() -> None:
            target = self._values.target
            assert target is not None
            entry = target.append_entry(encoded_key, encoded_value, encoded_header)
            self._engine.put(encoded_key, entry, flush)
            self._cache.put(encoded_key, (encoded_value, encoded_header))

        return self._exclusive_nowait(self._engine.can_put_at_once, append)

    def _after_sync(self) -> None:
        engine = self._engine
        for _ in range(_RELOAD_ATTEMPTS):
            generation = engine.generation
            self._values.refresh(engine.tag)
            if not self._index_moved_since(generation):
                break
            engine.sync()
        self._cache.clear()

    def _limit_parts(self, parts: int) -> bool:
        engine = self._engine
        with self._waiter.force_idle():
            self._check_open()
            if not engine.limit_parts(parts):
                return False
            self._values.refresh(engine.tag)
            self._cache.clear()
            # a GC since may have deleted values the cut index points at: read again
            header = index_header(os.path.join(self.path, INDEX_DIRECTORY), self.name)
            return header is None or header.tag == engine.tag

    def _close_resources(self, durable: bool = True) -> None:
        try:
            self._engine.close(durable=durable)
        finally:
            values = getattr(self, "_values", None)
            if values is not None:
                values.close()
            self._leave_batches()

    def _close_resources_after_failed_load(self) -> None:
        self._close_resources(durable=False)

    # -- batches (see ``batches``)

    def _batch_view(self, batch: batches.Batch) -> IndexedFileBatchView:
        return IndexedFileBatchView(batch, self)

    def _snapshot_view(self, snapshot: snapshots.Snapshot) -> IndexedFileSnapshotView:
        with self._waiter.task():
            self._check_open()
            return IndexedFileSnapshotView(
                snapshot, self, self._engine.snapshot(), self._values.pin()
            )

    def _prepare_part(self, data: bytes) -> Prepared:
        """A part whose ``write`` appends its values, then writes its index entries as the
        engine's part."""
        writes = _decode_part(data, self._key.size or 0, self._header.size or 0)
        return _PreparedAppends(self._engine.prepare_part(()), self._values, self._cache, writes)

    def _raw_items(
        self, start: Any, stop: Any, reverse: bool
    ) -> tuple[Iterator[tuple[bytes, bytes]], dict[int, Any]]:
        """The engine's snapshot with ``start <= key < stop`` and the values files it needs."""
        low, high = self._bounds(start, stop)
        with self._waiter.task():
            self._check_open()
            return self._ordered(low, high, reverse), self._values.pin()

    def _read_pinned(self, key: bytes, entry: bytes, pinned: dict[int, Any]) -> bytes:
        """The value an index entry of a snapshot points at."""
        offset, length, number = POINTER.unpack_from(entry)
        with self._waiter.task():
            self._check_open()
            return self._values.read_pinned(pinned, number, offset, length, key)

    # -- GC

    def _gc_begin(self) -> Lookup:
        lookup = self._engine.begin_gc()
        try:
            self._gc_copy = self._values.begin_gc()
        except BaseException:
            self._engine.end_gc()
            raise
        return lookup

    def _gc_value(self, key: bytes, entry: bytes) -> Any:
        value, header = self._read_raw(key, entry)
        return self._decode(self._value, value), self._decode(self._header, header)

    def _gc_commit(self, retained: dict[bytes, bytes], check: Callable[[], None]) -> None:
        """Copy the retained values into the GC's file, then merge the index onto it."""
        number = self._gc_copy
        assert number is not None
        values = self._values
        copy = values.create_copy(number)
        relocated: dict[bytes, bytes | None] = {}
        by_place = sorted_in_steps(list(retained.items()), key=_file_order)
        for key, entry in by_place:
            check()
            offset, length, source = POINTER.unpack_from(entry)
            value = values.read(source, offset, length, key)
            new_offset = copy.append(key, value)
            relocated[key] = POINTER.pack(new_offset, length, number) + entry[POINTER.size :]
        copy.release_reserve()
        copy.sync()
        check()
        # Cached values of dropped keys must go in the same exclusive section
        # as the index switch, or a read could still return them.
        try:
            self._engine.collect(relocated, tag=number, on_switch=self._cache.clear)
        except GcMergeRenamed:
            self._gc_copy = None  # a load would see the GC's index: keep its values file
            raise
        self._gc_copy = None
        with self._waiter.force_idle():
            freed = values.commit(number)
        logger.info("%s: GC freed %d bytes of values files", self.name, freed)

    def _gc_abandon(self) -> None:
        self._engine.end_gc()
        if self._gc_copy is not None:
            self._values.drop_copy(self._gc_copy)
            self._gc_copy = None


_VALUE_LENGTH = struct.Struct("<I")


class _PreparedAppends(Prepared):
    """A part's values appended and its index part written, not bound yet."""

    def __init__(
        self,
        index_part: EnginePart,
        values: ValueFiles,
        cache: Cache,
        writes: list[tuple[bytes, bytes, bytes]],
    ) -> None:
        self._index_part = index_part
        self._values = values
        self._cache = cache
        self._writes = writes

    def make_room(self) -> None:
        self._index_part.make_room()

    def write(self) -> None:
        writes = self._writes
        target = self._values.target
        assert target is not None
        entries = target.append_entries(writes)
        self._index_part.ops[:] = [
            (key, entry) for (key, _, _), entry in zip(writes, entries, strict=True)
        ]
        self._index_part.write()

    def end(self) -> None:
        self._index_part.end()

    def take(self) -> None:
        cache = self._cache
        for key, _, _ in self._writes:  # first: an interrupt below leaves no stale entry
            cache.discard(key)
        self._index_part.take()
        for key, value, header in self._writes:
            cache.put(key, (value, header))

    def cancel(self) -> None:
        self._index_part.cancel()  # the values stay, referenced by nothing


def _encode_part(writes: dict[bytes, tuple[bytes, bytes]]) -> bytes:
    """A batch's appends as ``_take_part`` reads them: key, header, value length, value."""
    return b"".join(
        key + header + _VALUE_LENGTH.pack(len(value)) + value
        for key, (value, header) in writes.items()
    )


def _decode_part(data: bytes, key_size: int, header_size: int) -> list[tuple[bytes, bytes, bytes]]:
    """The ``(key, value, header)`` appends of a part."""
    writes = []
    at = 0
    while at < len(data):
        key = data[at : at + key_size]
        header = data[at + key_size : at + key_size + header_size]
        at += key_size + header_size
        (length,) = _VALUE_LENGTH.unpack_from(data, at)
        at += _VALUE_LENGTH.size
        writes.append((key, data[at : at + length], header))
        at += length
    return writes


class IndexedFile(IndexedFileBase[K, V, H]):
    """Keys to values with a header given at each append (``Make_indexed_file``)."""

    _kind = "indexed_file"

    # append(key, value, header, *, flush=True) is IndexedFileBase.append


class SimpleIndexedFile(IndexedFileBase[K, V, H]):
    """Keys to values whose header is derived from the value (``Make_simple_indexed_file``)."""

    _kind = "simple_indexed_file"

    header_of: ClassVar[Callable[[Any], Any]]

    def append(self, key: K, value: V, *, flush: bool = True) -> None:  # type: ignore[override]
        """Append ``value`` for ``key`` with the header ``header_of(value)``."""
        self._append(key, value, type(self).header_of(value), flush=flush)


class IndexedFileBatchView(batches.BatchView, MappingReads[Any, Any]):
    """An indexed file inside a batch: its appends held by the batch, its reads the
    store's as committed at the moment of the read with the batch's appends over them."""

    _store: IndexedFileBase[Any, Any, Any]

    def __init__(self, batch: batches.Batch, store: IndexedFileBase[Any, Any, Any]) -> None:
        super().__init__(batch, store)
        #: The batch's last append of each key: (value, header), encoded.
        self._writes: dict[bytes, tuple[bytes, bytes]] = {}

    def _has_writes(self) -> bool:
        return bool(self._writes)

    def _encode_part(self) -> bytes:
        return _encode_part(self._writes)

    def _encoded_key(self, key: Any) -> bytes:
        store = self._store
        if type(key) is bytes and len(key) == store._bytes_key_size:
            return key
        return store._encode(store._key, key)

    def append(self, key: Any, value: Any, header: Any = None, *, flush: bool = True) -> None:
        """Append ``value`` with ``header`` for ``key`` when the batch commits (a simple
        indexed file derives the header; ``flush`` means nothing here)."""
        self._check_open()
        store = self._store
        if isinstance(store, SimpleIndexedFile):
            header = type(store).header_of(value)
        self._writes[self._encoded_key(key)] = (
            store._encode(store._value, value),
            store._encode(store._header, header),
        )

    def _written(self, key: Any) -> tuple[bytes, tuple[bytes, bytes] | None]:
        self._check_open()
        encoded = self._encoded_key(key)
        return encoded, self._writes.get(encoded)

    def read(self, key: Any) -> tuple[Any, Any] | None:
        """The batch's ``(value, header)`` of ``key`` if it appended one, else the store's."""
        _, written = self._written(key)
        if written is None:
            return self._store.read(key)
        store = self._store
        return store._decode(store._value, written[0]), store._decode(store._header, written[1])

    def header(self, key: Any) -> Any | None:
        """The header of ``key``'s value, the batch's appends first."""
        _, written = self._written(key)
        if written is None:
            return self._store.header(key)
        return self._store._decode(self._store._header, written[1])

    def mem(self, key: Any) -> bool:
        """True when ``key`` has a value, the batch's appends counted."""
        _, written = self._written(key)
        return written is not None or self._store.mem(key)

    def _pairs(self, start: Any, stop: Any, reverse: bool) -> Iterator[tuple[bytes, Any]]:
        self._check_open()
        store = self._store
        low, high = store._bounds(start, stop)
        snapshot, pinned = store._raw_items(start, stop, reverse)
        writes: dict[bytes, Any] = dict(self._writes)
        for key, found in batches.iter_sorted_overlay(snapshot, writes, low, high, reverse):
            yield key, found if isinstance(found, tuple) else (found, pinned)

    def keys(self, start: Any = None, stop: Any = None, *, reverse: bool = False) -> Iterator[Any]:
        """The keys with a value, ``start <= key < stop``, in key order, the batch's included."""
        store = self._store
        for key, _ in self._pairs(start, stop, reverse):
            yield store._decode(store._key, key)

    def items(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> Iterator[tuple[Any, tuple[Any, Any]]]:
        """The ``(key, (value, header))`` pairs, as ``keys``."""
        store = self._store
        for key, found in self._pairs(start, stop, reverse):
            if isinstance(found[1], dict):  # the store's: an index entry and the pinned files
                entry, pinned = found
                value, header = store._read_pinned(key, entry, pinned), entry[POINTER.size :]
            else:
                value, header = found
            yield (
                store._decode(store._key, key),
                (store._decode(store._value, value), store._decode(store._header, header)),
            )

    def _point_read(self, key: Any) -> Any:
        return self.read(key)

    def __len__(self) -> int:
        """The exact number of keys with a value, the batch's appends counted."""
        self._check_open()
        store = self._store
        return len(store) + sum(not store._has_encoded(key) for key in list(self._writes))


class IndexedFileSnapshotView(EngineSnapshotView):
    """An indexed file as it was when a snapshot was taken: every read, no write. It
    pins the values files of that moment (readable even after a GC deleted them)."""

    _store: IndexedFileBase[Any, Any, Any]

    def __init__(
        self,
        snapshot: snapshots.Snapshot,
        store: IndexedFileBase[Any, Any, Any],
        engine: EngineSnapshot,
        pinned: dict[int, Any],
    ) -> None:
        super().__init__(snapshot, store, engine)
        self._pinned = pinned

    def _entry(self, key: Any) -> tuple[bytes, bytes | None]:
        store = self._store
        if type(key) is bytes and len(key) == store._bytes_key_size:
            encoded = key
        else:
            encoded = store._encode(store._key, key)
        with store._waiter.task():
            self._snapshot.check_open(store)
            return encoded, self._engine.get(encoded)

    def mem(self, key: Any) -> bool:
        """True when ``key`` had a value then."""
        return self._entry(key)[1] is not None

    def header(self, key: Any) -> Any | None:
        """The header of ``key``'s value then, or None."""
        entry = self._entry(key)[1]
        if entry is None:
            return None
        return self._store._decode(self._store._header, entry[POINTER.size :])

    def read(self, key: Any) -> tuple[Any, Any] | None:
        """The ``(value, header)`` of ``key`` then, or None."""
        encoded, entry = self._entry(key)
        if entry is None:
            return None
        store = self._store
        value = store._read_pinned(encoded, entry, self._pinned)
        return (
            store._decode(store._value, value),
            store._decode(store._header, entry[POINTER.size :]),
        )

    def keys(self, start: Any = None, stop: Any = None, *, reverse: bool = False) -> Iterator[Any]:
        """The keys with a value then, ``start <= key < stop``, in key order."""
        return self._store._keys(self._pairs(start, stop, reverse))

    def items(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> Iterator[tuple[Any, tuple[Any, Any]]]:
        """The ``(key, (value, header))`` pairs then, as ``keys``."""
        return self._store._items(self._pairs(start, stop, reverse), self._pinned)

    def _point_read(self, key: Any) -> Any:
        return self.read(key)

    append = flush = EngineSnapshotView._refuse
