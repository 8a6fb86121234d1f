"""Crash tests of indexed files: a child appending values killed with SIGKILL.

The child (``tests/helpers/indexed_file_writer.py``) appends values of 0 B to
64 KiB with ``flush=True``, printing ``begin <key>`` before and ``ack <key>
<sha256>`` after each append; headers are the values' sha256. The parent
kills it at seeded moments, several rounds on the same directory with a
small index buffer (merges happen), and reloads after each kill: every acked
value reads back, the append in flight shows its old or its new value, and
nothing else appears. Since the child's appends are a function of its seed
and of the keys it loaded, the parent replays them to know the value in
flight.

Then simulated crashes, written by hand per the layout of
``l2_stores/engine/values.py``: torn tails, orphan records (a value written
whose index entry never was), and a record cut short that the index points
at (corruption, not a torn write).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotLoadStore,
    CannotReadFromStore,
    Mode,
    make_indexed_file,
    make_simple_indexed_file,
)
from tests.helpers.child import Child
from tests.helpers.runs import assert_runs_tile

HELPERS = Path(__file__).parent / "helpers"
WRITER = HELPERS / "indexed_file_writer.py"

KEY = construct.Bytes(32)
FILE_HEADER_SIZE = 64
VALUES_FILE = "values.00000000"
RECORD_OVERHEAD = 12


def sha256(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


# the child's classes (same names and codecs as in the helper)
CLASSES: dict[str, Any] = {
    "indexed": make_indexed_file("crash_indexed", KEY, construct.GreedyBytes, construct.Bytes(32)),
    "simple": make_simple_indexed_file(
        "crash_simple", KEY, construct.GreedyBytes, construct.Bytes(32), sha256
    ),
}
KIND_IDS = list(CLASSES)


def parse_lines(
    lines: list[str], seed: str, known: list[bytes]
) -> tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes] | None]:
    """(acked (key, digest) in order, the (key, digest) in flight or None).

    Checks the lines against a replay of the child's appends.
    """
    replay = writer_module.appends(seed, sorted(known))
    acked: list[tuple[bytes, bytes]] = []
    in_flight: tuple[bytes, bytes] | None = None
    for line in lines:
        words = line.split()
        if words[0] == "begin":
            assert in_flight is None, f"two appends in flight: {line}"
            key, value = next(replay)
            assert words[1] == key.hex(), "the replay of the child's appends diverged"
            in_flight = (key, sha256(value))
        elif words[0] == "ack":
            assert in_flight is not None and words[1] == in_flight[0].hex(), line
            assert words[2] == in_flight[1].hex(), "acked digest differs from the replay"
            acked.append(in_flight)
            in_flight = None
        else:
            assert words[0] in ("ready", "done"), line
    return acked, in_flight


def _load_helper() -> Any:
    spec = importlib.util.spec_from_file_location("indexed_file_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer_module = _load_helper()


def append(kind: str, store: Any, key: bytes, value: bytes) -> None:
    if kind == "simple":
        store.append(key, value)
    else:
        store.append(key, value, sha256(value))


# --------------------------------------------------------------------------
# files


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative name."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def frame(key: bytes, value: bytes) -> bytes:
    """A values-file record, per values.py: n | key | value | n | crc32."""
    n = struct.pack("<I", len(value))
    body = n + key + value + n
    return body + zlib.crc32(body).to_bytes(4, "little")


def value_records(path: Path) -> list[tuple[int, bytes, bytes]]:
    """The whole records of a values file: (offset, key, value); fails on anything else."""
    raw = path.read_bytes()
    assert raw[:8] == b"L2SVALS\0"
    position = FILE_HEADER_SIZE
    records = []
    while position < len(raw):
        (length,) = struct.unpack_from("<I", raw, position)
        size = RECORD_OVERHEAD + 32 + length
        record = raw[position : position + size]
        assert len(record) == size, f"record at offset {position} of {path} cut short"
        assert record == frame(record[4:36], record[36 : 36 + length]), f"bad record at {position}"
        records.append((position, record[4:36], record[36 : 36 + length]))
        position += size
    return records


def index_files(directory: Path) -> list[str]:
    """The index directory's files; none when a kill came before the store made it."""
    index = directory / "index"
    return sorted(os.listdir(index)) if index.is_dir() else []


