"""The ``demo`` command: a small rollup node's storage, built from the library's factories.

Blocks (a simple indexed file), the level -> hash map, the pending messages
(removable) and the head (a singleton) are written block by block, each
block in one atomic batch, while reader threads look up recent blocks
through snapshots of the stores and background GCs keep the last ``keep``
levels. Then every store is closed, reopened read-only and checked through
one snapshot. Run again on the same directory, the demo resumes from the
head.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import construct as c

from .batches import batch
from .errors import StoreError
from .factories import (
    make_indexable,
    make_indexable_removable,
    make_simple_indexed_file,
    make_singleton,
)
from .gc import Chain, Retain
from .mode import Mode
from .progress import Progress
from .snapshots import snapshot
from .stores.indexable import IndexableStore
from .stores.indexed_file import SimpleIndexedFile

Hash = c.Bytes(32)
BlockHeader = c.Struct("level" / c.Int32ub, "predecessor" / Hash)
Block = c.Struct("level" / c.Int32ub, "predecessor" / Hash, "payload" / c.GreedyBytes)
Head = c.Struct("level" / c.Int32ub, "hash" / Hash)


def header_of(block: Any) -> dict[str, Any]:
    """The header of a block: its level and predecessor."""
    return {"level": block["level"], "predecessor": block["predecessor"]}


Blocks = make_simple_indexed_file("blocks", Hash, Block, BlockHeader, header_of)
LevelsToHashes = make_indexable("levels_to_hashes", c.Int32ub, Hash)
PendingMessages = make_indexable_removable("pending_messages", Hash, c.Int32ub)
HeadStore = make_singleton("head", Head)

GENESIS = bytes(32)
MESSAGE_DELAY = 10  # a message is included, and removed, this many levels later


def block_hash(level: int) -> bytes:
    """The hash of the demo's block at ``level``."""
    return hashlib.blake2b(b"block" + level.to_bytes(4, "big"), digest_size=32).digest()


def message_hash(level: int) -> bytes:
    """The hash of the message received at ``level``."""
    return hashlib.blake2b(b"msg" + level.to_bytes(4, "big"), digest_size=32).digest()


def payload(level: int) -> bytes:
    """The block's payload: 100 B to 4 KiB of pseudo-random bytes, fixed by ``level``."""
    seed = hashlib.blake2b(b"payload" + level.to_bytes(4, "big")).digest()
    return hashlib.shake_128(seed).digest(100 + int.from_bytes(seed[:4], "big") % 3997)


def predecessor_hash(level: int) -> bytes:
    """The hash the block at ``level`` should point back to."""
    return block_hash(level - 1) if level > 0 else GENESIS


@dataclass
class DemoReport:
    """What a demo run did, measured and verified."""

    directory: str
    first_level: int
    last_level: int
    ingest_seconds: float
    lookups: int
    gc_runs: int
    gc_skipped: int
    gc_seconds: float
    bytes_before_gc: int | None
    bytes_after_gc: int
    peak_rss_kib: int
    verified: bool
    problem: str = ""
    chain: tuple[int, int] | None = None  # lowest and highest level verified

    def lines(self) -> list[str]:
        """The report as a printable table."""
        added = self.last_level - self.first_level + 1
        seconds = max(self.ingest_seconds, 1e-9)
        gc_mean = self.gc_seconds / self.gc_runs if self.gc_runs else 0.0
        skipped = f"; {self.gc_skipped} skipped, one was running" if self.gc_skipped else ""
        if self.bytes_before_gc is None:
            disk = f"{self.bytes_after_gc:,} (no GC ran)"
        else:
            disk = f"{self.bytes_before_gc:,} before GC / {self.bytes_after_gc:,} after GC"
        if self.verified and self.chain is not None:
            verdict = f"passed (chain of levels {self.chain[0]}..{self.chain[1]})"
        else:
            verdict = f"FAILED: {self.problem}"
        rows = [
            ("directory", self.directory),
            ("blocks added", f"{added} (levels {self.first_level}..{self.last_level})"),
            ("blocks/s", f"{added / seconds:,.0f}"),
            ("lookups/s", f"{self.lookups / seconds:,.0f} ({self.lookups:,} lookups)"),
            ("GC runs", f"{self.gc_runs} (blocks and levels_to_hashes each{skipped})"),
            ("GC time", f"{self.gc_seconds:.3f} s total, {gc_mean:.3f} s mean"),
            ("bytes on disk", disk),
            ("peak RSS", f"{self.peak_rss_kib / 1024:,.1f} MiB"),
            ("verification", verdict),
        ]
        return [f"{name:<15} {value}" for name, value in rows]


