"""Names of the files in an index directory, and what a listing of it holds.

An index directory holds::

    lock                 the writer lock (see ``lock``)
    run.<lo>-<hi>        a run: what the logs lo..hi left, sorted by key (``run``)
    log.<generation>     a log of bindings added after the runs (``log``)
    data.<generation>    a data file of the format before runs (``datafile``):
                         converted to the run 0..generation-1 at the first
                         writer load
    *.tmp                a run or data file being written, or a log being
                         created or prepared ahead for the next freeze;
                         deleted at the next writer load

Generations are decimal, zero-padded to eight digits. The live runs tile
the generations below D (``levels``), D the first live log; the live
bindings are those of the runs, newest first, updated by the logs of
generation D and above, in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .levels import Span

LOCK = "lock"
_DATA = "data."
_LOG = "log."
_RUN = "run."
_TMP = ".tmp"


def data_name(generation: int) -> str:
    """File name of the data file of ``generation``."""
    return f"{_DATA}{generation:08d}"


def log_name(generation: int) -> str:
    """File name of the log of ``generation``."""
    return f"{_LOG}{generation:08d}"


def temporary_name(generation: int) -> str:
    """File name of the data file of ``generation`` while it is written."""
    return data_name(generation) + _TMP


def run_name(span: Span) -> str:
    """File name of the run of ``span``."""
    return f"{_RUN}{span.lo:08d}-{span.hi:08d}"


def temporary_run_name(span: Span) -> str:
    """File name of the run of ``span`` while it is written."""
    return run_name(span) + _TMP


def _span(name: str) -> Span | None:
    lo, dash, hi = name[len(_RUN) :].partition("-")
    if not (dash and lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
        return None
    return Span(int(lo), int(hi))


@dataclass
class Listing:
    """The engine files found in a directory."""

    data: list[int] = field(default_factory=list)
    logs: list[int] = field(default_factory=list)
    runs: list[Span] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    @property
    def data_generation(self) -> int:
        """The first generation no run (or legacy data file) holds: 0 when there is none."""
        return max([*self.data, *(span.hi + 1 for span in self.runs)], default=0)


def _generation(name: str, prefix: str) -> int | None:
    digits = name[len(prefix) :]
    return int(digits) if digits.isdigit() else None


def scan(directory: str) -> Listing:
    """List the engine files of ``directory`` (other files are left alone)."""
    listing = Listing()
    for name in os.listdir(directory):
        if name.startswith((_DATA, _LOG, _RUN)) and name.endswith(_TMP):
            listing.temporaries.append(name)
        elif name.startswith(_RUN) and (span := _span(name)) is not None:
            listing.runs.append(span)
        elif name.startswith(_DATA) and (generation := _generation(name, _DATA)) is not None:
            listing.data.append(generation)
        elif name.startswith(_LOG) and (generation := _generation(name, _LOG)) is not None:
            listing.logs.append(generation)
    listing.data.sort()
    listing.logs.sort()
    listing.runs.sort()
    return listing
