"""Child process for tests/test_indexed_file_crash.py: append to an indexed file until killed.

Usage: indexed_file_writer.py DIR SEED KIND BUFFER [N_OPS]

KIND is ``indexed`` (make_indexed_file, the header given at each append) or
``simple`` (make_simple_indexed_file, the header derived from the value).
Keys are Bytes(32), values GreedyBytes of 0 B to 64 KiB (sizes drawn
log-uniformly from SEED), headers Bytes(32): the sha256 of the value, so the
parent can check every pair it reads back. A third of the appends replace
the value of a key already in the store. Every append has flush=True.

Prints, flushing stdout after each line:
    ready                        after the store is loaded
    begin <khex>                 just before calling append
    ack <khex> <sha256 hex>      after append returned
    done                         after N_OPS appends; then waits for stdin EOF
"""

import hashlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import construct

from l2_stores import Mode, make_indexed_file, make_simple_indexed_file

KEY = construct.Bytes(32)
VALUE = construct.GreedyBytes
HEADER = construct.Bytes(32)
MAX_VALUE = 64 << 10


def sha256(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def store_class(kind: str) -> Any:
    """Same classes as in tests/test_indexed_file_crash.py."""
    if kind == "simple":
        return make_simple_indexed_file("crash_simple", KEY, VALUE, HEADER, sha256)
    return make_indexed_file("crash_indexed", KEY, VALUE, HEADER)


def appends(seed: str, known: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) of each append, in order; ``known``: the keys at load, sorted.

    The parent replays this to know the value of an append killed in flight.
    """
    rng = random.Random(seed)
    known = list(known)
    while True:
        if known and rng.random() < 0.33:
            key = known[rng.randrange(len(known))]
        else:
            key = rng.randbytes(32)
            known.append(key)
        size = min(MAX_VALUE, int(2 ** rng.uniform(0, 16.01)) - 1)
        yield key, rng.randbytes(size)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    directory, seed, kind, buffer = sys.argv[1:5]
    n_ops = int(sys.argv[5]) if len(sys.argv) > 5 else 1_000_000
    store = store_class(kind).load(
        directory, Mode.READ_WRITE, index_buffer_size=int(buffer), cache_size=8
    )
    emit("ready")
    sequence = appends(seed, sorted(store.keys()))
    for _ in range(n_ops):
        key, value = next(sequence)
        digest = sha256(value)
        emit(f"begin {key.hex()}")
        if kind == "simple":
            store.append(key, value)
        else:
            store.append(key, value, digest)
        emit(f"ack {key.hex()} {digest.hex()}")
    emit("done")
    sys.stdin.read()  # wait to be killed


if __name__ == "__main__":
    main()
