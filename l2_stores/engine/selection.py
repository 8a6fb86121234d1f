"""What a GC keeps: the retained keys, with new values where given, and the touched keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

from .run import sorted_in_steps


@dataclass(frozen=True)
class Selection:
    """What a GC merge keeps.

    ``retained`` maps each key reachable at the GC's start to a new value, or
    to None to keep its value; every ``touched`` key (written since the GC
    started) keeps its value whatever ``retained`` says; other keys are
    dropped. ``tag`` is the new run's tag.
    """

    retained: Mapping[bytes, bytes | None]
    touched: Set[bytes]
    tag: int

    def kept(
        self, logged: Mapping[bytes, bytes | None], lookup: Callable[[bytes], bytes | None]
    ) -> list[tuple[bytes, bytes]]:
        """The bindings kept, in key order: ``logged`` (the frozen log, removals as None)
        over ``lookup`` (the runs) gives each key's value as it is."""
        rows: list[tuple[bytes, bytes]] = []
        # Sorted a chunk at a time, and no explicit yield: Python's switch interval
        # lets other threads in (a time.sleep(0) every 256 keys cost up to a switch
        # interval each whenever another thread was busy: 5 s for a 1M-key GC's
        # 100K kept keys beside a reader, against 1 s alone).
        for key in sorted_in_steps(list(self.retained.keys() | self.touched)):
            value = None if key in self.touched else self.retained.get(key)
            if value is None:
                value = logged[key] if key in logged else lookup(key)
            if value is not None:
                rows.append((key, value))
        return rows
