"""Stores of every kind for tests/test_cli.py, and a child that holds them open.

Imported by tests/test_cli.py (through importlib) and run as a script:

    cli_zoo.py hold DIR [REL...]   load every zoo store under DIR (or only those
                                   at the relative paths REL) READ_WRITE, print
                                   ``ready``, wait for stdin EOF, close, print
                                   ``closed``.

``build(root)`` writes the zoo with the library's public API and returns what
it holds: for each store (path relative to ``root``), the live bindings as
encoded bytes: ``{key: value}`` (indexable), ``{key: (header, value)}``
(indexed file), ``{b"": value}`` (singleton).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
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


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def short_digest(value: bytes) -> bytes:
    return sha256(value)[:4]


Head = make_singleton("head", construct.Int64ub)
Meta = make_singleton("meta", construct.GreedyBytes)
Plain = make_indexable("plain", KEY, construct.Bytes(8))
Removable = make_indexable_removable("removable", KEY, construct.Int32ub)
BlockHeader = construct.Struct("level" / construct.Int32ub, "predecessor" / construct.Bytes(32))
Blocks = make_indexed_file("blocks", KEY, construct.GreedyBytes, BlockHeader)
Simple = make_simple_indexed_file(
    "simple", KEY, construct.GreedyBytes, construct.Bytes(4), short_digest
)
Nested = make_indexable("nested", construct.Int32ub, construct.Bytes(16))

# relative path -> (class, kind as in `info --json`)
STORES: dict[str, tuple[Any, str]] = {
    "head": (Head, "singleton"),
    "meta": (Meta, "singleton"),
    "plain": (Plain, "indexable"),
    "removable": (Removable, "indexable"),
    "blocks": (Blocks, "indexed_file"),
    "simple": (Simple, "indexed_file"),
    "sub/nested": (Nested, "indexable"),
}
HEAD_VALUE = 12345
META_VALUE = b"hello, layer 2"
BUFFER = 16  # small index buffer: merges happen, data files exist


def plain_key(i: int) -> bytes:
    return sha256(b"plain %d" % i)


def removable_key(i: int) -> bytes:
    return sha256(b"removable %d" % i)


def block_key(i: int) -> bytes:
    return sha256(b"block %d" % i)


def block_payload(i: int, version: int = 0) -> bytes:
    return (b"%d:%d|" % (i, version)) * (1 + (i * 37) % 60)


def build(root: Path) -> dict[str, dict[bytes, Any]]:
    """Write the zoo under ``root``; return its live bindings, encoded."""
    expected: dict[str, dict[bytes, Any]] = {}

    with Head.load(root / "head") as head:
        head.write(HEAD_VALUE)
    expected["head"] = {b"": Head.value_codec.build(HEAD_VALUE)}
    with Meta.load(root / "meta") as meta:
        meta.write(b"first value")
        meta.write(META_VALUE)
    expected["meta"] = {b"": META_VALUE}

    plain: dict[bytes, bytes] = {}
    with Plain.load(root / "plain", index_buffer_size=BUFFER) as store:
        for i in range(200):
            store.add(plain_key(i), i.to_bytes(8, "big"))
            plain[plain_key(i)] = i.to_bytes(8, "big")
        keep = [plain_key(i) for i in range(150)]
        store.gc(Retain(keep), background=False)
        plain = {k: plain[k] for k in keep}
        for i in range(0, 40, 2):  # overwrites after the GC
            store.add(plain_key(i), (1000 + i).to_bytes(8, "big"))
            plain[plain_key(i)] = (1000 + i).to_bytes(8, "big")
    expected["plain"] = plain

    removable: dict[bytes, bytes] = {}
    with Removable.load(root / "removable", index_buffer_size=BUFFER) as store:
        for i in range(120):
            store.add(removable_key(i), i)
            removable[removable_key(i)] = i.to_bytes(4, "big")
        for i in range(0, 120, 3):
            store.remove(removable_key(i))
            del removable[removable_key(i)]
        store.remove(sha256(b"never added"))
        for i in range(0, 15, 3):  # removed, then added again
            store.add(removable_key(i), 7000 + i)
            removable[removable_key(i)] = (7000 + i).to_bytes(4, "big")
    expected["removable"] = removable

    blocks: dict[bytes, tuple[bytes, bytes]] = {}
    with Blocks.load(root / "blocks", index_buffer_size=BUFFER) as store:

        def append(i: int, version: int = 0) -> None:
            header = {"level": i, "predecessor": block_key(i - 1)}
            payload = block_payload(i, version)
            store.append(block_key(i), payload, header)
            blocks[block_key(i)] = (BlockHeader.build(header), payload)

        for i in range(150):
            append(i)
        keep = [block_key(i) for i in range(75, 150)]
        store.gc(Retain(keep), background=False)
        blocks = {k: blocks[k] for k in keep}
        for i in range(150, 180):
            append(i)
        for i in range(100, 105):  # a later append for the same key wins
            append(i, version=1)
    expected["blocks"] = blocks

    simple: dict[bytes, tuple[bytes, bytes]] = {}
    with Simple.load(root / "simple") as store:
        for i in range(80):
            key = sha256(b"simple %d" % i)
            value = b"simple value %d " % i * (1 + i % 7)
            store.append(key, value)
            simple[key] = (short_digest(value), value)
    expected["simple"] = simple

    nested: dict[bytes, bytes] = {}
    with Nested.load(root / "sub" / "nested", index_buffer_size=BUFFER) as store:
        for i in range(40):
            value = sha256(b"nested %d" % i)[:16]
            store.add(i, value)
            nested[i.to_bytes(4, "big")] = value
    expected["sub/nested"] = nested
    return expected


def read_back(cls: Any, kind: str, path: Path) -> dict[bytes, Any]:
    """The live bindings of the store at ``path``, loaded READ_ONLY, encoded like ``build``."""
    found: dict[bytes, Any] = {}
    if kind == "singleton":
        with cls.load(path, Mode.READ_ONLY) as store:
            value = store.read()
            if value is not None:
                found[b""] = cls.value_codec.build(value)
        return found
    with cls.load(path, Mode.READ_ONLY) as store:
        for key, value in store.items():
            encoded_key = cls.key_codec.build(key)
            assert encoded_key not in found, f"items() gave {encoded_key.hex()} twice"
            if kind == "indexed_file":
                payload, header = value
                found[encoded_key] = (
                    cls.header_codec.build(header),
                    cls.value_codec.build(payload),
                )
            else:
                found[encoded_key] = cls.value_codec.build(value)
    return found


def hold(root: Path, only: list[str]) -> None:
    stores = [
        cls.load(root / rel, Mode.READ_WRITE)
        for rel, (cls, _) in STORES.items()
        if not only or rel in only
    ]
    print("ready", flush=True)
    sys.stdin.read()
    for store in stores:
        store.close()
    print("closed", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(Path(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
