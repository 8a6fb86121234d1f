"""Unit tests of ``l2_stores.aio``, the asyncio face of the stores (issue 7).

API.md, "asyncio": every method of a synchronous store exists on its asyncio
face under the same name, with the same arguments, results and errors, as a
coroutine, except the plain calls ``readonly()`` / ``is_gc_finished()`` and
``keys()`` / ``items()``, which return async iterators. ``wrap`` / ``unwrap``
give two faces of the same open store; an asyncio store is not bound to one
event loop; waiting, merges, fsyncs, large values and GC work happen off the
loop. ``AsyncIdleWaiter`` guards like ``IdleWaiter``.

Each test drives its coroutines with a plain ``asyncio.run`` (``run`` below,
with a deadlock guard). The same scripted operations run on a synchronous
store and on an asyncio one, and their outcomes (results, or error classes)
must be equal; the expected error classes are also asserted outright, so that
the two faces cannot agree on a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotLoadStore,
    Chain,
    CodecError,
    GcFailed,
    IdleWaiter,
    Mode,
    ReadOnlyError,
    Retain,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    aio,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)

# Deadlock guard only: every test below normally takes well under a second.
GUARD = 60.0

KEY = construct.Bytes(32)
SHORT_KEY = b"\x01" * 31  # a key of the wrong size
SIMPLE_VALUE = construct.Struct("level" / construct.Int32ub, "payload" / construct.GreedyBytes)

SingletonCls = make_singleton("aio_singleton", construct.GreedyBytes)
IndexableCls = make_indexable("aio_indexable", KEY, construct.Int64ub)
RemovableCls = make_indexable_removable("aio_removable", KEY, construct.Bytes(32))
IndexedCls = make_indexed_file("aio_indexed", KEY, construct.GreedyBytes, construct.Int32ub)
SimpleCls = make_simple_indexed_file(
    "aio_simple", KEY, SIMPLE_VALUE, construct.Int32ub, lambda v: v["level"]
)

# Classes of the same names with other encoding sizes (CannotLoadStore).
OTHER_SIZES = {
    "singleton": make_singleton("aio_singleton", construct.Bytes(8)),
    "indexable": make_indexable("aio_indexable", construct.Bytes(16), construct.Int64ub),
    "removable": make_indexable_removable("aio_removable", KEY, construct.Bytes(16)),
    "indexed": make_indexed_file("aio_indexed", KEY, construct.GreedyBytes, construct.Int16ub),
    "simple": make_simple_indexed_file(
        "aio_simple", KEY, SIMPLE_VALUE, construct.Int64ub, lambda v: v["level"]
    ),
}


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` with a deadlock guard."""
    return asyncio.run(asyncio.wait_for(coroutine, GUARD))


async def collect(iterator: AsyncIterator[Any]) -> list[Any]:
    """Everything an async iterator yields, in order."""
    return [x async for x in iterator]


def plain(found: Any) -> Any:
    """A decoded result as plain, comparable data."""
    if isinstance(found, dict):
        return {n: plain(v) for n, v in found.items() if not n.startswith("_")}
    if isinstance(found, tuple | list):
        return type(found)(plain(v) for v in found)
    return found


# ----------------------------------------------------------------------
# Store kinds


@dataclass(frozen=True)
class Kind:
    """A store class under test, its asyncio face and how to write and look up."""

    name: str
    cls: Any
    face: type
    write: str  # the write method: add, append or write
    lookups: tuple[str, ...]  # methods taking a key
    removable: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def collectable(self) -> bool:
        return self.name != "singleton"

    @property
    def indexed(self) -> bool:
        return self.name in ("indexed", "simple")

    def value(self, i: int, size: int = 40) -> Any:
        """A model value for the write method (distinct for each ``i``)."""
        if self.name == "indexable":
            return i * 7919 + 1
        if self.name == "removable":
            return key(i * 31 + 5)
        if self.name == "simple":
            return {"level": i, "payload": bytes([i % 256]) * size}
        return bytes([i % 256]) * size

    def write_args(self, k: bytes, i: int, size: int = 40) -> tuple[Any, ...]:
        """The arguments of the write method binding ``k`` to value number ``i``."""
        if self.name == "singleton":
            return (self.value(i, size),)
        if self.name == "indexed":
            return (k, self.value(i, size), i)
        return (k, self.value(i, size))

    def expected(self, i: int, size: int = 40) -> Any:
        """What a lookup (``find``/``read``/``items``) returns for value number ``i``."""
        value = self.value(i, size)
        if self.name == "indexed":
            return (value, i)
        if self.name == "simple":
            return (value, i)
        return value

    def get(self) -> str:
        """The lookup returning the value."""
        return "read" if self.indexed or self.name == "singleton" else "find"


KINDS = {
    "singleton": Kind("singleton", SingletonCls, aio.AsyncSingletonStore, "write", ()),
    "indexable": Kind("indexable", IndexableCls, aio.AsyncIndexableStore, "add", ("mem", "find")),
    "removable": Kind(
        "removable",
        RemovableCls,
        aio.AsyncIndexableRemovableStore,
        "add",
        ("mem", "find"),
        removable=True,
    ),
    "indexed": Kind(
        "indexed", IndexedCls, aio.AsyncIndexedFile, "append", ("mem", "header", "read")
    ),
    "simple": Kind(
        "simple", SimpleCls, aio.AsyncSimpleIndexedFile, "append", ("mem", "header", "read")
    ),
}
ALL = list(KINDS)
COLLECTABLE = [k for k in ALL if KINDS[k].collectable]
INDEXED = ["indexed", "simple"]


def store_path(tmp_path: Path, kind: Kind, name: str = "store") -> str:
    """A singleton is a file, the other kinds a directory."""
    return str(tmp_path / (name + (".single" if kind.name == "singleton" else "")))


# ----------------------------------------------------------------------
# Running the same operation on both faces


