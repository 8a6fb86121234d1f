"""Model-based tests of the indexable stores, after Octez's ``test_indexed_store.ml``.

Random scenarios of actions run against a store and against a witness (a plain
dict); every read must agree with the witness.

* sequential scenarios: one action at a time, with merges (small
  ``index_buffer_size``) and close/reload in the middle;
* parallel scenarios: groups of actions run at once in many threads, the
  actions of a group touching distinct keys, reads only of keys the group does
  not write, so the expected results are deterministic; "filled" variants start
  from a store holding 20 bindings, merges running in the background;
* a concurrency stress run with writers on their own key partitions and
  readers of a stable set of keys;
* a READ_ONLY store beside a writer in the same process, checked after each
  ``sync()`` and, before it, against the state it last synced.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import IndexableStore, Mode, make_indexable, make_indexable_removable

KEY = construct.Bytes(32)
BYTES_VALUE = construct.Bytes(32)
STRUCT_VALUE = construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))

BytesStore = make_indexable_removable("model_bytes", KEY, BYTES_VALUE)
StructStore = make_indexable("model_struct", KEY, STRUCT_VALUE)

BUFFER_SIZES = [1, 2, 3, 5, 17]
JOIN_TIMEOUT = 120.0  # deadlock guard only

keys32 = st.binary(min_size=32, max_size=32)


@dataclass(frozen=True)
class Kind:
    """A store class under test, with a strategy for its values."""

    cls: type[IndexableStore]
    removable: bool
    values: st.SearchStrategy[Any]


KINDS = {
    "bytes-removable": Kind(BytesStore, True, st.binary(min_size=32, max_size=32)),
    "struct": Kind(
        StructStore,
        False,
        st.fixed_dictionaries(
            {"level": st.integers(0, 2**32 - 1), "hash": st.binary(min_size=32, max_size=32)}
        ),
    ),
}
KIND_IDS = list(KINDS)

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
}


def plain(found: Any) -> Any:
    """A decoded value as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    return found


@contextmanager
def store_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="l2_model_") as directory:
        yield os.path.join(directory, "store")


def listed_items(store: IndexableStore) -> dict[bytes, Any]:
    """``items()`` as a dict of plain values, checking each key comes once."""
    items = list(store.items())
    keys = [k for k, _ in items]
    assert len(keys) == len(set(keys)), "items() yielded a key twice"
    return {k: plain(v) for k, v in items}


