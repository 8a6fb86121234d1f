"""Typed use of the stores that mypy --strict accepts (tests/test_typing.py)."""

import construct

from l2_stores import (
    IndexableStore,
    IndexedFile,
    SingletonStore,
    aio,
    make_indexable,
    make_indexed_file,
    make_singleton,
)

Levels: type[IndexableStore[int, bytes]] = make_indexable(
    "levels", construct.Int32ub, construct.Bytes(32)
)
Blocks: type[IndexedFile[bytes, bytes, int]] = make_indexed_file(
    "blocks", construct.Bytes(32), construct.GreedyBytes, construct.Int32ub
)
Head: type[SingletonStore[int]] = make_singleton("head", construct.Int32ub)


def levels_from(levels: IndexableStore[int, bytes], first: int) -> list[int]:
    levels.add(first, b"x" * 32)
    found: bytes | None = levels.find(first)
    assert found == levels[first] == levels.get(first)
    return list(levels.keys(start=first))


def header_of(blocks: IndexedFile[bytes, bytes, int], key: bytes) -> int | None:
    blocks.append(key, b"value", 7)
    pair: tuple[bytes, int] | None = blocks.read(key)
    assert pair is None or pair[1] == 7
    return blocks.header(key)


def level_of(head: SingletonStore[int]) -> int | None:
    head.write(3)
    return head.read()


async def async_level(path: str) -> bytes | None:
    levels = await aio.load(Levels, path)
    await levels.add(1, b"x" * 32)
    found: bytes | None = await levels.find(1)
    await levels.close()
    return found


async def async_header(path: str) -> int | None:
    async with aio.open(Blocks, path) as blocks:
        await blocks.append(b"k" * 32, b"value", 7)
        return await blocks.header(b"k" * 32)
