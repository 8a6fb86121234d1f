"""The stores, awaited: every store kind offered to asyncio code.

``wrap(store)`` gives the asyncio face of an open store; ``unwrap()`` gives
the store back. Both faces may be used at once, from threads and from event
loops: they share the store's idle-waiter.

An operation that can complete at once runs on the event loop itself: a read
that can start a task without waiting (a lookup, a cached or small value), a
write that can enter its exclusive section without waiting and needs no
merge step and no fsync. Everything else (waiting for the guard, merges,
fsyncs, large values, loading, closing, GC) runs in a worker thread, so the
loop is never blocked for long. A cancelled write that already runs in a
thread still completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import itertools
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast, overload

from . import batches, snapshots
from .gc import Chain, Retain
from .idle_waiter import IdleWaiter
from .mode import Mode
from .stores.base import WOULD_BLOCK, H, K, Store, V
from .stores.indexable import IndexableRemovableStore, IndexableStore
from .stores.indexed_file import INLINE_VALUE_SIZE, IndexedFile, SimpleIndexedFile
from .stores.singleton import SingletonStore
from .stores.stats import StoreStats

__all__ = [
    "AsyncIdleWaiter",
    "AsyncIndexableRemovableStore",
    "AsyncIndexableStore",
    "AsyncIndexedFile",
    "AsyncSimpleIndexedFile",
    "AsyncSingletonStore",
    "AsyncStore",
    "load",
    "open",
    "wrap",
]

T = TypeVar("T")
S = TypeVar("S", bound=Store)

#: Bindings fetched per worker-thread hop by ``keys()`` and ``items()``.
ITERATION_BATCH = 256
#: Worker threads of the pool the stores' blocking work runs in. A pool of its
#: own keeps operations that wait (for a merge, a lock) from starving the
#: loop's default executor.
WORKERS = 16

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="l2_stores-aio")
    return _executor


def _forget_pool() -> None:
    global _executor
    _executor = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, in the caller's context."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(_pool(), call)


async def _in_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own: for waits that may last, so they never hold the pool."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as caught:  # handed to the awaiting coroutine
            result, error = None, caught
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="l2_stores-aio-wait", daemon=True).start()
    return await future


# -- stores


class AsyncStore(Generic[S]):
    """The asyncio face of an open store: the same methods, as coroutines."""

    def __init__(self, store: S) -> None:
        self._store = store

    def unwrap(self) -> S:
        """The synchronous store behind this face (the same open store)."""
        return self._store

    @property
    def path(self) -> str:
        """Where the store lives."""
        return self._store.path

    @property
    def mode(self) -> Mode:
        """The mode the store was loaded in."""
        return self._store.mode

    @property
    def closed(self) -> bool:
        """True once the store (or this view) is closed."""
        return self._store.closed

    @property
    def name(self) -> str:
        """The store's name."""
        return self._store.name

    def readonly(self) -> Self:
        """The asyncio face of a read-only view of the store."""
        return type(self)(self._store.readonly())

    async def close(self) -> None:
        """Close the store (in a worker thread: closing may finish a merge)."""
        await _in_thread(self._store.close)

    async def sync(self) -> None:
        """``READ_ONLY``: pick up what a writer elsewhere flushed."""
        await _in_thread(self._store.sync)  # type: ignore[attr-defined]

    async def stats(self) -> StoreStats:
        """The store's figures now (in a worker thread: it reads the files' sizes)."""
        return await _in_thread(self._store.stats)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<async {self._store!r}>"


class AsyncSingletonStore(AsyncStore[SingletonStore[Any]], Generic[V]):
    """The asyncio face of a :class:`~l2_stores.SingletonStore`."""

    async def read(self) -> V | None:
        """The value, or None."""
        value = self._store._read_nowait()
        if value is WOULD_BLOCK:
            return await _in_thread(self._store.read)
        return value  # type: ignore[no-any-return]

    async def write(self, value: V) -> None:
        """Replace the value, atomically and durably (fsync: in a worker thread)."""
        await _in_thread(self._store.write, value)

    async def delete(self) -> None:
        """Remove the value."""
        await _in_thread(self._store.delete)


