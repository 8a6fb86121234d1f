"""Child process for tests/test_batches.py: commit block batches over three stores until
killed.

Usage: batch_writer.py DIR SEED BUFFER N_BATCHES KILL [fsync]

Batch n (1, 2, ...) writes ``levels[n] = level_hash(n)``, appends ``block(n)`` (1-8 KiB)
with header ``n`` for ``level_hash(n)`` to the indexed file ``blocks``, and writes
``messages[n] = message(n)`` and removes ``messages[n - 3]``, and writes the singleton
``head`` = ``(n, level_hash(n))``. KILL is
``none``, or ``journal:K`` / ``part:K``: SIGKILL itself in batch K's commit once its
journal record is written / once the first store took its part.

Prints, flushing stdout after each line: ``ready``, then ``ack N`` after each commit,
then ``done``; then waits for stdin EOF.
"""

import hashlib
import os
import signal
import sys

import construct

import l2_stores
from l2_stores import make_indexable, make_indexable_removable, make_indexed_file, make_singleton

Levels = make_indexable("levels", construct.Int32ub, construct.Bytes(32))
Blocks = make_indexed_file("blocks", construct.Bytes(32), construct.GreedyBytes, construct.Int32ub)
Messages = make_indexable_removable("messages", construct.Int32ub, construct.Bytes(8))
Head = make_singleton(
    "head", construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))
)


def level_hash(n: int) -> bytes:
    return hashlib.sha256(b"level %d" % n).digest()


def block(n: int) -> bytes:
    digest = hashlib.sha256(b"block %d" % n).digest()
    return digest * (32 + digest[0] % 224)  # 1 to 8 KiB


def message(n: int) -> bytes:
    return hashlib.sha256(b"message %d" % n).digest()[:8]


def load(directory: str, buffer: int, fsync: bool, head: bool = True) -> tuple:
    """The stores of a node: levels, blocks, messages, and the head unless not ``head``."""
    options = {"index_buffer_size": buffer, "fsync": fsync}
    stores = (
        Levels.load(os.path.join(directory, "levels"), **options),
        Blocks.load(os.path.join(directory, "blocks"), **options),
        Messages.load(os.path.join(directory, "messages"), **options),
    )
    if head:
        stores += (Head.load(os.path.join(directory, "head"), fsync=fsync),)
    return stores


def check(directory: str, acked: int, with_head: bool = True) -> int:
    """Load the stores and check that every batch is whole or absent, in commit order,
    each of the first ``acked`` there; return the number of batches found."""
    stores = load(directory, 10_000, False, with_head)
    levels, blocks, messages, *heads = stores
    try:
        found = max(levels.keys(reverse=True), default=0)
        assert found >= acked, (found, acked)
        assert list(levels.keys()) == list(range(1, found + 1))
        for n in range(1, found + 1):
            assert levels.find(n) == level_hash(n)
            assert blocks.read(level_hash(n)) == (block(n), n)
        assert blocks.read(level_hash(found + 1)) is None
        assert len(blocks) == found
        assert dict(messages.items()) == {
            n: message(n) for n in range(max(1, found - 2), found + 1)
        }
        for head in heads:
            written = head.read()
            if found:
                assert (written.level, written.hash) == (found, level_hash(found))
            else:
                assert written is None
    finally:
        for store in stores:
            store.close()
    return found


def commit_block(batch: l2_stores.Batch, n: int) -> None:
    """Write block ``n`` in ``batch`` (over the stores of ``load``) and commit it."""
    levels_b, blocks_b, messages_b, *head_b = batch.views
    levels_b.add(n, level_hash(n))
    blocks_b.append(level_hash(n), block(n), n)
    messages_b.add(n, message(n))
    if n > 3:
        messages_b.remove(n - 3)
    for head in head_b:
        head.write({"level": n, "hash": level_hash(n)})
    batch.commit()


def main() -> None:
    directory, _seed, buffer, n_batches, kill = sys.argv[1:6]
    fsync = sys.argv[6:7] == ["fsync"]
    stores = load(directory, int(buffer), fsync)
    levels = stores[0]
    start = max(levels.keys(reverse=True), default=0) + 1
    print("ready", flush=True)
    mode, _, at = kill.partition(":")
    for n in range(start, start + int(n_batches)):
        batch = l2_stores.batch(*stores)
        if mode != "none" and n == int(at):
            point = {"journal": "journal_written", "ended": "part_ended"}.get(mode, "part_taken")
            batch.hooks.add(point, lambda: os.kill(os.getpid(), signal.SIGKILL))
        commit_block(batch, n)
        print(f"ack {n}", flush=True)
    print("done", flush=True)
    sys.stdin.read()
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
