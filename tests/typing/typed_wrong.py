"""Typed use of the stores with mistakes that mypy --strict must report
(tests/test_typing.py): one error on each line marked ``# wrong``, two where
``# wrong twice``."""

import construct

from l2_stores import IndexableStore, SingletonStore, aio, make_indexable, make_singleton

Levels: type[IndexableStore[int, bytes]] = make_indexable(
    "levels", construct.Int32ub, construct.Bytes(32)
)
Head: type[SingletonStore[int]] = make_singleton("head", construct.Int32ub)


def mistakes(levels: IndexableStore[int, bytes], head: SingletonStore[int]) -> str | None:
    levels.add("not an int", 5)  # wrong twice: the key and the value
    head.write("x")  # wrong: the head is an int
    return levels.find(1)  # wrong: a value is bytes


async def async_mistake(path: str) -> None:
    levels = await aio.load(Levels, path)
    await levels.add(1, "not bytes")  # wrong: the value is bytes


async def async_open_mistake(path: str) -> None:
    async with aio.open(Head, path) as head:
        await head.write("x")  # wrong: the head is an int
