"""What a GC keeps: ``Retain`` (these keys) or ``Chain`` (a walk from a key)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class Retain:
    """Keep exactly the bindings of ``keys``; a key without a binding is skipped."""

    __slots__ = ("keys",)

    def __init__(self, keys: Iterable[Any]) -> None:
        self.keys: tuple[Any, ...] = tuple(keys)

    def __repr__(self) -> str:
        return f"Retain({len(self.keys)} keys)"


class Chain:
    """Keep ``first``, then ``next(key, value)``, until it returns None.

    For an indexed file ``value`` is ``(value, header)``. The walk also stops
    at a key without a binding (a removed one, in a removable store) and at a
    key it has already kept.
    """

    __slots__ = ("first", "next")

    def __init__(self, first: Any, next: Callable[[Any, Any], Any | None]) -> None:
        if not callable(next):
            raise TypeError(f"Chain: next must be callable, got {next!r}")
        self.first = first
        self.next = next

    def __repr__(self) -> str:
        return f"Chain(first={self.first!r}, next={self.next!r})"
