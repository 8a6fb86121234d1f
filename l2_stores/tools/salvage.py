"""``salvage``: copy every binding whose checksums verify into new stores, and say what
could not be read.

A damaged store refuses to load (or to read the damaged part): corruption
is an error, never wrong data. Salvage reads each file on its own, trusting
no more of it than the checksums of what it takes:

- an index directory: its live runs, oldest first, row by row (a row whose
  checksum fails is skipped), then its logs in order, record by record (a
  bad record is skipped and the replay goes on after it; a batch's part
  counts at its end record only). Newer writes win, removals remove;
- an indexed file: its index as above, then each value read through the
  checksum of its record;
- a singleton: its file, whole, or nothing.

What a skipped row or record held is lost: a binding it overwrote or
removed may come back with its older value (each loss is reported with its
file and offset). The new stores are written with byte codecs, then given
the source store's identity when it can be read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import layout
from ..engine.filesystem import fsync_directory, fsync_tree, remove_tree, rename
from ..engine.framing import FORMAT_VERSION, HEADER_SIZE, Expected, Finding, parse_header
from ..engine.journal import LINK
from ..engine.levels import Span, TilingError, live_and_superseded
from ..engine.log import LOG_VERSIONS, salvage_log
from ..engine.log import MAGIC as LOG_MAGIC
from ..engine.run import MAGIC as RUN_MAGIC
from ..engine.run import salvage_run
from ..engine.value_files import list_values, values_name
from ..engine.values import POINTER, ValuesFile
from ..errors import CannotLoadStore, CannotReadFromStore, CannotWriteToStore, StoreError
from ..mode import Mode
from ..stores import identity
from ..stores.layout import Kind, identity_path
from ..stores.singleton import VARIABLE_SIZE, read_singleton_file
from .on_disk import Sizes, StoreOnDisk, find_stores, raw_class

__all__ = ["SalvageReport", "StoreSalvage", "salvage"]

_SCRATCH = ".salvage-index"
#: Where a salvage builds its stores, moved to the target at its end.
STAGING = ".salvage-tmp"


@dataclass
class StoreSalvage:
    """What salvage did for one store: the bindings it copied and what it could not read."""

    source: str
    target: str
    kind: str
    bindings: int = 0
    lost: list[Finding] = field(default_factory=list)


@dataclass
class SalvageReport:
    """What salvage did, store by store."""

    stores: list[StoreSalvage] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every record of every store could be read (notes aside)."""
        return not any(finding.problem for store in self.stores for finding in store.lost)


def salvage(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    on_store: Callable[[StoreSalvage], None] | None = None,
) -> SalvageReport:
    """Copy the readable bindings of the store at ``source`` (or of every store under the
    directory ``source``) into new stores at ``target``, at the same relative paths.

    The stores are built at ``<target>.salvage-tmp`` and moved to ``target``
    at the end: a kill leaves no target (the next salvage starts again) or
    the whole of it. The source is only read.

    ``on_store`` is called after each store. Raises :class:`CannotWriteToStore`
    when ``target`` exists, :class:`CannotLoadStore` when ``source`` holds no
    store; a store that cannot be read at all is reported, not raised.
    """
    source, target = os.fspath(source), os.fspath(target)
    if os.path.lexists(target):
        raise CannotWriteToStore("the salvage's target exists: give a new path", path=target)
    stores = find_stores(source)
    staging = target + STAGING
    for leftover in (staging, identity_path(staging, Kind.SINGLETON), staging + _SCRATCH):
        remove_tree(leftover)  # a salvage killed before its end
    report = SalvageReport()
    for store in stores:
        relative = os.path.relpath(store.path, source)
        destination = staging if relative == os.curdir else os.path.join(staging, relative)
        done = StoreSalvage(store.path, destination.replace(staging, target, 1), store.kind.value)
        try:
            _salvage_store(store, destination, done)
        except StoreError as error:
            done.lost.append(Finding(error.path or store.path, error.offset or 0, error.reason))
        report.stores.append(done)
        if on_store is not None:
            on_store(done)
    _put_in_place(staging, target)
    return report


