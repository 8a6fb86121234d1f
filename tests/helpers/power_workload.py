"""The writes of the power-loss tests, and the model their results are checked against.

A workload is a list of operations made from a seed alone (so a parent can
rebuild what its child did from the seed and the lines it printed). Running
it reports ``begin i`` and ``ack i`` around operation ``i`` and tracks how far
the writes are known durable. After a power loss, a store must hold the
model's state after some prefix of the operations (API.md, "Durability"): at
least every operation acknowledged as durable (``fsync=True``), at most every
operation begun, with each GC of the prefix either committed whole or not at
all, and every GC known finished committed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct

from l2_stores import (
    Mode,
    Retain,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)

KEY = construct.Bytes(32)
KEYS = [hashlib.sha256(b"key %d" % number).digest() for number in range(48)]


def sha256(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


CLASSES: dict[str, Any] = {
    "indexable": make_indexable("pl_indexable", KEY, construct.Bytes(32)),
    "removable": make_indexable_removable("pl_removable", KEY, construct.Bytes(32)),
    "indexed": make_indexed_file("pl_indexed", KEY, construct.GreedyBytes, construct.Bytes(32)),
    "simple": make_simple_indexed_file(
        "pl_simple", KEY, construct.GreedyBytes, construct.Bytes(32), sha256
    ),
    "singleton": make_singleton("pl_singleton", construct.GreedyBytes),
}
KINDS = list(CLASSES)
INDEXED = ("indexed", "simple")

Op = tuple[Any, ...]


def operations(kind: str, seed: int, count: int) -> list[Op]:
    """``count`` operations for a store of ``kind``, a function of ``seed`` alone."""
    rng = random.Random(f"{kind} {seed}")
    ops: list[Op] = []
    gc_running_since: int | None = None
    unflushed = 0
    while len(ops) < count:
        if kind == "singleton":
            if rng.random() < 0.1:
                ops.append(("delete",))
            else:
                ops.append(("write", rng.randbytes(rng.randint(0, 300))))
            continue
        if gc_running_since is not None and len(ops) - gc_running_since > rng.randint(4, 30):
            ops.append(("wait_gc",))
            gc_running_since = None
            continue
        roll = rng.random()
        if gc_running_since is None and roll < 0.01:  # close makes everything durable
            ops.append(("reopen",))
            unflushed = 0
            continue
        if unflushed and (roll < 0.15 or unflushed > 12):
            ops.append(("flush",))
            unflushed = 0
            continue
        flush = rng.random() < 0.85
        if not flush:
            unflushed += 1
        key = rng.choice(KEYS)
        if gc_running_since is None and roll > 0.97:
            keep = frozenset(rng.sample(KEYS, rng.randint(0, len(KEYS) // 2)))
            ops.append(("gc", keep))
            gc_running_since = len(ops)
        elif kind == "removable" and roll < 0.3:
            ops.append(("remove", key, flush))
        elif kind in INDEXED:
            ops.append(("add", key, rng.randbytes(rng.choice((0, 1, 40, 700, 2500))), flush))
        else:
            ops.append(("add", key, rng.randbytes(32), flush))
    if gc_running_since is not None:
        ops.append(("wait_gc",))
    if unflushed:
        ops.append(("flush",))
    return ops


@dataclass
class Progress:
    """How far a run got: operations begun, acknowledged, and known durable."""

    kind: str
    fsync: bool
    begun: int = 0
    acked: int = 0
    #: Operations whose effect is known durable (fsync=True).
    durable: int = 0
    #: GCs known finished (``wait_gc_completion`` returned).
    gcs_done: int = 0
    _unflushed: bool = False

    def begin(self, number: int) -> None:
        """Operation ``number`` starts."""
        self.begun = number + 1

    def ack(self, number: int, op: Op) -> None:
        """Operation ``number``, ``op``, returned."""
        self.acked = number + 1
        name = op[0]
        if name in ("add", "remove") and not op[-1]:
            self._unflushed = True
        flushed = name in ("flush", "write", "delete") or (name in ("add", "remove") and op[-1])
        if flushed and self.fsync and (name == "flush" or not self._unflushed):
            self.durable = number + 1
        if name == "reopen":  # whatever fsync says, a close makes everything durable
            self.durable = number + 1
        if name in ("flush", "reopen"):
            self._unflushed = False
        if name == "wait_gc":
            self.gcs_done += 1


def run(
    store: Any,
    ops: list[Op],
    progress: Progress,
    report: Callable[[str], None] | None = None,
    reopen: Callable[[], Any] | None = None,
) -> Any:
    """Apply ``ops`` to ``store``, keeping ``progress`` up to date (and reporting lines).

    A ``reopen`` closes the store and loads it again with ``reopen()``.
    Returns the store, open.
    """
    kind = progress.kind
    for number, op in enumerate(ops):
        progress.begin(number)
        if report is not None:
            report(f"begin {number}")
        name = op[0]
        if name == "add":
            _, key, value, flush = op
            if kind == "indexed":
                store.append(key, value, sha256(value), flush=flush)
            elif kind == "simple":
                store.append(key, value, flush=flush)
            else:
                store.add(key, value, flush=flush)
        elif name == "remove":
            store.remove(op[1], flush=op[2])
        elif name == "flush":
            store.flush()
        elif name == "gc":
            store.gc(Retain(sorted(op[1])), background=True)
        elif name == "wait_gc":
            assert store.wait_gc_completion(timeout=120), "GC did not finish"
        elif name == "write":
            store.write(op[1])
        elif name == "delete":
            store.delete()
        elif name == "reopen" and reopen is not None:
            store.close()
            store = reopen()
        progress.ack(number, op)
        if report is not None:
            report(f"ack {number}")
    return store


def parse_report(lines: list[str], progress: Progress, ops: list[Op]) -> Progress:
    """``progress`` brought up to date with the lines a child printed (as ``run`` reports)."""
    for line in lines:
        word, _, number = line.partition(" ")
        if word == "begin":
            progress.begin(int(number))
        elif word == "ack":
            progress.ack(int(number), ops[int(number)])
    return progress


# -- the model


def _apply(state: dict[bytes, bytes], op: Op, committed: bool) -> None:
    name = op[0]
    if name == "add":
        state[op[1]] = op[2]
    elif name == "remove":
        state.pop(op[1], None)
    elif name == "gc" and committed:
        for key in [key for key in state if key not in op[1]]:
            del state[key]
    elif name == "write":
        state[b""] = op[1]
    elif name == "delete":
        state.pop(b"", None)


def matching_prefix(
    content: dict[bytes, bytes],
    ops: list[Op],
    *,
    low: int,
    high: int,
    gcs_done: int,
) -> tuple[int, int] | None:
    """``(prefix, GCs committed)`` whose model state is ``content``, or None.

    The prefix is at least ``low`` and at most ``high`` operations; the GCs
    committed are the first ones of the prefix, at least ``gcs_done``.
    """
    gc_positions = [number for number, op in enumerate(ops[:high]) if op[0] == "gc"]
    for committed in range(gcs_done, len(gc_positions) + 1):
        first = low if committed == 0 else max(low, gc_positions[committed - 1] + 1)
        state: dict[bytes, bytes] = {}
        gc_seen = 0
        for prefix in range(high + 1):
            if prefix >= first and state == content:
                return prefix, committed
            if prefix == high:
                break
            op = ops[prefix]
            if op[0] == "gc":
                gc_seen += 1
            _apply(state, op, op[0] == "gc" and gc_seen <= committed)
    return None


def describe_mismatch(content: dict[bytes, bytes], ops: list[Op], high: int) -> str:
    """A short account of how ``content`` differs from the state after ``high`` operations."""
    state: dict[bytes, bytes] = {}
    for op in ops[:high]:
        _apply(state, op, True)
    missing = sorted(key.hex()[:8] for key in state.keys() - content.keys())
    extra = sorted(key.hex()[:8] for key in content.keys() - state.keys())
    different = sorted(
        key.hex()[:8] for key in state.keys() & content.keys() if state[key] != content[key]
    )
    return f"vs all {high} ops with GCs: missing {missing}, extra {extra}, different {different}"


def store_content(store: Any, kind: str) -> dict[bytes, bytes]:
    """What ``store`` holds, every value read back (and its header checked)."""
    if kind == "singleton":
        value = store.read()
        return {} if value is None else {b"": value}
    content: dict[bytes, bytes] = {}
    for key, item in store.items():
        if kind in INDEXED:
            value, header = item
            assert header == sha256(value), f"header of {key.hex()} does not match its value"
            content[key] = value
        else:
            content[key] = item
    return content


def load(kind: str, path: str, mode: Mode = Mode.READ_WRITE, **options: Any) -> Any:
    """Load the workload's store of ``kind`` at ``path``."""
    cls = CLASSES[kind]
    if kind == "singleton":
        return cls.load(path, mode)
    return cls.load(path, mode, **options)


def store_path(root: str, kind: str) -> str:
    """Where the workload's store lives under ``root``."""
    return f"{root}/{kind}"


def whole_lines(text: str) -> list[str]:
    """The whole lines of a child's output (a last line cut short by the kill is dropped)."""
    return text.split("\n")[:-1]
