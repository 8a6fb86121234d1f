"""Crash tests of the GC: a child growing and collecting a chain of blocks, killed with SIGKILL.

The child (``tests/helpers/gc_writer.py``) loops over rounds: writes, a
background ``gc(Chain(head, next))`` keeping the last KEEP blocks, more writes
while it runs, ``wait_gc_completion()``; it prints ``begin``/``ack`` around
every write (all with flush=True) and ``gc call``/``gc returned``/``gc
done`` around each GC. The parent kills it at seeded moments (after a number
of lines, after a delay, while a GC is held in its walk, right after a ``gc
done``), several rounds on the same directory, and reloads. Whatever the
timing, the reloaded content must be one of a few states computed from the
lines the child printed:

* every acked write is there, the write in flight (at most one) may or may not
  be;
* a GC whose ``gc done`` was printed is applied; for the GC in flight the
  content is the old one or the new one (its reachable set at ``gc call``,
  plus the keys written after ``gc returned``), never a mix: if one key it
  drops is missing, all of them are; a GC held in its walk has not committed,
  so the content is the old one.

After each kill the parent also checks that a READ_ONLY load changes no file,
that a READ_WRITE load recovers the same content and leaves no ``*.tmp``
file, no values file below the floor and no uncommitted GC copy (indexed
files: layout of ``l2_stores/engine/value_files.py`` and ``framing.py``), and
that the recovered store can run another GC and close cleanly.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import Chain, Mode, make_indexable, make_indexable_removable, make_indexed_file
from tests.helpers.child import Child
from tests.helpers.runs import assert_runs_tile, runs_tag

HELPERS = Path(__file__).parent / "helpers"
WRITER = HELPERS / "gc_writer.py"

KEY = construct.Bytes(32)
ZERO = bytes(32)
KEEP = 6

# the child's classes (same names and codecs as in the helper)
CLASSES: dict[str, Any] = {
    "plain": make_indexable("gc_crash_plain", KEY, construct.Bytes(32)),
    "removable": make_indexable_removable("gc_crash_removable", KEY, construct.Bytes(32)),
    "indexed": make_indexed_file(
        "gc_crash_indexed", KEY, construct.GreedyBytes, construct.Bytes(32)
    ),
}
KIND_IDS = list(CLASSES)

FILE_HEADER = struct.Struct("<8sHHIIIQQBQ11xI")  # l2_stores/engine/framing.py
FILE_HEADER_SIZE = 64
RECORD_OVERHEAD = 12  # values-file record: n | key | value | n | crc32
GC_COPY = 1

# Model values: the 32-byte value (indexable kinds), (predecessor, sha256) (indexed).
State = dict[bytes, Any]


def sha256(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def height(key: bytes) -> int:
    return int.from_bytes(key[1:5], "big")


def predecessor(kind: str, model: Any) -> bytes:
    return model[0] if kind == "indexed" else model


def reach(kind: str, state: State, head: bytes, keep: int = KEEP) -> set[bytes]:
    """What the child's Chain from ``head`` keeps in ``state`` (same walk as gc_writer.py)."""
    lowest = height(head) - keep + 1
    kept: set[bytes] = set()
    key: bytes | None = head
    while key is not None and key not in kept and key in state:
        kept.add(key)
        if height(key) <= lowest:
            break
        pred = predecessor(kind, state[key])
        key = None if pred == ZERO else pred
    return kept


def head_of(state: State) -> bytes | None:
    blocks = [k for k in state if k[:1] == b"B"]
    return max(blocks, key=height) if blocks else None


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


def read_header(path: Path) -> tuple[int, int]:
    """(flags, tag) of an engine file (framing.py)."""
    with open(path, "rb") as file:
        fields = FILE_HEADER.unpack(file.read(FILE_HEADER_SIZE))
    return fields[2], fields[9]


def index_directory(kind: str, directory: Path) -> Path:
    return directory / "index" if kind == "indexed" else directory


def values_numbers(directory: Path) -> dict[int, int]:
    """Values files of an indexed file: number -> flags."""
    found = {}
    for path in directory.glob("values.*"):
        found[int(path.name.split(".")[1])] = read_header(path)[0]
    return found