def _disk_usage(directory: str) -> int:
    """Total size of the files under ``directory`` (files deleted meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _check_arguments(**values: int) -> None:
    minimums = {"blocks": 1, "gc_every": 1, "keep": 1, "readers": 0}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimums[name]:
            raise ValueError(f"{name} must be an integer >= {minimums[name]}, got {value!r}")


class _Readers:
    """Threads looking up random recent blocks until stopped; they count and check results.

    A block in ``[max(low, head - keep + 1), head]`` must be found: every GC
    started at a head ``h <= head`` keeps levels from ``h - keep + 1`` on. A
    miss is excused only if the head moved on so far that a GC may have
    dropped the level since it was picked.
    """

    def __init__(
        self,
        count: int,
        blocks: SimpleIndexedFile[Any, Any, Any],
        levels: IndexableStore[Any, Any],
        keep: int,
        window: tuple[int, int],
    ) -> None:
        self._low, self.head = window
        self._keep = keep
        self._blocks, self._levels = blocks, levels
        self._stop = threading.Event()
        self.lookups = [0] * count
        self.problems: list[str] = []
        self._threads = [
            threading.Thread(target=self._serve, args=(i,), name=f"demo reader {i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self, number: int) -> None:
        chooser = random.Random(number)
        try:
            while not self._stop.is_set():
                head = self.head
                low = max(self._low, head - self._keep + 1)
                if head < low:
                    time.sleep(0.001)
                    continue
                level = chooser.randint(low, head)
                wrong = self._lookup(level)
                if wrong is not None and level >= self.head - self._keep + 1:
                    self.problems.append(f"reader: block at level {level}: {wrong}")
                    return
                self.lookups[number] += 4
                time.sleep(0)  # hand the GIL over: a spinning reader would starve the writer
        except StoreError as error:
            self.problems.append(f"reader: {error}")

    def _lookup(self, level: int) -> str | None:
        hashed = block_hash(level)
        with snapshot(self._blocks, self._levels) as (blocks, levels):  # one moment of both
            header = blocks.header(hashed)
            if header is None or header.level != level:
                return f"header() gave {header}"
            found = blocks.read(hashed)
            if found is None or found[0].level != level:
                return "read() gave no block or a wrong one"
            if not blocks.mem(hashed):
                return "mem() is False"
            if levels.find(level) != hashed:
                return "levels_to_hashes.find() disagrees"
        return None

    def stop(self) -> int:
        """Stop the threads; the number of lookups they served."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return sum(self.lookups)


class _GcRounds:
    """Background GC rounds (blocks by Chain, levels_to_hashes by Retain), one at a time.

    A round due while the previous one runs is skipped, as the library would
    ignore it; both stores are collected at the same head, so they keep the
    same levels.
    """

    def __init__(
        self,
        directory: str,
        blocks: SimpleIndexedFile[Any, Any, Any],
        levels: IndexableStore[Any, Any],
        keep: int,
    ) -> None:
        self._directory, self._blocks, self._levels, self._keep = directory, blocks, levels, keep
        self._watcher: threading.Thread | None = None
        self._failure: StoreError | None = None
        self.runs = self.skipped = 0
        self.seconds = 0.0
        self.last_head: int | None = None
        self.bytes_before: int | None = None

    def due(self, head: int) -> None:
        """Start a round keeping the levels ``head - keep + 1 .. head``, unless one runs."""
        if self._watcher is not None and self._watcher.is_alive():
            self.skipped += 1
            return
        self._raise_failure()
        if self.bytes_before is None:
            self.bytes_before = _disk_usage(self._directory)
        floor = max(0, head - self._keep + 1)

        def older(_key: bytes, entry: tuple[Any, Any]) -> bytes | None:
            level: int = entry[1].level
            predecessor: bytes = entry[1].predecessor
            return predecessor if level > floor else None

        started = time.perf_counter()
        self._blocks.gc(Chain(block_hash(head), older))
        self._levels.gc(Retain(range(floor, head + 1)))
        self._watcher = threading.Thread(target=self._watch, args=(started,), daemon=True)
        self._watcher.start()
        self.runs += 1
        self.last_head = head

    def _watch(self, started: float) -> None:
        try:
            self._blocks.wait_gc_completion()
            self._levels.wait_gc_completion()
        except StoreError as error:
            self._failure = error
        self.seconds += time.perf_counter() - started

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def finish(self) -> None:
        """Wait for the running round; raise ``GcFailed`` if a round failed."""
        if self._watcher is not None:
            self._watcher.join()
        self._raise_failure()