def _put_in_place(staging: str, target: str) -> None:
    """Move what salvage built at ``staging`` to ``target``, durably (all or nothing, but
    for a singleton's identity, which follows its value)."""
    if not os.path.lexists(staging):
        os.makedirs(target)  # nothing could be salvaged: an empty directory says so
        return
    fsync_tree(staging)
    rename(staging, target)
    staged_identity = identity_path(staging, Kind.SINGLETON)
    if os.path.exists(staged_identity):
        fsync_tree(staged_identity)
        rename(staged_identity, identity_path(target, Kind.SINGLETON))
    fsync_directory(os.path.dirname(os.path.abspath(target)))


def _salvage_store(store: StoreOnDisk, destination: str, done: StoreSalvage) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    if store.kind is Kind.SINGLETON:
        _salvage_singleton(store, destination, done)
    else:
        directory = store.index_directory
        assert directory is not None
        sizes = _sizes(store, directory, done)
        if sizes is None:
            return
        if os.path.exists(os.path.join(directory, LINK)):
            done.lost.append(
                Finding(os.path.join(directory, LINK), 0,
                        "in a batch journal, which salvage does not read: a batch that a "
                        "power loss took from the journal may be copied", False))  # fmt: skip
        if store.kind is Kind.INDEXABLE:
            cls: Any = raw_class(store.name, Kind.INDEXABLE, sizes)
            with cls.load(destination, Mode.READ_WRITE) as copy:
                _replay_index(directory, store.name, copy, done)
                done.bindings = len(copy)
        else:
            _salvage_indexed_file(store, directory, sizes, destination, done)
    _copy_identity(store, destination, done)


def _salvage_singleton(store: StoreOnDisk, destination: str, done: StoreSalvage) -> None:
    try:
        found = read_singleton_file(store.path, store.name)
    except CannotLoadStore as error:
        done.lost.append(Finding(store.path, error.offset or 0, error.reason))
        return
    if found is None:
        return
    value_size, encoded, _ = found
    sizes = Sizes(None, None if value_size == VARIABLE_SIZE else value_size)
    cls: Any = raw_class(store.name, Kind.SINGLETON, sizes)
    try:  # as a load reads it: with the batches only its journal holds yet
        with cls.load(store.path, Mode.READ_ONLY) as loaded:
            encoded = loaded.read()
    except StoreError as error:
        done.lost.append(
            Finding(error.path or store.path, error.offset or 0,
                    f"{error.reason}: the file's own value is taken"))  # fmt: skip
    if encoded is None:
        return
    with cls.load(destination, Mode.READ_WRITE) as copy:
        copy.write(encoded)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(destination + ".lock")
    done.bindings = 1


def _sizes(store: StoreOnDisk, directory: str, done: StoreSalvage) -> Sizes | None:
    """The store's encoding sizes, from the first file header that can be read."""
    with contextlib.suppress(StoreError):
        sizes = store.sizes()
        if sizes.key is not None:
            return sizes
    listing = layout.scan(directory)
    names: list[tuple[bytes, str, tuple[int, ...]]]
    names = [(RUN_MAGIC, layout.run_name(span), (FORMAT_VERSION,)) for span in listing.runs]
    names += [(LOG_MAGIC, layout.log_name(g), LOG_VERSIONS) for g in listing.logs]
    for magic, name, versions in names:
        path = os.path.join(directory, name)
        with contextlib.suppress(StoreError, OSError), open(path, "rb") as file:
            header = parse_header(file.read(HEADER_SIZE), magic, path, store.name, versions)
            if store.kind is Kind.INDEXED_FILE:
                return Sizes(header.key_size, None, header.header_size)
            return Sizes(header.key_size, header.value_size)
    if names:
        done.lost.append(Finding(directory, 0, "no file header can be read: nothing salvaged"))
    return None