def observe(
    cls: Any, directory: Path, mode: Mode, probes: frozenset[bytes] | set[bytes] = frozenset()
) -> dict[bytes, bytes]:
    """Every key's value digest, cross-checked between items/keys/read/header/mem."""
    state: dict[bytes, bytes] = {}
    with cls.load(directory, mode, index_buffer_size=20, cache_size=16) as store:
        for key, (value, header) in store.items():
            assert key not in state, "items() yielded a key twice"
            assert sha256(value) == header, f"{key.hex()}: value and header disagree"
            state[key] = header
        assert sorted(store.keys()) == sorted(state)
        for key, digest in state.items():
            for _ in range(2):  # from disk, then from the cache
                value, header = store.read(key)
                assert header == digest and sha256(value) == digest
            assert store.header(key) == digest
            assert store.mem(key)
        for key in probes - state.keys():
            assert store.read(key) is None
            assert store.header(key) is None
            assert not store.mem(key)
    return state


# --------------------------------------------------------------------------
# the child


# --------------------------------------------------------------------------
# appends killed at random moments


def kill_round(
    tmp_path: Path,
    directory: Path,
    kind: str,
    seed: str,
    plan: tuple[str, float],
    before: dict[bytes, bytes],
    recover_in_parent: bool,
) -> dict[bytes, bytes]:
    cls = CLASSES[kind]
    child = Child(WRITER, [directory, seed, kind, 20], tmp_path / "child-stderr.log")
    try:
        how, amount = plan
        if how == "acks":
            child.wait_for(lambda: child.acks >= amount)
        else:
            time.sleep(amount)
    finally:
        code = child.kill()
    assert code == -signal.SIGKILL, f"child died on its own ({code}):\n{child.stderr()}"
    acked, in_flight = parse_lines(child.lines, seed, list(before))

    durable = dict(before)
    for key, digest in acked:
        durable[key] = digest
    probes = set(durable) | ({in_flight[0]} if in_flight else set())

    files = snapshot(directory)
    seen = observe(cls, directory, Mode.READ_ONLY, probes)
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"
    for key, digest in seen.items():
        if in_flight is not None and key == in_flight[0]:
            assert digest in (durable.get(key), in_flight[1]), "in-flight key: unknown value"
        else:
            assert key in durable, f"unknown key {key.hex()}"
            assert digest == durable[key], f"{key.hex()}: not the acked value"
    missing = set(durable) - set(seen)
    assert not missing, f"{len(missing)} acked keys lost, e.g. {sorted(missing)[0].hex()}"
    print(
        f"round {seed}: plan {plan}, {len(acked)} acked, in flight: {in_flight is not None}, "
        f"{len(seen)} keys, index {index_files(directory)}"
    )

    if recover_in_parent:
        values = directory / VALUES_FILE
        # none when the kill came before the store made it
        size = values.stat().st_size if values.exists() else None
        assert observe(cls, directory, Mode.READ_WRITE, probes) == seen
        if size is not None:
            assert values.stat().st_size <= size
        value_records(values)  # whole records only: a torn tail was cut
        names = index_files(directory)
        assert not [n for n in names if n.endswith(".tmp")], names
        assert len([n for n in names if n.startswith("log.")]) == 1, names
        assert_runs_tile(directory / "index")
        assert observe(cls, directory, Mode.READ_ONLY, probes) == seen
    return seen


@pytest.mark.parametrize("kind", KIND_IDS)
def test_appends_survive_sigkill(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "store"
    rng = random.Random(f"indexed-crash-{kind}")
    state: dict[bytes, bytes] = {}
    for number in range(10):
        if rng.random() < 0.6:
            plan: tuple[str, float] = ("acks", rng.randint(1, 120))
        else:
            # from the spawn: before the load, during recovery, or mid-appends
            plan = ("sleep", rng.uniform(0.0, 0.6))
        state = kill_round(
            tmp_path,
            directory,
            kind,
            seed=f"{kind}-{number}",
            plan=plan,
            before=state,
            recover_in_parent=number % 3 != 1,
        )
    assert len(state) > 50, "the kills came too early to test anything"
    assert any(n.startswith("run.") for n in index_files(directory)), "no merge happened"
    # a last clean session: the store is still fully usable
    cls = CLASSES[kind]
    extra = {bytes([i]) * 32: bytes([i]) * i * 100 for i in range(45)}
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=20) as store:
        for key, value in extra.items():
            append(kind, store, key, value)
    state.update({key: sha256(value) for key, value in extra.items()})
    assert observe(cls, directory, Mode.READ_WRITE) == state
    value_records(directory / VALUES_FILE)


def allocated_past_end(path: Path) -> int:
    """Bytes of blocks the file holds past its size, less one block's rounding."""
    status = path.stat()
    return status.st_blocks * 512 - status.st_size - status.st_blksize