def check_store(store: IndexableStore, witness: dict[bytes, Any], keys: list[bytes]) -> None:
    """Every read of ``store`` agrees with ``witness``."""
    for k in keys:
        assert plain(store.find(k)) == witness.get(k), f"find({k.hex()[:8]})"
        assert store.mem(k) == (k in witness), f"mem({k.hex()[:8]})"
    listed = list(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(witness)
    assert listed_items(store) == witness


def merged(directory: str) -> bool:
    """Whether some flush produced a run in ``directory``."""
    return any(name.startswith("run.") for name in os.listdir(directory))


# ----------------------------------------------------------------------
# Sequential scenarios


SEQUENTIAL_ACTIONS = ["add"] * 6 + ["find", "mem", "flush", "keys", "items", "reload"]
REMOVABLE_ACTIONS = SEQUENTIAL_ACTIONS + ["remove"] * 3


@st.composite
def sequential_scenarios(draw: st.DrawFn, kind: Kind) -> tuple[list[bytes], int, list[tuple]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    index = st.integers(0, len(keys) - 1)
    names = st.sampled_from(REMOVABLE_ACTIONS if kind.removable else SEQUENTIAL_ACTIONS)
    actions: list[tuple] = []
    for _ in range(draw(st.integers(10, 80))):
        name = draw(names)
        if name == "add":
            actions.append((name, draw(index), draw(kind.values), draw(st.booleans())))
        elif name == "remove":
            actions.append((name, draw(index), draw(st.booleans())))
        elif name in ("find", "mem"):
            actions.append((name, draw(index)))
        elif name == "reload" and draw(st.booleans()):
            # Reloads at half the rate of the other actions, sometimes with
            # another buffer size than the one the logs were written with.
            actions.append((name, draw(st.sampled_from([buffer, *BUFFER_SIZES]))))
        else:
            actions.append((name,) if name != "reload" else ("items",))
    return keys, buffer, actions


def run_sequential(kind: Kind, keys: list[bytes], buffer: int, actions: list[tuple]) -> None:
    with store_directory() as path:
        witness: dict[bytes, Any] = {}
        store = kind.cls.load(path, index_buffer_size=buffer)
        try:
            for action in actions:
                name = action[0]
                if name == "add":
                    _, i, v, flush = action
                    store.add(keys[i], v, flush=flush)
                    witness[keys[i]] = v
                elif name == "remove":
                    _, i, flush = action
                    store.remove(keys[i], flush=flush)
                    witness.pop(keys[i], None)
                elif name == "find":
                    k = keys[action[1]]
                    assert plain(store.find(k)) == witness.get(k)
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
                    buffer = action[1]
                    store = kind.cls.load(path, index_buffer_size=buffer)
                    check_store(store, witness, keys)
                else:  # pragma: no cover
                    raise AssertionError(name)
            check_store(store, witness, keys)
        finally:
            store.close()
        with kind.cls.load(path, index_buffer_size=buffer) as again:
            check_store(again, witness, keys)
        with kind.cls.load(path, Mode.READ_ONLY) as reader:
            check_store(reader, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_sequential_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, actions = data.draw(sequential_scenarios(kind))
    run_sequential(kind, keys, buffer, actions)


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_sequential_scenario_with_many_merges(kind_id: str) -> None:
    """A fixed long scenario: with buffer 2 it merges many times, and the checks hold."""
    kind = KINDS[kind_id]
    rng = random.Random(kind_id)
    keys = [rng.randbytes(32) for _ in range(10)]

    def random_value() -> Any:
        if kind.removable:
            return rng.randbytes(32)
        return {"level": rng.randrange(2**32), "hash": rng.randbytes(32)}

    actions: list[tuple] = []
    for step in range(300):
        roll = rng.random()
        if roll < 0.55:
            actions.append(("add", rng.randrange(10), random_value(), rng.random() < 0.5))
        elif roll < 0.75 and kind.removable:
            actions.append(("remove", rng.randrange(10), rng.random() < 0.5))
        elif roll < 0.9:
            actions.append(("find", rng.randrange(10)))
        else:
            actions.append(("items",))
        if step % 75 == 74:
            actions.append(("reload", rng.choice(BUFFER_SIZES)))
    run_sequential(kind, keys, 2, actions)


@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "add", "add", "remove", "reload"]), st.integers(0, 40)),
        min_size=150,
        max_size=400,
    )
)
@settings(max_examples=15, **SETTINGS)
def test_many_runs_merged_and_reloaded_answer_like_a_dict(
    steps: list[tuple[str, int]],
) -> None:
    """Buffer 1: every write is a run; merges of 8, 64 and more form as the writes go on,
    removals are kept until the oldest run is merged, and reloads recover it all."""
    keys = [bytes([k]) * 32 for k in range(41)]
    witness: dict[bytes, Any] = {}
    with store_directory() as path:
        store = BytesStore.load(path, index_buffer_size=1)
        try:
            for number, (action, k) in enumerate(steps):
                if action == "add":
                    store.add(keys[k], bytes([number % 256]) * 32)
                    witness[keys[k]] = bytes([number % 256]) * 32
                elif action == "remove":
                    store.remove(keys[k])
                    witness.pop(keys[k], None)
                else:
                    store.close()
                    store = BytesStore.load(path, index_buffer_size=1)
                if number % 37 == 0:
                    check_store(store, witness, keys)
            store._engine.wait_merge()
            check_store(store, witness, keys)
            widths = [span.width for span in store._engine._stack.spans]
            assert max(widths) >= 8, widths  # merges of runs happened
        finally:
            store.close()
        with BytesStore.load(path, Mode.READ_ONLY) as reader:
            check_store(reader, witness, keys)


def test_small_buffers_really_merge() -> None:
    """The scenarios' small buffers make flushes happen (a run appears)."""
    with store_directory() as path:
        with BytesStore.load(path, index_buffer_size=2) as store:
            for i in range(6):
                store.add(bytes([i]) * 32, bytes([i]) * 32)
        assert merged(path)
        with BytesStore.load(path) as again:
            assert len(listed_items(again)) == 6


