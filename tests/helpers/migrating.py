"""Stores of the migration tests, and a child that migrates one and may be killed.

Run as ``python migrating.py KIND DIRECTORY``: it migrates the store of
``KIND`` (``indexable``, ``indexed`` or ``singleton``) made by ``build`` at
``DIRECTORY`` from its old class to its new one, slowed at each binding and
around the switch so that a kill can land anywhere, and prints ``done``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import construct

if __name__ == "__main__":  # run as a script: the repository's tests package on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from l2_stores import (
    make_indexable,
    make_indexed_file,
    make_singleton,
    migrate,
)
from l2_stores.engine import filesystem

BINDINGS = 300
OLD: dict[str, Any] = {
    "indexable": make_indexable("levels", construct.Int32ul, construct.Bytes(8)),
    "indexed": make_indexable("blocks", construct.Int32ub, construct.Bytes(8)),
    "singleton": make_singleton("head", construct.Int32ul),
}
# (a singleton of the same size: a value read by the other class would be wrong, not refused)
NEW: dict[str, Any] = {
    "indexable": make_indexable("levels", construct.Int32ub, construct.Bytes(8)),
    "indexed": make_indexed_file(
        "blocks", construct.Int32ub, construct.GreedyBytes, construct.Bytes(2)
    ),
    "singleton": make_singleton("head", construct.Int32ub),
}


def build(kind: str, path: Path) -> None:
    """The old store of ``kind`` at ``path``."""
    if kind == "singleton":
        with OLD[kind].load(path) as head:
            head.write(41)
        return
    with OLD[kind].load(path, index_buffer_size=64) as store:
        for key in range(BINDINGS):
            store.add(key, key.to_bytes(8, "big"))


def convert(kind: str, key: Any, value: Any) -> tuple[Any, Any] | None:
    """The conversion of the tests: odd keys are dropped; an indexed file gets a header."""
    if kind == "singleton":
        return key, value + 1
    if key % 2:
        return None
    return (key, (value * 2, value[:2])) if kind == "indexed" else (key, value)


def old_state(kind: str) -> dict[Any, Any]:
    if kind == "singleton":
        return {None: 41}
    return {key: key.to_bytes(8, "big") for key in range(BINDINGS)}


def new_state(kind: str) -> dict[Any, Any]:
    found = {}
    for key, value in old_state(kind).items():
        converted = convert(kind, key, value)
        if converted is not None:
            found[converted[0]] = converted[1]
    return found


def read(cls: Any, path: Path) -> dict[Any, Any]:
    """What the store of ``cls`` at ``path`` holds (READ_ONLY)."""
    from l2_stores import Mode

    with cls.load(path, Mode.READ_ONLY) as store:
        if hasattr(store, "items"):
            return dict(store.items())
        return {None: store.read()}


class SlowSwitch(filesystem.OsFileSystem):
    """Says when the switch's steps come (the parent may kill at one) and widens them."""

    def exchange(self, first: str, second: str) -> None:
        print("switching", flush=True)
        time.sleep(0.02)
        super().exchange(first, second)
        print("switched", flush=True)
        time.sleep(0.02)

    def rename(self, source: str, target: str) -> None:
        print(f"renaming {Path(target).name}", flush=True)
        time.sleep(0.01)
        super().rename(source, target)
        print(f"renamed {Path(target).name}", flush=True)
        time.sleep(0.01)


def main(kind: str, path: str) -> None:
    def slow_convert(key: Any, value: Any) -> tuple[Any, Any] | None:
        time.sleep(0.0002)
        return convert(kind, key, value)

    print("migrating", flush=True)
    with filesystem.installed(SlowSwitch()):
        migrate(OLD[kind], NEW[kind], path, slow_convert, progress=False)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