@dataclass(frozen=True)
class Op:
    """One call: method name, arguments, and the error class it must raise (if any)."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    raises: type[BaseException] | None = None


PLAIN_CALLS = {"is_gc_finished"}
ITERATORS = {"keys", "items"}


def normal_result(name: str, result: Any) -> Any:
    if name in ITERATORS:
        listed = [plain(x) for x in result]
        assert len(listed) == len({repr(x) for x in listed}), f"{name}() yielded a key twice"
        return sorted(listed, key=repr)
    return plain(result)


def error_outcome(error: BaseException, store_name: str, path: str) -> tuple[Any, ...]:
    if isinstance(error, StoreError):
        # Every store error names the store, and the path where there is one.
        assert error.name == store_name, f"{type(error).__name__} does not name the store"
        assert error.path in (None, path), f"{type(error).__name__} names another path"
    return ("raise", type(error))


def sync_outcome(store: Any, op: Op) -> tuple[Any, ...]:
    try:
        result = getattr(store, op.name)(*op.args, **op.kwargs)
        if op.name in ITERATORS:
            result = list(result)
        return ("ok", normal_result(op.name, result))
    except Exception as error:
        return error_outcome(error, type(store).name, store.path)


async def async_outcome(astore: Any, op: Op) -> tuple[Any, ...]:
    try:
        method = getattr(astore, op.name)
        if op.name in ITERATORS:
            iterator = method(*op.args, **op.kwargs)
            assert not inspect.isawaitable(iterator), f"{op.name}() must not be a coroutine"
            result = [x async for x in iterator]
        elif op.name in PLAIN_CALLS:
            result = method(*op.args, **op.kwargs)
            assert not inspect.isawaitable(result), f"{op.name}() must be a plain call"
        else:
            call = method(*op.args, **op.kwargs)
            assert inspect.iscoroutine(call), f"{op.name}() must return a coroutine"
            result = await call
        return ("ok", normal_result(op.name, result))
    except Exception as error:
        return error_outcome(error, type(astore.unwrap()).name, astore.path)


def check_outcomes(ops: list[Op], sync: list[Any], asynchronous: list[Any]) -> None:
    for op, s, a in zip(ops, sync, asynchronous, strict=True):
        assert s == a, f"{op}: sync gave {s}, asyncio gave {a}"
        if op.raises is not None:
            assert a == ("raise", op.raises), f"{op}: expected {op.raises.__name__}, got {a}"
        else:
            assert a[0] == "ok", f"{op}: unexpected {a}"


def compare_faces(kind: Kind, tmp_path: Path, ops: list[Op], **options: Any) -> None:
    """Run ``ops`` on a synchronous store and on an asyncio store (two directories)."""
    sync_path = store_path(tmp_path, kind, "sync")
    async_path = store_path(tmp_path, kind, "async")
    store = kind.cls.load(sync_path, **options)
    try:
        sync = [sync_outcome(store, op) for op in ops]
    finally:
        store.close()

    async def main() -> list[Any]:
        astore = await aio.load(kind.cls, async_path, **options)
        try:
            return [await async_outcome(astore, op) for op in ops]
        finally:
            await astore.close()

    check_outcomes(ops, sync, run(main()))


def write_op(kind: Kind, k: bytes, i: int, **kwargs: Any) -> Op:
    return Op(kind.write, kind.write_args(k, i), kwargs)


def lookups(kind: Kind, k: bytes, raises: type[BaseException] | None = None) -> list[Op]:
    return [Op(name, (k,), raises=raises) for name in kind.lookups]


def bad_values(kind: Kind, k: bytes) -> list[Op]:
    """Writes the codecs refuse (CodecError before anything is written)."""
    if kind.name == "indexable":
        return [Op("add", (k, -1), raises=CodecError), Op("add", (k, 2**64), raises=CodecError)]
    if kind.name == "removable":
        return [Op("add", (k, b"short"), raises=CodecError)]
    if kind.name == "indexed":
        return [
            Op("append", (k, 12345, 1), raises=CodecError),
            Op("append", (k, b"v", -1), raises=CodecError),
        ]
    # simple: header_of gives a header the header codec refuses
    return [Op("append", (k, {"level": -1, "payload": b""}), raises=CodecError)]


def collectable_script(kind: Kind) -> list[Op]:
    k0, k1, k2, k3 = key(1), key(2), key(3), key(4)
    ops = [
        *lookups(kind, k0),
        write_op(kind, k0, 0),
        write_op(kind, k1, 1, flush=False),
        *lookups(kind, k0),
        *lookups(kind, k1),
        Op("flush"),
        Op("keys"),
        Op("items"),
        write_op(kind, k0, 2),  # replaces
        write_op(kind, k2, 3),
        *lookups(kind, k0),
        *lookups(kind, SHORT_KEY, raises=CodecError),
        Op(kind.write, kind.write_args(SHORT_KEY, 4), raises=CodecError),
        *bad_values(kind, k3),
        *lookups(kind, k3),  # nothing was written by the refused writes
    ]
    if kind.removable:
        ops += [
            Op("remove", (k1,)),
            Op("remove", (k3,)),  # absent: a no-op
            Op("remove", (k2,), {"flush": False}),
            Op("remove", (SHORT_KEY,), raises=CodecError),
            *lookups(kind, k1),
            write_op(kind, k2, 5),
        ]
    ops += [
        Op("items"),
        Op("gc", (Retain([k0, k2, k3]),), {"background": False}),
        Op("is_gc_finished"),
        Op("wait_gc_completion"),
        Op("wait_gc_completion", (0.0,)),
        Op("keys"),
        Op("items"),
        Op("gc", (Retain([SHORT_KEY]),), raises=CodecError),
        Op("gc", ("not a spec",), raises=TypeError),
        Op("gc", (Chain(k0, lambda k, v: None),)),  # background
        Op("wait_gc_completion"),
        Op("items"),
        Op("sync"),
        Op("close"),
        Op("close"),  # idempotent
        *lookups(kind, k0, raises=StoreClosedError),
        *lookups(kind, SHORT_KEY, raises=CodecError),  # the key is checked first
        Op(kind.write, kind.write_args(k0, 6), raises=StoreClosedError),
        Op("flush", raises=StoreClosedError),
        Op("keys", raises=StoreClosedError),
        Op("items", raises=StoreClosedError),
        Op("gc", (Retain([k0]),), raises=StoreClosedError),
        Op("wait_gc_completion", raises=StoreClosedError),
        Op("is_gc_finished", raises=StoreClosedError),
        Op("sync", raises=StoreClosedError),
    ]
    if kind.removable:
        ops.append(Op("remove", (k0,), raises=StoreClosedError))
    return ops


def singleton_script(kind: Kind) -> list[Op]:
    return [
        Op("read"),
        Op("delete"),  # nothing to delete
        Op("write", (b"first",)),
        Op("read"),
        Op("write", (b"x" * 100_000,)),
        Op("read"),
        Op("write", (12345,), raises=CodecError),
        Op("read"),  # unchanged by the refused write
        Op("delete"),
        Op("read"),
        Op("write", (b"again",)),
        Op("sync"),
        Op("read"),
        Op("close"),
        Op("close"),
        Op("read", raises=StoreClosedError),
        Op("write", (b"late",), raises=StoreClosedError),
        Op("delete", raises=StoreClosedError),
        Op("sync", raises=StoreClosedError),
    ]


# ----------------------------------------------------------------------
# The face: names, coroutines, plain calls


def public(obj: Any) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def sync_methods(cls: type) -> set[str]:
    """Public instance methods of a store class (not ``load``, codecs or ``header_of``)."""
    return {n for n in public(cls) if inspect.isfunction(inspect.getattr_static(cls, n))}


@pytest.mark.parametrize("name", ALL)
def test_every_sync_method_exists_on_the_asyncio_face(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]

    async def main() -> None:
        async with aio.open(kind.cls, store_path(tmp_path, kind)) as astore:
            store = astore.unwrap()
            assert type(astore) is kind.face
            # dir(): what only the sync store has is the class method load (aio.load
            # replaces it) and the factory's class attributes; the face adds unwrap.
            codecs = {n for n in public(store) if n.endswith("_codec")}
            extra = {"header_of"} if name == "simple" else set()
            assert public(store) - public(astore) == {"load"} | codecs | extra
            assert public(astore) - public(store) == {"unwrap"}
            methods = sync_methods(type(store))
            assert kind.write in methods and "close" in methods and "readonly" in methods
            for method in methods:
                sync_method, async_method = getattr(store, method), getattr(astore, method)
                assert callable(async_method), method
                # (names, kinds and defaults: the sync store's annotations are its type
                # parameters, K and V, the face's Any)
                sync_signature = inspect.signature(sync_method)
                async_signature = inspect.signature(async_method)
                assert [
                    (p.name, p.kind, p.default) for p in sync_signature.parameters.values()
                ] == [
                    (p.name, p.kind, p.default) for p in async_signature.parameters.values()
                ], f"{method}: arguments differ"
                plain_call = method in ("readonly", "is_gc_finished", "keys", "items")
                assert inspect.iscoroutinefunction(async_method) != plain_call, method
            for attribute in ("path", "mode", "name", "closed"):
                assert getattr(astore, attribute) == getattr(store, attribute), attribute
            assert astore.mode is Mode.READ_WRITE
            # Plain calls give their result directly.
            view = astore.readonly()
            assert type(view) is kind.face and not inspect.isawaitable(view)
            if kind.collectable:
                assert astore.is_gc_finished() is True
                for iterator in (astore.keys(), astore.items()):
                    assert not inspect.isawaitable(iterator)
                    assert aiter(iterator) is iterator
                    assert [x async for x in iterator] == []

    run(main())


@pytest.mark.parametrize("name", ALL)
def test_same_results_and_errors_as_the_sync_store(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    script = singleton_script(kind) if name == "singleton" else collectable_script(kind)
    compare_faces(kind, tmp_path, script)


@pytest.mark.parametrize("name", COLLECTABLE)
def test_same_results_with_merges(name: str, tmp_path: Path) -> None:
    """Buffer 2: most writes merge (off the loop) and the answers stay the same."""
    kind = KINDS[name]
    ops: list[Op] = []
    for i in range(25):
        ops.append(write_op(kind, key(i % 9), i, flush=i % 3 == 0))
        if kind.removable and i % 4 == 3:
            ops.append(Op("remove", (key((i * 5) % 9),)))
        ops += lookups(kind, key((i * 7) % 9))
    ops += [Op("keys"), Op("items"), Op("flush")]
    compare_faces(kind, tmp_path, ops, index_buffer_size=2)


# ----------------------------------------------------------------------
# load, open, wrap, unwrap


@pytest.mark.parametrize("name", ALL)
def test_load_and_open_close_on_exit_and_on_exception(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    path = store_path(tmp_path, kind)
    k = key(1)

    async def main() -> None:
        astore = await aio.load(kind.cls, path)
        assert type(astore) is kind.face and astore.path == path
        await getattr(astore, kind.write)(*kind.write_args(k, 1))
        await astore.close()
        assert astore.closed and astore.unwrap().closed

        async with aio.open(kind.cls, path) as opened:
            assert type(opened) is kind.face and not opened.closed
            found = await getattr(opened, kind.get())(*(() if name == "singleton" else (k,)))
            assert plain(found) == kind.expected(1)
            await getattr(opened, kind.write)(*kind.write_args(k, 2))
        assert opened.closed
        with pytest.raises(StoreClosedError):
            await getattr(opened, kind.get())(*(() if name == "singleton" else (k,)))

        with pytest.raises(Boom):
            async with aio.open(kind.cls, path) as failing:
                await getattr(failing, kind.write)(*kind.write_args(k, 3))
                raise Boom
        assert failing.closed

        # A cancelled task inside the block closes the store too.
        inside = asyncio.Event()

        cancelled: list[Any] = []

        async def cancelled_user() -> None:
            async with aio.open(kind.cls, path) as store:
                cancelled.append(store)
                inside.set()
                await asyncio.sleep(GUARD)
            raise AssertionError("not cancelled")  # pragma: no cover

        task = asyncio.create_task(cancelled_user())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancelled[0].closed

        # Every close released the writer lock, and the last write is there.
        async with aio.open(kind.cls, path) as again:
            found = await getattr(again, kind.get())(*(() if name == "singleton" else (k,)))
            assert plain(found) == kind.expected(3)

    run(main())


def test_load_passes_mode_and_options(tmp_path: Path) -> None:
    kind = KINDS["removable"]
    path = str(tmp_path / "store")

    async def main() -> None:
        async with aio.open(RemovableCls, path, index_buffer_size=2) as astore:
            for i in range(6):
                await astore.add(key(i), kind.value(i))
        # index_buffer_size=2 reached the store: merges made a data file.
        assert any(n.startswith("run.") for n in os.listdir(path))
        reader = await aio.load(RemovableCls, path, Mode.READ_ONLY)
        assert reader.mode is Mode.READ_ONLY
        assert sorted(await collect(reader.keys())) == [key(i) for i in range(6)]
        with pytest.raises(ReadOnlyError):
            await reader.add(key(9), kind.value(9))
        await reader.close()
        with pytest.raises(TypeError):
            await aio.load(RemovableCls, path, no_such_option=1)
        with pytest.raises(TypeError):
            await aio.load(SingletonCls, str(tmp_path / "s"), index_buffer_size=3)
        async with aio.open(IndexedCls, str(tmp_path / "f"), cache_size=0, fsync=True) as f:
            await f.append(key(1), b"v", 1)
            assert plain(await f.read(key(1))) == (b"v", 1)

    run(main())


@pytest.mark.parametrize("name", ALL)
def test_wrap_and_unwrap_give_the_same_open_store(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    store = kind.cls.load(store_path(tmp_path, kind))
    astore = aio.wrap(store)
    assert type(astore) is kind.face
    assert astore.unwrap() is store
    assert aio.wrap(store).unwrap() is store
    k = key(7)
    args = () if name == "singleton" else (k,)

    async def main() -> None:
        # A write through one face is seen through the other, and back.
        await getattr(astore, kind.write)(*kind.write_args(k, 1))
        assert plain(getattr(store, kind.get())(*args)) == kind.expected(1)
        getattr(store, kind.write)(*kind.write_args(k, 2))
        assert plain(await getattr(astore, kind.get())(*args)) == kind.expected(2)
        # Closing one face closes the other.
        await astore.close()
        assert store.closed

    run(main())
    with pytest.raises(StoreClosedError):
        getattr(store, kind.get())(*args)

    other = kind.cls.load(store_path(tmp_path, kind))  # the lock was released
    aio.wrap(other)  # wrapping twice is harmless
    other.close()
    assert aio.wrap(other).closed


def test_wrap_refuses_what_is_not_a_store() -> None:
    for thing in (object(), "store", None, IdleWaiter()):
        with pytest.raises(TypeError):
            aio.wrap(thing)  # type: ignore[arg-type]


# ----------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", ALL)
def test_read_only_load_refuses_writes_like_the_sync_store(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    path = store_path(tmp_path, kind)
    k = key(3)
    with kind.cls.load(path) as writer:
        getattr(writer, kind.write)(*kind.write_args(k, 1))
    if name == "singleton":
        ops = [
            Op("read"),
            Op("write", (b"w",), raises=ReadOnlyError),
            Op("delete", raises=ReadOnlyError),
            Op("sync"),
            Op("read"),
        ]
    else:
        ops = [
            *lookups(kind, k),
            *lookups(kind, SHORT_KEY, raises=CodecError),
            Op(kind.write, kind.write_args(k, 2), raises=ReadOnlyError),
            Op("flush", raises=ReadOnlyError),
            Op("gc", (Retain([k]),), raises=ReadOnlyError),
            Op("is_gc_finished"),
            Op("wait_gc_completion"),
            Op("keys"),
            Op("items"),
            Op("sync"),
            *lookups(kind, k),
        ]
        if kind.removable:
            ops.insert(3, Op("remove", (k,), raises=ReadOnlyError))
    # READ_ONLY loads take no lock: both faces read the same path.
    reader = kind.cls.load(path, Mode.READ_ONLY)
    try:
        sync = [sync_outcome(reader, op) for op in ops]
    finally:
        reader.close()

    async def main() -> list[Any]:
        async with aio.open(kind.cls, path, Mode.READ_ONLY) as areader:
            assert areader.mode is Mode.READ_ONLY
            return [await async_outcome(areader, op) for op in ops]

    check_outcomes(ops, sync, run(main()))


@pytest.mark.parametrize("name", ALL)
def test_readonly_view_refuses_writes_like_the_sync_view(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    k = key(5)
    args = () if name == "singleton" else (k,)
    store = kind.cls.load(store_path(tmp_path, kind))
    astore = aio.wrap(store)
    sync_view, async_view = store.readonly(), astore.readonly()
    assert type(async_view) is kind.face
    assert async_view.unwrap() is not store and async_view.path == store.path
    refused = [Op(kind.write, kind.write_args(k, 9), raises=ReadOnlyError)]
    if name == "singleton":
        refused.append(Op("delete", raises=ReadOnlyError))
    else:
        refused += [
            Op("flush", raises=ReadOnlyError),
            Op("gc", (Retain([]),), raises=ReadOnlyError),
        ]
    if kind.removable:
        refused.append(Op("remove", (k,), raises=ReadOnlyError))

    async def main() -> None:
        await getattr(astore, kind.write)(*kind.write_args(k, 1))
        reads = (
            [Op("read")] if name == "singleton" else [*lookups(kind, k), Op("keys"), Op("items")]
        )
        ops = reads + refused + reads
        sync = [sync_outcome(sync_view, op) for op in ops]
        check_outcomes(ops, sync, [await async_outcome(async_view, op) for op in ops])
        # The view sees later writes through the store.
        await getattr(astore, kind.write)(*kind.write_args(k, 2))
        assert plain(await getattr(async_view, kind.get())(*args)) == kind.expected(2)
        # A view of a view is read-only too.
        with pytest.raises(ReadOnlyError):
            await getattr(async_view.readonly(), kind.write)(*kind.write_args(k, 3))
        # Closing the view detaches the view only.
        await async_view.close()
        assert async_view.closed and not astore.closed
        with pytest.raises(StoreClosedError):
            await getattr(async_view, kind.get())(*args)
        assert plain(await getattr(astore, kind.get())(*args)) == kind.expected(2)
        # Closing the store closes its views, and readonly() of a closed store fails.
        other_view = astore.readonly()
        await astore.close()
        with pytest.raises(StoreClosedError):
            await getattr(other_view, kind.get())(*args)
        with pytest.raises(StoreClosedError):
            astore.readonly()
        with pytest.raises(StoreClosedError):
            store.readonly()

    run(main())


@pytest.mark.parametrize("name", ALL)
def test_second_read_write_load_raises_store_locked(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    path = store_path(tmp_path, kind)

    async def main() -> None:
        first = await aio.load(kind.cls, path)
        with pytest.raises(StoreLockedError) as raised:
            await aio.load(kind.cls, path)
        assert raised.value.name == kind.cls.name and raised.value.path == path
        with pytest.raises(StoreLockedError):
            async with aio.open(kind.cls, path):
                raise AssertionError("opened a locked store")  # pragma: no cover
        with pytest.raises(StoreLockedError):
            kind.cls.load(path)  # the sync face sees the same lock
        reader = await aio.load(kind.cls, path, Mode.READ_ONLY)  # readers take no lock
        await reader.close()
        await first.close()
        second = await aio.load(kind.cls, path)  # released by close
        # ...and a lock taken by the sync face stops the asyncio one.
        with pytest.raises(StoreLockedError):
            await aio.load(kind.cls, path)
        await second.close()
        with kind.cls.load(path), pytest.raises(StoreLockedError):
            await aio.load(kind.cls, path)

    run(main())


@pytest.mark.parametrize("name", ALL)
def test_size_mismatch_raises_cannot_load_store(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    other = OTHER_SIZES[name]
    path = store_path(tmp_path, kind)
    k = key(2)

    async def main() -> None:
        async with aio.open(kind.cls, path) as astore:
            await getattr(astore, kind.write)(*kind.write_args(k, 1))
        for mode in (Mode.READ_WRITE, Mode.READ_ONLY):
            with pytest.raises(CannotLoadStore) as raised:
                await aio.load(other, path, mode)
            assert raised.value.name == kind.cls.name
            with pytest.raises(CannotLoadStore):
                async with aio.open(other, path, mode):
                    raise AssertionError("loaded with other sizes")  # pragma: no cover
            with pytest.raises(CannotLoadStore):
                other.load(path, mode)
        # The failed loads left no lock behind, and the content is intact.
        async with aio.open(kind.cls, path) as again:
            found = await getattr(again, kind.get())(*(() if name == "singleton" else (k,)))
            assert plain(found) == kind.expected(1)

    run(main())


class Boom(Exception):
    """Raised by a failing ``Chain.next``."""


def failing_next(fail_at: int) -> Callable[[Any, Any], Any]:
    calls = []

    def follow(k: bytes, value: Any) -> bytes | None:
        calls.append(k)
        if len(calls) > fail_at:
            raise Boom(f"next fails at call {len(calls)}")
        return key(int.from_bytes(k, "big") + 1)

    return follow


@pytest.mark.parametrize("name", COLLECTABLE)
def test_failing_gc_raises_gc_failed(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]

    async def main() -> None:
        async with aio.open(kind.cls, store_path(tmp_path, kind)) as astore:
            for i in range(10):
                await getattr(astore, kind.write)(*kind.write_args(key(i), i))
            before = sorted([plain(x) async for x in astore.items()], key=repr)
            # Background: gc() returns, the next wait_gc_completion() raises GcFailed.
            await astore.gc(Chain(key(0), failing_next(3)))
            with pytest.raises(GcFailed) as raised:
                await astore.wait_gc_completion()
            assert isinstance(raised.value.__cause__, Boom)
            assert raised.value.name == kind.cls.name
            assert await astore.wait_gc_completion() is True  # reported once
            assert astore.is_gc_finished()
            assert sorted([plain(x) async for x in astore.items()], key=repr) == before
            # Not in the background: gc() itself raises, as on the sync face.
            with pytest.raises(GcFailed) as raised:
                await astore.gc(Chain(key(0), failing_next(0)), background=False)
            assert isinstance(raised.value.__cause__, Boom)
            with pytest.raises(GcFailed):
                astore.unwrap().gc(Chain(key(0), failing_next(0)), background=False)
            assert sorted([plain(x) async for x in astore.items()], key=repr) == before
            # A working GC still runs afterwards.
            await astore.gc(Chain(key(0), lambda k, v: None))
            assert await astore.wait_gc_completion()
            assert await collect(astore.keys()) == [key(0)]

    run(main())


# ----------------------------------------------------------------------
# Async iteration


def deleted_files_held(path: str) -> list[str]:
    """Files under ``path`` that this process still holds open after their deletion."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(path) and target.endswith("(deleted)"):
                held.append(target)
    return held