def _store_paths(directory: str) -> tuple[str, str, str, str]:
    join = os.path.join
    return (
        join(directory, "head"),
        join(directory, "blocks"),
        join(directory, "levels_to_hashes"),
        join(directory, "pending_messages"),
    )


def _recent_low(
    blocks: SimpleIndexedFile[Any, Any, Any], head: int, hashed: bytes, keep: int
) -> int:
    """The lowest of the last ``keep`` levels reachable from the head; ``head + 1`` if none."""
    level = head
    while level > head - keep and level >= 0:
        header = blocks.header(hashed)
        if header is None or header.level != level:
            break
        hashed, level = header.predecessor, level - 1
    return level + 1


def run(
    directory: str = "l2-demo-data",
    blocks: int = 2000,
    gc_every: int = 1000,
    keep: int = 500,
    readers: int = 2,
) -> DemoReport:
    """Add ``blocks`` blocks after the head, GC every ``gc_every``, reopen and verify."""
    _check_arguments(blocks=blocks, gc_every=gc_every, keep=keep, readers=readers)
    head_path, blocks_path, levels_path, pending_path = _store_paths(directory)
    with (
        HeadStore.load(head_path) as head,
        Blocks.load(blocks_path) as block_store,
        LevelsToHashes.load(levels_path) as levels,
        PendingMessages.load(pending_path) as pending,
    ):
        current = head.read()
        first = current.level + 1 if current is not None else 0
        predecessor = current.hash if current is not None else GENESIS
        low = _recent_low(block_store, first - 1, predecessor, keep)
        gc = _GcRounds(directory, block_store, levels, keep)
        lookers = _Readers(readers, block_store, levels, keep, (low, first - 1))
        started = time.perf_counter()
        try:
            with Progress("ingesting", total=blocks, unit="block") as progress:
                for level in range(first, first + blocks):
                    hashed = block_hash(level)
                    block = {"level": level, "predecessor": predecessor, "payload": payload(level)}
                    # One atomic step: a crash leaves all four writes or none.
                    with batch(block_store, levels, pending, head) as (
                        block_b,
                        levels_b,
                        pending_b,
                        head_b,
                    ):
                        block_b.append(hashed, block)
                        levels_b.add(level, hashed)
                        pending_b.add(message_hash(level), level)
                        if level >= MESSAGE_DELAY:
                            pending_b.remove(message_hash(level - MESSAGE_DELAY))
                        head_b.write({"level": level, "hash": hashed})
                    lookers.head, predecessor = level, hashed
                    if (level - first + 1) % gc_every == 0:
                        gc.due(level)
                    progress.update()
        finally:
            seconds = time.perf_counter() - started
            lookups = lookers.stop()
        gc.finish()
    last = first + blocks - 1
    problem = lookers.problems[0] if lookers.problems else None
    # The last GC kept the chain from its head back ``keep`` levels, or to where it stopped.
    floor = None if gc.last_head is None else max(low, gc.last_head - keep + 1)
    if problem is None:
        problem, chain = verify(directory, last, keep, floor)
    else:
        chain = None
    return DemoReport(
        directory=directory,
        first_level=first,
        last_level=last,
        ingest_seconds=seconds,
        lookups=lookups,
        gc_runs=gc.runs,
        gc_skipped=gc.skipped,
        gc_seconds=gc.seconds,
        bytes_before_gc=gc.bytes_before,
        bytes_after_gc=_disk_usage(directory),
        peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        verified=problem is None,
        problem=problem or "",
        chain=chain,
    )