def _replay_index(directory: str, name: str, copy: Any, done: StoreSalvage) -> None:
    """Write the readable bindings of the index at ``directory`` into ``copy``, in order."""
    listing = layout.scan(directory)
    try:
        runs, _ = live_and_superseded(listing.runs)
    except TilingError as error:
        done.lost.append(Finding(directory, 0, f"runs do not tile ({error}): all read"))
        runs = sorted(listing.runs, key=lambda span: (span.hi, span.lo))
    for generation in listing.data:
        path = os.path.join(directory, layout.data_name(generation))
        done.lost.append(Finding(path, 0, "a data file of the format before runs: not salvaged"))
    first_log = max([span.hi + 1 for span in runs], default=0)
    for span in runs:
        _apply(copy, salvage_run(_run_path(directory, span), name, done.lost))
    for generation in listing.logs:
        if generation >= first_log:
            path = os.path.join(directory, layout.log_name(generation))
            _apply(copy, salvage_log(path, name, done.lost).items())


def _run_path(directory: str, span: Span) -> str:
    return os.path.join(directory, layout.run_name(span))


def _apply(copy: Any, bindings: Any) -> None:
    for key, value in bindings:
        if value is None:
            copy.remove(key, flush=False)
        else:
            copy.add(key, value, flush=False)


def _salvage_indexed_file(
    store: StoreOnDisk, directory: str, sizes: Sizes, destination: str, done: StoreSalvage
) -> None:
    assert sizes.key is not None
    entry_size = POINTER.size + sizes.header
    scratch = destination + _SCRATCH
    index: Any = raw_class(store.name, Kind.INDEXABLE, Sizes(sizes.key, entry_size))
    expected = Expected(store.name, sizes.key, entry_size, sizes.header)
    files: dict[int, ValuesFile] = {}
    try:
        with index.load(scratch, Mode.READ_WRITE) as entries:
            _replay_index(directory, store.name, entries, done)
            numbers, _ = list_values(store.path)
            for number in numbers:
                path = os.path.join(store.path, values_name(number))
                try:
                    files[number] = ValuesFile(
                        path, expected, readonly=True, fsync=False, number=number
                    )
                except StoreError as error:
                    done.lost.append(Finding(path, error.offset or 0, error.reason))
            cls: Any = raw_class(store.name, Kind.INDEXED_FILE, sizes)
            with cls.load(destination, Mode.READ_WRITE) as copy:
                for key, entry in entries.items():
                    value = _value(store, files, key, entry, done)
                    if value is not None:
                        copy.append(key, value, entry[POINTER.size :], flush=False)
                done.bindings = len(copy)
    finally:
        for file in files.values():
            file.close()
        remove_tree(scratch)


def _value(
    store: StoreOnDisk, files: dict[int, ValuesFile], key: bytes, entry: bytes, done: StoreSalvage
) -> bytes | None:
    offset, length, number = POINTER.unpack_from(entry)
    file = files.get(number)
    path = os.path.join(store.path, values_name(number))
    if file is None:
        done.lost.append(Finding(path, offset, f"value of key {key.hex()}: its file is missing"))
        return None
    try:
        return file.read(offset, length, key)
    except CannotReadFromStore as error:
        done.lost.append(Finding(path, offset, f"value of key {key.hex()}: {error.reason}"))
        return None


def _copy_identity(store: StoreOnDisk, destination: str, done: StoreSalvage) -> None:
    """Give the new store the source's identity, when it can be read."""
    if not os.path.exists(destination):
        return
    try:
        recorded = store.identity()
    except CannotLoadStore as error:
        done.lost.append(Finding(error.path or store.path, error.offset or 0, error.reason))
        return
    if recorded is not None:
        path = identity_path(destination, store.kind)
        identity.write(path, recorded, recorded.name, destination)