@pytest.mark.parametrize("name", COLLECTABLE)
def test_iteration_yields_every_binding_once_across_batches(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    count = aio.ITERATION_BATCH * 2 + 37  # several batches

    async def main() -> None:
        async with aio.open(kind.cls, store_path(tmp_path, kind), index_buffer_size=100) as s:
            for i in range(count):
                await getattr(s, kind.write)(*kind.write_args(key(i), i), flush=False)
            listed = await collect(s.keys())
            assert len(listed) == count and set(listed) == {key(i) for i in range(count)}
            items = [(k, plain(v)) async for k, v in s.items()]
            assert len(items) == count
            assert dict(items) == {key(i): kind.expected(i) for i in range(count)}
            store = s.unwrap()
            assert sorted(listed) == sorted(store.keys())
            assert sorted(items, key=repr) == sorted(
                [(k, plain(v)) for k, v in store.items()], key=repr
            )

    run(main())


@pytest.mark.parametrize("name", COLLECTABLE)
def test_early_break_and_aclose_release_the_store(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    count = aio.ITERATION_BATCH + 10

    async def main() -> None:
        astore = await aio.load(kind.cls, store_path(tmp_path, kind))
        for i in range(count):
            await getattr(astore, kind.write)(*kind.write_args(key(i), i), flush=False)
        async for _ in astore.items():
            break
        iterator = astore.keys()
        assert await iterator.__anext__() in {key(i) for i in range(count)}
        await iterator.aclose()
        with pytest.raises(StopAsyncIteration):
            await iterator.__anext__()
        # Nothing is held: writes and close go through at once.
        async with asyncio.timeout(10):
            await getattr(astore, kind.write)(*kind.write_args(key(0), 99))
            await astore.close()
        assert astore.unwrap()._waiter.is_idle()

    run(main())


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("name", INDEXED)
def test_early_break_and_aclose_let_go_of_deleted_values_files(name: str, tmp_path: Path) -> None:
    """An items() snapshot keeps the values files a GC deletes readable; break and
    aclose() let them go (the disk space is given back)."""
    kind = KINDS[name]
    path = store_path(tmp_path, kind)

    async def main() -> None:
        count = aio.ITERATION_BATCH + 50  # more than one batch: the snapshot stays open
        async with aio.open(kind.cls, path) as astore:
            for i in range(count):
                await getattr(astore, kind.write)(*kind.write_args(key(i), i), flush=False)
            assert deleted_files_held(path) == []
            iterator = astore.items()
            first = await iterator.__anext__()
            await astore.gc(Retain([key(1)]), background=False)
            held = deleted_files_held(path)
            assert held, "the snapshot should keep the old values file open"
            # The snapshot still reads the dropped values.
            rest = [x async for x in _take(iterator, 10)]
            assert len(rest) == 10 and first not in rest
            await iterator.aclose()
            assert deleted_files_held(path) == []

            for i in range(count, 2 * count):
                await getattr(astore, kind.write)(*kind.write_args(key(i), i), flush=False)
            async for _ in astore.items():
                await astore.gc(Retain([key(count + 1)]), background=False)
                assert deleted_files_held(path)
                break
            assert deleted_files_held(path) == []
            assert await collect(astore.keys()) == [key(count + 1)]

    run(main())


async def _take(iterator: Any, n: int) -> Any:
    for _ in range(n):
        yield await iterator.__anext__()


@pytest.mark.parametrize("name", COLLECTABLE)
def test_iteration_after_close_raises_store_closed(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    count = aio.ITERATION_BATCH + 10

    async def main() -> None:
        astore = await aio.load(kind.cls, store_path(tmp_path, kind))
        for i in range(count):
            await getattr(astore, kind.write)(*kind.write_args(key(i), i), flush=False)
        made_before = astore.items()
        started = astore.keys()
        for _ in range(aio.ITERATION_BATCH):  # the whole first batch
            await started.__anext__()
        await astore.close()
        # Asking for an iterator after close fails at once, as the sync store does.
        for method in (astore.keys, astore.items):
            with pytest.raises(StoreClosedError):
                method()
        # One made before close and not started fails at its first step.
        with pytest.raises(StoreClosedError):
            await made_before.__anext__()
        # One that had started fails at its next batch.
        with pytest.raises(StoreClosedError):
            await started.__anext__()

    run(main())


@pytest.mark.parametrize("name", ["removable", "indexed"])
def test_next_step_after_close_raises_store_closed(name: str, tmp_path: Path) -> None:
    """After close, the next step raises StoreClosedError, as the sync iterator does
    (and not an item left in the fetched batch)."""
    kind = KINDS[name]

    async def main() -> None:
        astore = await aio.load(kind.cls, store_path(tmp_path, kind))
        for i in range(5):
            await getattr(astore, kind.write)(*kind.write_args(key(i), i))
        store = astore.unwrap()
        sync_iterator, async_iterator = store.keys(), astore.keys()
        next(sync_iterator)
        await async_iterator.__anext__()
        await astore.close()
        with pytest.raises(StoreClosedError):
            next(sync_iterator)
        with pytest.raises(StoreClosedError):
            await async_iterator.__anext__()

    run(main())


@pytest.mark.parametrize("name", ["removable", "indexed"])
def test_iteration_snapshot_is_taken_when_called(name: str, tmp_path: Path) -> None:
    """In a quiet store, keys() takes its snapshot when called, as the sync store does."""
    kind = KINDS[name]

    async def main() -> None:
        async with aio.open(kind.cls, store_path(tmp_path, kind)) as astore:
            await getattr(astore, kind.write)(*kind.write_args(key(1), 1))
            store = astore.unwrap()
            sync_keys, async_keys = store.keys(), astore.keys()
            await getattr(astore, kind.write)(*kind.write_args(key(2), 2))
            assert list(sync_keys) == [key(1)]
            assert [k async for k in async_keys] == [key(1)]

    run(main())


@pytest.mark.parametrize("name", ["removable", "indexed"])
def test_cancelled_steps_lose_no_binding(name: str, tmp_path: Path) -> None:
    """Steps of keys()/items() cancelled while a batch is fetched: iterating on
    still yields every binding exactly once."""
    kind = KINDS[name]
    count = 3 * aio.ITERATION_BATCH + 5

    async def main() -> None:
        options = {"cache_size": 0} if kind.indexed else {}
        async with aio.open(kind.cls, store_path(tmp_path, kind), **options) as astore:
            for i in range(count):
                await getattr(astore, kind.write)(*kind.write_args(key(i), i, 5000), flush=False)
            for method in (astore.keys, astore.items):
                iterator, got, cancelled = method(), [], 0
                while True:
                    step = asyncio.ensure_future(iterator.__anext__())
                    await asyncio.sleep(0)
                    if not step.done():  # fetching a batch in a worker thread
                        step.cancel()
                        cancelled += 1
                    try:
                        got.append(await step)
                    except asyncio.CancelledError:
                        continue
                    except StopAsyncIteration:
                        break
                keys = [x[0] if isinstance(x, tuple) else x for x in got]
                assert sorted(keys) == [key(i) for i in range(count)]
                assert cancelled >= 1, "no step was cancelled: the test shows nothing"

    run(main())


GATE = threading.Event()
GATE.set()
GATED: list[threading.Event] = []


def _gated_decode(obj: bytes, context: Any) -> bytes:
    """Decodes values; while GATE is clear, waits for it (a slow fetch)."""
    if not GATE.is_set():
        GATED[0].set()
        assert GATE.wait(GUARD)
    return obj


GatedCls = make_indexed_file(
    "aio_gated",
    KEY,
    construct.ExprAdapter(construct.GreedyBytes, _gated_decode, lambda obj, context: obj),
    construct.Int32ub,
)


def test_aclose_while_a_cancelled_step_still_fetches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aclose() right after a step was cancelled, its batch still being fetched in a
    worker thread: no error, the iterator ends, and once that fetch ends (it may meet the
    store closed) nothing stays held and nothing is logged."""

    async def main() -> None:
        astore = await aio.load(GatedCls, str(tmp_path / "gated"), cache_size=0)
        for i in range(10):
            await astore.append(key(i), b"v" * 10, i)
        iterator = astore.items()
        GATED[:] = [threading.Event()]
        GATE.clear()
        try:
            step = asyncio.ensure_future(iterator.__anext__())
            await until(GATED[0].is_set, "the fetch decoding in a worker thread")
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
            fetching = iterator._fetching
            assert fetching is not None and not fetching.done()
            await iterator.aclose()
            GATE.set()
            with pytest.raises(StopAsyncIteration):
                await iterator.__anext__()
            async with asyncio.timeout(10):
                await astore.append(key(0), b"w", 0)
                await astore.close()
            await until(fetching.done, "the cancelled step's fetch to end")
            await asyncio.sleep(0)  # its done callbacks
            assert astore.unwrap()._waiter.is_idle()
        finally:
            GATE.set()
            await astore.close()

    with caplog.at_level(logging.ERROR):
        run(main())
    assert [record.getMessage() for record in caplog.records] == []


def test_cancelled_gc_wait_keeps_the_failure_and_timeouts_report_false(tmp_path: Path) -> None:
    kind = KINDS["indexed"]
    release = threading.Event()

    def held_then_failing(k: bytes, value: Any) -> bytes | None:
        assert release.wait(GUARD)
        raise Boom("after the release")

    async def main() -> None:
        async with aio.open(kind.cls, store_path(tmp_path, kind)) as astore:
            for i in range(5):
                await astore.append(*kind.write_args(key(i), i))
            await astore.gc(Chain(key(0), held_then_failing))
            assert astore.is_gc_finished() is False
            # A timeout while the GC runs: False, as on the sync face.
            assert await astore.wait_gc_completion(0.01) is False
            assert astore.unwrap().wait_gc_completion(0.01) is False
            waiting = asyncio.ensure_future(astore.wait_gc_completion())
            await asyncio.sleep(0.01)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            release.set()
            # The failure was not taken by the cancelled wait.
            with pytest.raises(GcFailed) as raised:
                await astore.wait_gc_completion(GUARD)
            assert isinstance(raised.value.__cause__, Boom)
            assert await astore.wait_gc_completion() is True
            assert sorted(await collect(astore.keys())) == [key(i) for i in range(5)]

    try:
        run(main())
    finally:
        release.set()


# ----------------------------------------------------------------------
# Two event loops


@pytest.mark.parametrize("name", ALL)
def test_one_store_used_from_two_event_loops(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    args = (lambda k: ()) if name == "singleton" else (lambda k: (k,))
    astore = run(aio.load(kind.cls, store_path(tmp_path, kind), **kind.options))
    state: dict[str, Any] = {}

    async def first() -> None:
        for i in range(aio.ITERATION_BATCH + 20):
            await getattr(astore, kind.write)(*kind.write_args(key(i), i))
        if kind.collectable:
            iterator = astore.keys()
            state["first"] = await iterator.__anext__()
            state["iterator"] = iterator  # continued in the second loop
            await astore.gc(Retain([key(i) for i in range(0, 400, 2)]))  # background

    async def second() -> None:
        if kind.collectable:
            rest = [k async for k in state["iterator"]]
            assert len(rest) + 1 == aio.ITERATION_BATCH + 20
            assert await astore.wait_gc_completion()
            kept = sorted(await collect(astore.keys()))
            assert kept == [key(i) for i in range(0, aio.ITERATION_BATCH + 20, 2)]
        last = aio.ITERATION_BATCH + (18 if kind.collectable else 19)  # retained / last written
        assert plain(await getattr(astore, kind.get())(*args(key(last)))) == kind.expected(last)
        await getattr(astore, kind.write)(*kind.write_args(key(1), 1000))
        assert plain(await getattr(astore, kind.get())(*args(key(1)))) == kind.expected(1000)
        await astore.close()

    run(first())
    run(second())
    assert astore.closed


def test_idle_waiter_used_from_two_event_loops() -> None:
    w = aio.AsyncIdleWaiter()
    log: list[str] = []

    async def use(tag: str) -> None:
        async def task() -> None:
            async with w.task():
                await asyncio.sleep(0.001)
                log.append(f"{tag} task")

        async def exclusive() -> None:
            async with w.force_idle():
                log.append(f"{tag} exclusive")

        await asyncio.gather(task(), exclusive(), task())
        assert await w.when_idle(lambda: tag) == tag

    run(use("one"))
    run(use("two"))
    assert sorted(log) == sorted(
        [f"{t} {s}" for t in ("one", "two") for s in ("task", "task", "exclusive")]
    )
    assert w.waiter.is_idle()


# ----------------------------------------------------------------------
# AsyncIdleWaiter


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` on the loop until it holds (deadlock guard: 10 s)."""
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.001)


async def gets_in_again(w: aio.AsyncIdleWaiter) -> None:
    """Nothing is left held: the waiter is idle, and a force_idle enters at once."""
    await until(w.waiter.is_idle, "the waiter to be idle")
    async with asyncio.timeout(10), w.force_idle():
        assert w.waiter.exclusive_running
    assert w.waiter.is_idle()


def test_tasks_run_concurrently() -> None:
    w = aio.AsyncIdleWaiter()
    n = 6
    all_in = asyncio.Event()
    inside = 0

    async def task() -> None:
        nonlocal inside
        async with w.task():
            inside += 1
            if inside == n:
                assert w.waiter.running_tasks == n
                all_in.set()
            async with asyncio.timeout(10):
                await all_in.wait()  # only if all n are inside at once
        inside -= 1

    async def main() -> None:
        await asyncio.gather(*(task() for _ in range(n)))
        assert w.waiter.is_idle()

    run(main())


def test_force_idle_excludes_tasks_and_other_force_idle() -> None:
    w = aio.AsyncIdleWaiter()
    state = {"tasks": 0, "exclusive": 0, "max_tasks": 0, "sections": 0}
    violations: list[str] = []

    async def task(i: int) -> None:
        for j in range(6):
            async with w.task():
                if state["exclusive"]:
                    violations.append(f"task {i} beside an exclusive section")
                state["tasks"] += 1
                state["max_tasks"] = max(state["max_tasks"], state["tasks"])
                await asyncio.sleep(0.001 * ((i + j) % 3))
                state["tasks"] -= 1
                state["sections"] += 1

    async def exclusive(i: int) -> None:
        for j in range(4):
            async with w.force_idle():
                if state["tasks"] or state["exclusive"]:
                    violations.append(f"exclusive {i} beside {state}")
                state["exclusive"] += 1
                await asyncio.sleep(0.001 * ((i + j) % 2))
                if state["tasks"] or state["exclusive"] != 1:
                    violations.append(f"exclusive {i} joined by {state}")
                state["exclusive"] -= 1
                state["sections"] += 1
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(task(i) for i in range(5)), *(exclusive(i) for i in range(4)))
        assert w.waiter.is_idle()

    run(main())
    assert violations == []
    assert state["sections"] == 5 * 6 + 4 * 4
    assert state["max_tasks"] >= 2, "tasks never overlapped: the test shows nothing"


def test_pending_force_idle_holds_back_new_tasks() -> None:
    w = aio.AsyncIdleWaiter()
    order: list[str] = []

    async def main() -> None:
        release = asyncio.Event()
        entered = asyncio.Event()

        async def holder() -> None:
            async with w.task():
                entered.set()
                await release.wait()
            order.append("holder out")

        async def exclusive() -> None:
            async with w.force_idle():
                order.append("exclusive in")
                await asyncio.sleep(0.01)
                order.append("exclusive out")

        async def late_task() -> None:
            async with w.task():
                order.append("late task in")

        first = asyncio.create_task(holder())
        await entered.wait()
        second = asyncio.create_task(exclusive())
        await until(lambda: w.waiter.pending_exclusive == 1, "force_idle pending")
        third = asyncio.create_task(late_task())
        await until(lambda: w.waiter.waiting_tasks == 1, "the late task waiting")
        await asyncio.sleep(0.02)
        assert order == [], "the late task started beside a pending force_idle"
        release.set()
        await asyncio.gather(first, second, third)

    run(main())
    assert order == ["holder out", "exclusive in", "exclusive out", "late task in"]


def test_when_idle_with_a_function_and_a_coroutine_function() -> None:
    w = aio.AsyncIdleWaiter()

    async def main() -> None:
        calls: list[str] = []

        def function() -> str:
            calls.append("function")
            assert w.waiter.exclusive_running and w.waiter.running_tasks == 0
            return "plain"

        async def coroutine_function() -> str:
            calls.append("coroutine")
            await asyncio.sleep(0.001)
            assert w.waiter.exclusive_running and w.waiter.running_tasks == 0
            return "awaited"

        assert await w.when_idle(function) == "plain"
        assert await w.when_idle(coroutine_function) == "awaited"
        assert calls == ["function", "coroutine"]
        assert w.waiter.is_idle()

        # It waits for the running task, without holding back new tasks.
        release, entered = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with w.task():
                entered.set()
                await release.wait()

        held = asyncio.create_task(holder())
        await entered.wait()
        waiting = asyncio.create_task(w.when_idle(function))
        await until(lambda: w.waiter.pending_exclusive == 1, "when_idle pending")
        async with asyncio.timeout(5), w.task():  # a new task still starts
            assert w.waiter.running_tasks == 2
        assert calls == ["function", "coroutine"]
        release.set()
        assert await waiting == "plain"
        await held

        # While the coroutine function runs, new tasks wait.
        in_fn, leave_fn = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def slow() -> str:
            in_fn.set()
            await leave_fn.wait()
            order.append("fn done")
            return "slow"

        async def task() -> None:
            async with w.task():
                order.append("task in")

        running = asyncio.create_task(w.when_idle(slow))
        await in_fn.wait()
        blocked = asyncio.create_task(task())
        await until(lambda: w.waiter.waiting_tasks == 1, "the task waiting for fn")
        leave_fn.set()
        assert await running == "slow"
        await blocked
        assert order == ["fn done", "task in"]

        # An exception of fn propagates and leaves nothing held.
        def failing() -> None:
            raise Boom("in when_idle")

        async def failing_coroutine() -> None:
            await asyncio.sleep(0)
            raise Boom("in when_idle")

        with pytest.raises(Boom):
            await w.when_idle(failing)
        with pytest.raises(Boom):
            await w.when_idle(failing_coroutine)
        await gets_in_again(w)

    run(main())


def test_nested_force_idle_in_the_same_task_runs_at_once() -> None:
    w = aio.AsyncIdleWaiter()

    async def main() -> None:
        # The outer section first, then the nested one (which must not wait for it).
        async with w.force_idle(), asyncio.timeout(5), w.force_idle():
            assert await w.when_idle(lambda: 1) == 1
        await gets_in_again(w)

    run(main())


def test_nested_task_in_force_idle_of_the_same_task_runs_at_once() -> None:
    """As IdleWaiter lets the owner of the section open tasks, the asyncio task that
    holds force_idle() may open a task() (it must not wait for itself)."""
    w = aio.AsyncIdleWaiter()
    entered = []

    async def main() -> None:
        try:
            async with w.force_idle():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1), w.task():
                        entered.append(True)
        finally:
            await until(w.waiter.is_idle, "the waiter to be idle")  # no leak either way

    run(main())
    # The sync waiter allows this for the thread that owns the section:
    sync = IdleWaiter()
    with sync.force_idle(), sync.task():
        pass
    assert entered == [True]


