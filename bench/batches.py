"""Benchmark of atomic batches beside LMDB and RocksDB write batches (not part of the tests).

    python bench/batches.py [--blocks N] [--fsync] [--json]

A block is 6 writes over 4 stores: the singleton head, the indexable
``levels`` (level -> hash), the removable ``messages`` (two adds, one
remove) and the indexed file ``blocks`` (hash -> a 1-8 KiB block with its
level as header). Each row writes N blocks in a fresh directory, in its own
subprocess:

- ``l2_stores plain``: the 6 writes, each with ``flush=True``;
- ``l2_stores batch``: one ``l2_stores.batch`` per block;
- ``lmdb txn``: one LMDB write transaction per block (4 named databases;
  ``sync``/``metasync`` as ``--fsync``);
- ``rocksdict batch``: one RocksDB ``WriteBatch`` per block (key prefixes
  for the 4 stores; ``WriteOptions.sync`` as ``--fsync``).

Reported: µs per block, blocks per second, and for l2_stores the fsyncs per
block (file and directory syncs counted at the engine's file-system seam).
Then snapshots: µs to take a snapshot of the 4 stores, and µs per ``find``
of a level through the snapshot and through the store (their ratio). Then
how long a commit keeps ``levels``' readers out (its exclusive section, less
the time it lets them in while it writes its journal record and its parts'
ends), median over more blocks, beside a plain ``levels.add``'s whole call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROWS = ["l2_stores plain", "l2_stores batch", "lmdb txn", "rocksdict batch"]


def block_of(n: int) -> tuple[bytes, bytes]:
    """Block ``n``: its hash and 1-8 KiB of content."""
    digest = hashlib.sha256(b"%d" % n).digest()
    return digest, digest * (32 + digest[0] % 224)


class CountingFileSystem:
    """The engine's file-system seam, counting fsyncs (files and directories)."""

    def __init__(self) -> None:
        from l2_stores.engine.filesystem import OsFileSystem

        class Counting(OsFileSystem):
            count = 0

            def fsync(self, fd: int) -> None:
                Counting.count += 1
                super().fsync(fd)

            def fsync_directory(self, path: str) -> None:
                Counting.count += 1
                super().fsync_directory(path)

        self.layer = Counting()

    @property
    def count(self) -> int:
        return type(self.layer).count  # type: ignore[attr-defined, no-any-return]


def l2_stores_writer(
    directory: str, fsync: bool, batched: bool
) -> tuple[Callable[[int], None], Callable[[], None], Any]:
    import construct

    import l2_stores

    levels_cls = l2_stores.make_indexable("levels", construct.Int32ub, construct.Bytes(32))
    messages_cls = l2_stores.make_indexable_removable(
        "messages", construct.Int64ub, construct.Bytes(32)
    )
    blocks_cls = l2_stores.make_indexed_file(
        "blocks", construct.Bytes(32), construct.GreedyBytes, construct.Int32ub
    )
    head_cls = l2_stores.make_singleton(
        "head", construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))
    )
    stores = (
        head_cls.load(os.path.join(directory, "head"), fsync=fsync),
        levels_cls.load(os.path.join(directory, "levels"), fsync=fsync),
        messages_cls.load(os.path.join(directory, "messages"), fsync=fsync),
        blocks_cls.load(os.path.join(directory, "blocks"), fsync=fsync),
    )

    def write(n: int, head: Any, levels: Any, messages: Any, blocks: Any) -> None:
        digest, content = block_of(n)
        levels.add(n, digest)
        blocks.append(digest, content, n)
        messages.add(2 * n, digest)
        messages.add(2 * n + 1, digest)
        messages.remove(2 * n - 2)
        head.write({"level": n, "hash": digest})

    if batched:

        def block(n: int) -> None:
            with l2_stores.batch(*stores) as views:
                write(n, *views)

    else:

        def block(n: int) -> None:
            write(n, *stores)

    def close() -> None:
        for store in stores:
            store.close()

    return block, close, stores


