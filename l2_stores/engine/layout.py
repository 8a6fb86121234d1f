"""Names of the files in an index directory, and what a listing of it holds.

An index directory holds::

    lock                 the writer lock (see ``lock``)
    data.<generation>    the sorted data file of that generation (``datafile``)
    log.<generation>     a log of bindings added after data.<generation> (``log``)
    *.tmp                a data file being written by a merge, or a log being
                         created or prepared ahead for the next freeze;
                         deleted at the next writer load

Generations are decimal, zero-padded to eight digits. ``data.G`` holds every
binding of the logs of generations below G; the live bindings are those of
the newest data file, updated by the logs of its generation and above, in
order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

LOCK = "lock"
_DATA = "data."
_LOG = "log."
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


@dataclass
class Listing:
    """The engine files found in a directory."""

    data: list[int] = field(default_factory=list)
    logs: list[int] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    @property
    def data_generation(self) -> int:
        """Generation of the newest data file, 0 when there is none."""
        return max(self.data, default=0)


def _generation(name: str, prefix: str) -> int | None:
    digits = name[len(prefix) :]
    return int(digits) if digits.isdigit() else None


def scan(directory: str) -> Listing:
    """List the engine files of ``directory`` (other files are left alone)."""
    listing = Listing()
    for name in os.listdir(directory):
        if name.startswith((_DATA, _LOG)) and name.endswith(_TMP):
            listing.temporaries.append(name)
        elif name.startswith(_DATA) and (generation := _generation(name, _DATA)) is not None:
            listing.data.append(generation)
        elif name.startswith(_LOG) and (generation := _generation(name, _LOG)) is not None:
            listing.logs.append(generation)
    listing.data.sort()
    listing.logs.sort()
    return listing
