"""The stores of ``tests/data/format1.tar.gz`` and what they hold."""

from __future__ import annotations

import hashlib
import os

import construct

from l2_stores import make_indexable, make_indexable_removable, make_indexed_file

Blocks = make_indexable("blocks", construct.Bytes(32), construct.Bytes(32))
Levels = make_indexable_removable("levels", construct.Int32ub, construct.Bytes(32))
Messages = make_indexed_file(
    "messages", construct.Bytes(32), construct.GreedyBytes, construct.Int32ub
)
BINDINGS = 700
BUFFER = 200


def digest(*parts: object) -> bytes:
    """32 bytes that follow from ``parts``."""
    return hashlib.sha256(repr(parts).encode()).digest()


def blocks() -> dict[bytes, bytes]:
    """What the store ``blocks`` holds: the last write of each key wins."""
    return {digest("k", i % 500): digest("v", i) for i in range(BINDINGS)}


def levels() -> dict[int, bytes]:
    """What the store ``levels`` holds: levels 0..699, every seventh removed."""
    return {level: digest("l", level) for level in range(BINDINGS) if level % 7}


def messages() -> dict[bytes, tuple[bytes, int]]:
    """What the store ``messages`` holds."""
    return {digest("m", i): (digest("body", i) * (i % 5 + 1), i) for i in range(BINDINGS)}


def make_stores(directory: str) -> None:
    """Write the three stores under ``directory``: data files, and a log of 50 records
    or more written by a second session, each."""
    split = BINDINGS - 50
    for part in (range(split), range(split, BINDINGS)):
        with Blocks.load(os.path.join(directory, "blocks"), index_buffer_size=BUFFER) as store:
            for i in part:
                store.add(digest("k", i % 500), digest("v", i))
        with Levels.load(os.path.join(directory, "levels"), index_buffer_size=BUFFER) as store:
            for level in part:
                store.add(level, digest("l", level))
            for level in part:
                if level % 7 == 0:
                    store.remove(level)
        path = os.path.join(directory, "messages")
        with Messages.load(path, index_buffer_size=BUFFER) as store:
            for i in part:
                key = digest("m", i)
                store.append(key, *messages()[key])
