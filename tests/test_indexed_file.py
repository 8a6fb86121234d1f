"""Indexed files: ``make_indexed_file`` and ``make_simple_indexed_file``.

Every test runs on both factories. Four store kinds: each factory with
``GreedyBytes`` values and with ``Struct`` values, headers either a ``Struct``
or ``Bytes(16)``; the simple kinds derive the header from the value.

* model-based scenarios (after ``test_model.py``): sequential actions with
  merges (small ``index_buffer_size``), cache evictions (small ``cache_size``)
  and reloads, and parallel groups of actions in 4 to 16 threads, against a
  dict witness;
* cache truth: what the cache serves is what a store with an empty cache
  reads from disk, replaced values and decoded Structs included;
* values from 0 bytes to 16 MiB;
* bad input and damaged files (layouts from ``l2_stores/engine/values.py``,
  ``log.py``, ``datafile.py`` and ``framing.py``): the error API.md names,
  never wrong data, every file byte-identical afterwards;
* a READ_ONLY store beside a writer in the same process, with ``sync()``.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import re
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import (
    CannotLoadStore,
    CannotReadFromStore,
    CodecError,
    DecodingError,
    Mode,
    ReadOnlyError,
    StoreClosedError,
    StoreError,
    make_indexed_file,
    make_simple_indexed_file,
)
from l2_stores.engine.framing import Expected
from l2_stores.engine.log import read_log
from l2_stores.engine.run import Run
from tests.helpers.runs import run_names

KEY = construct.Bytes(32)
STRUCT_HEADER = construct.Struct("level" / construct.Int32ub, "predecessor" / construct.Bytes(32))
BYTES_HEADER = construct.Bytes(16)
STRUCT_VALUE = construct.Struct("level" / construct.Int32ub, "payload" / construct.GreedyBytes)

FILE_HEADER_SIZE = 64
VALUES_FILE = "values.00000000"
RECORD_OVERHEAD = 12  # n u32 | key | value | n u32 | crc32
POINTER_SIZE = 16  # offset u64 | length u32 | file number u32

BUFFER_SIZES = [1, 2, 3, 5]
CACHE_SIZES = [0, 1, 2, 1000]
JOIN_TIMEOUT = 120.0  # deadlock guard only
MODES = [Mode.READ_ONLY, Mode.READ_WRITE]
MODE_IDS = ["ro", "rw"]

SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
}


def digest16(value: Any) -> bytes:
    """The header of a bytes value (anything else: the value codec refuses it)."""
    return hashlib.sha256(value if isinstance(value, bytes) else b"").digest()[:16]


def struct_header_of(value: Any) -> dict[str, Any]:
    """The header of a Struct value: its level and the hash of its payload.

    ``get`` with defaults, so that a value missing a field reaches the value
    codec (which must refuse it) instead of failing here.
    """
    payload = value.get("payload", b"")
    digest = hashlib.sha256(payload if isinstance(payload, bytes) else b"").digest()
    return {"level": value.get("level", 0), "predecessor": digest}


# --------------------------------------------------------------------------
# store kinds


@dataclass(frozen=True)
class Kind:
    """A store class under test, how to append to it and how to draw values."""

    name: str
    cls: Any
    simple: bool
    struct_value: bool
    values: st.SearchStrategy[Any]
    headers: st.SearchStrategy[Any] | None
    random_value: Callable[[random.Random], Any]
    random_header: Callable[[random.Random], Any]
    header_of: Callable[[Any], Any] | None = None

    def append(self, store: Any, key: bytes, value: Any, header: Any, flush: bool = True) -> None:
        if self.simple:
            store.append(key, value, flush=flush)
        else:
            store.append(key, value, header, flush=flush)

    def header_for(self, value: Any, header: Any) -> Any:
        """The header the store must give for an append of ``value`` (and ``header``)."""
        if self.simple:
            assert self.header_of is not None
            return self.header_of(value)
        return header

    def pair(self, value: Any, header: Any) -> tuple[Any, Any]:
        """The witness of an append: plain value and plain header."""
        return plain(value), plain(self.header_for(value, header))


def _struct_value(rng: random.Random) -> dict[str, Any]:
    return {"level": rng.randrange(2**32), "payload": rng.randbytes(rng.randrange(0, 120))}


def _struct_header(rng: random.Random) -> dict[str, Any]:
    return {"level": rng.randrange(2**32), "predecessor": rng.randbytes(32)}


struct_values = st.fixed_dictionaries(
    {"level": st.integers(0, 2**32 - 1), "payload": st.binary(max_size=100)}
)
struct_headers = st.fixed_dictionaries(
    {"level": st.integers(0, 2**32 - 1), "predecessor": st.binary(min_size=32, max_size=32)}
)
bytes_values = st.binary(max_size=200)
bytes_headers = st.binary(min_size=16, max_size=16)

KINDS = {
    "indexed-bytes": Kind(
        "indexed-bytes",
        make_indexed_file("if_bytes", KEY, construct.GreedyBytes, STRUCT_HEADER),
        simple=False,
        struct_value=False,
        values=bytes_values,
        headers=struct_headers,
        random_value=lambda rng: rng.randbytes(rng.randrange(0, 200)),
        random_header=_struct_header,
    ),
    "indexed-struct": Kind(
        "indexed-struct",
        make_indexed_file("if_struct", KEY, STRUCT_VALUE, BYTES_HEADER),
        simple=False,
        struct_value=True,
        values=struct_values,
        headers=bytes_headers,
        random_value=_struct_value,
        random_header=lambda rng: rng.randbytes(16),
    ),
    "simple-bytes": Kind(
        "simple-bytes",
        make_simple_indexed_file("sif_bytes", KEY, construct.GreedyBytes, BYTES_HEADER, digest16),
        simple=True,
        struct_value=False,
        values=bytes_values,
        headers=None,
        random_value=lambda rng: rng.randbytes(rng.randrange(0, 200)),
        random_header=lambda rng: None,
        header_of=digest16,
    ),
    "simple-struct": Kind(
        "simple-struct",
        make_simple_indexed_file("sif_struct", KEY, STRUCT_VALUE, STRUCT_HEADER, struct_header_of),
        simple=True,
        struct_value=True,
        values=struct_values,
        headers=None,
        random_value=_struct_value,
        random_header=lambda rng: None,
        header_of=struct_header_of,
    ),
}
KIND_IDS = list(KINDS)
# GreedyBytes values, one per factory: for tests on the raw values file
BYTES_KIND_IDS = ["indexed-bytes", "simple-bytes"]
STRUCT_KIND_IDS = ["indexed-struct", "simple-struct"]


# --------------------------------------------------------------------------
# helpers


def plain(found: Any) -> Any:
    """Decoded data as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    if isinstance(found, tuple):
        return tuple(plain(part) for part in found)
    return found


@contextmanager
def store_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="l2_indexed_") as directory:
        yield os.path.join(directory, "store")


def snapshot(directory: Path | str) -> dict[str, bytes]:
    """Every file under ``directory``, by relative name."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def listed_items(store: Any) -> dict[bytes, Any]:
    """``items()`` as a dict of plain pairs, checking each key comes once."""
    items = list(store.items())
    keys = [k for k, _ in items]
    assert len(keys) == len(set(keys)), "items() yielded a key twice"
    for _, pair in items:
        assert isinstance(pair, tuple) and len(pair) == 2, pair
    return {k: plain(pair) for k, pair in items}


def check_read(store: Any, kind: Kind, key: bytes, want: tuple[Any, Any] | None) -> None:
    found = store.read(key)
    if want is None:
        assert found is None, f"read({key.hex()[:8]}) of an absent key gave {found!r}"
        return
    assert isinstance(found, tuple) and len(found) == 2, found
    assert plain(found) == want, f"read({key.hex()[:8]})"
    if kind.struct_value:
        assert isinstance(found[0], construct.Container), type(found[0])


def check_store(
    store: Any, kind: Kind, witness: dict[bytes, tuple[Any, Any]], keys: list[bytes]
) -> None:
    """Every read of ``store`` agrees with ``witness`` (reads twice: disk, then cache)."""
    for k in keys:
        want = witness.get(k)
        check_read(store, kind, k, want)
        check_read(store, kind, k, want)
        assert plain(store.header(k)) == (want[1] if want else None), f"header({k.hex()[:8]})"
        assert store.mem(k) == (k in witness), f"mem({k.hex()[:8]})"
    listed = list(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(witness)
    assert listed_items(store) == witness


def merged(directory: str | Path) -> bool:
    """Whether some merge produced a data file in the store's index."""
    return any(name.startswith("run.") for name in os.listdir(Path(directory) / "index"))


