"""Child process for tests/test_gc_crash.py: grow a chain of blocks and GC it until killed.

Usage: gc_writer.py DIR SEED KIND BUFFER KEEP WALK_ROUND

KIND is ``plain`` (make_indexable), ``removable`` (make_indexable_removable),
both Bytes(32) -> Bytes(32), or ``indexed`` (make_indexed_file, GreedyBytes
values, Bytes(32) headers: the value's sha256).

Keys: a block is ``b"B" + height (4 bytes, big-endian) + 27 random bytes``,
a side binding (never reachable) ``b"S" + 31 random bytes``. A block's value
names its predecessor: the value itself (indexable kinds), or its first 32
bytes followed by a random payload of 0 to 3000 bytes (indexed). The genesis
block's predecessor is 32 zero bytes.

The child loads the store (its head: the highest block in it; a genesis block
if there is none), then loops over rounds: a few writes, a background
``gc(Chain(head, next))`` keeping the last KEEP blocks, more writes while it
runs (in odd rounds, on until ``is_gc_finished()``, at most 200),
``wait_gc_completion()``. Writes are new blocks on the head, adds and
overwrites of side bindings, and (``removable``) removes of side bindings and
of blocks just below the head, all with flush=True. With WALK_ROUND >= 0, the
GC of that round blocks for ever in its first ``next`` call, after printing
``walking``: a kill then lands while the GC is known to be in its walk.

Prints, flushing stdout after each line (lines never interleave):
    ready                            after the store is loaded
    begin add <khex> <vhex>          just before add (indexable kinds)
    begin add <khex> <predhex> <sha256hex>   just before append (indexed)
    ack add <khex>                   after it returned
    begin remove <khex> / ack remove <khex>
    gc call <round> <headhex>        just before gc()
    gc returned <round>              after gc() returned
    walking <round>                  from the GC's thread, in next (WALK_ROUND only)
    gc wait <round>                  just before wait_gc_completion()
    gc done <round>                  after it returned
    done                             after the last round; then waits for stdin EOF
"""

import hashlib
import random
import sys
import threading
from typing import Any

import construct

from l2_stores import Chain, Mode, make_indexable, make_indexable_removable, make_indexed_file

KEY = construct.Bytes(32)
ZERO = bytes(32)
ROUNDS = 400
MAX_STEPS_WHILE_GC = 200
_print_lock = threading.Lock()


def sha256(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def store_class(kind: str) -> Any:
    """Same classes as in tests/test_gc_crash.py."""
    if kind == "removable":
        return make_indexable_removable("gc_crash_removable", KEY, construct.Bytes(32))
    if kind == "indexed":
        return make_indexed_file(
            "gc_crash_indexed", KEY, construct.GreedyBytes, construct.Bytes(32)
        )
    return make_indexable("gc_crash_plain", KEY, construct.Bytes(32))


def height(key: bytes) -> int:
    return int.from_bytes(key[1:5], "big")


def predecessor(kind: str, value: Any) -> bytes:
    """The predecessor named by what the store gives ``next``."""
    if kind == "indexed":
        stored, header = value
        assert sha256(stored) == header, "next got a value that does not match its header"
        return stored[:32]
    return value


def keep_last(kind: str, head: bytes, keep: int) -> Any:
    """``next`` for the Chain from ``head`` keeping ``keep`` blocks (same as the parent's)."""
    lowest = height(head) - keep + 1

    def follow(key: bytes, value: Any) -> bytes | None:
        if height(key) <= lowest:
            return None
        pred = predecessor(kind, value)
        return None if pred == ZERO else pred

    return follow


def emit(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Writer:
    def __init__(self, store: Any, kind: str, rng: random.Random) -> None:
        self.store = store
        self.kind = kind
        self.rng = rng
        keys = list(store.keys())
        self.blocks = {height(k): k for k in keys if k[:1] == b"B"}
        self.side = sorted(k for k in keys if k[:1] == b"S")
        self.head = self.blocks[max(self.blocks)] if self.blocks else None

    def add(self, key: bytes, pred_or_value: bytes) -> None:
        if self.kind == "indexed":
            value = pred_or_value + self.rng.randbytes(self.rng.randrange(0, 3000))
            digest = sha256(value)
            emit(f"begin add {key.hex()} {pred_or_value.hex()} {digest.hex()}")
            self.store.append(key, value, digest)
        else:
            emit(f"begin add {key.hex()} {pred_or_value.hex()}")
            self.store.add(key, pred_or_value)
        emit(f"ack add {key.hex()}")

    def remove(self, key: bytes) -> None:
        emit(f"begin remove {key.hex()}")
        self.store.remove(key)
        emit(f"ack remove {key.hex()}")

    def new_block(self) -> None:
        pred = self.head if self.head is not None else ZERO
        level = height(self.head) + 1 if self.head is not None else 0
        key = b"B" + level.to_bytes(4, "big") + self.rng.randbytes(27)
        self.add(key, pred)
        self.blocks[level] = key
        self.head = key

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5 or self.head is None:
            self.new_block()
        elif self.kind == "removable" and roll < 0.65 and self.side:
            self.remove(self.side.pop(rng.randrange(len(self.side))))
        elif self.kind == "removable" and roll < 0.68 and self.head is not None:
            below = self.blocks.get(height(self.head) - 2)
            if below is not None:
                self.remove(below)  # the chain breaks there: later GCs keep less
            else:
                self.new_block()
        elif roll < 0.8 and self.side:
            key = self.side[rng.randrange(len(self.side))]  # overwrite (or re-add)
            self.add(key, ZERO if self.kind == "indexed" else rng.randbytes(32))
        else:
            key = b"S" + rng.randbytes(31)
            self.side.append(key)
            self.add(key, ZERO if self.kind == "indexed" else rng.randbytes(32))


def main() -> None:
    directory, seed, kind, buffer, keep, walk_round = sys.argv[1:7]
    cls = store_class(kind)
    options: dict[str, int] = {"index_buffer_size": int(buffer)}
    if kind == "indexed":
        options["cache_size"] = 8
    store = cls.load(directory, Mode.READ_WRITE, **options)
    emit("ready")
    rng = random.Random(seed)
    writer = Writer(store, kind, rng)
    if writer.head is None:
        writer.new_block()
    for number in range(ROUNDS):
        for _ in range(rng.randint(2, 10)):
            writer.step()
        head = writer.head
        assert head is not None
        follow = keep_last(kind, head, int(keep))
        if number == int(walk_round):
            inner = follow

            def follow(key: bytes, value: Any, inner: Any = inner, number: int = number) -> Any:
                emit(f"walking {number}")
                threading.Event().wait()  # for ever: the parent kills the child
                return inner(key, value)

        emit(f"gc call {number} {head.hex()}")
        store.gc(Chain(head, follow))
        emit(f"gc returned {number}")
        for _ in range(rng.randint(0, 10)):
            writer.step()
        if number % 2:
            # write on until the GC is seen finished: kills then also land
            # after its commit and before "gc done"
            for _ in range(MAX_STEPS_WHILE_GC):
                if store.is_gc_finished():
                    break
                writer.step()
        emit(f"gc wait {number}")
        store.wait_gc_completion()
        emit(f"gc done {number}")
    emit("done")
    sys.stdin.read()  # wait to be killed


if __name__ == "__main__":
    main()
