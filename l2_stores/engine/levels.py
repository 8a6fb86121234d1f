"""Which runs a store holds, and which of them to merge next.

A run holds the bindings of a contiguous range of log generations: the run
``lo..hi`` is what logs ``lo`` to ``hi`` left, newest binding of each key
first. The runs of a store tile the generations below its oldest live log
with no gap and no overlap, so a lookup reads the logs, then the runs from
the highest ``hi`` down, and stops at the first that knows the key.

Names are the manifest: a merge writes ``lo..hi`` for the runs it covers,
renames it into place, then deletes them. A listing that holds a run and
runs it contains is a merge cut short after its rename: the covering run
wins and the contained ones are superseded.

**Policy: tiered, by width.** A run's width is its number of log
generations. The first run of a log has width 1; ``FAN_IN`` adjacent runs
of equal width merge into one of ``FAN_IN`` times that width. The runs then
count the frozen logs in base ``FAN_IN``: at most ``FAN_IN - 1`` runs of each
width, ``log_FAN_IN(logs)`` widths, and a binding is rewritten once a
width: O(log N) writes, where one data file rewritten at every merge costs
O(N) (mirage/index #299). A run of another width (a GC's, a converted data
file) merges with nothing until a later one matches it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

FAN_IN = 8


@dataclass(frozen=True, order=True)
class Span:
    """The log generations ``lo`` .. ``hi`` (both included) that a run holds."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"run span {self.lo}..{self.hi}")

    @property
    def width(self) -> int:
        """How many log generations the span holds."""
        return self.hi - self.lo + 1

    def contains(self, other: Span) -> bool:
        """Whether ``other`` lies within this span."""
        return self.lo <= other.lo and other.hi <= self.hi


class TilingError(ValueError):
    """Runs that overlap without one containing the other, or leave a gap."""


def live_and_superseded(found: Iterable[Span]) -> tuple[list[Span], list[Span]]:
    """The runs to read (oldest first) and the runs a later merge superseded.

    Raises :class:`TilingError` when the live runs overlap or leave a gap.
    """
    live: list[Span] = []
    superseded: list[Span] = []
    # Widest first among equal starts, so a covering run comes before what it covers.
    for span in sorted(set(found), key=lambda s: (s.lo, -s.hi)):
        if live and live[-1].contains(span):
            superseded.append(span)
            continue
        if live and span.lo != live[-1].hi + 1:
            last = live[-1]
            what = "overlap" if span.lo <= last.hi else "leave a gap"
            raise TilingError(f"runs {last.lo}..{last.hi} and {span.lo}..{span.hi} {what}")
        live.append(span)
    return live, superseded


def merges(
    live: Sequence[Span], busy: Collection[Span] = (), fan_in: int = FAN_IN
) -> list[list[Span]]:
    """Groups of ``fan_in`` adjacent runs of equal width, none ``busy``, to merge now.

    ``live`` is oldest first. The groups are disjoint; within a width the
    oldest runs go first.
    """
    if fan_in < 2:
        raise ValueError(f"fan-in {fan_in}")
    groups: list[list[Span]] = []
    streak: list[Span] = []
    for span in live:
        if span in busy or (streak and span.width != streak[0].width):
            streak = []
        if span in busy:
            continue
        streak.append(span)
        if len(streak) == fan_in:
            groups.append(streak)
            streak = []
    return groups


def merged(group: Sequence[Span]) -> Span:
    """The span of the run that merging ``group`` (adjacent, oldest first) writes."""
    return Span(group[0].lo, group[-1].hi)