class _Collectable(AsyncStore[S]):
    """What indexable stores and indexed files share: flush, iteration, GC."""

    async def flush(self) -> None:
        """Make every earlier ``flush=False`` write survive a kill."""
        await _in_thread(self._store.flush)  # type: ignore[attr-defined]

    def keys(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> AsyncIterator[Any]:
        """The keys bound now with ``start <= key < stop`` (None: open), in key order
        (``reverse``: descending), each once; see the synchronous ``keys``.

        While a write holds or waits for the store, the snapshot is taken at
        the first step instead (in a worker thread), not to block the loop.
        """
        store: Any = self._store
        return _BatchedIterator(
            store,
            functools.partial(store.keys, start, stop, reverse=reverse),
            store._keys_nowait(start, stop, reverse),
        )

    def items(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> AsyncIterator[Any]:
        """The bindings now with ``start <= key < stop``, as ``keys``.

        While a write holds or waits for the store, the snapshot is taken at
        the first step instead (in a worker thread), not to block the loop.
        """
        store: Any = self._store
        return _BatchedIterator(
            store,
            functools.partial(store.items, start, stop, reverse=reverse),
            store._items_nowait(start, stop, reverse),
        )

    def __aiter__(self) -> AsyncIterator[Any]:
        """The keys, in key order."""
        return self.keys()

    async def gc(self, spec: Retain | Chain, *, background: bool = True) -> None:
        """Start a GC (``background``) or run one to its end; see the synchronous ``gc``."""
        await _in_thread(self._store.gc, spec, background=background)  # type: ignore[attr-defined]

    async def wait_gc_completion(self, timeout: float | None = None) -> bool:
        """Wait for a running GC; True when none runs any more.

        Raises ``GcFailed`` if a background GC failed since the last call.
        """
        store: Any = self._store
        if not store.is_gc_finished():
            # Wait without taking the failure: a cancelled wait must not lose it.
            await _in_own_thread(functools.partial(store._gc.idle.wait, timeout))
        result: bool = store.wait_gc_completion(0)
        return result

    def is_gc_finished(self) -> bool:
        """True when no GC runs."""
        result: bool = self._store.is_gc_finished()  # type: ignore[attr-defined]
        return result


class AsyncIndexableStore(_Collectable[IndexableStore[Any, Any]], Generic[K, V]):
    """The asyncio face of an :class:`~l2_stores.IndexableStore`."""

    async def mem(self, key: K) -> bool:
        """True when ``key`` is bound."""
        found = self._store._mem_nowait(key)
        if found is WOULD_BLOCK:
            return await _in_thread(self._store.mem, key)
        return bool(found)

    async def find(self, key: K) -> V | None:
        """The value bound to ``key``, or None."""
        value = self._store._find_nowait(key)
        if value is WOULD_BLOCK:
            return await _in_thread(self._store.find, key)
        return value  # type: ignore[no-any-return]

    async def get(self, key: K, default: Any = None) -> V | Any:
        """The value bound to ``key``, or ``default``."""
        value = await self.find(key)
        return default if value is None else value

    async def add(self, key: K, value: V, *, flush: bool = True) -> None:
        """Bind ``key`` to ``value``; durable on return with ``flush``."""
        if not self._store._add_nowait(key, value, flush):
            await _in_thread(self._store.add, key, value, flush=flush)


class AsyncIndexableRemovableStore(AsyncIndexableStore[K, V]):
    """The asyncio face of an :class:`~l2_stores.IndexableRemovableStore`."""

    async def remove(self, key: K, *, flush: bool = True) -> None:
        """Unbind ``key``; a no-op when it is not bound."""
        store = cast(IndexableRemovableStore[Any, Any], self._store)
        if not store._remove_nowait(key, flush):
            await _in_thread(store.remove, key, flush=flush)


class AsyncIndexedFile(_Collectable[IndexedFile[Any, Any, Any]], Generic[K, V, H]):
    """The asyncio face of an :class:`~l2_stores.IndexedFile`."""

    async def mem(self, key: K) -> bool:
        """True when ``key`` has a value."""
        found = self._store._mem_nowait(key)
        if found is WOULD_BLOCK:
            return await _in_thread(self._store.mem, key)
        return bool(found)

    async def header(self, key: K) -> H | None:
        """The header of ``key``'s value, or None."""
        header = self._store._header_nowait(key)
        if header is WOULD_BLOCK:
            return await _in_thread(self._store.header, key)
        return header  # type: ignore[no-any-return]

    async def read(self, key: K) -> tuple[V, H] | None:
        """The ``(value, header)`` of ``key``, or None (large values: in a worker thread)."""
        found = self._store._read_nowait(key)
        if found is WOULD_BLOCK:
            return await _in_thread(self._store.read, key)
        return found  # type: ignore[no-any-return]

    async def get(self, key: K, default: Any = None) -> tuple[V, H] | Any:
        """The ``(value, header)`` of ``key``, or ``default``."""
        found = await self.read(key)
        return default if found is None else found

    async def append(self, key: K, value: V, header: H, *, flush: bool = True) -> None:
        """Append ``value`` with ``header`` for ``key``; a later append wins."""
        if _looks_large(value) or not self._store._append_nowait(key, value, header, flush):
            await _in_thread(self._store.append, key, value, header, flush=flush)


class AsyncSimpleIndexedFile(AsyncIndexedFile[K, V, H]):
    """The asyncio face of a :class:`~l2_stores.SimpleIndexedFile`."""

    async def append(  # type: ignore[override]
        self, key: K, value: V, *, flush: bool = True
    ) -> None:
        """Append ``value`` for ``key`` with the header ``header_of(value)``."""
        store = cast(SimpleIndexedFile[Any, Any, Any], self._store)
        header = type(store).header_of(value)
        if _looks_large(value) or not store._append_nowait(key, value, header, flush):
            await _in_thread(store._append, key, value, header, flush=flush)


def _looks_large(value: Any) -> bool:
    """Whether the bytes and strings in ``value`` exceed ``INLINE_VALUE_SIZE``.

    Such values are encoded in a worker thread, not on the loop.
    """
    return _rough_size(value, 0) > INLINE_VALUE_SIZE


def _rough_size(value: Any, depth: int) -> int:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if depth < 3 and isinstance(value, dict):
        return sum(_rough_size(item, depth + 1) for item in value.values())
    if depth < 3 and isinstance(value, (list, tuple)):
        return sum(_rough_size(item, depth + 1) for item in value)
    return 0  # numbers and the like: a few bytes, which only the encoding tells


class _BatchedIterator(AsyncIterator[Any]):
    """An async iterator over a store's snapshot, fetched in batches in worker threads."""

    def __init__(
        self, store: Store, start: Callable[[], Iterator[Any]], started: Any = WOULD_BLOCK
    ) -> None:
        self._store = store
        self._start = start
        self._iterator: Iterator[Any] | None = None if started is WOULD_BLOCK else started
        self._batch: list[Any] = []
        self._position = 0
        self._done = False
        self._fetching: asyncio.Future[list[Any]] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._done and self._position == len(self._batch):
            raise StopAsyncIteration
        self._store._check_open()  # as the synchronous iterator does at each step
        if self._position == len(self._batch):
            if self._done:
                raise StopAsyncIteration
            if self._fetching is None:
                self._fetching = asyncio.ensure_future(_in_thread(self._fetch))
            # A cancelled step leaves the fetch running for the next step: no batch is lost.
            self._batch = await asyncio.shield(self._fetching)
            self._fetching = None
            self._position = 0
            if not self._batch:
                self._done = True
                raise StopAsyncIteration
        item = self._batch[self._position]
        self._position += 1
        return item

    def _fetch(self) -> list[Any]:
        if self._done:
            return []
        if self._iterator is None:
            self._iterator = self._start()  # the snapshot could not be taken when called
        return list(itertools.islice(self._iterator, ITERATION_BATCH))

    async def aclose(self) -> None:
        """Stop iterating and let go of the snapshot."""
        self._done, self._batch, self._position = True, [], 0
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, "close", None)
        if close is None:
            return
        fetching, self._fetching = self._fetching, None
        if fetching is not None and not fetching.done():
            # A cancelled step's fetch still runs the generator in a worker thread: the
            # generator is closed when it returns, and nobody awaits what it ended with
            # (a batch, or the store's close met meanwhile).
            def finish(done: asyncio.Future[list[Any]]) -> None:
                if not done.cancelled():
                    done.exception()  # seen: not logged as never retrieved
                close()

            fetching.add_done_callback(finish)
        else:
            close()


_FACES: list[tuple[type[Store], type[AsyncStore[Any]]]] = [
    (SimpleIndexedFile, AsyncSimpleIndexedFile),
    (IndexedFile, AsyncIndexedFile),
    (IndexableRemovableStore, AsyncIndexableRemovableStore),
    (IndexableStore, AsyncIndexableStore),
    (SingletonStore, AsyncSingletonStore),
]


@overload
def wrap(store: SimpleIndexedFile[K, V, H]) -> AsyncSimpleIndexedFile[K, V, H]: ...
@overload
def wrap(store: IndexedFile[K, V, H]) -> AsyncIndexedFile[K, V, H]: ...
@overload
def wrap(store: IndexableRemovableStore[K, V]) -> AsyncIndexableRemovableStore[K, V]: ...
@overload
def wrap(store: IndexableStore[K, V]) -> AsyncIndexableStore[K, V]: ...
@overload
def wrap(store: SingletonStore[V]) -> AsyncSingletonStore[V]: ...
@overload
def wrap(store: Store) -> Any: ...
def wrap(store: Store) -> Any:
    """The asyncio face of the open ``store``."""
    for kind, face in _FACES:
        if isinstance(store, kind):
            return face(store)
    raise TypeError(f"not an l2_stores store: {store!r}")


_Path = str | os.PathLike[str]


@overload
async def load(
    cls: type[SimpleIndexedFile[K, V, H]], path: _Path, mode: Mode = ..., **options: Any
) -> AsyncSimpleIndexedFile[K, V, H]: ...
@overload
async def load(
    cls: type[IndexedFile[K, V, H]], path: _Path, mode: Mode = ..., **options: Any
) -> AsyncIndexedFile[K, V, H]: ...
@overload
async def load(
    cls: type[IndexableRemovableStore[K, V]], path: _Path, mode: Mode = ..., **options: Any
) -> AsyncIndexableRemovableStore[K, V]: ...
@overload
async def load(
    cls: type[IndexableStore[K, V]], path: _Path, mode: Mode = ..., **options: Any
) -> AsyncIndexableStore[K, V]: ...
@overload
async def load(
    cls: type[SingletonStore[V]], path: _Path, mode: Mode = ..., **options: Any
) -> AsyncSingletonStore[V]: ...
@overload
async def load(cls: type[Store], path: _Path, mode: Mode = ..., **options: Any) -> Any: ...
async def load(
    cls: type[Store], path: str | os.PathLike[str], mode: Mode = Mode.READ_WRITE, **options: Any
) -> Any:
    """``cls.load(path, mode, **options)`` in a worker thread, as an asyncio store."""
    store = await _in_thread(cls.load, path, mode, **options)  # type: ignore[attr-defined]
    return wrap(store)


@overload
def open(
    cls: type[SimpleIndexedFile[K, V, H]], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[AsyncSimpleIndexedFile[K, V, H]]: ...
@overload
def open(
    cls: type[IndexedFile[K, V, H]], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[AsyncIndexedFile[K, V, H]]: ...
@overload
def open(
    cls: type[IndexableRemovableStore[K, V]], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[AsyncIndexableRemovableStore[K, V]]: ...
@overload
def open(
    cls: type[IndexableStore[K, V]], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[AsyncIndexableStore[K, V]]: ...
@overload
def open(
    cls: type[SingletonStore[V]], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[AsyncSingletonStore[V]]: ...
@overload
def open(
    cls: type[Store], path: _Path, mode: Mode = ..., **options: Any
) -> AbstractAsyncContextManager[Any]: ...
def open(
    cls: type[Store], path: str | os.PathLike[str], mode: Mode = Mode.READ_WRITE, **options: Any
) -> AbstractAsyncContextManager[Any]:
    """Load the store as :func:`load` does, and close it on exit (``async with``)."""
    return _opened(cls, path, mode, **options)


@asynccontextmanager
async def _opened(
    cls: type[Store], path: str | os.PathLike[str], mode: Mode, **options: Any
) -> AsyncIterator[Any]:
    store = await load(cls, path, mode, **options)
    try:
        yield store
    finally:
        await store.close()


# -- batches and snapshots

#: What a batch view holds in memory: never a wait, so run on the loop.
_HELD_WRITES = frozenset({"add", "remove", "append", "write", "delete"})


class AsyncView:
    """A batch's or a snapshot's view as asyncio sees it: each method a coroutine (run in
    a worker thread, except a batch's held writes), ``keys``/``items`` async iterators."""

    def __init__(self, view: Any, store: Store) -> None:
        self._view = view
        self._store = store

    def keys(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> AsyncIterator[Any]:
        """The view's keys, as an async iterator."""
        return _BatchedIterator(
            self._store, functools.partial(self._view.keys, start, stop, reverse=reverse)
        )

    def items(
        self, start: Any = None, stop: Any = None, *, reverse: bool = False
    ) -> AsyncIterator[Any]:
        """The view's bindings, as an async iterator."""
        return _BatchedIterator(
            self._store, functools.partial(self._view.items, start, stop, reverse=reverse)
        )

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.keys()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._view, name)
        if name in _HELD_WRITES:

            async def held(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)

            return held

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await _in_thread(method, *args, **kwargs)

        return call

    def __repr__(self) -> str:
        return f"<asyncio {self._view!r}>"


class AsyncBatch:
    """``l2_stores.batch`` for asyncio stores: the commit runs off the event loop."""

    def __init__(self, stores: tuple[AsyncStore[Any], ...]) -> None:
        plain = [store.unwrap() if isinstance(store, AsyncStore) else store for store in stores]
        self._batch = batches.Batch(plain)
        #: One asyncio batch view per store, in the order given.
        self.views = tuple(
            AsyncView(view, store) for view, store in zip(self._batch.views, plain, strict=True)
        )

    async def commit(self) -> None:
        """Commit every write of the batch at once (see ``Batch.commit``)."""
        await _in_own_thread(self._batch.commit)

    async def rollback(self) -> None:
        """Drop every write of the batch."""
        self._batch.rollback()

    async def __aenter__(self) -> tuple[AsyncView, ...]:
        self._batch._check_open()
        return self.views

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._batch._state != "open":
            return
        if exc_type is None:
            await self.commit()
        else:
            await self.rollback()


def batch(*stores: Any) -> AsyncBatch:
    """A batch of asyncio stores: ``async with aio.batch(a, b) as (a_view, b_view):``."""
    return AsyncBatch(stores)


@asynccontextmanager
async def snapshot(*stores: Any) -> AsyncIterator[tuple[AsyncView, ...]]:
    """``l2_stores.snapshot`` for asyncio stores, taken off the event loop."""
    plain = [store.unwrap() if isinstance(store, AsyncStore) else store for store in stores]
    taken = await _in_thread(snapshots.Snapshot, plain)
    try:
        yield tuple(AsyncView(view, store) for view, store in zip(taken.views, plain, strict=True))
    finally:
        taken.close()


# -- the idle-waiter


class AsyncIdleWaiter:
    """An idle-waiter for asyncio: ``async with w.task()``, ``async with w.force_idle()``.

    It guards the same way as :class:`~l2_stores.IdleWaiter` (shared tasks,
    exclusive sections that hold back new tasks, ``when_idle``) and may wrap
    one, to share a guard with threads. Waiting happens in a worker thread,
    never on the loop. An exclusive section belongs to the asyncio task that
    entered it: a nested ``force_idle`` in the same task runs at once.
    """

    def __init__(self, waiter: IdleWaiter | None = None) -> None:
        self.waiter = waiter if waiter is not None else IdleWaiter()

    def task(self) -> _AsyncSection:
        """A shared section: runs alongside other tasks, never with an exclusive one."""
        return _AsyncSection(self.waiter, exclusive=False)

    def force_idle(self) -> _AsyncSection:
        """An exclusive section; new tasks are held back while it waits for running ones."""
        return _AsyncSection(self.waiter, exclusive=True)

    async def when_idle(self, fn: Callable[[], T | Awaitable[T]]) -> T:
        """Run ``fn`` (a function or a coroutine function) alone once no task runs.

        New tasks are not held back while it waits.
        """
        owner = _task_owner()
        await _enter_off_loop(
            functools.partial(self.waiter.enter_exclusive, force=False, owner=owner),
            functools.partial(self.waiter.exit_exclusive, owner),
            functools.partial(self.waiter.try_enter_exclusive, owner),
        )
        try:
            result = fn()
            if inspect.isawaitable(result):
                return await result
            return result
        finally:
            self.waiter.exit_exclusive(owner)


class _AsyncSection:
    def __init__(self, waiter: IdleWaiter, exclusive: bool) -> None:
        self._waiter = waiter
        self._exclusive = exclusive
        self._owner: int | None = None

    async def __aenter__(self) -> None:
        waiter = self._waiter
        if self._exclusive:
            owner = self._owner = _task_owner()
            await _enter_off_loop(
                functools.partial(waiter.enter_exclusive, owner=owner),
                functools.partial(waiter.exit_exclusive, owner),
                functools.partial(waiter.try_enter_exclusive, owner),
            )
        else:
            await _enter_off_loop(
                waiter.enter_task,
                waiter.exit_task,
                functools.partial(waiter.try_enter_task, _task_owner()),
            )

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._exclusive:
            self._waiter.exit_exclusive(self._owner)
        else:
            self._waiter.exit_task()


def _task_owner() -> int:
    """The owner id of the current asyncio task's exclusive sections (negative)."""
    task = asyncio.current_task()
    return -id(task) if task is not None else -1


async def _enter_off_loop(
    enter: Callable[[], None], leave: Callable[[], None], try_enter: Callable[[], bool]
) -> None:
    """Enter at once if that needs no wait, else wait in a thread of its own.

    If the caller is cancelled while the thread waits, the section is left
    as soon as the thread gets it, by that thread (even if the loop is gone).
    """
    if try_enter():
        return
    guard = threading.Lock()
    state = {"entered": False, "abandoned": False}

    def enter_or_give_back() -> None:
        enter()
        with guard:
            if state["abandoned"]:
                leave()
            else:
                state["entered"] = True

    try:
        await _in_own_thread(enter_or_give_back)
    except asyncio.CancelledError:
        with guard:
            state["abandoned"] = True
            entered = state["entered"]
        if entered:
            leave()
        raise