class Holder:
    """A thread holding a task or an exclusive section of an IdleWaiter until released."""

    def __init__(self, waiter: IdleWaiter, exclusive: bool) -> None:
        self.release = threading.Event()
        entered = threading.Event()

        def hold() -> None:
            with waiter.force_idle() if exclusive else waiter.task():
                entered.set()
                assert self.release.wait(GUARD)

        self.thread = threading.Thread(target=hold, daemon=True)
        self.thread.start()
        assert entered.wait(GUARD)

    def stop(self) -> None:
        self.release.set()
        self.thread.join(GUARD)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("section", ["force_idle", "task", "when_idle"])
def test_cancelled_wait_does_not_leak_the_section(section: str) -> None:
    w = aio.AsyncIdleWaiter()
    # force_idle and when_idle wait for a running task, task for an exclusive section.
    holder = Holder(w.waiter, exclusive=section == "task")
    entered: list[str] = []

    async def enter() -> None:
        if section == "when_idle":
            await w.when_idle(lambda: entered.append(section))
            return
        async with getattr(w, section)():
            entered.append(section)

    async def main() -> None:
        try:
            waiting = asyncio.create_task(enter())
            if section == "task":
                await until(lambda: w.waiter.waiting_tasks == 1, "the task waiting")
            else:
                await until(lambda: w.waiter.pending_exclusive == 1, "the section pending")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        finally:
            holder.stop()
        await gets_in_again(w)

    run(main())
    assert entered == []


