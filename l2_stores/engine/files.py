"""An index directory's files, for tools: whether one is there, its sizes, its checks.

What the command-line tools (``info``, ``verify``, ``snapshot``) need to know
of an index directory without loading it, so that they never parse engine
files themselves: the engine owns its file names, headers and checkers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from . import datafile, journal, layout, log, run
from .framing import FORMAT_VERSION, HEADER_SIZE, FileHeader, Finding, parse_header

#: ``check(path, store_name)``: the findings of one file.
FileCheck = Callable[[str, str], Iterator[Finding]]


def index_lock(directory: str) -> str:
    """The path of the index's writer lock."""
    return os.path.join(directory, layout.LOCK)


def holds_index(directory: str) -> bool:
    """Whether ``directory`` holds an index (any of its files, or its lock; not a batch
    journal, which has a lock too)."""
    listing = layout.scan(directory)
    if listing.data or listing.logs or listing.runs:
        return True
    return os.path.isfile(os.path.join(directory, layout.LOCK)) and not journal.holds_journal(
        directory
    )


def stored_generation(directory: str) -> int:
    """The first generation the index's runs do not hold (0 for none, or no directory).

    It changes whenever a flush or a GC puts a run in place: a reader that
    saw another generation than the one it loaded knows a GC may have run.
    """
    if not os.path.isdir(directory):
        return 0
    return layout.scan(directory).data_generation


def index_bytes(directory: str) -> dict[str, int]:
    """Bytes on disk of the index directory's files by kind: ``runs`` (with the data files
    of the format before runs), ``logs`` (with the next log, prepared ahead), and ``other``
    (lock, leftovers, the store's own files kept there)."""
    listing = layout.scan(directory)
    kinds = {layout.run_name(span): "runs" for span in listing.runs}
    kinds |= {layout.data_name(generation): "runs" for generation in listing.data}
    kinds |= {layout.log_name(generation): "logs" for generation in listing.logs}
    kinds |= {name: "logs" for name in listing.temporaries if name.startswith("log.")}
    found = {"runs": 0, "logs": 0, "other": 0}
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    found[kinds.get(entry.name, "other")] += entry.stat().st_size
            except FileNotFoundError:
                continue  # deleted by a merge meanwhile
    return found


def index_header(directory: str, name: str) -> FileHeader | None:
    """The header of the index's newest file (a run, a data file or a log), or None."""
    if not os.path.isdir(directory):
        return None
    listing = layout.scan(directory)
    candidates: list[tuple[bytes, str, tuple[int, ...]]]
    candidates = [
        (run.MAGIC, layout.run_name(span), (FORMAT_VERSION,)) for span in reversed(listing.runs)
    ]
    candidates += [
        (datafile.MAGIC, layout.data_name(g), (FORMAT_VERSION,)) for g in reversed(listing.data)
    ]
    candidates += [
        (log.MAGIC, layout.log_name(g), log.LOG_VERSIONS) for g in reversed(listing.logs)
    ]
    for magic, file_name, versions in candidates:
        path = os.path.join(directory, file_name)
        try:
            with open(path, "rb") as file:
                return parse_header(file.read(HEADER_SIZE), magic, path, name, versions)
        except FileNotFoundError:
            continue  # replaced by a running writer meanwhile
    return None


def leftover(path: str, name: str) -> Iterator[Finding]:
    """The note on a ``.tmp`` file: deleted at the next writer load."""
    what = (
        "the next log, prepared by a flush (or left by an interrupted write)"
        if os.path.basename(path).startswith("log.")
        else "left by an interrupted write"
    )
    yield Finding(path, 0, f"{what}; deleted at the next writer load", False)


def unknown(path: str, name: str) -> Iterator[Finding]:
    """The note on a file that belongs to no store."""
    yield Finding(path, 0, "not a file of this store; left alone", False)


def index_checks(
    directory: str, others: dict[str, FileCheck] | None = None
) -> list[tuple[str, FileCheck]]:
    """Each file of the index directory with its check: runs, data files, logs, leftovers,
    the store's ``others`` (file name to check) found there, and files that are none of
    these."""
    if not os.path.isdir(directory):
        return []
    listing = layout.scan(directory)
    checks: list[tuple[str, FileCheck]] = []
    checks += [(layout.run_name(span), run.check_run) for span in listing.runs]
    checks += [(layout.data_name(g), datafile.check_data_file) for g in listing.data]
    checks += [(layout.log_name(g), log.check_log) for g in listing.logs]
    checks += [(file_name, leftover) for file_name in listing.temporaries]
    if os.path.isfile(os.path.join(directory, journal.LINK)):
        checks.append((journal.LINK, journal.check_link))
    names = set(os.listdir(directory))
    checks += [
        (file_name, check) for file_name, check in (others or {}).items() if file_name in names
    ]
    known = {layout.LOCK, *(file_name for file_name, _ in checks)}
    checks += [(n, unknown) for n in sorted(names) if n not in known]
    return [(os.path.join(directory, file_name), check) for file_name, check in checks]
