"""``l2-stores snapshot``: a directory of stores as one archive, and back.

An archive is a tar file (gzip-compressed when its name ends in ``.gz`` or
``.tgz``) holding ``manifest.json`` and one member per store with its live
bindings::

    indexable     key | value                         (fixed sizes), repeated
    indexed file  key | header | u32 length | value   (little-endian length), repeated
    singleton     the encoded value

The export reads each store through a ``READ_ONLY`` load, so it takes no
writer lock and sees a state the writer had flushed: never a half-merged or
half-collected one. Singletons are exported first, so a head read first
names blocks that the stores read after it still hold. The import checks
every member's size and SHA-256 before it writes anything, builds each store
aside with the library's own stores (fsynced), then moves it into place.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from .. import batches
from ..engine.filesystem import fsync_directory, fsync_tree, remove_tree
from ..engine.lock import WriterLock
from ..errors import CannotLoadStore, CannotWriteToStore
from ..migration import finish_cut_short_switch, switch_singleton
from ..mode import Mode
from ..stores import identity
from ..stores.layout import (
    MIGRATION_STAGING,
    Kind,
    identity_path,
    link_path,
)
from .on_disk import Sizes, StoreOnDisk, find_stores, raw_class

FORMAT = "l2_stores-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
VALUE_LENGTH = struct.Struct("<I")
_STAGING = ".import-tmp"  # a store being built by an import
_ASIDE = ".import-old"  # a store being replaced by an import
_CHUNK = 1 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ArchiveSummary:
    """What an export or an import did: stores, bindings, and the archive's size in bytes."""

    stores: int
    bindings: int
    bytes: int


def _open_for_writing(path: str, archive: str) -> tarfile.TarFile:
    if archive.endswith((".gz", ".tgz")):
        return tarfile.open(path, "w:gz")
    return tarfile.open(path, "w")


# -- export


def export_archive(
    directory: str | os.PathLike[str],
    archive: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> ArchiveSummary:
    """Write the stores found under ``directory`` (or the store at ``directory``) into the
    tar file ``archive`` (gzip-compressed when it ends in ``.gz`` or ``.tgz``), durably.

    Safe while writers run: each store is read as a ``READ_ONLY`` load sees
    it, singletons first (a head names blocks the stores read after it hold).
    ``progress(n)`` is called with the bytes of each binding written.
    Raises :class:`CannotWriteToStore` when ``archive`` exists and ``force``
    is False, and :class:`CannotLoadStore` when ``directory`` holds no store.
    """
    directory, archive = os.fspath(directory), os.fspath(archive)
    if os.path.exists(archive) and not force:
        raise CannotWriteToStore("archive exists (use --force to replace it)", path=archive)
    stores = find_stores(directory)
    stores.sort(key=lambda store: (store.kind is not Kind.SINGLETON, store.path))
    entries: list[dict[str, Any]] = []
    target_directory = os.path.dirname(os.path.abspath(archive))
    temporary = archive + ".tmp"
    try:
        with tempfile.TemporaryDirectory(dir=target_directory, prefix=".l2-snapshot-") as scratch:
            total_bindings = _write_archive(
                directory, stores, temporary, archive, scratch, entries, progress
            )
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, archive)
        fsync_directory(target_directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return ArchiveSummary(len(stores), total_bindings, os.path.getsize(archive))


def _write_archive(  # the members, then the manifest; returns the bindings written
    directory: str,
    stores: list[StoreOnDisk],
    temporary: str,
    archive: str,
    scratch: str,
    entries: list[dict[str, Any]],
    progress: Progress | None,
) -> int:
    total_bindings = 0
    with _open_for_writing(temporary, archive) as tar:
        for number, store in enumerate(stores):
            member = f"stores/{number:04d}.records"
            scratch_file = os.path.join(scratch, f"{number:04d}")
            entry = _export_store(store, directory, scratch_file, progress)
            entry["member"] = member
            tar.add(scratch_file, arcname=member)
            os.unlink(scratch_file)
            entries.append(entry)
            total_bindings += entry["bindings"]
        manifest = json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "stores": entries,
            },
            indent=1,
        ).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return total_bindings


def _relative_path(store: StoreOnDisk, directory: str) -> str:
    relative = os.path.relpath(store.path, directory)
    return store.name if relative == os.curdir else relative