def check_files_at_rest(kind: str, directory: Path) -> int:
    """A closed store: no leftovers. Returns the values-file floor (indexed), else 0."""
    leftovers = [str(p) for p in directory.rglob("*.tmp")]
    assert not leftovers, f"temporary files left: {leftovers}"
    index = index_directory(kind, directory)
    names = sorted(os.listdir(index))
    assert len([n for n in names if n.startswith("log.")]) == 1, names
    assert_runs_tile(index)
    if kind != "indexed":
        return 0
    floor = runs_tag(index)
    numbers = values_numbers(directory)
    assert numbers, "no values file"
    for number, flags in numbers.items():
        assert number >= floor, f"values file {number} is below the floor {floor}: a dead file"
        if number != floor:
            assert not flags & GC_COPY, f"values file {number}: an uncommitted GC copy left"
    return floor


def observe(kind: str, directory: Path, mode: Mode, probes: set[bytes]) -> tuple[State, int]:
    """Every binding, cross-checked between items/keys/reads; and the live records' bytes."""
    cls = CLASSES[kind]
    state: State = {}
    live_bytes = 0
    options = {"cache_size": 4} if kind == "indexed" else {}
    with cls.load(directory, mode, index_buffer_size=7, **options) as store:
        for key, value in store.items():
            assert key not in state, "items() yielded a key twice"
            if kind == "indexed":
                stored, header = value
                assert sha256(stored) == header, f"{key.hex()}: value and header disagree"
                state[key] = (stored[:32], header)
                live_bytes += RECORD_OVERHEAD + 32 + len(stored)
            else:
                state[key] = value
        assert sorted(store.keys()) == sorted(state)
        for key, model in state.items():
            assert store.mem(key)
            if kind == "indexed":
                stored, header = store.read(key)
                assert (stored[:32], header) == model and sha256(stored) == header
                assert store.header(key) == model[1]
            else:
                assert store.find(key) == model
        for key in probes - state.keys():
            assert not store.mem(key)
            assert (store.read(key) if kind == "indexed" else store.find(key)) is None
    return state, live_bytes


# --------------------------------------------------------------------------
# the child


# --------------------------------------------------------------------------
# the model: what the lines allow


@dataclass
class InFlightGc:
    number: int
    reachable: set[bytes]
    returned: bool = False
    touched: set[bytes] = field(default_factory=set)


@dataclass
class Outcome:
    """The states the reloaded store may hold, and what they were made of."""

    old: list[State]  # the in-flight GC not applied (or none in flight)
    new: list[State]  # the in-flight GC applied
    gc: InFlightGc | None
    acked: int
    completed_gcs: int
    probes: set[bytes]


def replay(kind: str, before: State, lines: list[str]) -> Outcome:
    """Apply the child's lines to ``before``; the in-flight write and GC give the choices."""
    state = dict(before)
    probes = set(before)
    pending: tuple[str, bytes, Any] | None = None
    gc: InFlightGc | None = None
    acked = 0
    completed = 0

    def apply(target: State, op: tuple[str, bytes, Any]) -> None:
        if op[0] == "add":
            target[op[1]] = op[2]
        else:
            target.pop(op[1], None)

    for line in lines:
        words = line.split()
        if words[0] == "begin":
            assert pending is None, f"two writes in flight: {line}"
            key = bytes.fromhex(words[2])
            probes.add(key)
            if words[1] == "add":
                if kind == "indexed":
                    value: Any = (bytes.fromhex(words[3]), bytes.fromhex(words[4]))
                else:
                    value = bytes.fromhex(words[3])
                pending = ("add", key, value)
            else:
                pending = ("remove", key, None)
            if gc is not None:
                assert gc.returned, f"a write between gc call and gc returned: {line}"
        elif words[0] == "ack":
            assert pending is not None and pending[0] == words[1], line
            assert pending[1].hex() == words[2], line
            apply(state, pending)
            if gc is not None:
                gc.touched.add(pending[1])
            pending = None
            acked += 1
        elif words[:2] == ["gc", "call"]:
            assert pending is None and gc is None, line
            gc = InFlightGc(int(words[2]), reach(kind, state, bytes.fromhex(words[3])))
        elif words[:2] == ["gc", "returned"]:
            assert gc is not None and gc.number == int(words[2]), line
            gc.returned = True
        elif words[:2] == ["gc", "done"]:
            assert gc is not None and gc.number == int(words[2]) and pending is None, line
            state = {k: v for k, v in state.items() if k in gc.reachable or k in gc.touched}
            gc = None
            completed += 1
        else:
            assert words[0] in ("ready", "walking", "done") or words[:2] == ["gc", "wait"], line

    old = [dict(state)]
    touched = [set(gc.touched)] if gc is not None else []
    if pending is not None:
        with_pending = dict(state)
        apply(with_pending, pending)
        old.append(with_pending)
        if gc is not None:
            touched.append(gc.touched | {pending[1]})
    new = []
    if gc is not None:
        for candidate, written in zip(old, touched, strict=True):
            new.append({k: v for k, v in candidate.items() if k in gc.reachable or k in written})
    return Outcome(old, new, gc, acked, completed, probes)