def lmdb_writer(directory: str, fsync: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    import lmdb

    env = lmdb.open(directory, map_size=1 << 36, max_dbs=4, sync=fsync, metasync=fsync)
    head, levels, messages, blocks = (env.open_db(name) for name in (b"h", b"l", b"m", b"b"))

    def block(n: int) -> None:
        digest, content = block_of(n)
        with env.begin(write=True) as txn:
            txn.put(n.to_bytes(4, "big"), digest, db=levels)
            txn.put(digest, n.to_bytes(4, "big") + content, db=blocks)
            txn.put((2 * n).to_bytes(8, "big"), digest, db=messages)
            txn.put((2 * n + 1).to_bytes(8, "big"), digest, db=messages)
            txn.delete((2 * n - 2).to_bytes(8, "big"), db=messages)
            txn.put(b"head", n.to_bytes(4, "big") + digest, db=head)

    return block, env.close


def rocksdict_writer(
    directory: str, fsync: bool
) -> tuple[Callable[[int], None], Callable[[], None]]:
    from rocksdict import Options, Rdict, WriteBatch, WriteOptions

    db = Rdict(directory, options=Options(raw_mode=True))
    options = WriteOptions()
    options.sync = fsync

    def block(n: int) -> None:
        digest, content = block_of(n)
        batch = WriteBatch(raw_mode=True)
        batch.put(b"l" + n.to_bytes(4, "big"), digest)
        batch.put(b"b" + digest, n.to_bytes(4, "big") + content)
        batch.put(b"m" + (2 * n).to_bytes(8, "big"), digest)
        batch.put(b"m" + (2 * n + 1).to_bytes(8, "big"), digest)
        batch.delete(b"m" + (2 * n - 2).to_bytes(8, "big"))
        batch.put(b"head", n.to_bytes(4, "big") + digest)
        db.write(batch, options)

    return block, db.close


def run_row(row: str, directory: str, blocks: int, fsync: bool) -> dict[str, Any]:
    counting = None
    if row.startswith("l2_stores"):
        from l2_stores.engine import filesystem

        counting = CountingFileSystem()
        installed = filesystem.installed(counting.layer)  # type: ignore[arg-type]
        installed.__enter__()
        block, close, stores = l2_stores_writer(directory, fsync, row.endswith("batch"))
    elif row == "lmdb txn":
        block, close = lmdb_writer(directory, fsync)
    else:
        block, close = rocksdict_writer(directory, fsync)
    before = counting.count if counting else 0
    start = time.perf_counter()
    for n in range(1, blocks + 1):
        block(n)
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "row": row,
        "block_us": elapsed / blocks * 1e6,
        "blocks_per_s": blocks / elapsed,
    }
    if counting is not None:
        result["fsyncs_per_block"] = (counting.count - before) / blocks
    if row == "l2_stores batch":
        result.update(snapshot_figures(stores, blocks))
        result.update(readers_held_figures(stores, block, blocks, min(blocks, 2000)))
    close()
    return result


