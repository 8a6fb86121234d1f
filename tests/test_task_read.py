"""The C fast path of ``find`` (``_idle_core.TaskRead``): the long way's answers and errors."""

from __future__ import annotations

import gc
import os
import random
import weakref
from typing import Any

import construct as c
import pytest

from l2_stores import (
    CodecError,
    DecodingError,
    StoreClosedError,
    make_indexable,
    make_indexable_removable,
)
from l2_stores.idle_waiter import CIdleWaiter
from l2_stores.stores.indexable import IndexableStore

needs_core = pytest.mark.skipif(CIdleWaiter is None, reason="the C idle-waiter core is not built")

LEVELLED = c.Struct("level" / c.Int32ub, "hash" / c.Bytes(32))


def long_find(store: Any, key: Any) -> Any:
    """``find`` the long way: the class's Python method."""
    return IndexableStore.find(store, key)


@needs_core
def test_find_is_the_fast_path_for_bytes_keys_only(tmp_path: os.PathLike[str]) -> None:
    from l2_stores._idle_core import TaskRead

    plain = make_indexable("plain", c.Bytes(32), c.Bytes(32)).load(os.path.join(tmp_path, "a"))
    levelled = make_indexable("levelled", c.Bytes(32), LEVELLED).load(os.path.join(tmp_path, "b"))
    numbered = make_indexable("numbered", c.Int64ub, c.Bytes(8)).load(os.path.join(tmp_path, "c"))
    try:
        assert isinstance(plain.find, TaskRead)
        assert isinstance(levelled.find, TaskRead)
        assert not isinstance(numbered.find, TaskRead)  # its keys are encoded: the long way
        assert plain.find.__doc__ == IndexableStore.find.__doc__
        assert plain.find.__name__ == "find"
    finally:
        plain.close()
        levelled.close()
        numbered.close()


