"""What every store has: a name, a path, a mode, a guard, views and closing."""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from types import TracebackType
from typing import Any, ClassVar, Generic, NoReturn, Self, TypeVar, overload

from .. import batches
from ..codecs import Codec
from ..engine import journal
from ..engine.files import index_bytes
from ..engine.interface import Engine, Prepared
from ..engine.interface import Snapshot as EngineSnapshot
from ..errors import (
    CannotReadFromStore,
    CodecError,
    DecodingError,
    ReadOnlyError,
    StoreClosedError,
)
from ..idle_waiter import IdleWaiter
from ..mode import Mode
from . import identity
from .stats import StoreStats


class WouldBlock:
    """The result of a ``_..._nowait`` call that could not complete without waiting."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WOULD_BLOCK"


#: Returned by the stores' ``_..._nowait`` entry points (asyncio's inline path)
#: when the operation would have to wait; the caller then runs the plain
#: method in a thread.
WOULD_BLOCK = WouldBlock()

T = TypeVar("T")
#: A store's decoded keys, values and headers, and what its point reads return.
K = TypeVar("K")
V = TypeVar("V")
H = TypeVar("H")
R = TypeVar("R")
D = TypeVar("D")

#: The stores open in this process (not their views), for ``open_stores``.
_open: weakref.WeakSet[Store] = weakref.WeakSet()
_open_lock = threading.Lock()


def open_stores() -> list[Store]:
    """The stores loaded in this process and not closed yet."""
    with _open_lock:
        return [store for store in list(_open) if not store.closed]


class _Lifetime:
    """Open/closed state of a store or of a view: ``closed``, and the same as a byte
    (``flag[0]``) for the engine's ordered reads to check at each step. A view's
    lifetime is a child of its store's: closed with it, or alone."""

    __slots__ = ("__weakref__", "_children", "_lock", "_store", "closed", "flag")

    def __init__(self, store: _Lifetime | None = None) -> None:
        self.closed = False
        self.flag = bytearray(1)
        self._store = store  # a view's: its store's lifetime
        self._children: list[weakref.ref[_Lifetime]] = []
        self._lock = threading.Lock()

    def child(self) -> _Lifetime:
        """A view's lifetime: it ends when the store's does, or before (a view of a view
        is a view of the store: closing one view leaves the others)."""
        if self._store is not None:
            return self._store.child()
        child = _Lifetime(self)
        with self._lock:
            self._children = [ref for ref in self._children if ref() is not None]
            self._children.append(weakref.ref(child))
            if self.closed:
                child.close()
        return child

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.flag[0] = 1
            children = [ref() for ref in self._children]
        for child in children:
            if child is not None:
                child.close()