def check_outcome(outcome: Outcome, seen: State, gc_may_commit: bool = True) -> str:
    """``seen`` is one of the allowed states; returns which ("old" or "new")."""
    if seen in outcome.old:
        return "old" if seen not in outcome.new else "old = new"
    if gc_may_commit and seen in outcome.new:
        return "new"
    # say what is wrong
    reference = outcome.old[0]
    message = []
    if outcome.gc is not None:
        gc = outcome.gc
        dropped = {k for k in reference if k not in gc.reachable and k not in gc.touched}
        present = dropped & set(seen)
        if present and present != dropped:
            message.append(
                f"a MIX of old and new: {len(present)} of the {len(dropped)} keys GC "
                f"{gc.number} drops are there"
            )
        elif present == dropped and dropped:
            message.append(f"GC {gc.number} not applied (all {len(dropped)} dropped keys there)")
        elif dropped:
            message.append(f"GC {gc.number} applied (its {len(dropped)} dropped keys are gone)")
        if not gc_may_commit:
            message.append("but that GC was held in its walk: it cannot have committed")
    allowed = outcome.old + outcome.new
    missing = {k for k in reference if k not in seen and all(k in s for s in allowed)}
    extra = {k for k in seen if all(k not in s for s in allowed)}
    wrong = {k for k in seen if all(k in s and s[k] != seen[k] for s in allowed) and k in reference}
    message.append(
        f"{len(missing)} keys present in every allowed state missing "
        f"(e.g. {[k.hex()[:12] for k in sorted(missing)[:3]]}), "
        f"{len(extra)} keys in no allowed state "
        f"(e.g. {[k.hex()[:12] for k in sorted(extra)[:3]]}), "
        f"{len(wrong)} wrong values"
    )
    pytest.fail("reloaded content is none of the allowed states: " + "; ".join(message))


# --------------------------------------------------------------------------
# rounds


@dataclass
class Plan:
    how: str  # "lines", "sleep", "walking", "done"
    amount: float = 0
    walk_round: int = -1
    done_round: int = -1


def parent_gc(kind: str, directory: Path, state: State) -> State:
    """Run a synchronous GC on the recovered store, as the child would; return the content."""
    head = head_of(state)
    if head is None:
        return state
    options = {"cache_size": 4} if kind == "indexed" else {}
    with CLASSES[kind].load(directory, Mode.READ_WRITE, index_buffer_size=7, **options) as store:

        def follow(key: bytes, value: Any) -> bytes | None:
            if height(key) <= height(head) - KEEP + 1:
                return None
            pred = value[0][:32] if kind == "indexed" else value
            return None if pred == ZERO else pred

        store.gc(Chain(head, follow), background=False)
    kept = reach(kind, state, head)
    return {k: v for k, v in state.items() if k in kept}


def kill_round(
    tmp_path: Path, directory: Path, kind: str, seed: str, plan: Plan, before: State, gc_after: bool
) -> State:
    stderr_path = tmp_path / f"child-{seed}.stderr"
    stderr_path.write_bytes(b"")  # this round's alone
    child = Child(WRITER, [directory, seed, kind, 7, KEEP, plan.walk_round], stderr_path)
    try:
        if plan.how == "lines":
            child.wait_for(lambda: len(child.lines) >= plan.amount)
        elif plan.how == "sleep":
            time.sleep(plan.amount)
        elif plan.how == "walking":
            walking = f"walking {plan.walk_round}"
            waiting = f"gc wait {plan.walk_round}"
            child.wait_for(lambda: child.seen(walking))
            start = child.acks
            child.wait_for(lambda: child.acks >= start + plan.amount or child.seen(waiting))
        elif plan.how == "done":
            child.wait_for(lambda: child.seen(f"gc done {plan.done_round}"))
        else:
            raise AssertionError(plan)
    finally:
        code = child.kill()
    assert code == -signal.SIGKILL, f"child died on its own ({code}):\n{child.stderr()}"
    try:
        return check_round(directory, kind, seed, plan, before, gc_after, child.lines)
    except Exception as error:  # AssertionError, pytest's Failed, a load error
        raise AssertionError(f"{error}\nchild stderr:\n{child.stderr()}") from error


