"""Indexable stores: fixed-size keys to fixed-size values, on the index engine."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from operator import itemgetter
from types import MethodType
from typing import Any, ClassVar, Self

from .. import batches, snapshots
from ..codecs import Codec
from ..engine.framing import Expected
from ..engine.index import Index
from ..engine.interface import Prepared
from ..engine.interface import Snapshot as EngineSnapshot
from ..errors import CodecError, DecodingError
from ..idle_waiter import task_read
from ..mode import Mode
from .base import WOULD_BLOCK, EngineSnapshotView, K, MappingReads, V, WouldBlock
from .collector import Collectable

DEFAULT_INDEX_BUFFER_SIZE = 10_000


class IndexableStore(Collectable[K, V]):
    """Fixed-size keys bound to fixed-size values (``Make_indexable``).

    ``path`` is a directory. Loading ``READ_WRITE`` creates it and takes the
    writer lock; ``READ_ONLY`` creates nothing.
    """

    key_codec: ClassVar[Any]
    value_codec: ClassVar[Any]
    _key: ClassVar[Codec]
    _value: ClassVar[Codec]
    _engine: Index
    _kind = "indexable"
    _roles = ("key", "value")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = Mode.READ_WRITE,
        *,
        index_buffer_size: int = DEFAULT_INDEX_BUFFER_SIZE,
        fsync: bool = False,
    ) -> Self:
        """Open the store at directory ``path``.

        ``index_buffer_size``: bindings kept in the in-memory write buffer
        (the log) before a merge into the sorted data file (default 10,000;
        while a merge runs the next log may hold up to three times as many).
        ``fsync``: every flush also reaches stable storage (default False).
        """
        directory = os.fspath(path)
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be a Mode, got {mode!r}")
        store = cls(directory, mode)
        store._fsync = bool(fsync)
        unrecorded = store._check_identity()
        membership = store._attach_batches(directory)
        try:
            store._engine = Index(
                directory,
                Expected(cls.name, cls._key.size or 0, cls._value.size or 0),
                readonly=mode is Mode.READ_ONLY,
                buffer_size=index_buffer_size,
                fsync=fsync,
                exclusive=store._waiter.force_idle,
                committed=membership.committed if membership is not None else None,
            )
        except BaseException:
            if membership is not None:
                membership.abandon()
            raise
        try:
            store._record_identity(unrecorded)
        except BaseException:
            store._close_resources_after_failed_load()
            if membership is not None:
                membership.abandon()
            raise
        store._catch_up(membership)
        store._bind_fast_paths()
        return store._loaded()

    # -- batches (see ``batches``)

    def _batch_view(self, batch: batches.Batch) -> IndexableBatchView:
        return IndexableBatchView(batch, self)

    def _snapshot_view(self, snapshot: snapshots.Snapshot) -> IndexableSnapshotView:
        with self._waiter.task():
            self._check_open()
            return IndexableSnapshotView(snapshot, self, self._engine.snapshot())

    def _prepare_part(self, data: bytes) -> Prepared:
        key_end = 1 + (self._key.size or 0)
        size = key_end + (self._value.size or 0)
        ops = [
            (data[at + 1 : at + key_end], data[at + key_end : at + size] if data[at] == 1 else None)
            for at in range(0, len(data), size)
        ]
        return self._engine.prepare_part(ops)

    def _bind_fast_paths(self) -> None:
        if self._bytes_key_size < 0 or type(self).find is not IndexableStore.find:
            return
        fast = task_read(
            self._waiter,
            self._lifetime,
            self._engine.get,
            self._bytes_key_size,
            self._value.decode if self._bytes_value_size < 0 else None,
            # through a proxy: a store must not refer to itself, or one
            # dropped unclosed would keep its writer lock until a GC pass
            MethodType(IndexableStore.find, weakref.proxy(self)),
        )
        if fast is not None:
            self.find = fast  # type: ignore[method-assign,assignment]

    # -- reads (shared tasks)

    def find(self, key: K) -> V | None:
        """The value bound to ``key``, or None."""
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
            raw = self._engine.get(encoded)
        finally:
            waiter.exit_task()
        if raw is None or self._bytes_value_size >= 0:
            return raw  # type: ignore[return-value]  # (a Bytes(n) codec: V is bytes)
        try:
            value: V = self._value.decode(raw)
        except DecodingError as error:
            raise self._decoding_error(error) from error
        return value

    def mem(self, key: K) -> bool:
        """True when ``key`` is bound."""
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
            return self._engine.get(encoded) is not None
        finally:
            waiter.exit_task()

    def _find_nowait(self, key: Any) -> Any:
        # find's body with a task that never waits: asyncio's hot path.
        encoded = self._encode(self._key, key)
        waiter = self._waiter
        if not waiter.try_enter_task():
            return WOULD_BLOCK
        try:
            if self._lifetime.closed:
                self._raise_closed()
            raw = self._engine.get(encoded)
        finally:
            waiter.exit_task()
        return None if raw is None else self._decode(self._value, raw)

    def _add_nowait(self, key: Any, value: Any, flush: bool) -> bool:
        self._check_writable("add")
        encoded_key = self._encode(self._key, key)
        encoded_value = self._encode(self._value, value)
        engine = self._engine
        return self._exclusive_nowait(
            engine.can_put_at_once, partial(engine.put, encoded_key, encoded_value, flush=flush)
        )

    def keys(
        self, start: K | None = None, stop: K | None = None, *, reverse: bool = False
    ) -> Iterator[K]:
        """The keys bound now with ``start <= key < stop`` (None: open), in key order
        (``reverse``: descending), each once."""
        snapshot = self._snapshot(start, stop, reverse)
        if self._bytes_pairs:  # (_decoded's first case, one call less: a seek is short)
            return map(itemgetter(0), snapshot)
        return self._decoded(snapshot, with_values=False)

    def items(
        self, start: K | None = None, stop: K | None = None, *, reverse: bool = False
    ) -> Iterator[tuple[K, V]]:
        """The ``(key, value)`` pairs bound now with ``start <= key < stop``, as ``keys``."""
        snapshot: Iterator[Any] = self._snapshot(start, stop, reverse)
        return snapshot if self._bytes_pairs else self._decoded(snapshot, with_values=True)

    def _keys_nowait(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[Any] | WouldBlock:
        snapshot = self._snapshot_nowait(start, stop, reverse)
        if isinstance(snapshot, WouldBlock):
            return snapshot
        return self._decoded(snapshot, with_values=False)

    def _items_nowait(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[tuple[Any, Any]] | WouldBlock:
        snapshot = self._snapshot_nowait(start, stop, reverse)
        if isinstance(snapshot, WouldBlock):
            return snapshot
        return self._decoded(snapshot, with_values=True)

    def _point_read(self, key: K) -> V | None:
        return self.find(key)  # (the instance's: its C fast path when bound)

    def _decoded(self, snapshot: Iterator[tuple[bytes, bytes]], with_values: bool) -> Iterator[Any]:
        """``snapshot`` decoded (bytes codecs decode what the engine holds to itself)."""
        if self._bytes_pairs:
            return snapshot if with_values else map(itemgetter(0), snapshot)
        return self._decoding(snapshot, with_values)

    def _decoding(
        self, snapshot: Iterator[tuple[bytes, bytes]], with_values: bool
    ) -> Iterator[Any]:
        decode_key = bytes if self._bytes_key_size >= 0 else self._key.decode
        decode_value = bytes if self._bytes_value_size >= 0 else self._value.decode
        try:
            for key, value in snapshot:
                yield (decode_key(key), decode_value(value)) if with_values else decode_key(key)
        except DecodingError as error:
            raise self._decoding_error(error) from error

    # -- writes (exclusive sections)

    def add(self, key: K, value: V, *, flush: bool = True) -> None:
        """Bind ``key`` to ``value``, replacing any earlier binding.

        With ``flush`` (the default) the binding survives a kill once this returns.
        """
        raw_key: Any = key  # as given: the codecs decide what they take
        raw_value: Any = value
        if not self._writable:
            self._check_writable("add")
        try:
            if type(raw_key) is bytes and len(raw_key) == self._bytes_key_size:
                encoded_key = raw_key
            else:
                encoded_key = self._key.encode(key)
            if type(raw_value) is bytes and len(raw_value) == self._bytes_value_size:
                encoded_value = raw_value
            else:
                encoded_value = self._value.encode(value)
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
            engine.put(encoded_key, encoded_value, flush)
        finally:
            waiter.exit_exclusive()


class IndexableRemovableStore(IndexableStore[K, V]):
    """An indexable store whose bindings can also be removed."""

    _kind = "indexable_removable"

    def remove(self, key: K, *, flush: bool = True) -> None:
        """Unbind ``key``; a no-op when it is not bound."""
        self._check_writable("remove")
        try:
            encoded_key = self._key.encode(key)
        except CodecError as error:
            raise self._codec_error(error) from error
        if self._engine.pacing:
            self._engine.reserve()
        waiter = self._waiter
        waiter.enter_exclusive()
        try:
            if self._lifetime.closed:
                self._raise_closed()
            self._remove_encoded(encoded_key, flush)
        finally:
            waiter.exit_exclusive()

    def _remove_encoded(self, encoded_key: bytes, flush: bool) -> None:
        """Unbind ``encoded_key`` in the exclusive section; if it is absent, only flush (or
        raise, when writes are refused)."""
        engine = self._engine
        if engine.get(encoded_key) is not None:
            engine.remove(encoded_key, flush=flush)
        else:
            engine.check_writable()
            if flush:
                engine.flush()

    def _batch_view(self, batch: batches.Batch) -> IndexableRemovableBatchView:
        return IndexableRemovableBatchView(batch, self)

    def _remove_nowait(self, key: Any, flush: bool) -> bool:
        self._check_writable("remove")
        encoded_key = self._encode(self._key, key)
        return self._exclusive_nowait(
            self._engine.can_put_at_once, partial(self._remove_encoded, encoded_key, flush)
        )


class _DecodedViewReads:
    """``keys`` and ``items`` of an indexable store's views, decoded from their ``_pairs``."""

    _store: IndexableStore[Any, Any]
    #: The view's encoded pairs with ``start <= key < stop``, in key order (the view's own).
    _pairs: Callable[[Any, Any, bool], Iterator[tuple[bytes, bytes]]]

    def keys(self, start: Any = None, stop: Any = None, *, reverse: bool = False) -> Iterator[Any]:
        """The keys the view shows with ``start <= key < stop``, in key order."""
        return self._store._decoded(self._pairs(start, stop, reverse), with_values=False)

    def items(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> Iterator[tuple[Any, Any]]:
        """The ``(key, value)`` pairs the view shows, as ``keys``."""
        return self._store._decoded(self._pairs(start, stop, reverse), with_values=True)


class IndexableBatchView(_DecodedViewReads, batches.BatchView, MappingReads[Any, Any]):
    """An indexable store inside a batch: its writes held by the batch, its reads the
    store's as committed at the moment of the read with the batch's writes over them."""

    _store: IndexableStore[Any, Any]

    def __init__(self, batch: batches.Batch, store: IndexableStore[Any, Any]) -> None:
        super().__init__(batch, store)
        #: The batch's last write to each key (None: a removal), encoded.
        self._writes: dict[bytes, bytes | None] = {}

    def _has_writes(self) -> bool:
        return bool(self._writes)

    def _encode_part(self) -> bytes:
        """The writes as ``IndexableStore._take_part`` reads them: op, key, value each."""
        zero = bytes(self._store._value.size or 0)
        return b"".join(
            b"\x01" + key + value if value is not None else b"\x02" + key + zero
            for key, value in self._writes.items()
        )

    def _encoded_key(self, key: Any) -> bytes:
        store = self._store
        if type(key) is bytes and len(key) == store._bytes_key_size:
            return key
        return store._encode(store._key, key)

    def add(self, key: Any, value: Any, *, flush: bool = True) -> None:
        """Bind ``key`` to ``value`` when the batch commits (``flush`` means nothing here)."""
        self._check_open()
        store = self._store
        self._writes[self._encoded_key(key)] = store._encode(store._value, value)

    def find(self, key: Any) -> Any | None:
        """The batch's value of ``key`` if it wrote one, else the store's."""
        self._check_open()
        encoded = self._encoded_key(key)
        if encoded in self._writes:
            raw = self._writes[encoded]
            return None if raw is None else self._store._decode(self._store._value, raw)
        return self._store.find(key)

    def mem(self, key: Any) -> bool:
        """True when ``key`` is bound, the batch's writes counted."""
        return self.find(key) is not None

    def _pairs(self, start: Any, stop: Any, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        self._check_open()
        store = self._store
        low, high = store._bounds(start, stop)
        base = store._snapshot(start, stop, reverse)
        return batches.iter_sorted_overlay(base, dict(self._writes), low, high, reverse)

    def _point_read(self, key: Any) -> Any:
        return self.find(key)

    def __len__(self) -> int:
        """The exact number of bindings, the batch's writes counted."""
        self._check_open()
        store = self._store
        count = len(store)
        for key, value in list(self._writes.items()):
            count += (value is not None) - store._has_encoded(key)
        return count


class IndexableRemovableBatchView(IndexableBatchView):
    """A removable store inside a batch."""

    def remove(self, key: Any, *, flush: bool = True) -> None:
        """Unbind ``key`` when the batch commits."""
        self._check_open()
        self._writes[self._encoded_key(key)] = None


class IndexableSnapshotView(_DecodedViewReads, EngineSnapshotView):
    """An indexable store as it was when a snapshot was taken: every read, no write."""

    _store: IndexableStore[Any, Any]

    def __init__(
        self, snapshot: snapshots.Snapshot, store: IndexableStore[Any, Any], engine: EngineSnapshot
    ) -> None:
        super().__init__(snapshot, store, engine)
        if store._bytes_key_size >= 0:  # the store's C fast path, on the snapshot
            fast = task_read(
                store._waiter,
                snapshot.lifetime(store),
                engine.get,
                store._bytes_key_size,
                store._value.decode if store._bytes_value_size < 0 else None,
                MethodType(IndexableSnapshotView.find, weakref.proxy(self)),
            )
            if fast is not None:
                self.find = fast  # type: ignore[method-assign]

    def _encoded_key(self, key: Any) -> bytes:
        store = self._store
        if type(key) is bytes and len(key) == store._bytes_key_size:
            return key
        return store._encode(store._key, key)

    def find(self, key: Any) -> Any | None:
        """The value bound to ``key`` then, or None."""
        store = self._store
        if type(key) is bytes and len(key) == store._bytes_key_size:
            encoded = key
        else:
            encoded = store._encode(store._key, key)
        waiter = store._waiter
        waiter.enter_task()
        try:
            if self._snapshot.closed or store._lifetime.closed:
                self._snapshot.check_open(store)
            raw = self._engine.get(encoded)
        finally:
            waiter.exit_task()
        if raw is None or store._bytes_value_size >= 0:
            return raw
        return store._decode(store._value, raw)

    def mem(self, key: Any) -> bool:
        """True when ``key`` was bound then."""
        return self.find(key) is not None

    def _point_read(self, key: Any) -> Any:
        return self.find(key)

    add = remove = flush = EngineSnapshotView._refuse