def only(directory: Path, prefix: str) -> Path:
    found = [p for p in directory.iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def assert_names(error: BaseException, name: str, path: Path | str) -> None:
    text = str(error)
    assert name in text, text
    assert str(path) in text, text


def message_without_paths(error: BaseException, *paths: Path) -> str:
    text = str(error)
    for path in sorted(paths, key=lambda p: -len(str(p))):
        text = text.replace(str(path), "<path>")
    return text


def value_records(path: Path, key_size: int = 32) -> list[tuple[int, int, bytes, bytes]]:
    """The records of a values file, parsed per values.py: (offset, size, key, value).

    Fails if a record is not whole or its checksum is wrong.
    """
    raw = path.read_bytes()
    assert raw[:8] == b"L2SVALS\0", raw[:8]
    position = FILE_HEADER_SIZE
    records = []
    while position < len(raw):
        (length,) = struct.unpack_from("<I", raw, position)
        size = RECORD_OVERHEAD + key_size + length
        record = raw[position : position + size]
        assert len(record) == size, f"record at {position} cut short"
        assert struct.unpack_from("<I", record, 4 + key_size + length)[0] == length
        assert zlib.crc32(record[:-4]) == int.from_bytes(record[-4:], "little")
        key = record[4 : 4 + key_size]
        records.append((position, size, key, record[4 + key_size : 4 + key_size + length]))
        position += size
    return records


def build(
    directory: Path,
    kind: Kind,
    count: int,
    buffer: int = 1000,
    seed: str = "build",
    replace: int = 0,
) -> dict[bytes, tuple[Any, Any]]:
    """A closed store of ``count`` keys, the first ``replace`` of them appended twice."""
    rng = random.Random(seed)
    keys = [rng.randbytes(32) for _ in range(count)]
    witness: dict[bytes, tuple[Any, Any]] = {}
    with kind.cls.load(directory, Mode.READ_WRITE, index_buffer_size=buffer) as store:
        for key in keys[:replace] + keys:
            value, header = kind.random_value(rng), kind.random_header(rng)
            kind.append(store, key, value, header)
            witness[key] = kind.pair(value, header)
    return witness


# --------------------------------------------------------------------------
# Sequential scenarios

SEQUENTIAL_ACTIONS = ["append"] * 6 + ["read", "header", "mem", "flush", "keys", "items"]
SEQUENTIAL_ACTIONS += ["reload", "peek"]

keys32 = st.binary(min_size=32, max_size=32)


@st.composite
def sequential_scenarios(
    draw: st.DrawFn, kind: Kind
) -> tuple[list[bytes], int, int, list[tuple[Any, ...]]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    cache = draw(st.sampled_from(CACHE_SIZES))
    index = st.integers(0, len(keys) - 1)
    headers = kind.headers if kind.headers is not None else st.none()
    actions: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(10, 60))):
        name = draw(st.sampled_from(SEQUENTIAL_ACTIONS))
        if name == "append":
            actions.append(
                (name, draw(index), draw(kind.values), draw(headers), draw(st.booleans()))
            )
        elif name in ("read", "header", "mem"):
            actions.append((name, draw(index)))
        elif name == "reload" and draw(st.booleans()):
            # half as often as the others, with other buffer and cache sizes
            buffer_after = draw(st.sampled_from([buffer, *BUFFER_SIZES]))
            actions.append((name, buffer_after, draw(st.sampled_from(CACHE_SIZES))))
        elif name == "reload":
            actions.append(("read", draw(index)))
        else:
            actions.append((name,))
    return keys, buffer, cache, actions


