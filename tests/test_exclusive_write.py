"""The C fast path of an indexed file's ``append`` (``_idle_core.ExclusiveWrite``
running ``_accel.IndexedAppend``): the long way's effects and errors."""

from __future__ import annotations

import gc
import os
import random
import re
import threading
from typing import Any

import construct as c
import pytest

from l2_stores import (
    CannotWriteToStore,
    CodecError,
    ReadOnlyError,
    StoreClosedError,
    make_indexed_file,
    make_simple_indexed_file,
)
from l2_stores.engine.accel import AcceleratedIndexedAppend
from l2_stores.idle_waiter import CIdleWaiter
from l2_stores.stores.indexed_file import IndexedFileBase

needs_c = pytest.mark.skipif(
    CIdleWaiter is None or AcceleratedIndexedAppend is None, reason="the C paths are not built"
)

Plain = make_indexed_file("plain", c.Bytes(32), c.GreedyBytes, c.Bytes(16))


def long_append(store: Any, *args: Any, **kwargs: Any) -> None:
    """``append`` the long way: the class's Python method."""
    IndexedFileBase.append(store, *args, **kwargs)


@needs_c
def test_append_is_the_fast_path_for_bytes_codecs_only(tmp_path: os.PathLike[str]) -> None:
    from l2_stores._idle_core import ExclusiveWrite

    levelled = make_indexed_file(
        "levelled", c.Bytes(32), c.Struct("level" / c.Int32ub), c.Bytes(16)
    )
    simple = make_simple_indexed_file("simple", c.Bytes(32), c.GreedyBytes, c.Bytes(4), len_header)
    plain = Plain.load(os.path.join(tmp_path, "a"))
    other = levelled.load(os.path.join(tmp_path, "b"))
    derived = simple.load(os.path.join(tmp_path, "c"))
    try:
        assert isinstance(plain.append, ExclusiveWrite)
        assert not isinstance(other.append, ExclusiveWrite)  # values are encoded
        assert not isinstance(derived.append, ExclusiveWrite)  # its own append
        assert plain.append.__doc__ == IndexedFileBase.append.__doc__
        assert plain.append.__name__ == "append"
        view = plain.readonly()
        assert not isinstance(view.append, ExclusiveWrite)
        with pytest.raises(ReadOnlyError):
            view.append(b"k" * 32, b"v", b"h" * 16)
    finally:
        plain.close()
        other.close()
        derived.close()