@pytest.mark.parametrize("value", ["bytes", "struct"])
def test_fast_and_long_find_agree_in_log_frozen_log_and_data_file(
    tmp_path: os.PathLike[str], value: str
) -> None:
    rng = random.Random(7)
    codec = c.Bytes(32) if value == "bytes" else LEVELLED
    cls = make_indexable_removable("agree", c.Bytes(32), codec)
    store = cls.load(os.path.join(tmp_path, "s"), index_buffer_size=16)
    keys = [rng.randbytes(32) for _ in range(200)]

    def value_of(i: int) -> Any:
        return keys[i] if value == "bytes" else {"level": i, "hash": keys[i]}

    try:
        for i, key in enumerate(keys):
            store.add(key, value_of(i))
            if i % 3 == 0:
                store.remove(keys[i // 2])
        for probe in [*keys, *(rng.randbytes(32) for _ in range(50))]:
            found = store.find(probe)
            assert found == long_find(store, probe)
            assert (found is not None) == store.mem(probe)
        assert store.find(keys[-1]) is not None  # hits, not only misses, were compared
    finally:
        store.close()


def test_keys_of_another_size_or_type_take_the_long_way(tmp_path: os.PathLike[str]) -> None:
    store = make_indexable("sizes", c.Bytes(4), c.Bytes(4)).load(os.fspath(tmp_path))
    try:
        store.add(b"abcd", b"1234")
        assert store.find(bytearray(b"abcd")) == b"1234"
        assert store.find(key=b"abcd") == b"1234"
        with pytest.raises(CodecError) as raised:
            store.find(b"abc")
        assert raised.value.name == "sizes" and raised.value.path == os.fspath(tmp_path)
        assert store._waiter.running_tasks == 0
    finally:
        store.close()


def test_a_value_that_does_not_decode_raises_the_stores_error(tmp_path: os.PathLike[str]) -> None:
    path = os.fspath(tmp_path)
    with make_indexable("tagged", c.Bytes(4), c.Bytes(4)).load(path) as raw:
        raw.add(b"good", b"ok\x00\x01")
        raw.add(b"bad!", b"no\x00\x01")
    os.unlink(os.path.join(path, "identity"))  # as a store made before identities
    tagged = c.Struct("tag" / c.Const(b"ok"), "n" / c.Int16ub)
    store = make_indexable("tagged", c.Bytes(4), tagged).load(path)
    try:
        assert store.find(b"good").n == 1
        with pytest.raises(DecodingError) as raised:
            store.find(b"bad!")
        assert raised.value.name == "tagged" and raised.value.path == path
        assert store._waiter.running_tasks == 0
        store.flush()  # an exclusive section can still be had: no task was left behind
    finally:
        store.close()


def test_closed_stores_and_closed_views_raise(tmp_path: os.PathLike[str]) -> None:
    store = make_indexable("closing", c.Bytes(4), c.Bytes(4)).load(os.fspath(tmp_path))
    store.add(b"abcd", b"1234")
    view = store.readonly()
    other = view.readonly()
    assert view.find(b"abcd") == b"1234"
    view.close()
    with pytest.raises(StoreClosedError):
        view.find(b"abcd")
    assert other.find(b"abcd") == b"1234"  # closing one view leaves the others
    assert store.find(b"abcd") == b"1234"
    store.close()
    for closed in (store, other):
        with pytest.raises(StoreClosedError) as raised:
            closed.find(b"abcd")
        assert raised.value.name == "closing"
    assert store._waiter.running_tasks == 0


def test_a_closed_store_is_collected(tmp_path: os.PathLike[str]) -> None:
    store = make_indexable("collected", c.Bytes(4), c.Bytes(4)).load(os.fspath(tmp_path))
    store.find(b"abcd")
    store.close()
    gone = weakref.ref(store)
    del store
    gc.collect()
    assert gone() is None


# -- TaskRead on its own


class Calls:
    """A fallback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append((args, kwargs))
        return "fallback"


class Lifetime:
    closed = False


def task_read(read: Any, decode: Any = None, lifetime: Any = None) -> tuple[Any, Any, Calls]:
    from l2_stores._idle_core import TaskRead

    assert CIdleWaiter is not None
    waiter = CIdleWaiter()
    fallback = Calls()
    fast = TaskRead(waiter, lifetime or Lifetime(), read, 4, decode, fallback)
    return fast, waiter, fallback


@needs_core
def test_task_read_runs_read_as_a_task() -> None:
    seen: list[int] = []
    waiters: list[Any] = []

    def read(key: bytes) -> bytes:
        seen.append(waiters[0].running_tasks)
        return key[::-1]

    fast, waiter, fallback = task_read(read)
    waiters.append(waiter)
    assert fast(b"abcd") == b"dcba"
    assert seen == [1] and waiter.running_tasks == 0 and fallback.calls == []


@needs_core
def test_task_read_decodes_unless_none_is_read() -> None:
    fast, _, fallback = task_read(lambda key: None if key == b"none" else key, bytes.upper)
    assert fast(b"abcd") == b"ABCD"
    assert fast(b"none") is None
    assert fallback.calls == []


@needs_core
@pytest.mark.parametrize(
    "call",
    [
        ((b"abc",), {}),  # another size
        ((bytearray(b"abcd"),), {}),  # not exactly bytes
        ((b"abcd", b"more"), {}),
        ((), {"key": b"abcd"}),
    ],
    ids=["size", "bytearray", "two-arguments", "keyword"],
)
def test_task_read_hands_other_calls_to_the_fallback(
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> None:
    fast, waiter, fallback = task_read(lambda key: pytest.fail("read was called"))
    args, kwargs = call
    assert fast(*args, **kwargs) == "fallback"
    assert fallback.calls == [call]
    assert waiter.running_tasks == 0


@needs_core
def test_task_read_hands_errors_and_closed_lifetimes_to_the_fallback() -> None:
    def failing(key: bytes) -> bytes:
        raise ValueError("read failed")

    fast, waiter, fallback = task_read(failing)
    assert fast(b"abcd") == "fallback"
    assert waiter.running_tasks == 0

    def undecodable(raw: bytes) -> bytes:
        raise ValueError("decode failed")

    fast, waiter, fallback = task_read(lambda key: key, undecodable)
    assert fast(b"abcd") == "fallback"
    assert waiter.running_tasks == 0

    closed = Lifetime()
    closed.closed = True
    fast, waiter, fallback = task_read(lambda key: pytest.fail("read was called"), None, closed)
    assert fast(b"abcd") == "fallback"
    assert len(fallback.calls) == 1 and waiter.running_tasks == 0


@needs_core
def test_task_read_waits_the_long_way_while_an_exclusive_section_runs() -> None:
    fast, waiter, fallback = task_read(lambda key: pytest.fail("read was called"))
    waiter.enter_exclusive()
    try:
        assert fast(b"abcd") == "fallback"
    finally:
        waiter.exit_exclusive()
    assert len(fallback.calls) == 1 and waiter.running_tasks == 0


@needs_core
def test_task_read_lets_interrupts_through_and_ends_its_task() -> None:
    def interrupted(key: bytes) -> bytes:
        raise KeyboardInterrupt

    fast, waiter, fallback = task_read(interrupted)
    with pytest.raises(KeyboardInterrupt):
        fast(b"abcd")
    assert waiter.running_tasks == 0 and fallback.calls == []


def test_a_store_dropped_unclosed_frees_its_writer_lock_without_a_gc_pass(
    tmp_path: os.PathLike[str],
) -> None:
    cls = make_indexable("dropped", c.Bytes(4), c.Bytes(4))
    path = os.fspath(tmp_path)
    gc.disable()
    try:
        store = cls.load(path)
        store.add(b"abcd", b"1234")
        view = store.readonly()
        assert store.find(b"abcd") == view.find(b"abcd") == b"1234"
        del store, view  # no cycle: reference counting frees them, lock included
        again = cls.load(path)
        assert again.find(b"abcd") == b"1234"
        again.close()
    finally:
        gc.enable()


@needs_core
def test_task_read_refuses_to_run_uninitialized_or_to_be_initialized_twice() -> None:
    from l2_stores._idle_core import TaskRead

    bare = TaskRead.__new__(TaskRead)
    with pytest.raises(TypeError):  # never a crash
        bare(b"abcd")
    fast, waiter, fallback = task_read(lambda key: key)
    with pytest.raises(TypeError, match="already initialized"):
        fast.__init__(waiter, Lifetime(), bytes, 4, None, fallback)
    assert fast(b"abcd") == b"abcd"