class ReadersHeld:
    """A store's idle-waiter, timing how long each exclusive section keeps readers out
    (from its entry to its end, less the time it lets them in)."""

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter
        self.held: list[int] = []
        self._since = 0
        self._out = 0
        self._tasks_in = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.waiter, name)

    def force_idle(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def section() -> Any:
            with self.waiter.force_idle():
                self._out, self._since = 0, time.perf_counter_ns()
                self._tasks_in = False
                try:
                    yield
                finally:
                    if not self._tasks_in:
                        self._out += time.perf_counter_ns() - self._since
                    self.held.append(self._out)

        return section()

    def let_tasks_in(self) -> bool:
        let_in = bool(self.waiter.let_tasks_in())
        if let_in:
            self._out += time.perf_counter_ns() - self._since
            self._tasks_in = True
        return let_in

    def keep_tasks_out(self) -> None:
        self.waiter.keep_tasks_out()
        self._since = time.perf_counter_ns()
        self._tasks_in = False


def readers_held_figures(
    stores: Any, block: Callable[[int], None], blocks: int, rounds: int
) -> dict[str, Any]:
    """The median time a commit keeps ``levels``' readers out, over ``rounds`` more
    blocks, and the median whole call of as many plain ``levels.add``."""
    levels = stores[1]
    timing = ReadersHeld(levels._waiter)
    levels._waiter = timing
    try:
        for n in range(blocks + 1, blocks + rounds + 1):
            block(n)
    finally:
        levels._waiter = timing.waiter
    adds = []
    for n in range(10 * blocks, 10 * blocks + rounds):
        start = time.perf_counter_ns()
        levels.add(n, bytes(32))
        adds.append(time.perf_counter_ns() - start)
    return {
        "commit_holds_readers_us": sorted(timing.held)[len(timing.held) // 2] / 1e3,
        "plain_add_us": sorted(adds)[len(adds) // 2] / 1e3,
    }


def snapshot_figures(stores: Any, blocks: int) -> dict[str, Any]:
    import l2_stores

    head, levels, messages, blocks_store = stores
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        snapshot = l2_stores.snapshot(head, levels, messages, blocks_store)
        snapshot.close()
    take_us = (time.perf_counter() - start) / rounds * 1e6
    keys = [1 + (n * 7919) % blocks for n in range(20_000)]
    with l2_stores.snapshot(levels) as (view,):
        start = time.perf_counter()
        for key in keys:
            view.find(key)
        through_snapshot = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        levels.find(key)
    through_store = time.perf_counter() - start
    return {
        "snapshot_us": take_us,
        "snapshot_find_us": through_snapshot / len(keys) * 1e6,
        "store_find_us": through_store / len(keys) * 1e6,
        "snapshot_find_ratio": through_snapshot / through_store,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=int, default=5000)
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.dir, args.blocks, args.fsync)))
        return
    results = []
    for row in ROWS:
        scratch = tempfile.mkdtemp(prefix="bench-batches-", dir=os.environ.get("BENCH_DIR"))
        try:
            command = [sys.executable, __file__, "--row", row, "--dir", scratch]
            command += ["--blocks", str(args.blocks)] + (["--fsync"] if args.fsync else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.blocks} blocks, fsync={args.fsync}")
    for result in results:
        extra = ""
        if "fsyncs_per_block" in result:
            extra += f"  fsyncs/block {result['fsyncs_per_block']:.2f}"
        print(
            f"{result['row']:18} {result['block_us']:9.1f} µs/block "
            f"{result['blocks_per_s']:9.0f} blocks/s{extra}"
        )
    by_row = {result["row"]: result for result in results}
    batch, plain = by_row["l2_stores batch"], by_row["l2_stores plain"]
    print(f"batch / plain: {batch['block_us'] / plain['block_us']:.2f} (target <= 1.5)")
    for peer in ("lmdb txn", "rocksdict batch"):
        print(f"batch / {peer}: {batch['block_us'] / by_row[peer]['block_us']:.2f} (target < 1)")
    print(
        f"snapshot of 4 stores: {batch['snapshot_us']:.1f} µs (target <= 50); find through "
        f"it {batch['snapshot_find_us']:.2f} µs, on the store {batch['store_find_us']:.2f} µs: "
        f"{batch['snapshot_find_ratio']:.2f} (target <= 1.2)"
    )
    print(
        f"a commit keeps levels' readers out {batch['commit_holds_readers_us']:.1f} µs "
        f"(median), a plain levels.add takes {batch['plain_add_us']:.1f} µs whole: "
        f"{batch['commit_holds_readers_us'] / batch['plain_add_us']:.1f} (target <= 1)"
    )


if __name__ == "__main__":
    main()