def len_header(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big")


def state(store: Any) -> dict[bytes, Any]:
    return {key: store.read(key) for key in store.keys()}  # noqa: SIM118 (not a dict)


@needs_c
def test_fast_and_long_appends_leave_the_same_store(tmp_path: os.PathLike[str]) -> None:
    """Same appends (merges, replacements, cache evictions) through each way: same files."""
    rng = random.Random(5)
    script = []
    keys = [rng.randbytes(32) for _ in range(300)]
    for step in range(2_000):
        key = rng.choice(keys)
        script.append((key, rng.randbytes(rng.choice([0, 10, 900, 5000])), key[:16], step % 7 != 3))
    fast_dir, long_dir = os.path.join(tmp_path, "fast"), os.path.join(tmp_path, "long")
    fast = Plain.load(fast_dir, index_buffer_size=50, cache_size=20, cache_bytes=20_000)
    slow = Plain.load(long_dir, index_buffer_size=50, cache_size=20, cache_bytes=20_000)
    try:
        for key, value, header, flush in script:
            fast.append(key, value, header, flush=flush)
            long_append(slow, key, value, header, flush=flush)
            if rng.random() < 0.05:
                probe = rng.choice(keys)
                assert fast.read(probe) == slow.read(probe)
        assert fast._cache.keys() == slow._cache.keys()
        assert state(fast) == state(slow)
    finally:
        fast.close()
        slow.close()
    for name in sorted(os.listdir(fast_dir)):
        if name.startswith("values."):  # the same records, in the same order
            with (
                open(os.path.join(fast_dir, name), "rb") as a,
                open(os.path.join(long_dir, name), "rb") as b,
            ):
                assert a.read() == b.read(), name
    with Plain.load(fast_dir) as again, Plain.load(long_dir) as other:
        assert state(again) == state(other)
        assert len(state(again)) == len({key for key, *_ in script})


@needs_c
def test_other_calls_take_the_long_way(tmp_path: os.PathLike[str]) -> None:
    store = Plain.load(os.path.join(tmp_path, "s"))
    calls: list[Any] = []
    original = IndexedFileBase.append

    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        original(self, *args, **kwargs)

    IndexedFileBase.append = recording  # type: ignore[method-assign]
    try:
        store._bind_fast_paths()  # its fallback is now the recording method
        key = b"k" * 32
        store.append(key, b"fast", b"h" * 16)
        store.append(key, b"flush", b"h" * 16, flush=True)
        assert calls == []
        store.append(key, b"no flush", b"h" * 16, flush=False)
        store.append(key, bytearray(b"array"), b"h" * 16)
        with pytest.raises(CodecError, match="plain"):
            store.append(b"short", b"v", b"h" * 16)  # refused the long way, by the store
    finally:
        IndexedFileBase.append = original  # type: ignore[method-assign]
    assert [args[1] for args, _ in calls] == [b"no flush", bytearray(b"array"), b"v"]
    assert store.read(b"k" * 32) == (b"array", b"h" * 16)
    store.close()


@needs_c
def test_a_closed_store_raises_its_error(tmp_path: os.PathLike[str]) -> None:
    store = Plain.load(os.path.join(tmp_path, "s"))
    fast = store.append
    store.close()
    with pytest.raises(StoreClosedError):
        fast(b"k" * 32, b"v", b"h" * 16)
    with pytest.raises(StoreClosedError):
        store.append(b"k" * 32, b"v", b"h" * 16)


@needs_c
def test_a_failed_write_leaves_the_section_and_reports_the_stores_error(
    tmp_path: os.PathLike[str],
) -> None:
    store = Plain.load(os.path.join(tmp_path, "s"))
    store.append(b"a" * 32, b"first", b"h" * 16)
    target = store._values.target
    assert target is not None
    writable = os.dup(target._fd)
    readonly = os.open(target.path, os.O_RDONLY)
    os.dup2(readonly, target._fd)  # the values file's writes now fail (EBADF)
    try:
        with pytest.raises(CannotWriteToStore, match=re.escape(target.path)):
            store.append(b"b" * 32, b"second", b"h" * 16)
    finally:
        os.dup2(writable, target._fd)
        os.close(writable)
        os.close(readonly)
    assert store._waiter.is_idle()
    store.append(b"c" * 32, b"third", b"h" * 16)
    assert state(store) == {b"a" * 32: (b"first", b"h" * 16), b"c" * 32: (b"third", b"h" * 16)}
    store.close()


@needs_c
def test_appends_wait_for_readers_and_for_exclusive_sections(tmp_path: os.PathLike[str]) -> None:
    """Eight threads append and read at once; every read sees a whole pair, the end
    state is the last append of each key (each thread owns its keys)."""
    store = Plain.load(os.path.join(tmp_path, "s"), index_buffer_size=64)
    errors: list[str] = []
    last: dict[bytes, bytes] = {}

    def work(seed: int) -> None:
        rng = random.Random(seed)
        mine = [bytes([seed]) * 16 + rng.randbytes(16) for _ in range(20)]
        for step in range(1_500):
            key = rng.choice(mine)
            if rng.random() < 0.5:
                value = b"%d:%d" % (seed, step)
                store.append(key, value, key[:16])
                last[key] = value
            else:
                pair = store.read(key)
                if pair is not None and (
                    pair[1] != key[:16] or not pair[0].startswith(b"%d:" % seed)
                ):
                    errors.append(repr(pair))
            if step % 300 == 0:
                with store._waiter.force_idle():
                    pass

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {key: pair[0] for key, pair in state(store).items()} == last
    assert store._waiter.is_idle()
    store.close()


@needs_c
def test_a_store_dropped_unclosed_is_freed_at_once(tmp_path: os.PathLike[str]) -> None:
    path = os.fspath(tmp_path)
    gc.disable()
    try:
        store = Plain.load(path)
        store.append(b"k" * 32, b"v", b"h" * 16)
        del store  # no cycle through the fast path: the lock goes with it
        again = Plain.load(path)
        assert again.read(b"k" * 32) == (b"v", b"h" * 16)
        again.close()
    finally:
        gc.enable()


@needs_c
def test_exclusive_write_refuses_to_run_uninitialized_or_twice() -> None:
    from l2_stores._idle_core import ExclusiveWrite

    bare = ExclusiveWrite.__new__(ExclusiveWrite)
    with pytest.raises(TypeError):
        bare(b"abcd")
    assert CIdleWaiter is not None

    class Lifetime:
        closed = False

    class Pacer:
        pacing = False

    waiter = CIdleWaiter()
    seen: list[Any] = []
    fast = ExclusiveWrite(waiter, Lifetime(), Pacer(), lambda *a: seen.append(a), (4,), print)
    with pytest.raises(TypeError, match="already initialized"):
        fast.__init__(waiter, Lifetime(), Pacer(), print, (4,), print)
    fast(b"abcd")
    assert seen == [(b"abcd",)] and waiter.is_idle()


@needs_c
def test_a_pacing_merge_and_a_held_section_send_appends_the_long_way(
    tmp_path: os.PathLike[str],
) -> None:
    store = Plain.load(os.path.join(tmp_path, "s"))
    calls: list[Any] = []
    original = IndexedFileBase.append

    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        original(self, *args, **kwargs)

    IndexedFileBase.append = recording  # type: ignore[method-assign]
    try:
        store._bind_fast_paths()
        store._engine.pacing = True  # the long way calls reserve() first
        store.append(b"p" * 32, b"paced", b"h" * 16)
        store._engine.pacing = False
        store.append(b"f" * 32, b"fast", b"h" * 16)
        with store._waiter.force_idle():  # this thread holds the section
            store.append(b"r" * 32, b"re-entrant", b"h" * 16)
    finally:
        IndexedFileBase.append = original  # type: ignore[method-assign]
    assert calls == [b"paced", b"re-entrant"]
    assert store._waiter.is_idle()
    assert state(store) == {
        b"p" * 32: (b"paced", b"h" * 16),
        b"f" * 32: (b"fast", b"h" * 16),
        b"r" * 32: (b"re-entrant", b"h" * 16),
    }
    store.close()


@needs_c
def test_a_store_loads_with_any_truthy_fsync(tmp_path: os.PathLike[str]) -> None:
    for index, fsync in enumerate([1, 0, None, "yes"]):
        with Plain.load(os.path.join(tmp_path, str(index)), fsync=fsync) as store:  # type: ignore[arg-type]
            store.append(b"k" * 32, b"v", b"h" * 16)
            assert store.read(b"k" * 32) == (b"v", b"h" * 16)