def check_round(
    directory: Path,
    kind: str,
    seed: str,
    plan: Plan,
    before: State,
    gc_after: bool,
    lines: list[str],
) -> State:
    """The checks after a kill (see the module docstring); returns the content."""
    # the plan was carried out (otherwise: the child stalled, a deadlock?)
    if plan.how == "lines":
        assert len(lines) >= plan.amount, f"the child stalled after {len(lines)} lines"
    if plan.how == "walking":
        assert f"walking {plan.walk_round}" in lines, "the GC never reached its walk"
    if plan.how == "done":
        assert f"gc done {plan.done_round}" in lines, "the GC never reported done"

    outcome = replay(kind, before, lines)
    files = snapshot(directory)
    seen, _ = observe(kind, directory, Mode.READ_ONLY, outcome.probes)
    assert snapshot(directory) == files, "a READ_ONLY load changed the files"
    which = check_outcome(outcome, seen, gc_may_commit=plan.how != "walking")
    # shown by pytest when a later check fails
    print(
        f"round {seed}: plan {plan}, {len(lines)} lines, {outcome.acked} acked, "
        f"{outcome.completed_gcs} GCs done, GC in flight: "
        f"{outcome.gc.number if outcome.gc else None} -> {which}, {len(seen)} keys"
    )

    recovered, _ = observe(kind, directory, Mode.READ_WRITE, outcome.probes)
    assert recovered == seen, "READ_WRITE recovery and READ_ONLY load disagree"
    check_files_at_rest(kind, directory)
    if gc_after:
        # the recovered store runs a GC and closes cleanly; it gives back the space
        expected = parent_gc(kind, directory, seen)
        after, live_bytes = observe(kind, directory, Mode.READ_WRITE, outcome.probes)
        assert after == expected, "the GC after recovery kept the wrong bindings"
        floor = check_files_at_rest(kind, directory)
        if kind == "indexed":
            numbers = values_numbers(directory)
            assert len(numbers) <= 2 and min(numbers) == floor, numbers
            total = sum(p.stat().st_size for p in directory.glob("values.*"))
            assert total <= 2 * FILE_HEADER_SIZE + live_bytes, (total, live_bytes)
        seen = after
    return seen


def make_plan(rng: random.Random, number: int) -> Plan:
    if number % 5 == 3:
        return Plan("walking", rng.randint(0, 8), walk_round=rng.randint(0, 2))
    if number % 5 == 4:
        return Plan("done", done_round=rng.randint(0, 3))
    if rng.random() < 0.7:
        return Plan("lines", rng.randint(1, 400))
    # from the spawn: before the load, during recovery, or mid-rounds
    return Plan("sleep", rng.uniform(0.0, 0.5))


@pytest.mark.parametrize("kind", KIND_IDS)
def test_gc_survives_sigkill(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "store"
    rng = random.Random(f"gc-crash-{kind}")
    state: State = {}
    for number in range(18):
        plan = make_plan(rng, number)
        state = kill_round(
            tmp_path,
            directory,
            kind,
            seed=f"{kind}-{number}",
            plan=plan,
            before=state,
            gc_after=number % 3 == 2,
        )
    assert head_of(state) is not None and height(head_of(state)) > 20, (
        "the kills came too early to test anything"
    )
    # a last clean session: the store is still fully usable
    expected = parent_gc(kind, directory, state)
    assert observe(kind, directory, Mode.READ_WRITE, set(state))[0] == expected
    check_files_at_rest(kind, directory)


@pytest.mark.parametrize("kind", KIND_IDS)
def test_gc_killed_in_its_walk_keeps_the_old_content(tmp_path: Path, kind: str) -> None:
    """Kills while the GC is known to be in its walk: never the new content, never a mix."""
    directory = tmp_path / "store"
    rng = random.Random(f"gc-walk-{kind}")
    state: State = {}
    for number in range(4):
        plan = Plan("walking", rng.randint(0, 12), walk_round=number % 3)
        state = kill_round(
            tmp_path, directory, kind, f"walk-{kind}-{number}", plan, state, gc_after=number == 3
        )


@pytest.mark.parametrize("kind", KIND_IDS)
def test_gc_killed_right_after_done_is_applied(tmp_path: Path, kind: str) -> None:
    """Kills right after ``gc done``: that GC is applied, whatever follows it."""
    directory = tmp_path / "store"
    rng = random.Random(f"gc-done-{kind}")
    state: State = {}
    for number in range(4):
        plan = Plan("done", done_round=rng.randint(0, 2))
        # replay() applies every GC whose "gc done" was printed: only a later
        # GC may be in flight, and its old content has the done one applied
        state = kill_round(
            tmp_path, directory, kind, f"done-{kind}-{number}", plan, state, gc_after=number == 3
        )
