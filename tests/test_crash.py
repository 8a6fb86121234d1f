"""Real crash tests: child processes killed with SIGKILL at random moments.

Each child (``tests/helpers/*.py``) prints ``begin <op>`` before and ``ack
<op>`` after every operation. After the kill the parent drains the child's
output and reloads the store. Since every store writes append-only in the
order of the calls, the reloaded state must be the state after some prefix of
the operations the child began, no shorter than what was acknowledged as
durable (every acked op with ``flush=True``; every op begun before the last
acked ``flush()`` with ``flush=False``). Nothing else may appear.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib
from pathlib import Path

import construct
import pytest

from l2_stores import Mode, make_indexable, make_indexable_removable, make_singleton
from tests.helpers.child import Child
from tests.helpers.runs import assert_runs_tile

HELPERS = Path(__file__).parent / "helpers"
CRASH_WRITER = HELPERS / "crash_writer.py"
SINGLETON_WRITER = HELPERS / "singleton_writer.py"

KEY = construct.Bytes(32)
Plain = make_indexable("crash_plain", KEY, KEY)
Removable = make_indexable_removable("crash_removable", KEY, KEY)
Singleton = make_singleton("crash_singleton", construct.GreedyBytes)

HEADER_SIZE = 64
RECORD_SIZE = 1 + 32 + 32 + 4


# --------------------------------------------------------------------------
# child processes


# --------------------------------------------------------------------------
# model


Op = tuple[str, bytes, bytes | None]


def parse_index_ops(lines: list[str]) -> tuple[list[Op], int, int]:
    """(ops in begin order, number acked, ops begun before the last acked flush)."""
    ops: list[Op] = []
    acked = 0
    flushed = 0
    for line in lines:
        words = line.split()
        if words[0] == "begin" and words[1] == "add":
            ops.append(("add", bytes.fromhex(words[2]), bytes.fromhex(words[3])))
        elif words[0] == "begin" and words[1] == "remove":
            ops.append(("remove", bytes.fromhex(words[2]), None))
        elif words[0] == "ack" and words[1] in ("add", "remove"):
            acked += 1
            op = ops[acked - 1]
            assert op[0] == words[1] and op[1].hex() == words[2], (line, op)
        elif line == "ack flush":
            flushed = len(ops)
    return ops, acked, flushed


def apply(state: dict[bytes, bytes], op: Op) -> None:
    kind, key, value = op
    if kind == "add":
        assert value is not None
        state[key] = value
    else:
        state.pop(key, None)


def check_prefix(
    before: dict[bytes, bytes], ops: list[Op], low: int, high: int, observed: dict[bytes, bytes]
) -> int:
    """The length of the prefix of ``ops`` (between low and high) giving ``observed``."""
    state = dict(before)
    for op in ops[:low]:
        apply(state, op)
    at_low = dict(state)
    for length in range(low, high + 1):
        if length > low:
            apply(state, ops[length - 1])
        if observed == state:
            return length
    missing = {k.hex(): v.hex() for k, v in at_low.items() if k not in observed}
    extra = {k.hex(): v.hex() for k, v in observed.items() if k not in at_low}
    wrong = {k.hex() for k in at_low if k in observed and observed[k] != at_low[k]}
    pytest.fail(
        f"reloaded state is no prefix of ops[:{low}..{high}] (of {len(ops)}): "
        f"{len(missing)} durable bindings missing (e.g. {list(missing.items())[:3]}), "
        f"{len(extra)} unexpected keys (e.g. {list(extra.items())[:3]}), "
        f"{len(wrong)} wrong values (e.g. {list(wrong)[:3]})"
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def observe(
    cls: type, directory: Path, mode: Mode, buffer: int, probes: set[bytes]
) -> dict[bytes, bytes]:
    """Every binding of the store, cross-checked between items/keys/find/mem."""
    with cls.load(directory, mode, index_buffer_size=buffer) as store:
        items = list(store.items())
        state = dict(items)
        assert len(state) == len(items), "items() yielded a key twice"
        keys = list(store.keys())
        assert len(keys) == len(state) and set(keys) == set(state)
        for key, value in state.items():
            assert store.find(key) == value
            assert store.mem(key)
        for key in probes - state.keys():
            assert store.find(key) is None
            assert not store.mem(key)
    return state


# --------------------------------------------------------------------------
# indexable stores killed at random moments


def kill_round(
    tmp_path: Path,
    directory: Path,
    cls: type,
    kind: str,
    buffer: int,
    flush_mode: str,
    n_ops: int,
    seed: str,
    plan: tuple[str, float],
    before: dict[bytes, bytes],
    recover_in_parent: bool,
    fsync: bool = False,
) -> tuple[dict[bytes, bytes], list[str]]:
    child = Child(
        CRASH_WRITER,
        [directory, seed, kind, buffer, n_ops, flush_mode, "fsync" if fsync else "-"],
        tmp_path / "child-stderr.log",
    )
    listing_at_kill: list[str] = []
    try:
        how, amount = plan
        if how == "acks":
            child.wait_for(lambda: child.acks >= amount)
        elif how == "sleep":
            time.sleep(amount)
        elif how in ("merge", "run-merge"):
            # wait until `amount` ops are acked, then kill as soon as a flush
            # (or, for run-merge, a merge of runs) is seen writing its run
            # (deadline: kill anyway)
            child.wait_for(lambda: child.acks >= amount)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not child.eof:
                try:
                    names = os.listdir(directory)
                except FileNotFoundError:
                    names = []
                writing = [n for n in names if n.startswith("run.") and n.endswith(".tmp")]
                if how == "merge" and writing:
                    break
                if any(merged_span(n) for n in writing):
                    break
        elif how == "boundary":
            # kill a few ms after the op that filled the log (a merge starts)
            child.wait_for(lambda: child.acks >= int(amount))
            time.sleep((amount - int(amount)) * 0.02)
        else:
            raise AssertionError(plan)
    finally:
        code = child.kill()
    if directory.exists():
        listing_at_kill = sorted(os.listdir(directory))
    assert code == -signal.SIGKILL, f"child died on its own ({code}):\n{child.stderr()}"

    ops, acked, flushed = parse_index_ops(child.lines)
    if flush_mode == "each":
        low = acked
        assert len(ops) - acked <= 1, "more than one op in flight"
    else:
        low = flushed
    high = len(ops)
    probes = set(before) | {op[1] for op in ops}

    files_before = snapshot(directory)
    seen = observe(cls, directory, Mode.READ_ONLY, buffer, probes)
    assert snapshot(directory) == files_before, "a READ_ONLY load changed the files"
    length = check_prefix(before, ops, low, high, seen)
    # shown by pytest when a later check fails
    print(
        f"round {seed}: plan {plan}, {len(ops)} ops begun, durable {low}, "
        f"reloaded prefix {length}, {len(seen)} bindings, files at kill {listing_at_kill}"
    )

    if recover_in_parent:
        recovered = observe(cls, directory, Mode.READ_WRITE, buffer, probes)
        assert recovered == seen, "READ_WRITE recovery and READ_ONLY load disagree"
        names = sorted(os.listdir(directory))
        assert not [n for n in names if n.endswith(".tmp")], names
        assert len([n for n in names if n.startswith("log.")]) == 1, names
        assert_runs_tile(directory)
        # the recovered store reads the same once more
        assert observe(cls, directory, Mode.READ_ONLY, buffer, probes) == seen
    return seen, listing_at_kill


@pytest.mark.parametrize(
    ("kind", "buffer", "flush_mode", "max_acks", "rounds", "fsync"),
    [
        ("plain", 50, "each", 1500, 10, False),
        ("removable", 7, "each", 300, 10, False),
        ("plain", 7, "batch:9", 300, 8, False),
        ("removable", 50, "batch:13", 1500, 8, False),
        ("removable", 10, "each", 100, 5, True),
    ],
    ids=[
        "plain-buf50",
        "removable-buf7",
        "plain-buf7-batched",
        "removable-buf50-batched",
        "removable-buf10-fsync",
    ],
)
def test_indexable_survives_sigkill(
    tmp_path: Path,
    kind: str,
    buffer: int,
    flush_mode: str,
    max_acks: int,
    rounds: int,
    fsync: bool,
) -> None:
    cls = Removable if kind == "removable" else Plain
    directory = tmp_path / "store"
    rng = random.Random(f"crash-{kind}-{buffer}-{flush_mode}")
    state: dict[bytes, bytes] = {}
    for number in range(rounds):
        if rng.random() < 0.6:
            plan: tuple[str, float] = ("acks", rng.randint(1, max_acks))
        else:
            # from the spawn: before the load, during recovery, or mid-writes
            plan = ("sleep", rng.uniform(0.0, 0.7))
        state, _ = kill_round(
            tmp_path,
            directory,
            cls,
            kind,
            buffer,
            flush_mode,
            1_000_000,
            seed=f"{kind}-{buffer}-{number}",
            plan=plan,
            before=state,
            recover_in_parent=number % 3 != 1,
            fsync=fsync,
        )
    # a last clean session: the store is still fully usable after all that
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=buffer) as store:
        extra = {bytes([i]) * 32: bytes([255 - i]) * 32 for i in range(2 * buffer + 3)}
        for key, value in extra.items():
            store.add(key, value)
    state.update(extra)
    assert observe(cls, directory, Mode.READ_WRITE, buffer, set()) == state


def merged_span(name: str) -> bool:
    """Whether ``name`` is a run of more than one generation (a merge's) being written."""
    lo, _, hi = name.removeprefix("run.").removesuffix(".tmp").partition("-")
    return lo.isdigit() and hi.isdigit() and int(hi) > int(lo)


@pytest.mark.parametrize("kind", ["plain", "removable"])
def test_indexable_killed_during_run_merges(tmp_path: Path, kind: str) -> None:
    """Buffer 4: a merge of 8 runs every 32 adds, of 64 every 256, of 512 every 2,048;
    kills land while merges of every width write their run, and what was acknowledged
    survives each."""
    cls = Removable if kind == "removable" else Plain
    directory = tmp_path / "store"
    rng = random.Random(f"run-merge-kills-{kind}")
    state: dict[bytes, bytes] = {}
    widths: set[int] = set()
    for number in range(8):
        state, listing = kill_round(
            tmp_path,
            directory,
            cls,
            kind,
            4,
            "each",
            1_000_000,
            seed=f"run-merge-{kind}-{number}",
            plan=("run-merge", rng.randint(40, 2500)),
            before=state,
            recover_in_parent=number % 2 == 0,
        )
        for name in listing:
            if name.endswith(".tmp") and merged_span(name):
                lo, _, hi = name.removeprefix("run.").removesuffix(".tmp").partition("-")
                widths.add(int(hi) - int(lo) + 1)
    print(f"widths of the run merges the kills cut short: {sorted(widths)}")
    assert observe(cls, directory, Mode.READ_WRITE, 4, set()) == state


def test_indexable_killed_during_merges(tmp_path: Path) -> None:
    """Buffer 2000, ~20k adds per child: kills land while a merge writes its data file."""
    directory = tmp_path / "store"
    buffer = 2000
    rng = random.Random("merge-kills")
    state: dict[bytes, bytes] = {}
    interrupted = 0
    for number in range(6):
        recover = number % 2 == 0
        if number % 2 == 0:
            plan: tuple[str, float] = ("merge", rng.randrange(0, 8000))
        else:
            # the active log holds (size - 64) / R records after the parent's
            # clean close; the next merge starts when it reaches `buffer`
            logs = sorted(directory.glob("log.*"))
            held = (logs[-1].stat().st_size - HEADER_SIZE) // RECORD_SIZE if logs else 0
            boundary = (buffer - held % buffer) + buffer * rng.randrange(0, 3)
            plan = ("boundary", boundary + rng.random())
        state, listing = kill_round(
            tmp_path,
            directory,
            Plain,
            "plain",
            buffer,
            "each",
            20_000,
            seed=f"merge-{number}",
            plan=plan,
            before=state,
            recover_in_parent=recover,
        )
        if (
            any(n.startswith("run.") and n.endswith(".tmp") for n in listing)
            or sum(n.startswith("log.") for n in listing) > 1
        ):
            interrupted += 1
    # informative only (timing): how many kills hit a merge in progress
    print(f"kills that interrupted a merge: {interrupted} of 6")


# --------------------------------------------------------------------------
# singleton killed at random moments


def singleton_value(number: int) -> bytes:
    """Same as ``value_bytes`` in helpers/singleton_writer.py."""
    body = random.Random(number).randbytes(random.Random(-number).randrange(0, 9000))
    return f"value {number} len {len(body)}|".encode() + body


def test_singleton_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "single"
    rng = random.Random("singleton-crash")
    current: bytes | None = None
    for number in range(8):
        child = Child(
            SINGLETON_WRITER, [path, f"single-{number}", 200], tmp_path / "child-stderr.log"
        )
        try:
            if rng.random() < 0.6:
                acks = rng.randint(1, 60)
                child.wait_for(lambda child=child, acks=acks: child.acks >= acks)
            else:
                time.sleep(rng.uniform(0.0, 0.6))
        finally:
            code = child.kill()
        assert code == -signal.SIGKILL, f"child died on its own ({code}):\n{child.stderr()}"
        states: list[bytes | None] = [current]
        acked = 0
        for line in child.lines:
            words = line.split()
            if words[0] == "begin" and words[1] == "write":
                states.append(singleton_value(int(words[2])))
            elif words[0] == "begin" and words[1] == "delete":
                states.append(None)
            elif words[0] == "ack":
                acked += 1
        began = len(states) - 1
        assert began - acked <= 1
        allowed = states[acked:]  # the last acked state, or the in-flight one
        print(f"singleton round {number}: {began} ops begun, {acked} acked")

        files_before = snapshot(path.parent)
        with Singleton.load(path, Mode.READ_ONLY) as store:
            seen = store.read()
        assert snapshot(path.parent) == files_before, "a READ_ONLY load changed the files"
        assert seen in allowed, (
            f"read {seen[:40] if seen else seen!r}, allowed {[a[:40] if a else a for a in allowed]}"
        )
        with Singleton.load(path, Mode.READ_WRITE) as store:
            assert store.read() == seen
        assert not (path.parent / (path.name + ".tmp")).exists()
        current = seen


# --------------------------------------------------------------------------
# torn tails


def make_store(directory: Path, count: int, buffer: int = 1000, seed: str = "s") -> dict:
    rng = random.Random(seed)
    state = {rng.randbytes(32): rng.randbytes(32) for _ in range(count)}
    with Plain.load(directory, Mode.READ_WRITE, index_buffer_size=buffer) as store:
        for key, value in state.items():
            store.add(key, value)
    return state


def only(directory: Path, prefix: str) -> Path:
    found = [p for p in directory.iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


TORN_TAILS = {
    "short-garbage": lambda rng, record: rng.randbytes(rng.randint(1, RECORD_SIZE - 1)),
    "one-byte": lambda rng, record: b"\x01",
    "cut-record": lambda rng, record: record[: rng.randint(1, RECORD_SIZE - 1)],
    "zero-record": lambda rng, record: bytes(RECORD_SIZE),
    "zero-partial": lambda rng, record: bytes(40),
    "zero-record-and-a-half": lambda rng, record: bytes(RECORD_SIZE + 30),
    "two-zero-records": lambda rng, record: bytes(2 * RECORD_SIZE),
    # a kill in the middle of a store through the map: some of the record's
    # bytes (in any order), then the zero-filled free space after it
    "half-stored-then-free-space": lambda rng, record: (
        half_stored(rng, record) + bytes(rng.randint(1, 5 * RECORD_SIZE))
    ),
    "stored-but-its-crc-then-free-space": lambda rng, record: record[:-4] + bytes(4 + RECORD_SIZE),
}


def half_stored(rng: random.Random, record: bytes) -> bytes:
    """``record`` with a random strict subset of its bytes stored, the rest zero."""
    stored = bytearray(len(record))
    for position in rng.sample(range(len(record)), rng.randint(1, len(record) - 1)):
        stored[position] = record[position]
    return bytes(stored)


@pytest.mark.parametrize("tail", sorted(TORN_TAILS))
@pytest.mark.parametrize("merged", [False, True], ids=["log-only", "with-data-file"])
def test_torn_tail_is_dropped(tmp_path: Path, tail: str, merged: bool) -> None:
    directory = tmp_path / "store"
    state = make_store(directory, 30, buffer=8 if merged else 1000)
    log = only(directory, "log.")
    original = log.read_bytes()
    assert (len(original) - HEADER_SIZE) % RECORD_SIZE == 0
    rng = random.Random(tail)
    # a would-be next record, valid, so that a cut of it is a realistic tail
    body = b"\x01" + rng.randbytes(64)
    record = body + zlib.crc32(body).to_bytes(4, "little")
    garbage = TORN_TAILS[tail](rng, record)
    log.write_bytes(original + garbage)
    files = snapshot(directory)

    assert observe(Plain, directory, Mode.READ_ONLY, 1000, {record[1:33]}) == state
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"

    assert observe(Plain, directory, Mode.READ_WRITE, 1000, {record[1:33]}) == state
    assert log.read_bytes() == original, "READ_WRITE load did not cut the torn tail exactly"

    # appending after the cut works, and what follows is read back
    key, value = b"k" * 32, b"v" * 32
    with Plain.load(directory, Mode.READ_WRITE) as store:
        store.add(key, value)
    assert observe(Plain, directory, Mode.READ_WRITE, 1000, set()) == {**state, key: value}


def test_singleton_tmp_leftover_is_ignored_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with Singleton.load(path) as store:
        store.write(b"committed")
    leftover = tmp_path / "single.tmp"
    leftover.write_bytes(b"half-written garbage")
    with Singleton.load(path, Mode.READ_ONLY) as store:
        assert store.read() == b"committed"
    assert leftover.read_bytes() == b"half-written garbage"
    with Singleton.load(path) as store:
        assert store.read() == b"committed"
    assert not leftover.exists()


# --------------------------------------------------------------------------
# interrupted merges, simulated


def log_file(generation: int, records: list[tuple[int, bytes, bytes]]) -> bytes:
    """A log file as documented in l2_stores/engine/log.py and framing.py."""
    body = struct.pack("<8sHHIIIQQB19x", b"L2SLOG\0\0", 1, 0, 32, 32, 0, generation, 0, 0)
    data = body + zlib.crc32(body).to_bytes(4, "little")
    for op, key, value in records:
        rec = bytes([op]) + key + value
        data += rec + zlib.crc32(rec).to_bytes(4, "little")
    return data


def append_seal(path: Path) -> None:
    """End the log at ``path`` with a seal, as a freeze does (layout of engine/log.py)."""
    rec = bytes([4]) + bytes(64)
    with open(path, "ab") as file:
        file.write(rec + zlib.crc32(rec).to_bytes(4, "little"))


def generation_of(path: Path) -> int:
    return int(path.name.split(".")[1])


def test_merge_leftovers_are_ignored_and_removed(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    state = make_store(directory, 25, buffer=10)
    log = only(directory, "log.")
    following = generation_of(log) + 1
    rng = random.Random("leftovers")
    leftovers = {
        f"run.{following - 1:08d}-{following - 1:08d}.tmp": rng.randbytes(700),
        f"log.{following:08d}.tmp": log_file(following, [])[:30],
        f"run.00000000-{following - 1:08d}.tmp": b"",
        "run.convert-0.tmp": b"",
    }
    for name, content in leftovers.items():
        (directory / name).write_bytes(content)
    files = snapshot(directory)

    assert observe(Plain, directory, Mode.READ_ONLY, 10, set()) == state
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"

    with Plain.load(directory, Mode.READ_WRITE, index_buffer_size=10) as store:
        remaining = sorted(os.listdir(directory))
        assert not [n for n in remaining if n.endswith(".tmp")], remaining
        assert dict(store.items()) == state
    assert observe(Plain, directory, Mode.READ_WRITE, 10, set()) == state


def test_merge_cut_short_is_redone(tmp_path: Path) -> None:
    """The state a kill leaves after a freeze: two logs and a partial run .tmp."""
    directory = tmp_path / "store"
    state = make_store(directory, 40, buffer=1000)
    (directory / "identity").unlink()  # made as Plain, given removes by hand below
    log = only(directory, "log.")
    assert generation_of(log) == 0
    append_seal(log)  # frozen
    rng = random.Random("cut-short")
    # the next log, already holding a few records (overwrites, removes, new keys)
    some = sorted(state)[:6]
    records = [(1, some[0], b"\xaa" * 32), (2, some[1], bytes(32)), (1, b"n" * 32, b"m" * 32)]
    records += [(2, some[2], bytes(32)), (1, some[2], b"\xbb" * 32)]
    (directory / "log.00000001").write_bytes(log_file(1, records))
    (directory / "run.00000000-00000000.tmp").write_bytes(rng.randbytes(1500))
    expected = dict(state)
    expected[some[0]] = b"\xaa" * 32
    del expected[some[1]]
    expected[b"n" * 32] = b"m" * 32
    expected[some[2]] = b"\xbb" * 32
    files = snapshot(directory)

    assert observe(Removable, directory, Mode.READ_ONLY, 1000, set(some)) == expected
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"
    assert observe(Removable, directory, Mode.READ_WRITE, 1000, set(some)) == expected
    names = sorted(os.listdir(directory))
    assert names == ["identity", "lock", "log.00000001", "run.00000000-00000000"], names
    assert observe(Removable, directory, Mode.READ_WRITE, 1000, set(some)) == expected
