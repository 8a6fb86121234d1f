"""``l2-stores verify``: read every record of every file of a store and check it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..engine.files import FileCheck, index_checks, leftover, unknown
from ..engine.framing import HEADER_SIZE, Finding
from ..engine.value_files import list_values, values_name
from ..engine.values import POINTER, RECORD_OVERHEAD, check_values_file
from ..errors import CannotReadFromStore, StoreError
from ..mode import Mode
from ..stores import identity
from ..stores.layout import IDENTITY, INDEX_DIRECTORY, Kind, identity_path
from ..stores.singleton import check_singleton_file
from .on_disk import StoreOnDisk


@dataclass
class Verification:
    """What ``verify`` found in a set of stores."""

    stores: int = 0
    files: int = 0
    bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """The findings that are problems, not notes."""
        return [finding for finding in self.findings if finding.problem]


def verify(stores: list[StoreOnDisk], on_file: Callable[[int], None] | None = None) -> Verification:
    """Check every file of ``stores``; ``on_file(bytes)`` is called after each file."""
    result = Verification()
    for store in stores:
        result.stores += 1
        found_before = len(result.findings)
        for path, check in _file_checks(store):
            try:
                size = os.path.getsize(path)
                result.findings.extend(check(path, store.name))
            except FileNotFoundError:
                result.findings.append(
                    Finding(path, 0, "file vanished while checked (a writer is running?)", False)
                )
                continue
            result.files += 1
            result.bytes += size
            if on_file is not None:
                on_file(size)
        if not any(finding.problem for finding in result.findings[found_before:]):
            result.findings.extend(_check_as_loaded(store))
    return result


def _file_checks(store: StoreOnDisk) -> list[tuple[str, FileCheck]]:
    identity_file = identity_path(store.path, store.kind)
    checks: list[tuple[str, FileCheck]]
    if store.kind is Kind.SINGLETON:
        checks = [(store.path, check_singleton_file)]
        if os.path.isfile(identity_file):
            checks.append((identity_file, identity.check_file))
        return checks
    index_directory = store.index_directory
    assert index_directory is not None
    if store.kind is Kind.INDEXABLE:
        checks = index_checks(index_directory, {IDENTITY: identity.check_file})
    else:
        checks = index_checks(index_directory)
        if os.path.isfile(identity_file):
            checks.append((identity_file, identity.check_file))
    if store.kind is Kind.INDEXED_FILE:
        numbers, temporaries = list_values(store.path)
        ends = _referenced_ends(store)
        checks += [
            (
                os.path.join(store.path, values_name(n)),
                check_values_file
                if ends is None
                else partial(_check_values_up_to, ends.get(n, HEADER_SIZE)),
            )
            for n in numbers
        ]
        checks += [(os.path.join(store.path, name), leftover) for name in temporaries]
        known = {INDEX_DIRECTORY, IDENTITY, *map(values_name, numbers), *temporaries}
        checks += [
            (os.path.join(store.path, name), unknown)
            for name in sorted(os.listdir(store.path))
            if name not in known
        ]
    return checks


def _referenced_ends(store: StoreOnDisk) -> dict[int, int] | None:
    """Per values file, where the last record its index points at ends (None: no index read).

    The index is read as a load reads it: the bindings of a point in time
    whose values are all whole.
    """
    try:
        opened = store.open(Mode.READ_ONLY)
        if opened is None:
            return None
        with opened:
            ends: dict[int, int] = {}
            key_size = opened._key.size or 0  # type: ignore[attr-defined]
            for _, entry in opened._engine.items():  # type: ignore[attr-defined]
                offset, length, number = POINTER.unpack_from(entry)
                end = offset + RECORD_OVERHEAD + key_size + length
                ends[number] = max(ends.get(number, HEADER_SIZE), end)
            return ends
    except StoreError:
        return None  # reported by the check as loaded


def _check_values_up_to(end: int, path: str, name: str) -> Iterator[Finding]:
    return check_values_file(path, name, end)


def _check_as_loaded(store: StoreOnDisk) -> Iterator[Finding]:
    """Load the store read-only and read every binding, as a user would."""
    try:
        opened = store.open(Mode.READ_ONLY)
        if opened is None:
            return
        with opened:
            if store.kind is Kind.INDEXED_FILE:
                yield from _check_value_pointers(store, opened)
            elif store.kind is Kind.INDEXABLE:
                for _ in opened.items():  # type: ignore[attr-defined]
                    pass
    except StoreError as error:
        yield Finding(error.path or store.path, error.offset or 0, error.reason.split(" (file ")[0])


def _check_value_pointers(store: StoreOnDisk, opened: Any) -> Iterator[Finding]:
    """Check that every index entry of an indexed file points at its value's record.

    The index snapshot and the values files are taken in one task, so a GC
    committing meanwhile cannot make a file vanish under the check.
    """
    with opened._waiter.task():
        opened._check_open()
        snapshot = opened._engine.items()
        pinned = opened._values.pin()
    pointers = []
    for key, entry in snapshot:
        offset, length, number = POINTER.unpack_from(entry)
        pointers.append((number, offset, length, key))
    pointers.sort()  # file by file, in file order
    for number, offset, length, key in pointers:
        values = pinned.get(number)
        if values is None or not values.opened:
            path = os.path.join(store.path, values_name(number))
            yield Finding(path, offset, f"values file missing; key {key.hex()} points into it")
            continue
        try:
            values.read(offset, length, key)
        except CannotReadFromStore as error:
            yield Finding(
                values.path, offset, f"key {key.hex()}: {error.reason.split(' (file ')[0]}"
            )