# ----------------------------------------------------------------------
# Parallel scenarios


def run_in_threads(functions: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread, all released at once; return the results.

    An exception in a thread is re-raised here; a thread still running after
    ``JOIN_TIMEOUT`` fails the test (deadlock guard).
    """
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
def parallel_group(draw: st.DrawFn, kind: Kind, pool: int) -> tuple[list[tuple], bool]:
    """One group of 4 to 16 actions run at once: writes on distinct keys, reads
    only of keys not written in the group; and whether to reload afterwards."""
    threads = draw(st.integers(4, 16))
    written = draw(
        st.lists(st.integers(0, pool - 1), unique=True, min_size=1, max_size=min(threads, pool))
    )
    actions: list[tuple] = []
    for i in written:
        if kind.removable and draw(st.integers(0, 3)) == 0:
            actions.append(("remove", i, draw(st.booleans())))
        else:
            actions.append(("add", i, draw(kind.values), draw(st.booleans())))
    unwritten = [i for i in range(pool) if i not in set(written)]
    others = [st.tuples(st.just("flush")), st.tuples(st.just("items"))]
    if unwritten:
        read_index = st.sampled_from(unwritten)
        read = st.tuples(st.sampled_from(["find", "mem"]), read_index)
        others = [read, read, read, *others]
    for _ in range(threads - len(written)):
        actions.append(draw(st.one_of(others)))
    reload = draw(st.integers(0, 5)) == 0
    return draw(st.permutations(actions)), reload


@st.composite
def parallel_scenarios(
    draw: st.DrawFn, kind: Kind, filled: bool
) -> tuple[list[bytes], int, dict[bytes, Any], list[tuple[list[tuple], bool]]]:
    count = draw(st.integers(2, 10))
    fill = 20 if filled else 0
    keys = draw(st.lists(keys32, min_size=count + fill, max_size=count + fill, unique=True))
    initial = {k: draw(kind.values) for k in keys[:fill]}
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    groups = draw(st.lists(parallel_group(kind, len(keys)), min_size=2, max_size=8))
    return keys, buffer, initial, groups


def group_function(store: IndexableStore, keys: list[bytes], action: tuple) -> Callable[[], Any]:
    name = action[0]
    if name == "add":
        _, i, v, flush = action
        return lambda: store.add(keys[i], v, flush=flush)
    if name == "remove":
        _, i, flush = action
        return lambda: store.remove(keys[i], flush=flush)  # type: ignore[attr-defined]
    if name == "find":
        return lambda: plain(store.find(keys[action[1]]))
    if name == "mem":
        return lambda: store.mem(keys[action[1]])
    if name == "flush":
        return store.flush
    if name == "items":
        return lambda: [(k, plain(v)) for k, v in store.items()]
    raise AssertionError(name)  # pragma: no cover


def check_group_results(
    keys: list[bytes],
    actions: list[tuple],
    results: list[Any],
    before: dict[bytes, Any],
    after: dict[bytes, Any],
) -> None:
    written = {keys[a[1]] for a in actions if a[0] in ("add", "remove")}
    for action, result in zip(actions, results, strict=True):
        name = action[0]
        if name == "find":
            assert result == before.get(keys[action[1]])
        elif name == "mem":
            assert result == (keys[action[1]] in before)
        elif name == "items":
            # Concurrent with the group's writes: keys not written must show
            # the witness; written keys their old or their new binding.
            seen = [k for k, _ in result]
            assert len(seen) == len(set(seen)), "items() yielded a key twice"
            found = dict(result)
            for k in set(before) | set(after):
                if k not in written:
                    assert found.get(k) == before.get(k)
                else:
                    assert k not in found or found[k] in (before.get(k), after.get(k))
            assert set(found) <= set(before) | set(after)


def run_parallel(
    kind: Kind,
    keys: list[bytes],
    buffer: int,
    initial: dict[bytes, Any],
    groups: list[tuple[list[tuple], bool]],
) -> None:
    with store_directory() as path:
        witness = dict(initial)
        store = kind.cls.load(path, index_buffer_size=buffer)
        try:
            for k, v in initial.items():
                store.add(k, v, flush=False)
            for actions, reload in groups:
                before = dict(witness)
                for action in actions:
                    if action[0] == "add":
                        witness[keys[action[1]]] = action[2]
                    elif action[0] == "remove":
                        witness.pop(keys[action[1]], None)
                functions = [group_function(store, keys, a) for a in actions]
                results = run_in_threads(functions)
                check_group_results(keys, actions, results, before, witness)
                check_store(store, witness, keys)
                if reload:
                    store.close()
                    store = kind.cls.load(path, index_buffer_size=buffer)
                    check_store(store, witness, keys)
        finally:
            store.close()
        with kind.cls.load(path, index_buffer_size=buffer) as again:
            check_store(again, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_parallel_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=False))
    run_parallel(kind, keys, buffer, initial, groups)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_parallel_scenarios_filled(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=True))
    run_parallel(kind, keys, min(buffer, 5), initial, groups)


# ----------------------------------------------------------------------
# Concurrency stress

WRITERS = 8
OPS_PER_WRITER = 2500
KEYS_PER_WRITER = 40
READERS = 4
STABLE_KEYS = 64


def test_concurrent_stress_partitions_and_stable_readers() -> None:
    rng = random.Random(2024)
    stable = {rng.randbytes(32): rng.randbytes(32) for _ in range(STABLE_KEYS)}
    partitions = [
        [bytes([0xF0, w]) + rng.randbytes(30) for _ in range(KEYS_PER_WRITER)]
        for w in range(WRITERS)
    ]
    all_keys = list(stable) + [k for part in partitions for k in part]
    assert len(set(all_keys)) == len(all_keys)
    # Every value ever written to a partition key (written before the add).
    history: dict[bytes, set[bytes]] = {k: set() for part in partitions for k in part}
    witnesses: list[dict[bytes, bytes]] = [{} for _ in range(WRITERS)]
    writers_done = threading.Event()
    errors: list[BaseException] = []
    reader_stats = [0] * READERS

    with store_directory() as path:
        store = BytesStore.load(path, index_buffer_size=7)
        try:
            for k, v in stable.items():
                store.add(k, v, flush=False)
            store.flush()

            def writer(w: int) -> None:
                try:
                    local = random.Random(w)
                    mine = partitions[w]
                    witness = witnesses[w]
                    for _ in range(OPS_PER_WRITER):
                        k = local.choice(mine)
                        roll = local.random()
                        if roll < 0.5:
                            v = local.randbytes(32)
                            history[k].add(v)
                            store.add(k, v, flush=local.random() < 0.5)
                            witness[k] = v
                        elif roll < 0.65:
                            store.remove(k, flush=local.random() < 0.5)
                            witness.pop(k, None)
                        elif roll < 0.9:
                            assert store.find(k) == witness.get(k)
                        elif roll < 0.95:
                            assert store.mem(k) == (k in witness)
                        else:
                            store.flush()
                except BaseException as error:
                    errors.append(error)

            def reader(r: int) -> None:
                try:
                    local = random.Random(1000 + r)
                    stable_keys = list(stable)
                    iterations = 0
                    while not writers_done.is_set() or iterations < 5:
                        iterations += 1
                        for _ in range(50):
                            k = local.choice(stable_keys)
                            assert store.find(k) == stable[k]
                            assert store.mem(k)
                        seen: set[bytes] = set()
                        for k, v in store.items():
                            assert k not in seen, "items() yielded a key twice"
                            seen.add(k)
                            if k in stable:
                                assert v == stable[k]
                            else:
                                assert k in history, "items() yielded a key never written"
                                assert v in history[k], "items() yielded a value never written"
                        assert set(stable) <= seen, "items() missed a stable binding"
                    reader_stats[r] = iterations
                except BaseException as error:
                    errors.append(error)

            threads = [
                threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)
            ]
            readers = [
                threading.Thread(target=reader, args=(r,), daemon=True) for r in range(READERS)
            ]
            for thread in threads + readers:
                thread.start()
            for thread in threads:
                thread.join(JOIN_TIMEOUT)
            writers_done.set()
            for thread in readers:
                thread.join(JOIN_TIMEOUT)
            assert not any(t.is_alive() for t in threads + readers), "deadlock?"
            if errors:
                raise errors[0]
            assert all(count >= 5 for count in reader_stats)

            expected = dict(stable)
            for witness in witnesses:
                expected.update(witness)
            check_store(store, expected, all_keys)
        finally:
            store.close()
        assert merged(path)
        with BytesStore.load(path, index_buffer_size=7) as again:
            check_store(again, expected, all_keys)


# ----------------------------------------------------------------------
# READ_ONLY beside a writer


@st.composite
def read_only_scenarios(draw: st.DrawFn) -> tuple[list[bytes], bool, list[list[tuple]]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    reader_first = draw(st.booleans())
    index = st.integers(0, len(keys) - 1)
    write = st.one_of(
        st.tuples(st.just("add"), index, st.binary(min_size=32, max_size=32), st.booleans()),
        st.tuples(st.just("add"), index, st.binary(min_size=32, max_size=32), st.booleans()),
        st.tuples(st.just("remove"), index, st.booleans()),
        st.tuples(st.just("peek")),  # check the reader before the writer's flush
    )
    batches = draw(st.lists(st.lists(write, min_size=1, max_size=12), min_size=2, max_size=8))
    return keys, reader_first, batches


@settings(max_examples=50, **SETTINGS)
@given(scenario=read_only_scenarios())
def test_read_only_store_beside_a_writer(
    scenario: tuple[list[bytes], bool, list[list[tuple]]],
) -> None:
    keys, reader_first, batches = scenario
    with store_directory() as path:
        reader = BytesStore.load(path, Mode.READ_ONLY) if reader_first else None
        writer = BytesStore.load(path, index_buffer_size=3)
        try:
            if reader is None:
                reader = BytesStore.load(path, Mode.READ_ONLY)
            witness: dict[bytes, bytes] = {}
            synced: dict[bytes, bytes] = {}
            check_store(reader, synced, keys)
            for batch in batches:
                for action in batch:
                    if action[0] == "add":
                        _, i, v, flush = action
                        writer.add(keys[i], v, flush=flush)
                        witness[keys[i]] = v
                    elif action[0] == "remove":
                        _, i, flush = action
                        writer.remove(keys[i], flush=flush)
                        witness.pop(keys[i], None)
                    else:
                        # Not synced yet: the reader shows what it last synced.
                        check_store(reader, synced, keys)
                writer.flush()
                check_store(reader, synced, keys)
                reader.sync()
                synced = dict(witness)
                check_store(reader, synced, keys)
                check_store(writer.readonly(), witness, keys)
            reader.sync()
            check_store(reader, witness, keys)
        finally:
            writer.close()
            if reader is not None:
                reader.close()
        with BytesStore.load(path, Mode.READ_ONLY) as late_reader:
            check_store(late_reader, witness, keys)
        with BytesStore.load(path) as again:
            check_store(again, witness, keys)


def test_read_only_store_follows_many_merges() -> None:
    """A fixed long run: the writer merges many times between the reader's syncs."""
    rng = random.Random(99)
    keys = [rng.randbytes(32) for _ in range(30)]
    with store_directory() as path:
        writer = BytesStore.load(path, index_buffer_size=3)
        reader = BytesStore.load(path, Mode.READ_ONLY)
        try:
            witness: dict[bytes, bytes] = {}
            synced: dict[bytes, bytes] = {}
            for round_ in range(40):
                for _ in range(rng.randrange(1, 20)):
                    k = rng.choice(keys)
                    if rng.random() < 0.75:
                        v = rng.randbytes(32)
                        writer.add(k, v, flush=rng.random() < 0.5)
                        witness[k] = v
                    else:
                        writer.remove(k, flush=rng.random() < 0.5)
                        witness.pop(k, None)
                writer.flush()
                check_store(reader, synced, keys)
                if round_ % 3 != 2:  # sometimes skip a sync: the next one catches up
                    reader.sync()
                    synced = dict(witness)
                    check_store(reader, synced, keys)
            assert merged(path)
        finally:
            writer.close()
            reader.close()