def test_cancellation_racing_with_entry_does_not_leak() -> None:
    """Waits cancelled at many moments around the holder's release: nothing leaks."""
    w = aio.AsyncIdleWaiter()
    outcomes = {"entered": 0, "cancelled": 0}

    async def one(i: int) -> None:
        holder = Holder(w.waiter, exclusive=i % 3 == 0)
        kind = ("task", "force_idle", "when_idle")[i % 3]

        async def enter() -> None:
            if kind == "when_idle":
                await w.when_idle(lambda: None)
            else:
                async with getattr(w, kind)():
                    await asyncio.sleep(0)

        task = asyncio.create_task(enter())
        await asyncio.sleep(0.0002 * (i % 7))
        threading.Timer(0.0001 * (i % 5), holder.release.set).start()
        await asyncio.sleep(0.0001 * (i % 11))
        task.cancel()
        try:
            await task
            outcomes["entered"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        holder.stop()
        await until(w.waiter.is_idle, f"the waiter to be idle after round {i}")

    async def main() -> None:
        for i in range(120):
            await one(i)
        await gets_in_again(w)

    run(main())
    assert outcomes["entered"] + outcomes["cancelled"] == 120


@pytest.mark.parametrize("section", ["force_idle", "task"])
def test_cancelled_wait_of_a_finished_loop_does_not_leak(section: str) -> None:
    """A wait cancelled when its event loop ends before the waiting thread gets the
    section: the section is still given back."""
    w = aio.AsyncIdleWaiter()
    holder = Holder(w.waiter, exclusive=section == "task")

    async def give_up() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05), getattr(w, section)():
                raise AssertionError("entered a held section")  # pragma: no cover

    run(give_up())  # the loop ends while the worker thread still waits
    holder.stop()
    deadline = time.monotonic() + 2
    while not w.waiter.is_idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    # Checked without blocking, so that a leak cannot hang the test session.
    got_in = w.waiter.try_enter_exclusive()
    if got_in:
        w.waiter.exit_exclusive()
    else:  # leaked: give the section back, so that no waiting thread stays stuck
        with contextlib.suppress(RuntimeError):
            if w.waiter.exclusive_running:
                w.waiter.exit_exclusive(w.waiter._owner)
            while w.waiter.running_tasks:
                w.waiter.exit_task()
    assert got_in, "another force_idle cannot get in: the cancelled wait leaked it"