def verify(
    directory: str, last_level: int, keep: int, floor: int | None = None
) -> tuple[str | None, tuple[int, int] | None]:
    """Reopen the stores read-only and check them; ``(problem or None, chain levels)``.

    ``floor``, when a GC ran, is the lowest level the last GC that ran kept,
    from the head at its start. Blocks and levels below it must be gone; all
    from it to the head must be there, since a GC also keeps what is added
    while it runs. So the window is not ``keep`` levels back from the final
    head: the blocks added during and after the last GC are all still there.
    """
    head_path, blocks_path, levels_path, pending_path = _store_paths(directory)
    with (
        HeadStore.load(head_path, Mode.READ_ONLY) as head_store,
        Blocks.load(blocks_path, Mode.READ_ONLY) as blocks_store,
        LevelsToHashes.load(levels_path, Mode.READ_ONLY) as levels_store,
        PendingMessages.load(pending_path, Mode.READ_ONLY) as pending_store,
        snapshot(head_store, blocks_store, levels_store, pending_store) as (
            head,
            block_store,
            levels,
            pending,
        ),
    ):
        current = head.read()
        if current is None:
            return "there is no head", None
        if (current.level, current.hash) != (last_level, block_hash(last_level)):
            found = f"level {current.level}, hash {current.hash.hex()[:16]}..."
            return f"the head is {found}; the block at level {last_level} expected", None
        keys = block_store.keys()  # a store is not iterable itself
        stored = sum(1 for _ in keys)
        with Progress("verifying", total=stored + (floor or 0), unit="block") as progress:
            problem, low = _verify_chain(block_store, levels, last_level, progress)
            if problem is None:
                problem = _verify_window(
                    block_store, last_level, low, stored, keep, floor, progress
                )
        if problem is None:
            problem = _verify_levels(levels, last_level, low, keep, floor)
        if problem is None:
            problem = _verify_pending(pending, last_level)
        return problem, (None if problem else (low, last_level))


def _verify_chain(
    block_store: SimpleIndexedFile[Any, Any, Any],
    levels: IndexableStore[Any, Any],
    head: int,
    progress: Progress,
) -> tuple[str | None, int]:
    """Walk back from the head while blocks are found; (problem, lowest level walked)."""
    level, hashed = head, block_hash(head)
    while level >= 0 and (found := block_store.read(hashed)) is not None:
        block, header = found
        want = predecessor_hash(level)
        expected = {"level": level, "predecessor": want}
        if header_of(block) != expected or header_of(header) != expected:
            return (
                f"block at level {level} does not follow block {level - 1}: it says level "
                f"{block.level}, predecessor {block.predecessor.hex()[:16]}... "
                f"(expected {want.hex()[:16]}...)",
                0,
            )
        if block.payload != payload(level):
            return f"block at level {level} has a wrong payload", 0
        bound = levels.find(level)
        if bound is not None and bound != hashed:
            return f"levels_to_hashes maps level {level} to {bound.hex()}, not the block", 0
        level, hashed = level - 1, block.predecessor
        progress.update()
    return None, level + 1


def _verify_window(
    block_store: SimpleIndexedFile[Any, Any, Any],
    head: int,
    low: int,
    stored: int,
    keep: int,
    floor: int | None,
    progress: Progress,
) -> str | None:
    """The chain holds every stored block, and the GC dropped exactly what it had to."""
    walked = head - low + 1
    if walked < min(keep, stored):
        return f"the chain from the head stops at level {low}: {walked} blocks, {stored} stored"
    if walked != stored:
        return f"{stored - walked} of {stored} stored blocks are not on the chain from the head"
    if floor is not None:
        if low > floor:
            return f"block at level {low - 1} is gone, but the last GC kept levels {floor}.."
        for level in range(floor):
            if block_store.mem(block_hash(level)):
                return f"block at level {level} is still stored; the last GC kept levels {floor}.."
            progress.update()
    return None


def _verify_levels(
    levels: IndexableStore[Any, Any], head: int, low: int, keep: int, floor: int | None
) -> str | None:
    """levels_to_hashes binds a contiguous range of levels up to the head, each to its block."""
    bound = dict(levels.items())
    if not bound:
        return "levels_to_hashes is empty"
    lowest = min(bound)
    if sorted(bound) != list(range(lowest, head + 1)):
        return f"levels_to_hashes does not bind exactly the levels {lowest}..{head}"
    wrong = next((level for level, hashed in bound.items() if hashed != block_hash(level)), None)
    if wrong is not None:
        return f"levels_to_hashes maps level {wrong} to a wrong hash"
    if lowest > max(low, head - keep + 1):
        return f"levels_to_hashes starts at level {lowest}, not by {max(low, head - keep + 1)}"
    if floor is not None and lowest != floor:
        return f"levels_to_hashes starts at level {lowest}; the last GC kept levels {floor}.."
    return None


def _verify_pending(pending: IndexableStore[Any, Any], head: int) -> str | None:
    """The pending messages are exactly those of the last ten levels."""
    expected = {message_hash(level): level for level in range(max(0, head - 9), head + 1)}
    found = dict(pending.items())
    if found != expected:
        return (
            f"pending_messages holds {len(found)} messages, "
            f"{len(expected)} expected (levels {max(0, head - 9)}..{head})"
        )
    return None