def run_sequential(
    kind: Kind, keys: list[bytes], buffer: int, cache: int, actions: list[tuple[Any, ...]]
) -> None:
    with store_directory() as path:
        witness: dict[bytes, tuple[Any, Any]] = {}
        store = kind.cls.load(path, index_buffer_size=buffer, cache_size=cache)
        try:
            for action in actions:
                name = action[0]
                if name == "append":
                    _, i, value, header, flush = action
                    kind.append(store, keys[i], value, header, flush)
                    witness[keys[i]] = kind.pair(value, header)
                elif name == "read":
                    check_read(store, kind, keys[action[1]], witness.get(keys[action[1]]))
                elif name == "header":
                    k = keys[action[1]]
                    want = witness.get(k)
                    assert plain(store.header(k)) == (want[1] if want else None)
                elif name == "mem":
                    k = keys[action[1]]
                    assert store.mem(k) == (k in witness)
                elif name == "flush":
                    store.flush()
                elif name == "keys":
                    listed = list(store.keys())
                    assert len(listed) == len(set(listed))
                    assert set(listed) == set(witness)
                elif name == "items":
                    assert listed_items(store) == witness
                elif name == "reload":
                    store.close()
                    _, buffer, cache = action
                    store = kind.cls.load(path, index_buffer_size=buffer, cache_size=cache)
                    check_store(store, kind, witness, keys)
                elif name == "peek":
                    # a READ_ONLY store beside the writer sees everything flushed
                    store.flush()
                    with kind.cls.load(path, Mode.READ_ONLY, cache_size=cache) as reader:
                        check_store(reader, kind, witness, keys)
                else:  # pragma: no cover
                    raise AssertionError(name)
            check_store(store, kind, witness, keys)
        finally:
            store.close()
        with kind.cls.load(path, index_buffer_size=buffer, cache_size=cache) as again:
            check_store(again, kind, witness, keys)
        with kind.cls.load(path, Mode.READ_ONLY, cache_size=cache) as reader:
            check_store(reader, kind, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_sequential_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, cache, actions = data.draw(sequential_scenarios(kind))
    run_sequential(kind, keys, buffer, cache, actions)


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_sequential_scenario_with_many_merges(kind_id: str) -> None:
    """A fixed long scenario: buffer 2 merges often, cache 2 evicts often."""
    kind = KINDS[kind_id]
    rng = random.Random(kind_id)
    keys = [rng.randbytes(32) for _ in range(10)]
    actions: list[tuple[Any, ...]] = []
    for step in range(240):
        roll = rng.random()
        if roll < 0.5:
            actions.append(
                (
                    "append",
                    rng.randrange(10),
                    kind.random_value(rng),
                    kind.random_header(rng),
                    rng.random() < 0.5,
                )
            )
        elif roll < 0.8:
            actions.append(("read", rng.randrange(10)))
        elif roll < 0.9:
            actions.append(("header", rng.randrange(10)))
        else:
            actions.append(("items",))
        if step % 60 == 59:
            actions.append(("reload", rng.choice(BUFFER_SIZES), rng.choice(CACHE_SIZES)))
    run_sequential(kind, keys, 2, 2, actions)


@pytest.mark.parametrize("kind_id", ["indexed-bytes", "simple-struct"])
def test_small_buffers_really_merge(kind_id: str) -> None:
    """The scenarios' small buffers make merges happen (a data file appears)."""
    kind = KINDS[kind_id]
    with store_directory() as path:
        witness = build(Path(path), kind, 6, buffer=2)
        assert merged(path)
        with kind.cls.load(path, cache_size=0) as again:
            check_store(again, kind, witness, list(witness))


# --------------------------------------------------------------------------
# Parallel scenarios


def run_in_threads(functions: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread, all released at once; return the results."""
    barrier = threading.Barrier(len(functions), timeout=JOIN_TIMEOUT)
    results: list[Any] = [None] * len(functions)
    errors: list[BaseException] = []

    def run(index: int, function: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results[index] = function()
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(functions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    if errors:
        raise errors[0]
    return results


@st.composite
def parallel_group(draw: st.DrawFn, kind: Kind, pool: int) -> tuple[list[tuple[Any, ...]], bool]:
    """4 to 16 actions run at once: appends on distinct keys, reads only of
    keys not written in the group; and whether to reload afterwards."""
    threads = draw(st.integers(4, 16))
    written = draw(
        st.lists(st.integers(0, pool - 1), unique=True, min_size=1, max_size=min(threads, pool))
    )
    headers = kind.headers if kind.headers is not None else st.none()
    actions: list[tuple[Any, ...]] = [
        ("append", i, draw(kind.values), draw(headers), draw(st.booleans())) for i in written
    ]
    unwritten = [i for i in range(pool) if i not in set(written)]
    others: list[st.SearchStrategy[tuple[Any, ...]]] = [
        st.tuples(st.just("flush")),
        st.tuples(st.just("items")),
        st.tuples(st.just("keys")),
    ]
    if unwritten:
        read = st.tuples(st.sampled_from(["read", "header", "mem"]), st.sampled_from(unwritten))
        others = [read, read, read, read, *others]
    for _ in range(threads - len(written)):
        actions.append(draw(st.one_of(others)))
    reload = draw(st.integers(0, 4)) == 0
    return draw(st.permutations(actions)), reload


@st.composite
def parallel_scenarios(
    draw: st.DrawFn, kind: Kind
) -> tuple[list[bytes], int, int, list[tuple[list[tuple[Any, ...]], bool]]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    cache = draw(st.sampled_from(CACHE_SIZES))
    groups = draw(st.lists(parallel_group(kind, len(keys)), min_size=2, max_size=6))
    return keys, buffer, cache, groups


def group_function(
    store: Any, kind: Kind, keys: list[bytes], action: tuple[Any, ...]
) -> Callable[[], Any]:
    name = action[0]
    if name == "append":
        _, i, value, header, flush = action
        return lambda: kind.append(store, keys[i], value, header, flush)
    if name == "read":
        return lambda: plain(store.read(keys[action[1]]))
    if name == "header":
        return lambda: plain(store.header(keys[action[1]]))
    if name == "mem":
        return lambda: store.mem(keys[action[1]])
    if name == "flush":
        return store.flush
    if name == "items":
        return lambda: [(k, plain(pair)) for k, pair in store.items()]
    if name == "keys":
        return lambda: list(store.keys())
    raise AssertionError(name)  # pragma: no cover


def check_group_results(
    keys: list[bytes],
    actions: list[tuple[Any, ...]],
    results: list[Any],
    before: dict[bytes, tuple[Any, Any]],
    after: dict[bytes, tuple[Any, Any]],
) -> None:
    written = {keys[a[1]] for a in actions if a[0] == "append"}
    for action, result in zip(actions, results, strict=True):
        name = action[0]
        if name == "read":
            assert result == before.get(keys[action[1]])
        elif name == "header":
            want = before.get(keys[action[1]])
            assert result == (want[1] if want else None)
        elif name == "mem":
            assert result == (keys[action[1]] in before)
        elif name == "keys":
            assert len(result) == len(set(result)), "keys() yielded a key twice"
            assert set(before) <= set(result) <= set(after)
        elif name == "items":
            # concurrent with the group's appends: keys not written show the
            # witness, written keys their old or their new pair
            seen = [k for k, _ in result]
            assert len(seen) == len(set(seen)), "items() yielded a key twice"
            found = dict(result)
            assert set(found) <= set(after)
            for k in after:
                if k not in written:
                    assert found.get(k) == before.get(k)
                else:
                    assert k not in found or found[k] in (before.get(k), after[k])
                    assert k in found or k not in before


def run_parallel(
    kind: Kind,
    keys: list[bytes],
    buffer: int,
    cache: int,
    groups: list[tuple[list[tuple[Any, ...]], bool]],
) -> None:
    with store_directory() as path:
        witness: dict[bytes, tuple[Any, Any]] = {}
        store = kind.cls.load(path, index_buffer_size=buffer, cache_size=cache)
        try:
            for actions, reload in groups:
                before = dict(witness)
                for action in actions:
                    if action[0] == "append":
                        witness[keys[action[1]]] = kind.pair(action[2], action[3])
                functions = [group_function(store, kind, keys, a) for a in actions]
                results = run_in_threads(functions)
                check_group_results(keys, actions, results, before, witness)
                check_store(store, kind, witness, keys)
                if reload:
                    store.close()
                    store = kind.cls.load(path, index_buffer_size=buffer, cache_size=cache)
                    check_store(store, kind, witness, keys)
        finally:
            store.close()
        with kind.cls.load(path, index_buffer_size=buffer, cache_size=cache) as again:
            check_store(again, kind, witness, keys)
        with kind.cls.load(path, Mode.READ_ONLY, cache_size=0) as reader:
            check_store(reader, kind, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_parallel_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, cache, groups = data.draw(parallel_scenarios(kind))
    run_parallel(kind, keys, buffer, cache, groups)


# --------------------------------------------------------------------------
# Cache truth


def same_as_fresh(found: Any, fresh: Any) -> None:
    """A pair served by a store equals, and is of the type of, what a fresh store reads."""
    assert found is not None and fresh is not None, (found, fresh)
    assert found == fresh
    assert plain(found) == plain(fresh)
    for mine, theirs in zip(found, fresh, strict=True):
        assert type(mine) is type(theirs), (type(mine), type(theirs))


@pytest.mark.parametrize("cache", [1, 2, 1000])
@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_cache_serves_what_disk_holds(kind_id: str, cache: int) -> None:
    """Each read (from the cache or not) equals what a store with an empty cache reads."""
    kind = KINDS[kind_id]
    rng = random.Random(f"cache-{kind_id}-{cache}")
    keys = [rng.randbytes(32) for _ in range(6)]
    witness: dict[bytes, tuple[Any, Any]] = {}
    with store_directory() as path:
        writer = kind.cls.load(path, index_buffer_size=3, cache_size=cache)
        # cache_size=0: every read of the checker comes from disk
        checker = kind.cls.load(path, Mode.READ_ONLY, cache_size=0)
        try:
            for _ in range(120):
                key = rng.choice(keys)
                if rng.random() < 0.5:  # often a replacement of a cached value
                    value, header = kind.random_value(rng), kind.random_header(rng)
                    kind.append(writer, key, value, header, flush=rng.random() < 0.5)
                    witness[key] = kind.pair(value, header)
                    if kind.struct_value:
                        value["level"] = (value["level"] + 1) % 2**32  # the caller's dict only
                        value["payload"] = b"changed afterwards"
                for _ in range(rng.randrange(1, 3)):
                    found = writer.read(key)
                    assert plain(found) == witness.get(key)
                    if key in witness:
                        writer.flush()
                        checker.sync()
                        same_as_fresh(found, checker.read(key))
                        if kind.struct_value:
                            assert isinstance(found[0], construct.Container)
                        assert type(found[1]) is type(checker.header(key))
            writer.flush()
            checker.sync()
            for key in keys:
                found = writer.read(key)
                if key in witness:
                    same_as_fresh(found, checker.read(key))
                else:
                    assert found is None and checker.read(key) is None
        finally:
            checker.close()
            writer.close()
        with kind.cls.load(path, cache_size=0) as fresh:
            check_store(fresh, kind, witness, keys)


@pytest.mark.parametrize("kind_id", STRUCT_KIND_IDS)
def test_struct_values_read_back_decoded(kind_id: str) -> None:
    """The store returns what decoding gives (a Container), not the dict passed in."""
    kind = KINDS[kind_id]
    key = b"s" * 32
    value = {"level": 7, "payload": b"payload"}
    header = b"h" * 16 if kind.headers is not None and not kind.simple else None
    with store_directory() as path:
        with kind.cls.load(path, cache_size=1000) as store:
            kind.append(store, key, value, header)
            found = store.read(key)  # served by the cache
            assert found is not None
            assert found[0] is not value
            assert isinstance(found[0], construct.Container)
            value["payload"] = b"mutated by the caller"  # must not reach the store
            again = store.read(key)
        with kind.cls.load(path, cache_size=0) as fresh:
            from_disk = fresh.read(key)
        same_as_fresh(found, from_disk)
        same_as_fresh(again, from_disk)
        assert plain(from_disk[0]) == {"level": 7, "payload": b"payload"}


@pytest.mark.parametrize("kind_id", STRUCT_KIND_IDS)
def test_mutating_a_read_result_does_not_change_later_reads(kind_id: str) -> None:
    """A caller editing the Container ``read`` gave must not change what the store serves.

    With the cache, the same Container object is handed out again, so its
    edits would be served as the stored value, which a fresh load contradicts.
    """
    kind = KINDS[kind_id]
    key = b"m" * 32
    value = {"level": 7, "payload": b"payload"}
    header = b"h" * 16 if not kind.simple else None
    with store_directory() as path:
        with kind.cls.load(path, cache_size=1000) as store:
            kind.append(store, key, value, header)
            first = store.read(key)
            assert first is not None
            first[0].level = 99
            first[0].payload = b"edited by the caller"
            second = store.read(key)
        with kind.cls.load(path, cache_size=0) as fresh:
            from_disk = fresh.read(key)
        assert plain(from_disk[0]) == value
        assert plain(second) == plain(from_disk), "the cache served a caller's edits"


# --------------------------------------------------------------------------
# Values from 0 bytes to 16 MiB

SIZES = [0, 1, 100, 8 << 10, 1 << 20, 16 << 20]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
@pytest.mark.parametrize("kind_id", BYTES_KIND_IDS)
def test_value_sizes_round_trip(tmp_path: Path, kind_id: str, size: int) -> None:
    kind = KINDS[kind_id]
    rng = random.Random(f"size-{size}")
    value = rng.randbytes(size)
    header = {"level": size, "predecessor": hashlib.sha256(value).digest()}
    key = hashlib.sha256(b"key%d" % size).digest()
    neighbours = {bytes([i]) * 32: (bytes([i]) * i, _struct_header(rng)) for i in (1, 2)}
    directory = tmp_path / "store"
    with kind.cls.load(directory, index_buffer_size=2, cache_size=1000) as store:
        first, second = neighbours.items()
        kind.append(store, first[0], *first[1])
        kind.append(store, key, value, header)
        kind.append(store, second[0], *second[1])
        found = store.read(key)  # from the cache
        assert found is not None and found[0] == value
        assert plain(found) == kind.pair(value, header)
        assert plain(store.header(key)) == kind.pair(value, header)[1]
    witness = {k: kind.pair(v, h) for k, (v, h) in neighbours.items()}
    witness[key] = kind.pair(value, header)
    values = directory / VALUES_FILE
    expected_size = FILE_HEADER_SIZE + sum(
        RECORD_OVERHEAD + 32 + len(v) for v, _ in witness.values()
    )
    assert values.stat().st_size == expected_size
    assert [len(r[3]) for r in value_records(values)] == [1, size, 2]
    for mode in MODES:
        with kind.cls.load(directory, mode, cache_size=0) as store:
            found = store.read(key)  # from disk
            assert found is not None and type(found[0]) is bytes
            assert len(found[0]) == size and found[0] == value
            check_store(store, kind, witness, list(witness))


# --------------------------------------------------------------------------
# Bad input: codecs and refused values


@pytest.mark.parametrize("factory", ["indexed", "simple"])
def test_non_fixed_header_or_key_codec_refused_at_factory(factory: str) -> None:
    def make(key: Any, value: Any, header: Any) -> Any:
        if factory == "indexed":
            return make_indexed_file("not_fixed", key, value, header)
        return make_simple_indexed_file("not_fixed", key, value, header, lambda v: v)

    for header in (
        construct.GreedyBytes,
        construct.PascalString(construct.VarInt, "utf8"),
        construct.Struct("a" / construct.Int32ub, "rest" / construct.GreedyBytes),
    ):
        with pytest.raises(CodecError):
            make(KEY, construct.GreedyBytes, header)
    with pytest.raises(CodecError):
        make(construct.GreedyBytes, construct.GreedyBytes, BYTES_HEADER)
    with pytest.raises(ValueError):
        (make_indexed_file if factory == "indexed" else make_simple_indexed_file)(
            "", KEY, construct.GreedyBytes, BYTES_HEADER, *([] if factory == "indexed" else [id])
        )
    # variable-size values are what indexed files are for
    cls = make(KEY, STRUCT_VALUE, BYTES_HEADER)
    assert cls.value_codec is STRUCT_VALUE and cls.header_codec is BYTES_HEADER
    assert cls.key_codec is KEY and cls.name == "not_fixed"


WrongHeader = make_indexed_file("wrong_header", KEY, construct.GreedyBytes, BYTES_HEADER)
# the header is the first 16 bytes of the value: a shorter value gives a short header
WrongSimpleHeader = make_simple_indexed_file(
    "wrong_simple_header", KEY, construct.GreedyBytes, BYTES_HEADER, lambda v: v[:16]
)


def _good_state(store: Any, simple: bool) -> dict[bytes, Any]:
    state = {}
    for i in range(7):
        key, value = bytes([i]) * 32, bytes([i]) * (20 + i)
        if simple:
            store.append(key, value)
        else:
            store.append(key, value, value[:16])
        state[key] = (value, value[:16])
    return state


@pytest.mark.parametrize("factory", ["indexed", "simple"])
def test_header_of_wrong_size_is_codec_error(tmp_path: Path, factory: str) -> None:
    simple = factory == "simple"
    cls: Any = WrongSimpleHeader if simple else WrongHeader
    directory = tmp_path / "store"
    with cls.load(directory, index_buffer_size=3) as store:
        state = _good_state(store, simple)
    with cls.load(directory, index_buffer_size=3) as store:  # no merge running now
        files = snapshot(directory)
        values_size = (directory / VALUES_FILE).stat().st_size
        bad_headers: list[Any] = [b"h" * 15, b"h" * 17, b"", "h" * 16, None]
        for key in (b"n" * 32, bytes(32)):  # a new key, and a bound one
            for flush in (True, False):
                if simple:
                    for short in (b"", b"v" * 15):
                        with pytest.raises(CodecError) as caught:
                            store.append(key, short, flush=flush)
                        assert_names(caught.value, cls.name, directory)
                else:
                    for header in bad_headers:
                        with pytest.raises(CodecError) as caught:
                            store.append(key, b"v" * 40, header, flush=flush)
                        assert isinstance(caught.value, ValueError)
                        assert_names(caught.value, cls.name, directory)
                assert (directory / VALUES_FILE).stat().st_size == values_size
        store.flush()
        assert snapshot(directory) == files, "a refused header changed the files"
        assert store.read(b"n" * 32) is None and not store.mem(b"n" * 32)
        assert dict(store.items()) == state
    for mode in MODES:
        with cls.load(directory, mode, cache_size=0) as store:
            assert dict(store.items()) == state


REFUSED_STRUCT_VALUES = [
    {"level": 1},  # no payload
    {"payload": b"p"},  # no level
    {"level": 2**32, "payload": b"p"},
    {"level": -1, "payload": b"p"},
    {"level": 1, "payload": "not bytes"},
]
REFUSED_STRUCT_HEADERS = [
    {"level": 2**32, "predecessor": b"p" * 32},
    {"level": -1, "predecessor": b"p" * 32},
    {"level": 1, "predecessor": b"p" * 31},
    {"level": 1},
    {"predecessor": b"p" * 32},
]


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_refused_value_or_header_writes_nothing(tmp_path: Path, kind_id: str) -> None:
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness = build(directory, kind, 8, buffer=3)
    rng = random.Random("refused")
    cases: list[tuple[Any, Any]] = []
    if kind.struct_value:
        cases += [(value, kind.random_header(rng)) for value in REFUSED_STRUCT_VALUES]
    else:
        cases += [("a str", kind.random_header(rng)), (None, kind.random_header(rng))]
    if not kind.simple:
        good_value = kind.random_value(rng)
        if kind.headers is struct_headers:
            cases += [(good_value, header) for header in REFUSED_STRUCT_HEADERS]
        else:
            cases += [(good_value, header) for header in (b"h" * 15, 5, None)]
    values = directory / VALUES_FILE
    with kind.cls.load(directory, index_buffer_size=3) as store:
        files = snapshot(directory)
        size = values.stat().st_size
        for value, header in cases:
            for key in (b"n" * 32, next(iter(witness))):
                for flush in (True, False):
                    with pytest.raises(CodecError) as caught:
                        kind.append(store, key, value, header, flush)
                    assert_names(caught.value, kind.cls.name, directory)
                    assert values.stat().st_size == size, f"{value!r} reached the values file"
        store.flush()
        assert snapshot(directory) == files, "a refused value changed the files"
        check_store(store, kind, witness, [b"n" * 32, *witness])
    for mode in MODES:
        with kind.cls.load(directory, mode, cache_size=0) as store:
            check_store(store, kind, witness, [b"n" * 32, *witness])


BAD_KEYS: list[Any] = [b"k" * 31, b"k" * 33, b"", "k" * 32, None, bytearray(b"k" * 31)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_wrong_key_is_codec_error(tmp_path: Path, kind_id: str, mode: Mode) -> None:
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness = build(directory, kind, 6, buffer=4)
    files = snapshot(directory)
    rng = random.Random("wrong key")
    with kind.cls.load(directory, mode, index_buffer_size=4) as store:
        operations: list[Callable[[Any], Any]] = [store.read, store.header, store.mem]
        if mode is Mode.READ_WRITE:
            value, header = kind.random_value(rng), kind.random_header(rng)
            operations += [
                lambda k: kind.append(store, k, value, header, True),
                lambda k: kind.append(store, k, value, header, False),
            ]
        for operation in operations:
            for key in BAD_KEYS:
                with pytest.raises(CodecError) as caught:
                    operation(key)
                assert isinstance(caught.value, ValueError)
                assert_names(caught.value, kind.cls.name, directory)
        if mode is Mode.READ_WRITE:
            store.flush()
        check_store(store, kind, witness, list(witness))
    assert snapshot(directory) == files, "a refused key changed the files"


# --------------------------------------------------------------------------
# Bad input: other codec sizes


def expect_load_error(
    cls: Any, path: Path, mode: Mode, files_root: Path, **options: Any
) -> CannotLoadStore:
    """The load raises CannotLoadStore and leaves every file byte-identical."""
    before = snapshot(files_root)
    with pytest.raises(CannotLoadStore) as caught:
        store = cls.load(path, mode, **options)
        store.close()
    assert snapshot(files_root) == before, f"a failed {mode.name} load changed the files"
    assert cls.name in str(caught.value)
    return caught.value


RESIZED = [
    ("header20", KEY, construct.Bytes(20), ("16", "20")),
    ("header36", KEY, STRUCT_HEADER, ("16", "36")),
    ("key20", construct.Bytes(20), BYTES_HEADER, ("32", "20")),
    ("key8-header4", construct.Int64ub, construct.Int32ub, ("32", "8", "16", "4")),
]


@pytest.mark.parametrize("merged_index", [False, True], ids=["log-only", "with-data-file"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("key", "header", "sizes"), [c[1:] for c in RESIZED], ids=[c[0] for c in RESIZED]
)
@pytest.mark.parametrize("factory", ["indexed", "simple"])
def test_other_key_or_header_size_refused(
    tmp_path: Path,
    factory: str,
    key: Any,
    header: Any,
    sizes: tuple[str, ...],
    mode: Mode,
    merged_index: bool,
) -> None:
    kind = KINDS[f"{factory}-struct" if factory == "indexed" else "simple-bytes"]
    assert kind.cls.header_codec is BYTES_HEADER
    directory = tmp_path / "store"
    build(directory, kind, 12, buffer=5 if merged_index else 1000)
    assert merged(directory) == merged_index
    if factory == "indexed":
        other = make_indexed_file("resized", key, kind.cls.value_codec, header)
    else:
        other = make_simple_indexed_file("resized", key, kind.cls.value_codec, header, id)
    error = expect_load_error(other, directory, mode, directory)
    text = message_without_paths(error, directory)
    assert "expected" in text.lower() and "found" in text.lower(), text
    for size in sizes:
        assert re.search(rf"\b{size}\b", text), (size, text)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_values_file_of_other_sizes_refused(tmp_path: Path, mode: Mode) -> None:
    """The values file carries the key and header sizes too (framing.py header)."""
    kind = KINDS["simple-bytes"]
    directory = tmp_path / "store"
    build(directory, kind, 5)
    values = directory / VALUES_FILE
    raw = bytearray(values.read_bytes())
    assert struct.unpack_from("<IIII", raw, 12)[:3] == (32, 0xFFFFFFFF, 16)
    raw[20:24] = struct.pack("<I", 24)  # header size 24
    raw[60:64] = zlib.crc32(bytes(raw[:60])).to_bytes(4, "little")
    values.write_bytes(bytes(raw))
    error = expect_load_error(kind.cls, directory, mode, directory)
    text = message_without_paths(error, directory)
    assert "expected" in text.lower() and "found" in text.lower(), text
    assert re.search(r"\b24\b", text) and re.search(r"\b16\b", text), text


# --------------------------------------------------------------------------
# Damaged values file

# (name, offset in a record of a value of n bytes with 32-byte keys)
RECORD_PARTS: list[tuple[str, Callable[[int], int]]] = [
    ("length", lambda n: 0),
    ("length-high", lambda n: 3),
    ("key-first", lambda n: 4),
    ("key", lambda n: 20),
    ("key-last", lambda n: 35),
    ("value-first", lambda n: 36),
    ("value", lambda n: 36 + n // 2),
    ("value-last", lambda n: 35 + n),
    ("trailing-length", lambda n: 36 + n),
    ("trailing-length-high", lambda n: 39 + n),
    ("crc", lambda n: 40 + n),
    ("crc-last", lambda n: 43 + n),
]


def damaged_values_store(
    directory: Path, kind: Kind
) -> tuple[dict[bytes, tuple[Any, Any]], list[tuple[int, int, bytes, bytes]]]:
    """Five keys of 30 to 70-byte values, each appended once, index merged."""
    rng = random.Random("damage")
    witness: dict[bytes, tuple[Any, Any]] = {}
    with kind.cls.load(directory, index_buffer_size=2) as store:
        for i in range(5):
            key = rng.randbytes(32)
            value, header = rng.randbytes(30 + 10 * i), kind.random_header(rng)
            kind.append(store, key, value, header)
            witness[key] = kind.pair(value, header)
    records = value_records(directory / VALUES_FILE)
    assert [r[2] for r in records] == list(witness)
    return witness, records


def check_victim(
    store: Any, kind: Kind, witness: dict[bytes, tuple[Any, Any]], victim: bytes
) -> None:
    """The victim's value is refused, its header and mem still answer, the rest reads."""
    for _ in range(2):  # a refused read is not cached either
        with pytest.raises(CannotReadFromStore) as caught:
            store.read(victim)
        assert kind.cls.name in str(caught.value)
    assert plain(store.header(victim)) == witness[victim][1]
    assert store.mem(victim)
    for key, want in witness.items():
        if key != victim:
            check_read(store, kind, key, want)
    assert set(store.keys()) == set(witness)
    with pytest.raises(CannotReadFromStore):
        for key, pair in store.items():
            assert plain(pair) == witness[key], "items() gave wrong data"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("part", [p[0] for p in RECORD_PARTS])
@pytest.mark.parametrize("kind_id", BYTES_KIND_IDS)
def test_flipped_values_byte_fails_only_that_read(
    tmp_path: Path, kind_id: str, part: str, mode: Mode
) -> None:
    """A record before the last: the load works, that key's read raises."""
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness, records = damaged_values_store(directory, kind)
    offset, _, victim, value = records[2]
    where = dict(RECORD_PARTS)[part](len(value))
    flip(directory / VALUES_FILE, offset + where, 0x01 if "high" not in part else 0x80)
    files = snapshot(directory)
    with kind.cls.load(directory, mode, cache_size=1000) as store:
        check_victim(store, kind, witness, victim)
    assert snapshot(directory) == files, "reading a damaged record changed the files"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("part", [p[0] for p in RECORD_PARTS])
@pytest.mark.parametrize("kind_id", BYTES_KIND_IDS)
def test_flipped_byte_in_last_values_record(
    tmp_path: Path, kind_id: str, part: str, mode: Mode
) -> None:
    """The last record: READ_ONLY reads fail for that key; a writer's load may refuse
    the file (a bad last record that is not a torn one), but never cuts it."""
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness, records = damaged_values_store(directory, kind)
    offset, _, victim, value = records[-1]
    where = dict(RECORD_PARTS)[part](len(value))
    flip(directory / VALUES_FILE, offset + where, 0x01 if "high" not in part else 0x80)
    files = snapshot(directory)
    try:
        store = kind.cls.load(directory, mode, cache_size=1000)
    except CannotLoadStore as error:
        assert mode is Mode.READ_WRITE, f"READ_ONLY load refused: {error}"
        assert_names(error, kind.cls.name, directory)
    else:
        with store:
            check_victim(store, kind, witness, victim)
    assert snapshot(directory) == files, "the damaged last record was changed"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("offset", [0, 8, 12, 16, 20, 24, 41, 59, 60, 63])
def test_flipped_values_file_header_refused(tmp_path: Path, offset: int, mode: Mode) -> None:
    kind = KINDS["indexed-bytes"]
    directory = tmp_path / "store"
    build(directory, kind, 4)
    flip(directory / VALUES_FILE, offset, 0x04)
    expect_load_error(kind.cls, directory, mode, directory)


def check_never_wrong(
    store: Any, witness: dict[bytes, tuple[Any, Any]], probes: list[bytes]
) -> dict[bytes, int]:
    """Every read raises a StoreError or gives exactly the truth; errors per key."""
    errors: dict[bytes, int] = {}

    def attempt(key: bytes, call: Callable[[], Any], want: Any) -> None:
        try:
            got = call()
        except StoreError:
            errors[key] = errors.get(key, 0) + 1
            return
        assert got == want, f"{key.hex()[:8]}: got {got!r}, want {want!r}"

    for key in probes:
        want = witness.get(key)
        for _ in range(2):  # from disk, then perhaps from the cache
            attempt(key, lambda key=key: plain(store.read(key)), want)
        attempt(key, lambda key=key: plain(store.header(key)), want[1] if want else None)
        attempt(key, lambda key=key: store.mem(key), want is not None)
    try:
        for key, pair in store.items():
            assert plain(pair) == witness.get(key), f"items() gave wrong data for {key.hex()}"
    except StoreError:
        errors[b"items"] = 1
    return errors


@pytest.mark.parametrize("kind_id", BYTES_KIND_IDS)
def test_every_flipped_values_byte_is_detected_or_harmless(tmp_path: Path, kind_id: str) -> None:
    """Flip each byte of a small values file: every read raises or is right.

    A flip in the file header fails the load; in a live record, that key's
    read (READ_ONLY) or the writer's load; in a superseded record, nothing.
    """
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    rng = random.Random("sweep")
    witness: dict[bytes, tuple[Any, Any]] = {}
    keys = [rng.randbytes(32) for _ in range(5)]
    with kind.cls.load(directory, index_buffer_size=3) as store:
        # keys[1] and keys[3] replaced: their first records are dead; the last is live
        for key in [keys[0], keys[1], keys[2], keys[3], keys[1], keys[4], keys[3]]:
            value, header = rng.randbytes(rng.randrange(0, 24)), kind.random_header(rng)
            kind.append(store, key, value, header)
            witness[key] = kind.pair(value, header)
    values = directory / VALUES_FILE
    original = values.read_bytes()
    records = value_records(values)
    live = {key: (offset, size) for offset, size, key, _ in records}  # the last record wins
    owner: dict[int, bytes | None] = {}
    for offset, size, key, _ in records:
        for position in range(offset, offset + size):
            owner[position] = key if live[key] == (offset, size) else None
    probes = [*keys, b"\x00" * 32]
    rw_sample = set(rng.sample(range(len(original)), 150))
    undetected = []
    for position in range(len(original)):
        raw = bytearray(original)
        raw[position] ^= rng.randrange(1, 256)
        values.write_bytes(bytes(raw))
        damaged = snapshot(directory)
        for mode in MODES if position in rw_sample else [Mode.READ_ONLY]:
            try:
                with kind.cls.load(directory, mode, cache_size=1000) as store:
                    errors = check_never_wrong(store, witness, probes)
            except CannotLoadStore:
                errors = {b"load": 1}
            assert snapshot(directory) == damaged, (position, mode, "files changed")
            if position < FILE_HEADER_SIZE:
                assert errors == {b"load": 1}, (position, mode, errors)
            elif owner[position] is not None and mode is Mode.READ_ONLY:
                victim = owner[position]
                # exactly the victim's reads (twice) and items() fail
                assert errors == {victim: 2, b"items": 1}, (position, errors)
            elif owner[position] is None and mode is Mode.READ_ONLY:
                assert not errors, (position, "a dead record's damage showed", errors)
            elif owner[position] is not None and not errors:
                undetected.append((position, mode))
    assert not undetected, f"damage in live records never detected: {undetected}"
    values.write_bytes(original)
    with kind.cls.load(directory, Mode.READ_ONLY) as store:
        check_store(store, kind, witness, probes)


# --------------------------------------------------------------------------
# Damaged index files


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("part", [0, 1, 32, 33, 40, 45, 70, 80], ids=lambda p: f"byte{p}")
@pytest.mark.parametrize("kind_id", ["indexed-bytes", "simple-bytes"])
def test_flipped_log_record_refused(tmp_path: Path, kind_id: str, part: int, mode: Mode) -> None:
    kind = KINDS[kind_id]
    header_size = kind.cls.header_codec.sizeof()
    record = 1 + 32 + POINTER_SIZE + header_size + 4
    if part >= record:
        part = record - 1
    directory = tmp_path / "store"
    build(directory, kind, 6)
    log = only(directory / "index", "log.")
    assert log.stat().st_size == FILE_HEADER_SIZE + 7 * record  # and the close's mark
    flip(log, FILE_HEADER_SIZE + 3 * record + part, 0x10)
    expect_load_error(kind.cls, directory, mode, directory)


def key_at(raw: bytes, offset: int) -> bytes:
    return raw[offset : offset + 32]


def index_expected(kind: Any) -> Expected:
    header_size = kind.cls.header_codec.sizeof()
    return Expected(kind.cls.name, 32, POINTER_SIZE + header_size, header_size)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("part", ["key", "offset", "length", "header", "crc"])
@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_flipped_data_file_row_never_gives_wrong_data(
    tmp_path: Path, kind_id: str, part: str, mode: Mode
) -> None:
    """After merges: the damaged row's key fails to read, the others read right."""
    kind = KINDS[kind_id]
    header_size = kind.cls.header_codec.sizeof()
    directory = tmp_path / "store"
    witness = build(directory, kind, 21, buffer=10, replace=3)
    data = directory / "index" / run_names(directory / "index")[-1]
    raw = data.read_bytes()
    count = struct.unpack_from("<Q", raw, 32)[0]
    row = 32 + POINTER_SIZE + header_size + 4
    opened = Run(str(data), index_expected(kind))
    rows, fence_rows = opened.geometry.rows, opened.geometry.fence_rows
    opened.close()
    logged = set(read_log(str(only(directory / "index", "log.")), index_expected(kind)).bindings)
    index = next(i for i in range(count // 2, count) if key_at(raw, rows + i * row) not in logged)
    victim = key_at(raw, rows + index * row)
    assert victim in witness
    where = {"key": 5, "offset": 32, "length": 41, "header": 44 + header_size // 2, "crc": row - 2}
    flip(data, rows + index * row + where[part], 0x01)
    files = snapshot(directory)
    with kind.cls.load(directory, mode, cache_size=1000) as store:
        for call in (store.read, store.header, store.mem):
            with pytest.raises(CannotReadFromStore) as caught:
                call(victim)
            assert kind.cls.name in str(caught.value)
        errors = check_never_wrong(store, witness, [*witness, b"\x00" * 32])
        # A lookup checks every row its search compares: the keys sharing the
        # damaged row's fence (about 4 KiB of rows) may fail too, no others.
        fence = index // fence_rows * fence_rows
        neighbours = {
            key_at(raw, rows + i * row) for i in range(fence, min(fence + fence_rows, count))
        }
        assert victim in errors and set(errors) <= {*neighbours, b"items"}, errors
    assert snapshot(directory) == files, "reading a damaged row changed the files"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("missing", ["index", "values"])
def test_missing_file_never_gives_wrong_data(tmp_path: Path, missing: str, mode: Mode) -> None:
    """The index directory or the values file of a non-empty store deleted.

    No crash leaves this (the index is created before the values file, and
    neither is ever deleted): the bindings are lost, not absent. A load may
    refuse the store, or answer from what is left, but a key that has a value
    must never read as absent.
    """
    kind = KINDS["indexed-bytes"]
    directory = tmp_path / "store"
    witness = build(directory, kind, 6, buffer=4)
    if missing == "index":
        for path in sorted((directory / "index").iterdir()):
            path.unlink()
        (directory / "index").rmdir()
    else:
        (directory / VALUES_FILE).unlink()
    try:
        store = kind.cls.load(directory, mode)
    except CannotLoadStore as error:
        assert_names(error, kind.cls.name, directory)
        return
    with store:
        for key, want in witness.items():
            for read, expected in (
                (store.read, want),
                (store.header, want[1]),
                (store.mem, True),
            ):
                try:
                    got = read(key)
                except StoreError:
                    continue
                assert plain(got) == expected, f"{read.__name__} of a stored key gave {got!r}"


# --------------------------------------------------------------------------
# Closed stores, read-only stores and views


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_read_only_writes_refused(tmp_path: Path, kind_id: str) -> None:
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness = build(directory, kind, 6, buffer=3)
    rng = random.Random("ro")
    value, header = kind.random_value(rng), kind.random_header(rng)
    key = next(iter(witness))
    with kind.cls.load(directory) as writer:
        for store in (writer.readonly(), kind.cls.load(directory, Mode.READ_ONLY)):
            files = snapshot(directory)
            for call in (
                lambda store=store: kind.append(store, key, value, header, True),
                lambda store=store: kind.append(store, b"n" * 32, value, header, False),
                store.flush,
            ):
                with pytest.raises(ReadOnlyError) as caught:
                    call()
                assert_names(caught.value, kind.cls.name, directory)
            assert snapshot(directory) == files
            check_store(store, kind, witness, list(witness))
            store.close()
        # closing the view left the writer open
        kind.append(writer, b"n" * 32, value, header)
        assert plain(writer.read(b"n" * 32)) == kind.pair(value, header)


@pytest.mark.parametrize("kind_id", ["indexed-bytes", "simple-struct"])
def test_closed_store_refuses_every_call(tmp_path: Path, kind_id: str) -> None:
    kind = KINDS[kind_id]
    directory = tmp_path / "store"
    witness = build(directory, kind, 6, buffer=3)
    key = next(iter(witness))
    rng = random.Random("closed")
    value, header = kind.random_value(rng), kind.random_header(rng)
    store = kind.cls.load(directory)
    view = store.readonly()
    store.close()
    store.close()  # idempotent
    files = snapshot(directory)
    for call in (
        lambda: store.read(key),
        lambda: store.header(key),
        lambda: store.mem(key),
        lambda: kind.append(store, key, value, header, True),
        store.flush,
        store.sync,
        store.readonly,
        lambda: list(store.keys()),
        lambda: list(store.items()),
        lambda: view.read(key),
        lambda: list(view.items()),
    ):
        with pytest.raises(StoreClosedError) as caught:
            call()
        assert_names(caught.value, kind.cls.name, directory)
    assert snapshot(directory) == files


@pytest.mark.parametrize("started", [True, False], ids=["started", "unstarted"])
@pytest.mark.parametrize("what", ["items", "keys"])
def test_iterator_used_after_close(tmp_path: Path, what: str, started: bool) -> None:
    """An items()/keys() iterator taken before close() and used after it."""
    kind = KINDS["indexed-bytes"]
    directory = tmp_path / "store"
    witness = build(directory, kind, 9, buffer=4)  # 8 rows in the data file, 1 in the log
    store = kind.cls.load(directory, Mode.READ_WRITE, index_buffer_size=4)
    iterator = store.items() if what == "items" else store.keys()
    if started:
        first = next(iterator)
        assert (first[0] if what == "items" else first) in witness
    # Free any garbage memoryview of the data file, so that close() really
    # unmaps it (otherwise whether it does depends on when gc last ran).
    gc.collect()
    store.close()
    with pytest.raises(StoreClosedError):
        list(iterator)


# --------------------------------------------------------------------------
# READ_ONLY beside a writer, in the same process


@pytest.mark.parametrize("cache", [0, 1, 1000])
@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_read_only_store_follows_a_writer(kind_id: str, cache: int) -> None:
    """The reader shows what it last synced; after sync(), what the writer flushed,
    replaced values included (the reader's cache serves nothing stale)."""
    kind = KINDS[kind_id]
    rng = random.Random(f"follow-{kind_id}-{cache}")
    keys = [rng.randbytes(32) for _ in range(8)]
    with store_directory() as path:
        reader = kind.cls.load(path, Mode.READ_ONLY, cache_size=cache)
        writer = kind.cls.load(path, index_buffer_size=3, cache_size=cache)
        try:
            witness: dict[bytes, tuple[Any, Any]] = {}
            synced: dict[bytes, tuple[Any, Any]] = {}
            check_store(reader, kind, synced, keys)
            for round_ in range(25):
                for _ in range(rng.randrange(1, 6)):
                    key = rng.choice(keys)
                    value, header = kind.random_value(rng), kind.random_header(rng)
                    kind.append(writer, key, value, header, flush=rng.random() < 0.5)
                    witness[key] = kind.pair(value, header)
                    # not synced yet: the reader still shows what it synced
                    check_read(reader, kind, key, synced.get(key))
                writer.flush()
                check_store(reader, kind, synced, keys)
                if round_ % 4 != 3:  # sometimes skip a sync: the next one catches up
                    reader.sync()
                    synced = dict(witness)
                    check_store(reader, kind, synced, keys)
                check_store(writer.readonly(), kind, witness, keys)
            reader.sync()
            check_store(reader, kind, witness, keys)
            assert merged(path)
        finally:
            writer.close()
            reader.close()
        with kind.cls.load(path, Mode.READ_ONLY, cache_size=cache) as late_reader:
            check_store(late_reader, kind, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_reader_cache_not_stale_after_sync(kind_id: str) -> None:
    """A value the reader cached, replaced by the writer: after sync, the new one."""
    kind = KINDS[kind_id]
    rng = random.Random(f"stale-{kind_id}")
    key = b"r" * 32
    with store_directory() as path, kind.cls.load(path, cache_size=1000) as writer:
        first = (kind.random_value(rng), kind.random_header(rng))
        kind.append(writer, key, *first)
        with kind.cls.load(path, Mode.READ_ONLY, cache_size=1000) as reader:
            for _ in range(5):
                assert plain(reader.read(key)) == kind.pair(*first)  # now cached
                second = (kind.random_value(rng), kind.random_header(rng))
                kind.append(writer, key, *second, flush=False)
                writer.flush()
                assert plain(reader.read(key)) == kind.pair(*first)  # not synced yet
                reader.sync()
                assert plain(reader.read(key)) == kind.pair(*second)
                assert plain(reader.header(key)) == kind.pair(*second)[1]
                first = second


@pytest.mark.parametrize("kind_id", ["indexed-struct", "simple-bytes"])
def test_read_only_load_of_missing_path_creates_nothing(tmp_path: Path, kind_id: str) -> None:
    kind = KINDS[kind_id]
    path = tmp_path / "missing" / "store"
    for target in (tmp_path / "store", path):
        with kind.cls.load(target, Mode.READ_ONLY) as store:
            assert store.read(b"k" * 32) is None
            assert store.header(b"k" * 32) is None
            assert not store.mem(b"k" * 32)
            assert list(store.keys()) == [] and list(store.items()) == []
            store.sync()
            assert list(store.items()) == []
        assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
    # a reader opened before the writer created anything picks it up on sync
    rng = random.Random("late")
    reader = kind.cls.load(path, Mode.READ_ONLY)
    try:
        value, header = kind.random_value(rng), kind.random_header(rng)
        with kind.cls.load(path) as writer:
            reader.sync()
            assert reader.read(b"k" * 32) is None
            kind.append(writer, b"k" * 32, value, header)
            reader.sync()
            assert plain(reader.read(b"k" * 32)) == kind.pair(value, header)
    finally:
        reader.close()


# --------------------------------------------------------------------------
# Reads through the values file's map


@pytest.mark.parametrize("mapped", [True, False], ids=["map", "pread"])
def test_values_file_reads_records_appended_after_its_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    """A writer and a READ_ONLY reader read every record, however the file grew
    after its map was made: the tail by pread, then through a new map."""
    from l2_stores.engine import values as values_module
    from l2_stores.engine.framing import Expected

    if not mapped:
        monkeypatch.setattr(values_module, "value_of_record", None)
    elif values_module.value_of_record is None:
        pytest.skip("the C accelerator is not built")
    monkeypatch.setattr(values_module, "REMAP_STEP", 1 << 16)
    expected = Expected("growing", 8, 0, 4)
    path = str(tmp_path / "values.0")
    writer = values_module.ValuesFile(path, expected, readonly=False, fsync=False)
    reader = values_module.ValuesFile(path, expected, readonly=True, fsync=False)
    rng = random.Random(5)
    records: list[tuple[int, bytes, bytes]] = []
    map_sizes: dict[str, set[int]] = {"writer": set(), "reader": set()}
    try:
        for round_size in [1, 3, 40, 2, 200, 1, 600]:
            for _ in range(round_size):
                key, value = rng.randbytes(8), rng.randbytes(rng.randrange(0, 700))
                records.append((writer.append(key, value), key, value))
            for offset, key, value in rng.sample(records, len(records)):
                assert writer.read(offset, len(value), key) == value
                assert reader.read(offset, len(value), key) == value
            for name, file in (("writer", writer), ("reader", reader)):
                mapping = file._map
                map_sizes[name].add(len(mapping) if mapping is not None else 0)
        offset, key, value = records[-1]
        with pytest.raises(CannotReadFromStore, match=re.escape(f"offset {offset}")):
            reader.read(offset, len(value), bytes(8))
        with pytest.raises(CannotReadFromStore, match="does not match"):
            writer.read(offset, len(value) + 1, key)
    finally:
        writer.close()
        reader.close()
    for name, sizes in map_sizes.items():
        if mapped:
            # mapped again as the file grew, never past what was written
            assert len(sizes) >= 3, (name, sizes)
            assert max(sizes) <= os.path.getsize(path)
        else:
            assert sizes == {0}, (name, sizes)


def test_values_file_reads_by_pread_when_no_map_can_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from l2_stores.engine import values as values_module
    from l2_stores.engine.framing import Expected

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(values_module.mmap, "mmap", refuse)
    path = str(tmp_path / "values.0")
    writer = values_module.ValuesFile(path, Expected("nomap", 8, 0, 4), readonly=False, fsync=False)
    try:
        offset = writer.append(b"k" * 8, b"value")
        assert writer.read(offset, 5, b"k" * 8) == b"value"
        assert writer._map is None
    finally:
        writer.close()


def test_values_and_headers_that_fail_to_decode_name_the_store(tmp_path: Path) -> None:
    """read and header decode outside their task; a failure is the store's DecodingError."""
    writer = make_indexed_file(
        "undecodable", construct.Bytes(4), construct.GreedyBytes, construct.Bytes(2)
    )
    reader = make_indexed_file(
        "undecodable", construct.Bytes(4), construct.Int32ub, construct.Const(b"ok")
    )
    path = tmp_path / "store"
    with writer.load(path) as store:
        store.append(b"key1", b"ab", b"no")
        store.append(b"key2", b"abcd", b"ok")
    (path / "identity").unlink()  # as a store made before identities: codecs unchecked
    with reader.load(path) as store:
        for read in (store.read, store.header):
            with pytest.raises(DecodingError) as info:
                read(b"key1")
            assert info.value.name == "undecodable"
            assert info.value.path == str(path)
        assert store.read(b"key2") == (0x61626364, b"ok")
        assert store.header(b"key2") == b"ok"
        assert store.read(b"none") is None
        assert store.header(b"none") is None


# --------------------------------------------------------------------------
# Reserved blocks past the values' end


def blocks_past_end(path: Path) -> int:
    """Bytes of blocks ``path`` holds past its size, less one block's rounding."""
    status = path.stat()
    return status.st_blocks * 512 - status.st_size - status.st_blksize


def test_reserved_blocks_are_given_back_when_a_file_takes_no_more_appends(
    reserving_tmp_path: Path,
) -> None:
    """The writer's reservation never changes a file's size; closing, and a GC
    moving the appends to a new file, give its blocks back."""
    from l2_stores import Retain
    from l2_stores.engine.values import RESERVE_STEP

    tmp_path = reserving_tmp_path
    cls = make_indexed_file(
        "reserve", construct.Bytes(8), construct.GreedyBytes, construct.Bytes(2)
    )
    directory = tmp_path / "store"
    with cls.load(directory) as store:
        for i in range(20):
            store.append(i.to_bytes(8, "big"), bytes([i]) * 3000, b"hh")
        (first,) = sorted(directory.glob("values.*"))
        written = first.stat().st_size
        assert blocks_past_end(first) >= RESERVE_STEP // 2
        store.gc(Retain([i.to_bytes(8, "big") for i in range(0, 20, 2)]), background=False)
        store.append(b"after gc", b"x" * 5000, b"hh")
        files = sorted(directory.glob("values.*"))
        assert len(files) == 2, files  # the copy, and the target of appends
        copy, target = files
        assert blocks_past_end(copy) <= 0
        assert blocks_past_end(target) >= RESERVE_STEP // 2
        sizes = {path: path.stat().st_size for path in files}
        assert written == 64 + 20 * (12 + 8 + 3000)
    for path in files:
        assert path.stat().st_size == sizes[path]
        assert blocks_past_end(path) <= 0
    with cls.load(directory, Mode.READ_ONLY) as reader:
        assert reader.read(b"after gc") == (b"x" * 5000, b"hh")
        assert reader.read((4).to_bytes(8, "big")) == (bytes([4]) * 3000, b"hh")
        assert reader.read((5).to_bytes(8, "big")) is None