def test_waiting_happens_off_the_loop() -> None:
    """While force_idle waits for a thread's task, the loop keeps running."""
    w = aio.AsyncIdleWaiter()
    holder = Holder(w.waiter, exclusive=False)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while ticks < 20:
            await asyncio.sleep(0.001)
            ticks += 1
        holder.release.set()  # only reached if the loop runs while force_idle waits

    async def main() -> None:
        async with asyncio.timeout(10):
            ticking = asyncio.create_task(ticker())
            async with w.force_idle():
                assert ticks >= 20
            await ticking

    try:
        run(main())
    finally:
        holder.stop()


def test_async_idle_waiter_shares_the_guard_with_threads() -> None:
    shared = IdleWaiter()
    w = aio.AsyncIdleWaiter(shared)
    assert w.waiter is shared
    state = {"tasks": 0, "exclusive": 0}
    lock = threading.Lock()
    violations: list[str] = []

    def thread_body(i: int) -> None:
        for j in range(30):
            if (i + j) % 4 == 0:
                with shared.force_idle():
                    with lock:
                        if state["tasks"] or state["exclusive"]:
                            violations.append(f"thread exclusive beside {state}")
                        state["exclusive"] += 1
                    time.sleep(0.0002)
                    with lock:
                        state["exclusive"] -= 1
            else:
                with shared.task():
                    with lock:
                        if state["exclusive"]:
                            violations.append("thread task beside an exclusive section")
                        state["tasks"] += 1
                    time.sleep(0.0002)
                    with lock:
                        state["tasks"] -= 1

    async def coroutine_body(i: int) -> None:
        for j in range(30):
            if (i + j) % 4 == 1:
                async with w.force_idle():
                    with lock:
                        if state["tasks"] or state["exclusive"]:
                            violations.append(f"async exclusive beside {state}")
                        state["exclusive"] += 1
                    await asyncio.sleep(0.0002)
                    with lock:
                        state["exclusive"] -= 1
            else:
                async with w.task():
                    with lock:
                        if state["exclusive"]:
                            violations.append("async task beside an exclusive section")
                        state["tasks"] += 1
                    await asyncio.sleep(0.0002)
                    with lock:
                        state["tasks"] -= 1

    threads = [threading.Thread(target=thread_body, args=(i,), daemon=True) for i in range(3)]

    async def main() -> None:
        for thread in threads:
            thread.start()
        await asyncio.gather(*(coroutine_body(i) for i in range(4)))

    run(main())
    for thread in threads:
        thread.join(GUARD)
        assert not thread.is_alive()
    assert violations == []
    assert shared.is_idle()


