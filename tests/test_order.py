"""Order, ranges and the mapping protocol (API.md "Order, ranges and the mapping protocol").

Model-based: random scenarios of adds, removes, flushes, reloads and GCs on a
store with many runs (a tiny ``index_buffer_size``), checked after each step
against a sorted witness: ``keys``/``items`` with ``start``, ``stop`` and
``reverse``, ``in``, ``[]``, ``get``, ``iter`` and an exact ``len``. Then
snapshots under concurrent writers, run counts written before they existed,
indexed files, the asyncio face and bad bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any

import construct as c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import (
    CodecError,
    Mode,
    Retain,
    StoreClosedError,
    aio,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
)
from l2_stores.engine import layout
from l2_stores.engine.run import REMOVED
from tests.helpers.runs import rewrite_run_header, run_header

PAIR = c.Struct("level" / c.Int32ub, "index" / c.Int16ub)

Hashes = make_indexable_removable("order_hashes", c.Bytes(32), c.Bytes(4))
Levels = make_indexable_removable("order_levels", c.Int32ub, c.Bytes(4))
Messages = make_indexable_removable("order_messages", PAIR, c.Bytes(4))


def _hash_key(i: int) -> bytes:
    return zlib.crc32(i.to_bytes(4, "big")).to_bytes(4, "big") * 8


def _pair_key(i: int) -> Any:
    return c.Container(level=i // 7, index=i % 7)


def _plain(key: Any) -> Any:
    return (key.level, key.index) if isinstance(key, c.Container) else key


KINDS = {
    "bytes32": (Hashes, _hash_key),
    "int32ub": (Levels, lambda i: i),
    "struct": (Messages, _pair_key),
}


def _encoded(cls: Any, key: Any) -> bytes:
    return bytes(cls.key_codec.build(key))


def check_against(store: Any, model: dict[bytes, tuple[Any, bytes]], bounds: list[Any]) -> None:
    """Every ordered question of the API against the witness (encoded key -> (key, value))."""
    cls = type(store)
    ordered = sorted(model)
    assert [_plain(k) for k in store.keys(None, None)] == [_plain(model[e][0]) for e in ordered]
    assert [_plain(k) for k in iter(store)] == [_plain(model[e][0]) for e in ordered]
    assert len(store) == len(model)
    for start, stop in zip(bounds, [*bounds[1:], None], strict=True):
        low = None if start is None else _encoded(cls, start)
        high = None if stop is None else _encoded(cls, stop)
        chosen = [e for e in ordered if (low is None or e >= low) and (high is None or e < high)]
        want = [(_plain(model[e][0]), model[e][1]) for e in chosen]
        got = [(_plain(k), v) for k, v in store.items(start, stop)]
        assert got == want
        got = [(_plain(k), v) for k, v in store.items(start, stop, reverse=True)]
        assert got == want[::-1]
        assert [_plain(k) for k in store.keys(start, stop, reverse=True)] == [
            k for k, _ in want[::-1]
        ]
    for start in bounds:
        if start is None:
            continue
        encoded = _encoded(cls, start)
        assert (start in store) is (encoded in model)
        if encoded in model:
            assert store[start] == model[encoded][1] == store.get(start)
        else:
            with pytest.raises(KeyError):
                store[start]
            assert store.get(start, "absent") == "absent"


actions = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "remove", "flush", "reload", "gc", "check"]),
        st.integers(0, 60),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=60,
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions, buffer=st.sampled_from([1, 2, 3, 7]), probes=st.lists(st.integers(0, 60)))
def test_ordered_reads_match_a_sorted_witness(
    kind: str, steps: list[tuple[str, int, int]], buffer: int, probes: list[int]
) -> None:
    cls, make_key = KINDS[kind]
    probed = {_encoded(cls, make_key(i)): make_key(i) for i in probes}
    bounds = [None, *(probed[e] for e in sorted(probed))]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "store")
        store = cls.load(path, index_buffer_size=buffer)
        model: dict[bytes, tuple[Any, bytes]] = {}
        try:
            for action, i, word in steps:
                key = make_key(i)
                encoded = _encoded(cls, key)
                value = word.to_bytes(4, "big")
                if action == "add":
                    store.add(key, value, flush=False)
                    model[encoded] = (key, value)
                elif action == "remove":
                    store.remove(key, flush=False)
                    model.pop(encoded, None)
                elif action == "flush":
                    store.flush()
                elif action == "reload":
                    store.close()
                    store = cls.load(path, index_buffer_size=buffer)
                elif action == "gc":
                    kept = [model[e][0] for e in sorted(model)[::2]]
                    store.gc(Retain(kept), background=False)
                    model = {_encoded(cls, k): model[_encoded(cls, k)] for k in kept}
                else:
                    check_against(store, model, bounds)
            check_against(store, model, bounds)
            store.close()
            store = cls.load(path, index_buffer_size=buffer)
            check_against(store, model, bounds)
        finally:
            store.close()


def test_big_endian_keys_iterate_numerically_little_endian_ones_do_not(tmp_path: Path) -> None:
    little = make_indexable("order_little", c.Int32ul, c.Bytes(1))
    with (
        Levels.load(tmp_path / "big", index_buffer_size=16) as big,
        little.load(tmp_path / "little", index_buffer_size=16) as small,
    ):
        for level in (1, 256, 2, 65536, 3):
            big.add(level, b"\x00\x00\x00\x00")
            small.add(level, b"x")
        assert list(big.keys()) == [1, 2, 3, 256, 65536]
        assert list(small.keys()) == [65536, 256, 1, 2, 3]  # byte order of the encoding


def test_the_last_levels_and_the_oldest(tmp_path: Path) -> None:
    with Levels.load(tmp_path / "levels", index_buffer_size=100) as levels:
        assert len(levels) == 0 and bool(levels)  # a store is true, even empty
        assert next(iter(levels), None) is None and list(levels.items(reverse=True)) == []
        for level in range(50, 1_050):
            levels.add(level, level.to_bytes(4, "big"), flush=False)
        last = [level for level, _ in zip(levels.keys(reverse=True), range(100), strict=False)]
        assert last == list(range(1_049, 949, -1))
        assert next(iter(levels)) == 50
        assert list(levels.keys(500, 503)) == [500, 501, 502]
        assert len(levels) == 1_000


def test_a_levels_messages_by_struct_key(tmp_path: Path) -> None:
    with Messages.load(tmp_path / "messages", index_buffer_size=10) as messages:
        for level in range(20):
            for index in range(level % 5):
                messages.add({"level": level, "index": index}, b"msg" + bytes([index]))
        found = [
            (k.level, k.index)
            for k in messages.keys({"level": 12, "index": 0}, {"level": 13, "index": 0})
        ]
        assert found == [(12, 0), (12, 1)]


def test_an_iterator_is_a_snapshot_under_concurrent_writers(tmp_path: Path) -> None:
    store = Levels.load(tmp_path / "levels", index_buffer_size=50)
    for level in range(2_000):
        store.add(level, b"old!", flush=False)
    before = dict(store.items())
    iterators = [store.items(), store.items(500, 1_500), store.items(reverse=True)]
    firsts = [next(iterator) for iterator in iterators]  # started, not finished

    def write(offset: int) -> None:
        for level in range(offset, 4_000, 4):
            if level % 3:
                store.add(level, b"new!", flush=False)
            else:
                store.remove(level, flush=False)

    writers = [threading.Thread(target=write, args=(offset,)) for offset in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    store.gc(Retain(range(0, 4_000, 2)), background=False)
    expected = sorted(before.items())
    assert [firsts[0], *iterators[0]] == expected
    assert [firsts[1], *iterators[1]] == [(k, v) for k, v in expected if 500 <= k < 1_500]
    assert [firsts[2], *iterators[2]] == expected[::-1]
    now = {k: b"new!" for k in range(4_000) if k % 3 and k % 2 == 0}
    assert dict(store.items()) == now and len(store) == len(now)
    store.close()


def _forget_counts(path: Path) -> int:
    """Zero the live count of every run (as runs written before it existed), checksums
    kept; return how many runs."""
    runs = layout.scan(str(path)).runs
    for span in runs:
        rewrite_run_header(path / layout.run_name(span), live=0)
    return len(runs)


def _recorded_counts(path: Path) -> list[int]:
    return [
        run_header(path / layout.run_name(span))["live"] for span in layout.scan(str(path)).runs
    ]


def test_runs_without_a_count_are_counted_once_then_counts_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "levels"
    with Levels.load(path, index_buffer_size=20) as store:
        for level in range(300):
            store.add(level, b"abcd", flush=False)
        for level in range(0, 300, 7):
            store.remove(level, flush=False)
    assert all(_recorded_counts(path))
    assert _forget_counts(path) > 2
    expected = 300 - len(range(0, 300, 7))
    with Levels.load(path, index_buffer_size=20) as store:
        assert len(store) == expected  # counted by reading the runs
        for level in range(300, 340):  # flushes on top of the counted runs
            store.add(level, b"abcd", flush=False)
        assert len(store) == expected + 40
    assert _recorded_counts(path)[-1]  # the flushes since recorded theirs
    with Levels.load(path, Mode.READ_ONLY) as reader:
        assert len(reader) == expected + 40
        runs = reader._engine._stack
        newest = runs.runs[-1].live
        assert newest == sum(value is not REMOVED for _, value in runs.rows())


def test_indexed_files_iterate_in_key_order_with_values_and_headers(tmp_path: Path) -> None:
    Blocks = make_indexed_file("order_blocks", c.Int32ub, c.GreedyBytes, c.Bytes(2))
    with Blocks.load(tmp_path / "blocks", index_buffer_size=4) as blocks:
        for level in (5, 1, 9, 3, 7, 3):
            blocks.append(level, b"block %d" % level * level, struct.pack(">H", level))
        assert list(blocks) == [1, 3, 5, 7, 9] and len(blocks) == 5
        assert list(blocks.items(3, 7, reverse=True)) == [
            (5, (b"block 5" * 5, b"\x00\x05")),
            (3, (b"block 3" * 3, b"\x00\x03")),
        ]
        assert blocks[9] == (b"block 9" * 9, b"\x00\x09") and 4 not in blocks
        with pytest.raises(KeyError):
            blocks[4]


def test_asyncio_ranges(tmp_path: Path) -> None:
    async def main() -> None:
        async with aio.open(Levels, tmp_path / "levels", index_buffer_size=8) as levels:
            for level in range(40):
                await levels.add(level, level.to_bytes(4, "big"), flush=False)
            assert [k async for k in levels.keys(10, 15)] == [10, 11, 12, 13, 14]
            assert [k async for k in levels.keys(35, reverse=True)] == [39, 38, 37, 36, 35]
            assert [k async for k, _ in levels.items(None, 2)] == [0, 1]
            assert [k async for k in levels][:3] == [0, 1, 2]

    asyncio.run(main())


def test_bad_bounds_name_the_store(tmp_path: Path) -> None:
    with Levels.load(tmp_path / "levels") as levels:
        levels.add(1, b"abcd")
        with pytest.raises(CodecError, match="order_levels") as caught:
            list(levels.keys("one"))
        assert caught.value.path == str(tmp_path / "levels")
        with pytest.raises(CodecError, match="order_levels"):
            levels.items(stop=-1)
        assert list(levels.keys()) == [1]


@pytest.mark.parametrize("flush", [False, True], ids=["buffered", "flushed"])
def test_iterators_taken_between_writes_keep_their_moment(tmp_path: Path, flush: bool) -> None:
    """Iterators made at many moments, left unread while the writes go on (copied
    active logs, freezes, merges), each yield the store of their moment; flushed
    adds are the C put's, which must leave a dict an iterator holds to Python."""
    rng = random.Random(24)
    # few keys, a log of 25: the writes after an iterator often overwrite keys it holds
    store = Levels.load(tmp_path / "levels", index_buffer_size=25)
    model: dict[int, bytes] = {}
    taken: list[tuple[Any, list[tuple[int, bytes]]]] = []
    for step in range(600):
        level = rng.randrange(150) if step % 3 == 0 else rng.randrange(12)
        if rng.random() < 0.25:
            store.remove(level, flush=flush)
            model.pop(level, None)
        else:
            model[level] = step.to_bytes(4, "big")
            store.add(level, model[level], flush=flush)
        if step % 11 == 0:
            low, high = sorted(rng.sample(range(160), 2))
            reverse = rng.random() < 0.5
            want = [(k, model[k]) for k in sorted(model) if low <= k < high]
            taken.append((store.items(low, high, reverse=reverse), want[::-1] if reverse else want))
            if step % 22 == 0:  # some are started, most are not
                iterator, expected = taken[-1]
                first = next(iterator, None)
                started = [] if first is None else [first]
                taken[-1] = (itertools.chain(started, iterator), expected)
    for iterator, want in taken:
        assert list(iterator) == want
    store.close()


