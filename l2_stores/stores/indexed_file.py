"""Indexed files: fixed-size keys to variable-size values with a fixed-size header.

A store directory holds ``index/`` (the index engine, whose entries are
``offset u64 | length u32 | header``) and ``values.00000000`` (see
``engine.values``). ``header`` and ``mem`` read only the index; ``read``
reads the index, then the value's record with one ``pread``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Self

from ..codecs import Codec
from ..engine.framing import HEADER_SIZE, Expected
from ..engine.index import Index
from ..engine.values import POINTER, ValuesFile
from ..errors import CannotLoadStore, CodecError
from ..mode import Mode
from .base import EngineStore
from .indexable import DEFAULT_INDEX_BUFFER_SIZE

logger = logging.getLogger("l2_stores.indexed_file")

DEFAULT_CACHE_SIZE = 1_000
INDEX_DIRECTORY = "index"
VALUES_FILE = "values.00000000"


class _LruCache:
    """The encoded (value, header) of the last ``capacity`` keys read or appended.

    Encoded bytes are kept, not decoded objects, so that a caller changing a
    returned value cannot change what later reads return.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bytes, bytes] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: tuple[bytes, bytes]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class IndexedFileBase(EngineStore):
    """What both indexed-file kinds share: everything but ``append``."""

    key_codec: ClassVar[Any]
    value_codec: ClassVar[Any]
    header_codec: ClassVar[Any]
    _key: ClassVar[Codec]
    _value: ClassVar[Codec]
    _header: ClassVar[Codec]
    _values: ValuesFile
    _cache: _LruCache

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = Mode.READ_WRITE,
        *,
        index_buffer_size: int = DEFAULT_INDEX_BUFFER_SIZE,
        cache_size: int = DEFAULT_CACHE_SIZE,
        fsync: bool = False,
    ) -> Self:
        """Open the indexed file at directory ``path``.

        ``index_buffer_size``: index bindings kept in memory before a merge
        (default 10,000). ``cache_size``: recently read or appended
        (value, header) pairs kept in an LRU cache (default 1,000).
        ``fsync``: every value and every flush reaches stable storage.
        """
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be a Mode, got {mode!r}")
        directory = os.fspath(path)
        store = cls(directory, mode)
        header_size = cls._header.size or 0
        expected = Expected(cls.name, cls._key.size or 0, POINTER.size + header_size, header_size)
        readonly = mode is Mode.READ_ONLY
        index_existed = os.path.isdir(os.path.join(directory, INDEX_DIRECTORY))
        values_path = os.path.join(directory, VALUES_FILE)
        values_existed = os.path.exists(values_path)
        store._engine = Index(
            os.path.join(directory, INDEX_DIRECTORY),
            expected,
            readonly=readonly,
            buffer_size=index_buffer_size,
            fsync=fsync,
            exclusive=store._waiter.force_idle,
        )
        try:
            if not values_existed:
                store._refuse_index_without_values()
            store._values = ValuesFile(values_path, expected, readonly=readonly, fsync=fsync)
            if store._values.end > HEADER_SIZE and not index_existed:
                raise CannotLoadStore(
                    f"{values_path} holds values but the index directory is missing",
                    name=cls.name,
                    path=directory,
                )
            if not readonly:
                store._drop_unreferenced_tail()
        except OSError as error:
            store._engine.close()
            raise CannotLoadStore(f"cannot load: {error}", name=cls.name, path=directory) from error
        except BaseException:
            store._engine.close()
            raise
        store._cache = _LruCache(cache_size)
        return store

    def _refuse_index_without_values(self) -> None:
        """No crash leaves index entries without a values file: refuse, create nothing."""
        if next(iter(self._engine.items()), None) is not None:
            raise CannotLoadStore(
                f"the index has entries but {VALUES_FILE} is missing",
                name=self.name,
                path=self.path,
            )

    def _drop_unreferenced_tail(self) -> None:
        """Cut orphans and torn bytes after the last record the index points at."""
        values = self._values
        if values.end == HEADER_SIZE:
            return
        last = values.last_record()
        if last is not None:
            offset, key, length = last
            entry = self._engine.get(key)
            if entry is not None and POINTER.unpack_from(entry) == (offset, length):
                return  # the file ends with a live record: nothing to cut
        referenced_end = HEADER_SIZE
        for _, entry in self._engine.items():
            offset, length = POINTER.unpack_from(entry)
            referenced_end = max(referenced_end, values.record_end(offset, length))
        if referenced_end > values.end:
            values.close()
            raise CannotLoadStore(
                f"the index points past the end of {values.path} "
                f"(offset {referenced_end}, file of {values.end} bytes)",
                name=self.name,
                path=self.path,
            )
        if referenced_end < values.end:
            logger.warning(
                "%s: dropping %d unreferenced bytes at the end of %s",
                self.name,
                values.end - referenced_end,
                values.path,
            )
            values.cut(referenced_end)

    # -- reads

    def mem(self, key: Any) -> bool:
        """True when ``key`` has a value."""
        encoded = self._encode(self._key, key)
        with self._waiter.task():
            self._check_open()
            return self._engine.get(encoded) is not None

    def header(self, key: Any) -> Any | None:
        """The header of ``key``'s value, or None; never reads the value."""
        encoded = self._encode(self._key, key)
        with self._waiter.task():
            self._check_open()
            entry = self._engine.get(encoded)
        if entry is None:
            return None
        return self._decode(self._header, entry[POINTER.size :])

    def read(self, key: Any) -> tuple[Any, Any] | None:
        """The ``(value, header)`` of ``key``, or None."""
        encoded = self._encode(self._key, key)
        with self._waiter.task():
            self._check_open()
            raw = self._cache.get(encoded)
            if raw is None:
                entry = self._engine.get(encoded)
                if entry is None:
                    return None
                raw = self._read_raw(encoded, entry)
                # Cached inside the task: no append can slip in between.
                self._cache.put(encoded, raw)
        return self._decode(self._value, raw[0]), self._decode(self._header, raw[1])

    def _read_raw(self, key: bytes, entry: bytes) -> tuple[bytes, bytes]:
        offset, length = POINTER.unpack_from(entry)
        return self._values.read(offset, length, key), entry[POINTER.size :]

    def keys(self) -> Iterator[Any]:
        """Every key with a value at the time of the call, once each, in no particular order."""
        return self._keys(self._snapshot())

    def _keys(self, snapshot: Iterator[tuple[bytes, bytes]]) -> Iterator[Any]:
        for key, _ in snapshot:
            yield self._decode(self._key, key)

    def items(self) -> Iterator[tuple[Any, tuple[Any, Any]]]:
        """Every ``(key, (value, header))`` at the time of the call, in no particular order."""
        return self._items(self._snapshot())

    def _items(
        self, snapshot: Iterator[tuple[bytes, bytes]]
    ) -> Iterator[tuple[Any, tuple[Any, Any]]]:
        for key, entry in snapshot:
            with self._waiter.task():
                self._check_open()
                value, header = self._read_raw(key, entry)
            pair = (self._decode(self._value, value), self._decode(self._header, header))
            yield self._decode(self._key, key), pair

    # -- writes

    def _append(self, key: Any, value: Any, header: Any, flush: bool) -> None:
        self._check_writable("append")
        try:
            encoded_key = self._key.encode(key)
            encoded_value = self._value.encode(value)
            encoded_header = self._header.encode(header)
        except CodecError as error:
            raise self._codec_error(error) from error
        self._engine.reserve()
        with self._waiter.force_idle():
            self._check_open()
            offset = self._values.append(encoded_key, encoded_value)
            entry = POINTER.pack(offset, len(encoded_value)) + encoded_header
            self._engine.put(encoded_key, entry, flush=flush)
            self._cache.put(encoded_key, (encoded_value, encoded_header))

    def _after_sync(self) -> None:
        self._values.reopen_if_missing()
        self._cache.clear()

    def _close_resources(self) -> None:
        try:
            self._engine.close()
        finally:
            self._values.close()


class IndexedFile(IndexedFileBase):
    """Keys to values with a header given at each append (``Make_indexed_file``)."""

    def append(self, key: Any, value: Any, header: Any, *, flush: bool = True) -> None:
        """Append ``value`` with ``header`` for ``key``; a later append for the key wins."""
        self._append(key, value, header, flush)


class SimpleIndexedFile(IndexedFileBase):
    """Keys to values whose header is derived from the value (``Make_simple_indexed_file``)."""

    header_of: ClassVar[Callable[[Any], Any]]

    def append(self, key: Any, value: Any, *, flush: bool = True) -> None:
        """Append ``value`` for ``key`` with the header ``header_of(value)``."""
        self._append(key, value, type(self).header_of(value), flush)