def test_many_waiting_sections_do_not_starve_the_holder(tmp_path: Path) -> None:
    """aio.WORKERS coroutines waiting for a section do not take every thread the
    holder's store call needs (no deadlock)."""
    w = aio.AsyncIdleWaiter()

    async def main() -> None:
        store = await aio.load(IndexedCls, str(tmp_path / "f"), cache_size=0)
        await store.append(key(1), b"v" * 100_000, 1)  # large: read in a worker thread
        go = asyncio.Event()

        async def holder() -> Any:
            async with w.force_idle():
                await go.wait()
                return await store.read(key(1))

        async def waiting_task() -> None:
            async with w.task():
                pass

        held = asyncio.create_task(holder())
        await until(lambda: w.waiter.exclusive_running, "the holder inside")
        waiters = [asyncio.create_task(waiting_task()) for _ in range(aio.WORKERS)]
        await until(lambda: w.waiter.waiting_tasks == aio.WORKERS, "the tasks waiting")
        go.set()
        try:
            async with asyncio.timeout(3):
                found = await held
                await asyncio.gather(*waiters)
            assert plain(found) == (b"v" * 100_000, 1)
        finally:
            for task in [held, *waiters]:
                task.cancel()
            await asyncio.gather(held, *waiters, return_exceptions=True)
            await until(w.waiter.is_idle, "the waiter to be idle after cleanup")
            await store.close()

    run(main())


