"""Smoke test of an installed l2_stores, run from outside the source tree (``.ci/run``).

    python tests/smoke_installed.py --accelerated yes|no

Every store kind is written, read, collected, batched, snapshotted, closed
and loaded again; the script checks that the package was imported from the
installation (not from the source tree) and that the accelerator is in use
or not, as told. It prints ``smoke ok`` and exits 0, or raises.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # tests/ itself: nothing of the package is there, keep it out anyway

import construct  # noqa: E402

import l2_stores  # noqa: E402
from l2_stores import (  # noqa: E402
    Chain,
    Mode,
    Retain,
    batch,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
    snapshot,
)

Hash = construct.Bytes(32)
Head = make_singleton("head", construct.Struct("level" / construct.Int32ub, "hash" / Hash))
Levels = make_indexable("levels", construct.Int32ub, Hash)
Pending = make_indexable_removable("pending", construct.Int32ub, construct.Bytes(8))
Blocks = make_indexed_file("blocks", Hash, construct.GreedyBytes, construct.Int32ub)
Messages = make_simple_indexed_file(
    "messages", construct.Int32ub, construct.GreedyBytes, construct.Bytes(1), lambda v: v[:1]
)


def block_hash(level: int) -> bytes:
    return level.to_bytes(4, "big") * 8


def write(root: Path) -> None:
    with (
        Head.load(root / "head") as head,
        Levels.load(root / "levels", index_buffer_size=64) as levels,
        Pending.load(root / "pending") as pending,
        Blocks.load(root / "blocks", index_buffer_size=64) as blocks,
        Messages.load(root / "messages") as messages,
    ):
        for level in range(1, 301):
            with batch(head, levels, blocks) as (head_b, levels_b, blocks_b):
                blocks_b.append(block_hash(level), b"payload" * level, level - 1)
                levels_b.add(level, block_hash(level))
                head_b.write({"level": level, "hash": block_hash(level)})
            pending.add(level, b"p" * 8)
            messages.append(level, b"m" + bytes(level % 200))
        for level in range(1, 201):
            pending.remove(level)
        with snapshot(head, levels, blocks) as (head_s, levels_s, blocks_s):
            top = head_s.read()
            assert top is not None and levels_s.find(top.level) == top.hash
            assert blocks_s.header(top.hash) == top.level - 1

        def predecessor(key: bytes, pair: tuple[bytes, int]) -> bytes | None:
            return block_hash(pair[1]) if pair[1] > 250 else None

        blocks.gc(Chain(block_hash(300), predecessor), background=False)
        levels.gc(Retain(range(251, 301)), background=False)
        assert blocks.stats().gc_runs == 1


def check(root: Path) -> None:
    with Head.load(root / "head", Mode.READ_ONLY) as head:
        top = head.read()
        assert top is not None and top.level == 300
    with Levels.load(root / "levels", Mode.READ_ONLY) as levels:
        assert list(levels.keys()) == list(range(251, 301))
        assert levels[300] == block_hash(300)
    with Pending.load(root / "pending", Mode.READ_ONLY) as pending:
        assert len(pending) == 100 and 200 not in pending and 201 in pending
    with Blocks.load(root / "blocks", Mode.READ_ONLY) as blocks:
        assert len(blocks) == 50
        assert blocks.read(block_hash(300)) == (b"payload" * 300, 299)
    with Messages.load(root / "messages", Mode.READ_ONLY) as messages:
        assert len(messages) == 300 and messages.header(7) == b"m"


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__)
    arguments.add_argument("--accelerated", choices=["yes", "no"], required=True)
    expected = arguments.parse_args().accelerated == "yes"
    location = Path(l2_stores.__file__).resolve()
    assert location.parent != SOURCE_TREE / "l2_stores", (
        f"imported from the source tree: {location}"
    )
    assert "site-packages" in location.parts, f"not an installed package: {location}"
    assert l2_stores.accelerated is expected, f"accelerated is {l2_stores.accelerated}"
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write(root)
        check(root)
    state = "with" if expected else "without"
    print(f"smoke ok: l2_stores {l2_stores.__version__} from {location.parent}, {state} C")
    print(f"(python {sys.version.split()[0]}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