def test_a_readers_iterator_keeps_its_moment_across_syncs(tmp_path: Path) -> None:
    path = tmp_path / "levels"
    writer = Levels.load(path, index_buffer_size=1_000)  # one log: the reader reads on in it
    for level in range(30):
        writer.add(level, b"one!")
    reader = Levels.load(path, Mode.READ_ONLY)
    iterator = reader.items()
    assert next(iterator) == (0, b"one!")
    for level in range(30):
        writer.add(level, b"two!") if level % 2 else writer.remove(level)
    reader.sync()
    assert list(iterator) == [(level, b"one!") for level in range(1, 30)]
    assert list(reader.items()) == [(level, b"two!") for level in range(1, 30, 2)]
    assert len(reader) == 15
    reader.close()
    writer.close()


ORDER_READER = Path(__file__).parent / "helpers" / "order_reader.py"


def test_a_read_only_process_iterates_its_moment_beside_a_writer_process(
    tmp_path: Path,
) -> None:
    """A READ_ONLY process's iterators keep their moment while it syncs between steps
    and the writer (here) overwrites, removes, merges runs and GCs their files away."""
    path = tmp_path / "levels"
    writer = Levels.load(path, index_buffer_size=40)
    levels = 1_500
    state: dict[int, bytes] = {}

    def write_round(number: int) -> None:
        for level in range(levels):
            if (level + number) % 5 == 0:
                writer.remove(level, flush=level % 50 == 0)
                state.pop(level, None)
            else:
                value = struct.pack(">HH", number, level % 997)
                writer.add(level, value, flush=level % 50 == 0)
                state[level] = value
        writer.flush()

    def as_pairs(bindings: dict[int, bytes], reverse: bool = False) -> list[list[Any]]:
        return [[level, value.hex()] for level, value in sorted(bindings.items(), reverse=reverse)]

    write_round(0)
    reader = subprocess.Popen(
        [sys.executable, str(ORDER_READER), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None and reader.stdout is not None

    def answer() -> str:
        assert reader.stdout is not None
        ready, _, _ = select.select([reader.stdout], [], [], 60)
        line = reader.stdout.readline() if ready else ""
        if not line:
            reader.kill()
            pytest.fail(f"the reader is gone or stuck: {reader.communicate(timeout=60)[1][-3000:]}")
        return line

    def ask(line: str) -> Any:
        assert reader.stdin is not None
        reader.stdin.write(line + "\n")
        reader.stdin.flush()
        return json.loads(answer())

    try:
        assert answer().strip() == "ready"
        expected = {"first": as_pairs(state), "back": as_pairs(state, reverse=True)}
        ask("iter first")
        ask("iter back reverse")
        got: dict[str, list[list[Any]]] = {"first": [], "back": []}
        for number in range(1, 9):
            write_round(number)  # merges: runs replaced, their files deleted
            if number % 3 == 0:
                writer.gc(Retain(range(0, levels, 2)), background=False)
                state = {level: v for level, v in state.items() if level % 2 == 0}
            assert ask("sync") == {"ok": "sync"}
            for name in got:
                got[name] += ask(f"step {name} 150")
            if number == 4:  # one more iterator, of this moment
                ask("iter middle")
                expected["middle"] = as_pairs(state)
                got["middle"] = []
        for name in got:
            got[name] += ask(f"step {name} {levels}")
        assert got == expected
        ask("iter now")
        assert ask(f"step now {levels}") == as_pairs(state)
        assert ask("len") == {"len": len(state)}
        reader.stdin.write("quit\n")
        reader.stdin.flush()
        assert reader.wait(timeout=60) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.communicate(timeout=60)
        writer.close()


@pytest.mark.parametrize("codec", ["bytes", "int"])
def test_a_views_iterators_end_with_the_view_or_the_store(tmp_path: Path, codec: str) -> None:
    """Closing a view stops its iterators (not the store's); closing the store stops
    every iterator of the store and of its views, at their next step."""
    cls = Hashes if codec == "bytes" else Levels
    key = _hash_key if codec == "bytes" else (lambda i: i)
    store = cls.load(tmp_path / "store", index_buffer_size=20)
    for i in range(100):
        store.add(key(i), b"v%03d" % (i % 1000))
    view, other_view = store.readonly(), store.readonly()
    of_view, keys_of_view = view.items(), view.keys(reverse=True)
    of_other, of_store = other_view.items(), store.items()
    for iterator in (of_view, keys_of_view, of_other, of_store):
        next(iterator)
    view.close()
    for iterator in (of_view, keys_of_view):
        with pytest.raises(StoreClosedError):
            next(iterator)
    assert len([next(of_other), *of_store]) == 100  # the other view and the store go on
    late = store.readonly()
    of_late = late.items()
    store.close()
    for iterator in (of_other, of_late):
        with pytest.raises(StoreClosedError):
            next(iterator)
    with pytest.raises(StoreClosedError):
        store.readonly()