# ----------------------------------------------------------------------
# Large values


def record_threads(
    monkeypatch: pytest.MonkeyPatch, target: Any, names: list[str]
) -> list[tuple[str, int, int]]:
    """Record (method, value length, thread id) of each call of ``target``'s ``names``."""
    calls: list[tuple[str, int, int]] = []
    for name in names:
        original = getattr(target, name)

        def recorded(*args: Any, _name: str = name, _original: Any = original) -> Any:
            result = _original(*args)
            size = len(args[1]) if _name.startswith("append") else len(result)
            calls.append((_name, size, threading.get_ident()))
            return result

        monkeypatch.setattr(target, name, recorded)
    return calls


INLINE = 16 * 1024  # values up to this size are read and appended on the loop
SIZES = [1, INLINE - 4, INLINE + 1, 100_000, 3 * 1024 * 1024]


@pytest.mark.parametrize("name", INDEXED)
def test_large_values_read_and_append_correctly_off_the_loop(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = KINDS[name]
    path = store_path(tmp_path, kind)

    def args(i: int) -> tuple[Any, ...]:
        return kind.write_args(key(i), i, SIZES[i])

    def expected(i: int) -> Any:
        return kind.expected(i, SIZES[i])

    async def main() -> None:
        loop_thread = threading.get_ident()
        astore = await aio.load(kind.cls, path, cache_size=0)  # every read reads the file
        values = astore.unwrap()._values
        reads = record_threads(monkeypatch, values, ["read"])
        appends = record_threads(monkeypatch, values.target, ["append_entry"])  # one target
        for i in range(len(SIZES)):
            await astore.append(*args(i))
        for i in range(len(SIZES)):
            assert plain(await astore.read(key(i))) == expected(i), f"value of {SIZES[i]} B"
            assert await astore.header(key(i)) == i
        assert {k: plain(v) async for k, v in astore.items()} == {
            key(i): expected(i) for i in range(len(SIZES))
        }
        encoded = [len(kind.cls.value_codec.build(kind.value(i, s))) for i, s in enumerate(SIZES)]
        calls = reads + appends
        for method, size, thread in calls:
            if size > INLINE:
                assert thread != loop_thread, f"{method} of {size} B ran on the event loop"
        large = [c for c in calls if c[1] > INLINE]
        small = [c for c in calls if c[1] <= INLINE]
        assert {(m, s) for m, s, _ in large} >= {
            (m, s) for m in ("append_entry", "read") for s in encoded if s > INLINE
        }
        # The small ones, in this quiet store, took the inline path.
        assert small and all(thread == loop_thread for _, _, thread in small)
        await astore.close()
        # Read back by the sync face and after a reload, with the cache on.
        with kind.cls.load(path) as store:
            for i in range(len(SIZES)):
                assert plain(store.read(key(i))) == expected(i)
        async with aio.open(kind.cls, path) as again:
            for i in reversed(range(len(SIZES))):
                assert plain(await again.read(key(i))) == expected(i)
                assert plain(await again.read(key(i))) == expected(i)  # cached

    run(main())


@pytest.mark.parametrize("name", INDEXED)
def test_large_values_are_encoded_off_the_loop(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value too large for the inline path is not encoded on the loop either."""
    kind = KINDS[name]
    encodings: list[tuple[int, int]] = []
    original = kind.cls._value

    def encode(value: Any) -> bytes:
        encoded = original.encode(value)
        encodings.append((len(encoded), threading.get_ident()))
        return encoded

    monkeypatch.setattr(kind.cls, "_value", dataclasses.replace(original, encode=encode))
    # the recording codec is no identity: bytes values must not skip it
    monkeypatch.setattr(kind.cls, "_greedy_bytes_value", False)

    async def main() -> None:
        loop_thread = threading.get_ident()
        async with aio.open(kind.cls, store_path(tmp_path, kind)) as astore:
            await astore.append(*kind.write_args(key(1), 1, 3 * 1024 * 1024))
            assert plain(await astore.read(key(1))) == kind.expected(1, 3 * 1024 * 1024)
        assert encodings, "the recording codec was not used"
        on_loop = [size for size, thread in encodings if thread == loop_thread]
        assert on_loop == [], f"values of {on_loop} B encoded on the event loop"

    run(main())


def test_large_singleton_values(tmp_path: Path) -> None:
    path = str(tmp_path / "single")

    async def main() -> None:
        async with aio.open(SingletonCls, path) as astore:
            for size in SIZES:
                value = bytes([size % 251]) * size
                await astore.write(value)
                assert await astore.read() == value
        async with aio.open(SingletonCls, path) as again:
            assert await again.read() == bytes([SIZES[-1] % 251]) * SIZES[-1]

    run(main())


# ----------------------------------------------------------------------
# Cancellation of store calls


@pytest.mark.parametrize("name", ["removable", "indexed"])
def test_cancelled_store_calls_leave_the_store_usable(name: str, tmp_path: Path) -> None:
    """Store calls cancelled while they wait for the guard (a sync writer holds it)."""
    kind = KINDS[name]

    async def main() -> None:
        astore = await aio.load(kind.cls, store_path(tmp_path, kind))
        await getattr(astore, kind.write)(*kind.write_args(key(0), 0))
        holder = Holder(astore.unwrap()._waiter, exclusive=True)
        try:
            calls = [
                asyncio.create_task(getattr(astore, kind.write)(*kind.write_args(key(1), 1))),
                asyncio.create_task(getattr(astore, kind.get())(key(0))),
                asyncio.create_task(astore.mem(key(0))),
            ]
            await asyncio.sleep(0.02)
            assert not any(c.done() for c in calls), "a call went past a held section"
            for c in calls:
                c.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
        finally:
            holder.stop()
        # A cancelled write that already runs in a thread still completes (aio.py).
        await until(astore.unwrap()._waiter.is_idle, "the store's waiter to be idle")
        assert plain(await getattr(astore, kind.get())(key(1))) == kind.expected(1)
        await getattr(astore, kind.write)(*kind.write_args(key(2), 2))
        assert sorted(await collect(astore.keys())) == [key(0), key(1), key(2)]
        await astore.close()

    run(main())