def test_a_reservation_left_by_a_kill_is_given_back_at_the_next_writer_load(
    reserving_tmp_path: Path,
) -> None:
    """The writer reserves blocks past the values' end; killed, it leaves them, and
    the next READ_WRITE load gives them back (a READ_ONLY one changes nothing)."""
    tmp_path = reserving_tmp_path
    directory = tmp_path / "store"
    child = Child(WRITER, [directory, "reserve", "indexed", 20, 30], tmp_path / "child-stderr.log")
    try:
        child.wait_for(lambda: bool(child.lines) and child.lines[-1] == "done")
    finally:
        code = child.kill()
    assert code == -signal.SIGKILL, f"child died on its own ({code}):\n{child.stderr()}"
    acked, in_flight = parse_lines(child.lines, "reserve", [])
    assert len(acked) == 30 and in_flight is None
    values = directory / VALUES_FILE
    size = values.stat().st_size
    left = allocated_past_end(values)
    assert left > 0, "the killed writer held no reservation"
    files = snapshot(directory)
    assert observe(CLASSES["indexed"], directory, Mode.READ_ONLY) == dict(acked)
    assert snapshot(directory) == files
    assert allocated_past_end(values) == left, "a READ_ONLY load changed the allocation"
    assert observe(CLASSES["indexed"], directory, Mode.READ_WRITE) == dict(acked)
    assert values.stat().st_size == size, "the reservation changed the values file's size"
    assert allocated_past_end(values) <= 0
    value_records(values)


# --------------------------------------------------------------------------
# torn tails, orphans and cut records, simulated


def make_store(
    directory: Path, kind: str, count: int, buffer: int, seed: str = "store"
) -> dict[bytes, bytes]:
    """A closed store of ``count`` keys (a few replaced); returns key -> value."""
    rng = random.Random(seed)
    state: dict[bytes, bytes] = {}
    keys = [rng.randbytes(32) for _ in range(count)]
    with CLASSES[kind].load(directory, Mode.READ_WRITE, index_buffer_size=buffer) as store:
        for key in keys + keys[:3]:
            value = rng.randbytes(rng.randrange(0, 3000))
            append(kind, store, key, value)
            state[key] = value
    return state


def digests(state: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {key: sha256(value) for key, value in state.items()}


def _garbage(rng: random.Random, record: bytes) -> bytes:
    garbage = rng.randbytes(rng.randint(4, len(record) - 1))
    # the length field says more than what follows: cut short
    assert struct.unpack_from("<I", garbage)[0] > len(garbage)
    return garbage


TORN_TAILS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "short-garbage": _garbage,
    "one-byte": lambda rng, record: b"\x07",
    "three-bytes": lambda rng, record: b"\x01\x02\x03",
    "cut-in-length": lambda rng, record: record[:2],
    "cut-in-key": lambda rng, record: record[:20],
    "cut-in-value": lambda rng, record: record[: len(record) // 2],
    "cut-before-trailer": lambda rng, record: record[:-8],
    "cut-in-crc": lambda rng, record: record[:-1],
    "zero-partial": lambda rng, record: bytes(30),
    "zero-record": lambda rng, record: bytes(len(record)),
    "zero-long": lambda rng, record: bytes(3 * len(record) + 7),
}


@pytest.mark.parametrize("merged", [False, True], ids=["log-only", "with-data-file"])
@pytest.mark.parametrize("tail", list(TORN_TAILS))
@pytest.mark.parametrize("kind", KIND_IDS)
def test_torn_values_tail_is_cut(tmp_path: Path, kind: str, tail: str, merged: bool) -> None:
    cls = CLASSES[kind]
    directory = tmp_path / "store"
    state = make_store(directory, kind, 12, buffer=4 if merged else 1000)
    assert any(n.startswith("run.") for n in index_files(directory)) == merged
    values = directory / VALUES_FILE
    original = values.read_bytes()
    rng = random.Random(tail)
    new_key = rng.randbytes(32)
    record = frame(new_key, rng.randbytes(500))  # the append that was cut
    values.write_bytes(original + TORN_TAILS[tail](rng, record))
    files = snapshot(directory)
    expected = digests(state)

    assert observe(cls, directory, Mode.READ_ONLY, {new_key}) == expected
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"

    assert observe(cls, directory, Mode.READ_WRITE, {new_key}) == expected
    assert values.read_bytes() == original, "the READ_WRITE load did not cut the tail exactly"

    # appends after the cut work and read back
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=4) as store:
        append(kind, store, new_key, b"after the cut")
    expected[new_key] = sha256(b"after the cut")
    assert observe(cls, directory, Mode.READ_WRITE) == expected
    assert [r[1] for r in value_records(values)][-1] == new_key


