"""A small rollup node's storage, built from the library's own factories.

It stores a chain of L2 blocks (hash -> level and predecessor), the level ->
hash map, a removable store of pending messages and the head, then closes,
reopens and checks everything. Run again on the same directory, it resumes
from the head.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import construct as c

from .factories import make_indexable, make_indexable_removable, make_singleton
from .mode import Mode

Hash = c.Bytes(32)
BlockInfo = c.Struct("level" / c.Int32ub, "predecessor" / Hash)
Head = c.Struct("level" / c.Int32ub, "hash" / Hash)

Blocks = make_indexable("blocks", Hash, BlockInfo)
LevelsToHashes = make_indexable("levels_to_hashes", c.Int32ub, Hash)
PendingMessages = make_indexable_removable("pending_messages", Hash, c.Int32ub)
HeadStore = make_singleton("head", Head)

GENESIS = bytes(32)


def block_hash(level: int) -> bytes:
    """The (deterministic) hash of the demo's block at ``level``."""
    return hashlib.blake2b(level.to_bytes(4, "big"), digest_size=32).digest()


def message_hash(level: int) -> bytes:
    """The hash of the message included at ``level``."""
    return hashlib.blake2b(b"msg" + level.to_bytes(4, "big"), digest_size=32).digest()


@dataclass
class DemoReport:
    """What a demo run did."""

    directory: str
    first_level: int
    last_level: int
    seconds: float
    verified_blocks: int
    pending_messages: int
    bytes_on_disk: int

    def lines(self) -> list[str]:
        """The report as printable lines."""
        added = self.last_level - self.first_level + 1
        rate = added / self.seconds if self.seconds > 0 else 0.0
        return [
            f"directory        {self.directory}",
            f"blocks added     {added} (levels {self.first_level}..{self.last_level})",
            f"blocks/s         {rate:,.0f}",
            f"verified blocks  {self.verified_blocks} after close and reload",
            f"pending messages {self.pending_messages}",
            f"bytes on disk    {self.bytes_on_disk:,}",
        ]


def _disk_usage(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def run(directory: str = "l2-demo-data", blocks: int = 2000) -> DemoReport:
    """Add ``blocks`` blocks after the current head, reopen and verify the whole chain."""
    started = time.perf_counter()
    with (
        HeadStore.load(os.path.join(directory, "head")) as head,
        Blocks.load(os.path.join(directory, "blocks")) as block_store,
        LevelsToHashes.load(os.path.join(directory, "levels_to_hashes")) as levels,
        PendingMessages.load(os.path.join(directory, "pending_messages")) as pending,
    ):
        current = head.read()
        first = current.level + 1 if current is not None else 0
        predecessor = current.hash if current is not None else GENESIS
        for level in range(first, first + blocks):
            hashed = block_hash(level)
            block_store.add(hashed, {"level": level, "predecessor": predecessor})
            levels.add(level, hashed)
            pending.add(message_hash(level), level, flush=False)
            if level >= 10:  # messages are included ten levels later
                pending.remove(message_hash(level - 10), flush=False)
            pending.flush()
            head.write({"level": level, "hash": hashed})
            predecessor = hashed
    seconds = time.perf_counter() - started
    last = first + blocks - 1
    verified = verify(directory, last)
    with PendingMessages.load(os.path.join(directory, "pending_messages"), Mode.READ_ONLY) as p:
        pending_count = len(list(p.keys()))
    return DemoReport(
        directory, first, last, seconds, verified, pending_count, _disk_usage(directory)
    )


def verify(directory: str, last_level: int) -> int:
    """Walk the chain from the head back to genesis; return the blocks checked."""
    with (
        HeadStore.load(os.path.join(directory, "head"), Mode.READ_ONLY) as head,
        Blocks.load(os.path.join(directory, "blocks"), Mode.READ_ONLY) as block_store,
        LevelsToHashes.load(os.path.join(directory, "levels_to_hashes"), Mode.READ_ONLY) as levels,
    ):
        current = head.read()
        if current is None or current.level != last_level:
            raise AssertionError(f"head is {current}, level {last_level} expected")
        hashed, checked = current.hash, 0
        for level in range(last_level, -1, -1):
            block = block_store.find(hashed)
            if block is None or block.level != level or levels.find(level) != hashed:
                raise AssertionError(f"block at level {level} missing or wrong")
            hashed, checked = block.predecessor, checked + 1
        if hashed != GENESIS:
            raise AssertionError("the chain does not end at genesis")
        return checked
