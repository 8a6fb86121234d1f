"""Named points where tests step into the engine (as mirage/index's ``Private.Hook``).

An engine runs its hooks at each point it reaches; by default there are
none and a point costs one dict lookup on the slow paths only (never on a
put or a find). Tests hold a flush back, fail a step or count them by
adding an action at a point, instead of patching module globals::

    index.hooks.add("flush_write", lambda: release.wait())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

#: The points, in the order a flush or a run merge reaches them:
#: ``create_log``: the writer, freezing a log, creates the next one itself (no
#: spare was prepared); an action that raises fails the freeze;
#: ``prepare_spare``: a flush's helper thread, before it prepares the next
#: spare log; an action that raises is a failed preparation;
#: ``flush_write``: a flush's thread, before it writes the frozen log's run;
#: ``flush_renamed``: a flush's thread (a GC's too), once its run is renamed into
#: place, before it opens it; an action that raises is a run that cannot be opened;
#: ``merge_write``: a run merge's thread, before it writes the merged run;
#: ``delete``: before superseded files are deleted (outside the exclusive section).
#: A batch's commit (``batches.Batch.hooks``): ``part_written``: after each store
#: writes its part without its end (readers in; an action that raises is a failed
#: write: the batch gives up); ``journal_written``: its record
#: is in the journal, no store has ended its part; ``part_ended``: after each
#: store writes its part's end in its files (readers still in); ``part_taken``:
#: after each store binds its part in memory.
Point = Literal[
    "create_log",
    "prepare_spare",
    "flush_write",
    "flush_renamed",
    "merge_write",
    "delete",
    "part_written",
    "journal_written",
    "part_ended",
    "part_taken",
]
POINTS: tuple[Point, ...] = get_args(Point)


class Hooks:
    """The actions to run at each point of one engine."""

    def __init__(self) -> None:
        self._actions: dict[str, list[Callable[[], object]]] = {}

    def add(self, point: Point, action: Callable[[], object]) -> None:
        """Run ``action`` every time the engine reaches ``point`` (an error it raises
        is the step's)."""
        if point not in POINTS:
            raise ValueError(f"no hook point {point!r}; the points are {', '.join(POINTS)}")
        self._actions.setdefault(point, []).append(action)

    def clear(self) -> None:
        """Remove every action."""
        self._actions.clear()

    def run(self, point: Point) -> None:
        """Run the actions of ``point``, in the order they were added."""
        for action in self._actions.get(point, ()):
            action()