@pytest.mark.parametrize("then_torn", [False, True], ids=["orphan", "orphan-then-torn"])
@pytest.mark.parametrize("kind", KIND_IDS)
def test_orphan_record_is_never_returned(tmp_path: Path, kind: str, then_torn: bool) -> None:
    """A kill between the value's write and its index entry leaves an orphan record."""
    cls = CLASSES[kind]
    directory = tmp_path / "store"
    state = make_store(directory, kind, 10, buffer=4)
    values = directory / VALUES_FILE
    original = values.read_bytes()
    rng = random.Random("orphan")
    orphan_key = rng.randbytes(32)
    replaced_key = sorted(state)[3]
    orphans = frame(orphan_key, b"never indexed") + frame(replaced_key, b"replacement lost")
    torn = frame(rng.randbytes(32), b"x" * 100)[:50] if then_torn else b""
    values.write_bytes(original + orphans + torn)
    files = snapshot(directory)
    expected = digests(state)
    probes = {orphan_key, replaced_key}

    assert observe(cls, directory, Mode.READ_ONLY, probes) == expected
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"
    assert observe(cls, directory, Mode.READ_WRITE, probes) == expected
    # nothing after the last referenced record is kept: orphans and torn bytes go
    assert values.read_bytes() == original

    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=4) as store:
        assert store.read(orphan_key) is None
        assert store.read(replaced_key) == (state[replaced_key], sha256(state[replaced_key]))
        for i in range(9):  # merges too
            append(kind, store, bytes([i]) * 32, bytes([i]) * i)
            expected[bytes([i]) * 32] = sha256(bytes([i]) * i)
        append(kind, store, orphan_key, b"indexed at last")
        append(kind, store, replaced_key, b"replaced at last")
        expected[orphan_key] = sha256(b"indexed at last")
        expected[replaced_key] = sha256(b"replaced at last")
        assert store.read(orphan_key) == (b"indexed at last", expected[orphan_key])
    for mode in (Mode.READ_ONLY, Mode.READ_WRITE):
        assert observe(cls, directory, mode, probes) == expected
    assert len(value_records(values)) == 10 + 3 + 9 + 2


@pytest.mark.parametrize("kind", KIND_IDS)
def test_indexed_record_cut_short_is_corruption(tmp_path: Path, kind: str) -> None:
    """A record the index points at, cut short: no torn write, so never silently cut.

    READ_ONLY: that key's read raises, its header still answers, the rest
    reads; READ_WRITE: the load is refused. The files stay as they are.
    """
    cls = CLASSES[kind]
    directory = tmp_path / "store"
    state = make_store(directory, kind, 10, buffer=4)
    values = directory / VALUES_FILE
    records = value_records(values)
    offset, victim, value = records[-1]
    assert state[victim] == value
    os.truncate(values, offset + 36 + len(value) // 2)
    files = snapshot(directory)
    with cls.load(directory, Mode.READ_ONLY) as store:
        with pytest.raises(CannotReadFromStore):
            store.read(victim)
        assert store.header(victim) == sha256(value)
        assert store.mem(victim)
        for key, want in state.items():
            if key != victim:
                assert store.read(key) == (want, sha256(want))
    with pytest.raises(CannotLoadStore) as caught:
        cls.load(directory, Mode.READ_WRITE).close()
    assert cls.name in str(caught.value)
    assert snapshot(directory) == files, "a damaged values file was changed"


@pytest.mark.parametrize("kind", KIND_IDS)
def test_torn_record_ending_like_a_whole_one(tmp_path: Path, kind: str) -> None:
    """A torn append whose cut lands right after a value's bytes that end with
    what looks like a whole record (a value may hold any bytes: say, a record
    copied from another values file).

    The torn tail must still be dropped, or at least must not stop later
    loads: after more appends and an ordinary torn tail, the store loads with
    every value.
    """
    cls = CLASSES[kind]
    directory = tmp_path / "store"
    state = make_store(directory, kind, 6, buffer=4)
    values = directory / VALUES_FILE
    original = values.read_bytes()
    inner = frame(b"i" * 32, b"inner value")
    outer = frame(b"o" * 32, b"prefix " + inner)  # the append in flight
    cut = outer[: 36 + len(b"prefix ") + len(inner)]  # cut right after the value
    values.write_bytes(original + cut)
    expected = digests(state)
    probes = {b"i" * 32, b"o" * 32}
    assert observe(cls, directory, Mode.READ_WRITE, probes) == expected
    cut_off = values.read_bytes() == original
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=4) as store:
        for i in range(5):
            append(kind, store, bytes([i]) * 32, bytes([i]) * 50)
            expected[bytes([i]) * 32] = sha256(bytes([i]) * 50)
    # a second crash: an ordinary torn tail
    with open(values, "ab") as file:
        file.write(frame(b"t" * 32, b"torn" * 40)[:30])
    assert observe(cls, directory, Mode.READ_ONLY, probes) == expected
    assert observe(cls, directory, Mode.READ_WRITE, probes) == expected, (
        f"cut at the first load: {cut_off}"
    )