def _export_store(
    store: StoreOnDisk, directory: str, scratch_file: str, progress: Progress | None
) -> dict[str, Any]:
    sizes = store.sizes()
    recorded = store.identity()
    digest = hashlib.sha256()
    count = 0
    with open(scratch_file, "wb") as out:

        def write(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        opened = store.open()
        if opened is not None:
            with opened:
                for record in _records(store.kind, opened):
                    write(record)
                    count += 1
                    if progress is not None:
                        progress(len(record))
        size = out.tell()
    return {
        "path": _relative_path(store, directory),
        "kind": store.kind.value,
        "key_size": sizes.key,
        "value_size": sizes.value,
        "header_size": sizes.header,
        "bindings": count,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "identity": None if recorded is None else recorded.as_json(),
    }


def _records(kind: Kind, store: Any) -> Iterator[bytes]:
    if kind is Kind.SINGLETON:
        value = store.read()
        if value is not None:
            yield value
    elif kind is Kind.INDEXED_FILE:
        for key, (value, header) in store.items():
            yield b"".join((key, header, VALUE_LENGTH.pack(len(value)), value))
    else:
        for key, value in store.items():
            yield key + value


# -- import


def import_archive(
    archive: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> ArchiveSummary:
    """Rebuild the stores of ``archive`` (made by :func:`export_archive`) under
    ``directory``, each with the identity it had; ``progress(n)`` is called with the
    bindings written.

    Every member is checked before anything is written; each store is built
    aside, fsynced, then moved into place (``force`` replaces existing stores).

    Raises :class:`CannotLoadStore` for a damaged or foreign archive (nothing
    is written then), :class:`CannotWriteToStore` when a store exists and
    ``force`` is False, and :class:`StoreLockedError` when a writer holds a
    store that ``force`` would replace.
    """
    archive, directory = os.fspath(archive), os.fspath(directory)
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as error:
        raise CannotLoadStore(f"cannot read archive: {error}", path=archive) from error
    with tar:
        entries = _checked_manifest(tar, archive)
        targets = [os.path.join(directory, os.path.normpath(entry["path"])) for entry in entries]
        try:
            for target in targets:
                _finish_interrupted_import(target)
        except OSError as error:
            raise CannotWriteToStore(
                f"cannot finish an earlier import: {error}", path=directory
            ) from error
        existing = [target for target in targets if os.path.lexists(target)]
        if existing and not force:
            raise CannotWriteToStore(
                f"{len(existing)} store(s) exist, {', '.join(existing)} (use --force to replace)",
                path=directory,
            )
        os.makedirs(directory, exist_ok=True)
        kinds = [Kind(entry["kind"]) for entry in entries]
        locks = _lock_existing(targets, kinds)  # refuses a store a writer holds, up front
        staged: list[StoreOnDisk] = []
        # The journals of the stores replaced, up front too (another process may hold one):
        # once replaced, they leave them (their batches must not come back, nor keep the
        # journals from shrinking).
        replaced = [
            (link_path(target, kind), os.path.basename(target))
            for target, kind in zip(targets, kinds, strict=True)
        ]
        try:
            retirements = batches.Retirements(replaced)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        try:
            total = 0
            for entry, target, kind in zip(entries, targets, kinds, strict=True):
                member = tar.extractfile(entry["member"])
                assert member is not None
                staged.append(StoreOnDisk(target + _STAGING, kind))
                with member:
                    total += _build_store(entry, member, staged[-1], archive, progress)
            for built in staged:
                fsync_tree(built.path)
            for built, target, entry in zip(staged, targets, entries, strict=True):
                _move_into_place(built, target, entry)
            staged.clear()
            retirements.retire()
        except OSError as error:
            raise CannotWriteToStore(
                f"import cut short: {error} (the next import finishes or undoes it)",
                path=directory,
            ) from error
        finally:
            for leftover in staged:
                remove_tree(leftover.path)
                if leftover.kind is Kind.SINGLETON:
                    remove_tree(leftover.lock_path)
            retirements.release()
            for lock in locks:
                lock.release()
    return ArchiveSummary(len(entries), total, os.path.getsize(archive))


def _checked_manifest(tar: tarfile.TarFile, archive: str) -> list[dict[str, Any]]:
    """The manifest's store entries, after checking every member against it."""

    def fail(what: str) -> CannotLoadStore:
        return CannotLoadStore(f"bad snapshot archive: {what}", path=archive)

    try:
        members = {member.name: member for member in tar.getmembers()}
        if MANIFEST not in members:
            raise fail("no manifest.json")
        raw = tar.extractfile(members[MANIFEST])
        assert raw is not None
        manifest = json.loads(raw.read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise fail(str(error)) from error
    except ValueError as error:
        raise fail(f"manifest.json is not JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise fail("not an l2_stores snapshot")
    if manifest.get("version") != VERSION:
        raise fail(f"snapshot version {manifest.get('version')!r}, version {VERSION} expected")
    entries = manifest.get("stores")
    if not isinstance(entries, list) or not entries:
        raise fail("the manifest lists no store")
    for entry in entries:
        _check_entry(entry, members, tar, fail)
    paths = [os.path.normpath(entry["path"]) for entry in entries]
    if len(set(paths)) != len(paths):
        raise fail("a store path appears twice")
    return entries


def _check_entry(
    entry: Any,
    members: dict[str, tarfile.TarInfo],
    tar: tarfile.TarFile,
    fail: Callable[[str], CannotLoadStore],
) -> None:
    fields = {
        "path": str, "kind": str, "header_size": int, "bindings": int, "member": str,
        "bytes": int, "sha256": str,
    }  # fmt: skip
    if not isinstance(entry, dict) or any(
        not isinstance(entry.get(name), kind) for name, kind in fields.items()
    ):
        raise fail(f"malformed store entry {entry!r}")
    path = entry["path"]
    normal = os.path.normpath(path)
    if (
        os.path.isabs(path)
        or normal == os.curdir
        or normal.split(os.sep)[0] == os.pardir
        or normal.endswith((_STAGING, _ASIDE))
    ):
        raise fail(f"unsafe store path {path!r}")
    if entry["kind"] not in {kind.value for kind in Kind}:
        raise fail(f"unknown store kind {entry['kind']!r}")
    if entry.get("identity") is not None:
        try:
            recorded = identity.from_json(entry["identity"])
        except ValueError as error:
            raise fail(f"store {path!r}: {error}") from error
        if recorded.files.value != entry["kind"]:
            raise fail(f"store {path!r}: identity of a {recorded.kind}, files of {entry['kind']}")
    if entry["bindings"] < 0 or not _sizes_fit(entry):
        raise fail(f"sizes or count that do not fit a {entry['kind']} store in {entry!r}")
    member = members.get(entry["member"])
    if member is None or not member.isfile():
        raise fail(f"member {entry['member']!r} of {path!r} is missing")
    if member.size != entry["bytes"]:
        raise fail(f"member {entry['member']!r} holds {member.size} bytes, {entry['bytes']} listed")
    digest = hashlib.sha256()
    data = tar.extractfile(member)
    assert data is not None
    with data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise fail(f"member {entry['member']!r} of {path!r}: checksum mismatch")


def _sizes_fit(entry: dict[str, Any]) -> bool:
    """Whether the encoding sizes of a manifest entry fit its kind of store."""
    kind = Kind(entry["kind"])
    key, value, header = entry.get("key_size"), entry.get("value_size"), entry["header_size"]
    empty = entry["bindings"] == 0

    def size(found: Any, least: int = 0) -> bool:
        return type(found) is int and least <= found < 0xFFFFFFFF

    if kind is Kind.SINGLETON:
        return key is None and header == 0 and (value is None or size(value))
    if kind is Kind.INDEXABLE:
        return header == 0 and (
            (key is None and value is None and empty) or (size(key, 1) and size(value))
        )
    return value is None and size(header) and ((key is None and empty) or size(key, 1))


def _lock_existing(targets: list[str], kinds: list[Kind]) -> list[WriterLock]:
    """Take the writer lock of every store to be replaced; all or none."""
    locks: list[WriterLock] = []
    try:
        for target, kind in zip(targets, kinds, strict=True):
            store = StoreOnDisk(target, kind)
            if os.path.lexists(target) and (
                kind is not Kind.SINGLETON or os.path.exists(store.lock_path)
            ):
                locks.append(WriterLock(store.lock_path, store.name, target))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _build_store(
    entry: dict[str, Any],
    member: IO[bytes],
    store: StoreOnDisk,
    archive: str,
    progress: Progress | None,
) -> int:
    """Write the bindings of ``member`` into a new store at ``store.path``; their number."""
    kind = store.kind
    remove_tree(store.path)
    if kind is Kind.SINGLETON:
        remove_tree(store.lock_path)
    sizes = Sizes(entry.get("key_size"), entry.get("value_size"), entry["header_size"])
    count = 0
    os.makedirs(os.path.dirname(os.path.abspath(store.path)), exist_ok=True)
    if sizes.key is None and kind is not Kind.SINGLETON:
        os.makedirs(store.path)  # a store that never held a binding
    else:
        cls: Any = raw_class(store.name, kind, sizes)
        with cls.load(store.path, Mode.READ_WRITE) as built:  # fsynced whole before the move
            for key, value, header in _reader(kind, sizes, member, entry, archive):
                if kind is Kind.SINGLETON:
                    built.write(value)
                elif kind is Kind.INDEXED_FILE:
                    built.append(key, value, header, flush=False)
                else:
                    built.add(key, value, flush=False)
                count += 1
                if progress is not None:
                    progress(1)
    if kind is Kind.SINGLETON:
        remove_tree(store.lock_path)
    elif entry.get("identity") is not None:
        _record(entry, store.path, kind)
    if count != entry["bindings"]:
        raise CannotLoadStore(
            f"bad snapshot archive: {entry['path']!r} holds {count} bindings, "
            f"{entry['bindings']} listed",
            path=archive,
        )
    return count


def _reader(
    kind: Kind, sizes: Sizes, member: IO[bytes], entry: dict[str, Any], archive: str
) -> Iterator[tuple[bytes, bytes, bytes]]:
    """``(key, value, header)`` of each binding of a member."""

    def exactly(size: int) -> bytes:
        data = member.read(size)
        if len(data) != size:
            raise CannotLoadStore(
                f"bad snapshot archive: {entry['path']!r} cut short", path=archive
            )
        return data

    if kind is Kind.SINGLETON:
        value = member.read()
        if value or entry["bindings"]:
            yield b"", value, b""
        return
    assert sizes.key is not None
    while first := member.read(1):
        key = first + exactly(sizes.key - 1)
        if kind is Kind.INDEXED_FILE:
            header = exactly(sizes.header)
            (length,) = VALUE_LENGTH.unpack(exactly(VALUE_LENGTH.size))
            yield key, exactly(length), header
        else:
            assert sizes.value is not None
            yield key, exactly(sizes.value), b""


def _record(entry: dict[str, Any], path: str, kind: Kind) -> None:
    """Record at ``path`` the identity the archive gives the store of ``entry``."""
    found = identity.from_json(entry["identity"])
    identity.write(identity_path(path, kind), found, found.name, path)


def _move_into_place(built: StoreOnDisk, target: str, entry: dict[str, Any]) -> None:
    """Put the store built at ``built.path`` in place of ``target`` (the caller holds its lock).

    A kill between the two renames of a replacement leaves the old store at
    ``target + _ASIDE``; the next import puts it back first. A singleton (a
    value file and an identity file) switches as ``migrate`` switches one: a
    marker, then its files, rolled forward by the next import (or migrate);
    the singleton it replaces leaves its batch journal.
    """
    if built.kind is Kind.SINGLETON:
        staging = target + MIGRATION_STAGING
        for path in (staging, identity_path(staging, Kind.SINGLETON)):
            remove_tree(path)
        if entry.get("identity") is not None:
            _record(entry, built.path, built.kind)
        if os.path.exists(built.path):
            os.rename(built.path, staging)
        if os.path.exists(identity_path(built.path, Kind.SINGLETON)):
            os.rename(
                identity_path(built.path, Kind.SINGLETON), identity_path(staging, Kind.SINGLETON)
            )
        switch_singleton(staging, target)
    elif os.path.lexists(target):
        aside = target + _ASIDE
        remove_tree(aside)
        os.rename(target, aside)
        os.rename(built.path, target)
        fsync_directory(os.path.dirname(os.path.abspath(target)))
        remove_tree(aside)
    else:
        os.rename(built.path, target)
    fsync_directory(os.path.dirname(os.path.abspath(target)))


def _finish_interrupted_import(target: str) -> None:
    """Undo what a killed import left at ``target``: put the old store back, drop staging;
    finish a singleton's switch."""
    finish_cut_short_switch(target, os.path.basename(target))
    aside = target + _ASIDE
    if os.path.lexists(aside):
        if os.path.lexists(target):
            remove_tree(aside)  # the new store was in place
        else:
            os.rename(aside, target)
    staging = target + _STAGING
    remove_tree(staging)
    remove_tree(staging + ".lock")