class Store:
    """Base of every store kind.

    Instances are made by the kind's ``load`` class method; every store is a
    context manager that closes it.
    """

    name: ClassVar[str]
    #: The kind an identity names (see ``identity``), and the roles of its codecs.
    _kind: ClassVar[str]
    _roles: ClassVar[tuple[str, ...]]
    #: False for the tools' byte-codec classes: they read any store of their files.
    _checks_identity: ClassVar[bool] = True
    _identity_of_class: ClassVar[identity.Identity | None] = None  # each class's own

    def __init__(self, path: str, mode: Mode) -> None:
        self.path = path
        self.mode = mode
        self._waiter = IdleWaiter()
        self._lifetime = _Lifetime()
        self._writable = mode is Mode.READ_WRITE
        self._is_view = False

    def _loaded(self) -> Self:
        """The load's last step: the store counts among the open ones (``open_stores``)."""
        with _open_lock:
            _open.add(self)
        return self

    # -- identity

    @classmethod
    def _identity(cls) -> identity.Identity:
        """What this class records as a store's identity, and loads only."""
        found = cls.__dict__.get("_identity_of_class")
        if found is None:
            codecs = {role: identity.describe(getattr(cls, f"{role}_codec")) for role in cls._roles}
            found = identity.Identity(cls._kind, cls.name, codecs)
            cls._identity_of_class = found
        return found

    def _check_identity(self) -> bool:
        """Before a load touches anything: refuse a store of another identity; True when
        the store has none recorded yet."""
        return self._checks_identity and identity.check(self.path, self._identity(), self.name)

    def _check_identity_unchanged(self) -> None:
        """At a sync: refuse when another store replaced this one's files (a migration)."""
        if self._checks_identity:
            identity.check_unchanged(self.path, self._identity(), self.name)

    def _record_identity(self, pending: bool) -> None:
        """At a ``READ_WRITE`` load, holding the lock: record the identity if ``pending``."""
        if pending and self.mode is Mode.READ_WRITE:
            identity.record(self.path, self._identity(), self.name)

    def stats(self) -> StoreStats:
        """The store's figures now (see :class:`StoreStats`)."""
        raise NotImplementedError

    # -- views and lifetime

    def readonly(self) -> Self:
        """A view of this open store on which every write raises ReadOnlyError."""
        self._check_open()
        view = copy.copy(self)
        view._lifetime = self._lifetime.child()
        view._writable = False
        view._is_view = True
        view._bind_fast_paths()
        return view

    def _bind_fast_paths(self) -> None:
        """Bind to this instance the C fast paths of its reads, for its current lifetime."""

    @property
    def closed(self) -> bool:
        """True once this store (or this view) is closed."""
        return self._lifetime.closed

    def close(self) -> None:
        """Close the store; idempotent. Closing a view only detaches the view."""
        if self._is_view:
            self._lifetime.close()  # its iterators stop; the store goes on
            self._bind_fast_paths()
            return
        self._before_close()
        waiter = self._waiter
        waiter.enter_exclusive()
        try:
            if self._lifetime.closed:
                return
            self._lifetime.close()
            self._close_resources()
        finally:
            waiter.exit_exclusive()

    def _before_close(self) -> None:
        """Stop background work that needs the exclusive section (called before taking it)."""

    def _close_resources(self) -> None:
        """Release files and locks (called once, in the exclusive section)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.mode.name
        view = ", view" if self._is_view else ""
        return f"<{type(self).__name__} {self.name!r} at {self.path} ({state}{view})>"

    # -- asyncio's inline path

    def _in_task_nowait(self, body: Callable[[], T]) -> T | WouldBlock:
        """Run ``body`` in a task if one can start without waiting."""
        waiter = self._waiter
        if not waiter.try_enter_task():
            return WOULD_BLOCK
        try:
            self._check_open()
            return body()
        finally:
            waiter.exit_task()

    def _exclusive_nowait(self, ready: Callable[[], bool], body: Callable[[], None]) -> bool:
        """Run ``body`` alone if the section is free and ``ready()`` holds in it; True if run."""
        waiter = self._waiter
        if not waiter.try_enter_exclusive():
            return False
        try:
            self._check_open()
            if not ready():
                return False
            body()
            return True
        finally:
            waiter.exit_exclusive()

    # -- checks and errors, shared by the kinds

    def _check_open(self) -> None:
        if self._lifetime.closed:
            self._raise_closed()

    def _raise_closed(self) -> NoReturn:
        raise self._closed_error()

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError("store is closed", name=self.name, path=self.path)

    def _check_writable(self, operation: str) -> None:
        if not self._writable:
            what = "a read-only view" if self._is_view else "loaded READ_ONLY"
            raise ReadOnlyError(f"cannot {operation}: {what}", name=self.name, path=self.path)

    def _codec_error(self, error: CodecError) -> CodecError:
        return CodecError(error.reason, name=self.name, path=self.path)

    def _decoding_error(self, error: DecodingError) -> DecodingError:
        return DecodingError(error.reason, name=self.name, path=self.path)

    def _encode(self, codec: Codec, value: Any) -> bytes:
        try:
            return codec.encode(value)
        except CodecError as error:
            raise self._codec_error(error) from error

    def _decode(self, codec: Codec, raw: bytes) -> Any:
        try:
            return codec.decode(raw)
        except DecodingError as error:
            raise self._decoding_error(error) from error


class MappingReads(Generic[K, R]):
    """The mapping protocol (``iter``, ``in``, ``[]``, ``get``) on a kind's own reads: a
    store's, or a batch's or a snapshot's view of one. ``K`` is the decoded key, ``R``
    what a point read returns (a value; an indexed file's ``(value, header)``)."""

    def mem(self, key: K) -> bool:
        """True when ``key`` is bound."""
        raise NotImplementedError

    def keys(
        self, start: K | None = None, stop: K | None = None, *, reverse: bool = False
    ) -> Iterator[K]:
        """The keys bound now with ``start <= key < stop`` (None: open), in key order."""
        raise NotImplementedError

    def _point_read(self, key: K) -> R | None:
        """What ``store[key]`` answers (the kind's ``find`` or ``read``), None when unbound."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[K]:
        """The keys, in key order."""
        return self.keys()

    def __contains__(self, key: object) -> bool:
        """``mem``."""
        return self.mem(key)  # type: ignore[arg-type]

    def __getitem__(self, key: K) -> R:
        """The kind's ``find`` (indexed files: ``read``); KeyError when ``key`` is not bound."""
        found = self._point_read(key)
        if found is None:
            raise KeyError(key)
        return found

    @overload
    def get(self, key: K) -> R | None: ...
    @overload
    def get(self, key: K, default: D) -> R | D: ...
    def get(self, key: K, default: Any = None) -> Any:
        """The kind's ``find`` (indexed files: ``read``), or ``default`` when not bound."""
        found = self._point_read(key)
        return default if found is None else found


class EngineStore(Store, MappingReads[K, R]):
    """A store kept in an engine (see ``engine.interface``): flush, sync, snapshots."""

    _engine: Engine
    _fsync = False
    _batch: batches.Membership | None = None
    _key: ClassVar[Codec]
    # n for a plain ``Bytes(n)`` codec, -1 for any other: encoding bytes of
    # size n and decoding what the engine returns are then the identity, so
    # the hot paths skip the codec's call.
    _bytes_key_size: ClassVar[int] = -1
    _bytes_value_size: ClassVar[int] = -1
    _bytes_header_size: ClassVar[int] = -1
    # True for a ``GreedyBytes`` value codec: encoding exact bytes is the identity.
    _greedy_bytes_value: ClassVar[bool] = False
    # Both key and value ``Bytes(n)``: the engine's pairs are the store's.
    _bytes_pairs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for role in ("key", "value", "header"):
            codec = cls.__dict__.get(f"_{role}")
            if isinstance(codec, Codec):
                size = codec.size if codec.kind == "bytes" and codec.size is not None else -1
                setattr(cls, f"_bytes_{role}_size", size)
                if role == "value":
                    cls._greedy_bytes_value = codec.kind == "greedy_bytes"
        cls._bytes_pairs = cls._bytes_key_size >= 0 and cls._bytes_value_size >= 0

    def flush(self) -> None:
        """Make every earlier ``flush=False`` write survive a kill."""
        self._check_writable("flush")
        with self._waiter.force_idle():
            self._check_open()
            self._engine.flush()

    def sync(self) -> None:
        """``READ_ONLY``: pick up what the writer flushed since the last load or sync."""
        with self._waiter.force_idle():
            self._check_open()
            if self.mode is Mode.READ_ONLY:
                self._check_identity_unchanged()
            self._engine.sync()
            self._after_sync()

    def stats(self) -> StoreStats:
        """The store's figures now: bindings, bytes on disk by kind of file, runs, merges,
        bytes written, GCs, cache hits and pending log records (see :class:`StoreStats`)."""
        with self._waiter.task():
            self._check_open()
            engine = self._engine.stats()
            bindings = self._engine.live_count()
        try:
            disk = self._disk_bytes()
        except OSError as error:
            raise CannotReadFromStore(
                f"cannot list the store's files: {error}", name=self.name, path=self.path
            ) from error
        return StoreStats(
            name=self.name,
            path=self.path,
            kind=self._kind,
            mode=self.mode.value,
            bindings=bindings,
            disk_bytes=disk,
            runs=engine.runs,
            merges=engine.merges,
            merge_seconds=engine.merge_seconds,
            bytes_written=engine.bytes_written + self._bytes_written_beside(),
            pending_records=engine.pending_records,
            **self._more_stats(),
        )

    def _disk_bytes(self) -> dict[str, int]:
        """The store's bytes on disk by kind of file."""
        return index_bytes(self.path)

    def _bytes_written_beside(self) -> int:
        """Bytes the store wrote since the load beside its engine's (an indexed file's values)."""
        return 0

    def _more_stats(self) -> dict[str, Any]:
        """The kind's own fields of ``StoreStats`` (GC, cache)."""
        return {}

    def _after_sync(self) -> None:
        """Refresh what the kind keeps beside the engine (in the exclusive section)."""

    def _snapshot(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """The engine's snapshot of the bindings with ``start <= key < stop`` (decoded keys,
        None: open) in key order, taken now; StoreClosedError once the store is closed."""
        low: bytes | None
        high: bytes | None
        if stop is None and type(start) is bytes and len(start) == self._bytes_key_size:
            low, high = start, None  # (_bounds' answer, one call less: a seek is short)
        else:
            low, high = self._bounds(start, stop)
        lifetime = self._lifetime
        with self._waiter:  # (its task(), one call less: a seek is a few microseconds)
            if lifetime.closed:
                self._raise_closed()
            # (_ordered's call, one call less again)
            return self._engine.items(low, high, reverse, lifetime.flag, self._closed_error)

    def _ordered(
        self, low: bytes | None, high: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        """The engine's ordered reads, stopped by the store's close (in a task)."""
        return self._engine.items(low, high, reverse, self._lifetime.flag, self._closed_error)

    def _bounds(self, start: Any, stop: Any) -> tuple[bytes | None, bytes | None]:
        """``start`` and ``stop`` encoded (None stays None)."""
        size = self._bytes_key_size
        return (
            start
            if start is None or (type(start) is bytes and len(start) == size)
            else self._encode(self._key, start),
            stop
            if stop is None or (type(stop) is bytes and len(stop) == size)
            else self._encode(self._key, stop),
        )

    def _has_encoded(self, encoded: bytes) -> bool:
        """Whether the encoded key ``encoded`` is bound."""
        with self._waiter.task():
            self._check_open()
            return self._engine.get(encoded) is not None

    def __len__(self) -> int:
        """The exact number of live bindings."""
        with self._waiter.task():
            self._check_open()
            return self._engine.live_count()

    def __bool__(self) -> bool:
        """Always true, as any open or closed store object: ``len(store)`` tells if it is empty."""
        return True

    def _mem_nowait(self, key: Any) -> bool | WouldBlock:
        encoded = self._encode(self._key, key)
        found = self._in_task_nowait(partial(self._engine.get, encoded))
        return found if isinstance(found, WouldBlock) else found is not None

    def _snapshot_nowait(
        self, start: Any = None, stop: Any = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]] | WouldBlock:
        """``_snapshot`` if its task can start without waiting."""
        low, high = self._bounds(start, stop)
        return self._in_task_nowait(partial(self._ordered, low, high, reverse))

    def _close_resources(self) -> None:
        try:
            self._engine.close()
        finally:
            self._leave_batches()

    # -- batches (see ``batches``): the store's side

    def _attach_batches(self, engine_directory: str) -> batches.Membership | None:
        """At a load, before the engine's: the store's journal membership, if linked."""
        self._link = os.path.join(engine_directory, journal.LINK)
        if self.mode is not Mode.READ_WRITE:
            return None
        return batches.attach(self._link, self.name, self.path)

    def _limit_parts(self, parts: int) -> bool:
        with self._waiter.force_idle():
            self._check_open()
            return self._engine.limit_parts(parts)

    def _catch_up(self, membership: batches.Membership | None) -> None:
        """After the load: take the journal's parts the store lacks, then belong to it."""
        if membership is None:
            return
        try:
            membership.catch_up(self)
        except BaseException:
            membership.abandon()
            self._close_resources_after_failed_load()
            raise
        self._join(membership)

    def _close_resources_after_failed_load(self) -> None:
        self._engine.close(durable=False)

    def _join(self, membership: batches.Membership) -> None:
        self._batch = membership
        self._engine.before_durable = membership.sync_journal

    def _leave_batches(self) -> None:
        if self._batch is not None:
            self._batch.leave(self)

    def _link_path(self) -> str:
        return self._link

    def _part_count(self) -> int:
        return self._engine.parts

    def _durable_part_count(self) -> int:
        return self._engine.durable_parts

    def _batch_fsync(self) -> bool:
        return self._fsync

    def _checkpoint(self) -> None:
        """Nothing: an engine store's parts are in its logs (the runs make them durable)."""

    def _refuse_writes(self, reason: str) -> None:
        self._engine.refuse_writes(reason)

    def _before_exclusive(self) -> None:
        """Before a batch takes the store's exclusive section: wait for room, as writes do."""
        if self._engine.pacing:
            self._engine.reserve()

    def _prepare_part(self, data: bytes) -> Prepared:
        """A part (encoded by the kind's batch view), touching nothing yet: its steps
        (``Prepared``) run in the exclusive section."""
        raise NotImplementedError

    def _take_part(self, data: bytes) -> None:
        """Take a committed part at once (a load's catch-up)."""
        self._before_exclusive()
        with self._waiter.force_idle():
            self._check_open()
            self._prepare_part(data).finish()

    def _batch_view(self, batch: batches.Batch) -> batches.BatchView:
        """A view of the store holding its writes for ``batch``."""
        raise NotImplementedError


class EngineSnapshotView(MappingReads[Any, Any]):
    """An engine store as it was when a snapshot was taken (``snapshots``): what every
    kind's snapshot view shares; the kind adds its point reads."""

    def __init__(self, snapshot: Any, store: Any, engine: EngineSnapshot) -> None:
        self._snapshot = snapshot
        self._store = store
        self._engine = engine

    def _pairs(self, start: Any, stop: Any, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        """The engine's pairs then with ``start <= key < stop``, stopped by the store's close."""
        store = self._store
        low, high = store._bounds(start, stop)
        with store._waiter.task():
            self._snapshot.check_open(store)
            return self._engine.items(
                low,
                high,
                reverse=reverse,
                closed=store._lifetime.flag,
                on_closed=store._closed_error,
            )

    def __len__(self) -> int:
        """The number of bindings then."""
        with self._store._waiter.task():
            self._snapshot.check_open(self._store)
            return self._engine.live_count()

    def _refuse(self, *_: Any, **__: Any) -> None:
        store = self._store
        raise ReadOnlyError("cannot write: a snapshot", name=store.name, path=store.path)
