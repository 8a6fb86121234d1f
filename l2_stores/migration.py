"""``migrate``: rewrite a store under new codecs or as another kind, switching atomically.

The new store is built beside the old one, at ``<path>.migrate-tmp``, from
the old store's bindings (loaded ``READ_WRITE``: no writer changes it
meanwhile), and fsynced whole. Then the old store is closed, its writer lock
taken back bare, and the two swap places in one step:

- a store directory: ``renameat2(RENAME_EXCHANGE)`` swaps the two
  directories, so ``<path>`` names the old store or the new one, whole, at
  every instant; the old one, now at ``<path>.migrate-tmp``, is deleted;
- a singleton (two files: its value and its identity): a marker says the
  switch has begun (and whether the new store holds a value); the old
  identity file is removed, the new value file renamed over the old one
  (or the old one removed), and the new identity file put in place. A kill after the first
  marker leaves the old or the new value without an identity: the next
  ``READ_WRITE`` load of the new class (or the next ``migrate``) finishes the switch;
  until then loads of another class and ``READ_ONLY`` loads are refused.

A kill at any moment leaves the old store or the new one at ``<path>``, and
perhaps a leftover at ``<path>.migrate-tmp`` (a new store cut short, or the
old one after the switch) that the next ``migrate`` deletes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import batches
from .engine import filesystem
from .engine.lock import WriterLock
from .errors import CannotLoadStore, CannotWriteToStore
from .mode import Mode
from .progress import Progress
from .stores import identity
from .stores.base import Store
from .stores.indexable import IndexableStore
from .stores.indexed_file import IndexedFileBase, SimpleIndexedFile
from .stores.layout import MIGRATION_STAGING as STAGING
from .stores.layout import MIGRATION_SWITCHING, Kind, identity_path, link_path
from .stores.singleton import SingletonStore

__all__ = ["MigrationSummary", "migrate"]

#: Beside a singleton's staging, the marker of a switch begun (a kill then rolls forward:
#: the singleton refuses other loads until then); it holds ``value`` or ``none`` (whether
#: the new store's value file replaces the old), a comma, and ``identity`` or ``-``.
SWITCHING = MIGRATION_SWITCHING
_MARKERS = {b"value,identity", b"value,-", b"none,identity", b"none,-"}

#: ``convert(key, value) -> (key, value) | None``: None drops the binding. An indexed
#: file's value is ``(value, header)``; a singleton's key is None.
Convert = Callable[[Any, Any], "tuple[Any, Any] | None"]


@dataclass(frozen=True)
class MigrationSummary:
    """What a migration did: bindings read from the old store, written to the new one."""

    read: int
    written: int
    switched: bool


def _files(cls: type[Store]) -> Kind:
    return identity.KIND_FILES[cls._kind]


def _family(cls: type[Store]) -> str:
    if issubclass(cls, SingletonStore):
        return "singleton"
    if issubclass(cls, IndexedFileBase):
        return "indexed file"
    if issubclass(cls, IndexableStore):
        return "indexable"
    raise TypeError(f"not a store class: {cls!r}")


def migrate(
    old: type[Store],
    new: type[Store],
    path: str | os.PathLike[str],
    convert: Convert | None = None,
    *,
    progress: bool = True,
) -> MigrationSummary:
    """Rewrite the store of class ``old`` at ``path`` as a store of class ``new``.

    ``convert(key, value)`` returns the new ``(key, value)``, or None to drop
    the binding (default: keep both as decoded, re-encoded by ``new``'s
    codecs). The old store stays whole and loadable until one atomic switch.
    ``progress``: a progress bar on stderr when it is a terminal. Running it
    again after a migration that was done (or killed after its switch) only
    tidies up, unless ``old`` and ``new`` have the same identity: then the
    store cannot tell, and ``convert`` runs again.

    Raises ``ValueError`` for kinds no binding can go between without
    ``convert`` (or a singleton and another kind), :class:`CannotLoadStore`
    when ``path`` holds no store of ``old`` (nor of ``new``), and
    :class:`StoreLockedError` when a writer holds it.
    """
    directory = os.fspath(path)
    families = (_family(old), _family(new))
    if "singleton" in families and families[0] != families[1]:
        raise ValueError(f"cannot migrate a {families[0]} store to a {families[1]} store")
    if families[0] != families[1] and convert is None:
        raise ValueError(
            f"migrating a {families[0]} store to a {families[1]} store needs a convert "
            "function (an indexed file's value is (value, header))"
        )
    staging = directory + STAGING
    try:
        finish_cut_short_switch(directory, new.name)  # a singleton's, if a kill left one
        _remove(staging, new)
    except OSError as error:
        raise CannotWriteToStore(
            f"cannot finish an earlier migration: {error}", name=new.name, path=directory
        ) from error
    if _already_done(old, new, directory):
        return MigrationSummary(0, 0, False)
    if not any(map(os.path.lexists, (directory, identity_path(directory, _files(old))))):
        raise CannotLoadStore("no store there to migrate", name=old.name, path=directory)
    source: Any = old.load(directory, Mode.READ_WRITE)  # type: ignore[attr-defined]
    try:
        read, written = _copy(source, new, staging, convert, progress)
        for built in (staging, identity_path(staging, Kind.SINGLETON)):
            if os.path.exists(built):  # (a singleton that holds no value has no file)
                filesystem.fsync_tree(built)
    except BaseException:
        source.close()
        _remove(staging, new)
        raise
    lock_path, link_path, parts = _lock_path(source), source._link_path(), source._part_count()
    source.close()
    # The writer lock, bare, from the close to the switch. Taking it cannot wait, so a
    # writer may have loaded the store in between: its files must be as the close left them.
    closed = _fingerprint(directory, lock_path)
    lock = WriterLock(lock_path, old.name, directory)
    try:
        if _fingerprint(directory, lock_path) != closed:
            _remove(staging, new)
            raise CannotWriteToStore(
                "a writer loaded the store while it was migrated: nothing changed, run "
                "migrate again once it is stopped",
                name=old.name,
                path=directory,
            )
        # The old store's batch parts are all in its files (its close made them durable):
        # its journal need not keep them for it any more.
        batches.retire(link_path, old.name, directory, parts)
        _switch(new, staging, directory)
    finally:
        lock.release()
    _remove(staging, old)
    return MigrationSummary(read, written, True)


def _fingerprint(path: str, lock_path: str) -> list[tuple[str, int, int]]:
    """Every file of the store at ``path`` (and its singleton's side files) but its lock:
    name, size and modification time."""
    found = []
    candidates = [path] if os.path.isdir(path) else [path, link_path(path, Kind.SINGLETON)]
    for root in candidates:
        for folder, _, names in os.walk(root) if os.path.isdir(root) else [("", [], [root])]:
            for name in names:
                full = os.path.join(folder, name)
                if full == lock_path:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    status = os.stat(full)
                    found.append((full, status.st_size, status.st_mtime_ns))
    return sorted(found)


def _already_done(old: type[Store], new: type[Store], directory: str) -> bool:
    """Whether ``directory`` holds a store of ``new`` that is not one of ``old``."""
    if old._identity().same_as(new._identity()):
        return False
    try:
        identity.check(directory, new._identity(), new.name)
    except CannotLoadStore:
        return False
    recorded = identity.read(identity_path(directory, _files(new)), new.name, directory)
    return recorded is not None


def _lock_path(store: Any) -> str:
    if isinstance(store, SingletonStore):
        return store.path + ".lock"
    if isinstance(store, IndexedFileBase):
        return os.path.join(store.path, "index", "lock")
    return os.path.join(store.path, "lock")


def _pairs(store: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(store, SingletonStore):
        value = store.read()
        if value is not None:
            yield None, value
        return
    yield from store.items()


def _copy(
    source: Any, new: type[Store], staging: str, convert: Convert | None, progress: bool
) -> tuple[int, int]:
    """Write the converted bindings of ``source`` into a new store at ``staging``."""
    read = written = 0
    bar = Progress(f"migrate {source.name}", total=len(source) if hasattr(source, "__len__") else 1)
    if not progress:
        bar.close()
    target: Any = new.load(staging, Mode.READ_WRITE)  # type: ignore[attr-defined]
    try:
        for key, value in _pairs(source):
            read += 1
            bar.update()
            converted = (key, value) if convert is None else convert(key, value)
            if converted is None:
                continue
            _put(target, *converted)
            written += 1
        if hasattr(target, "flush"):
            target.flush()
    finally:
        target.close()
        bar.close()
    return read, written


def _put(target: Any, key: Any, value: Any) -> None:
    if isinstance(target, SingletonStore):
        target.write(value)
    elif isinstance(target, SimpleIndexedFile):
        target.append(key, value[0] if isinstance(value, tuple) else value, flush=False)
    elif isinstance(target, IndexedFileBase):
        target.append(key, value[0], value[1], flush=False)
    else:
        target.add(key, value, flush=False)


def _switch(new: type[Store], staging: str, directory: str) -> None:
    """Put the store built at ``staging`` in place of the one at ``directory``."""
    try:
        if _files(new) is Kind.SINGLETON:
            switch_singleton(staging, directory)
        else:
            filesystem.exchange(staging, directory)
            filesystem.fsync_directory(os.path.dirname(os.path.abspath(directory)))
    except OSError as error:
        raise CannotWriteToStore(
            f"cannot switch to the migrated store: {error}", name=new.name, path=directory
        ) from error


def switch_singleton(staging: str, directory: str) -> None:
    """Put the singleton built at ``staging`` (``<directory>.migrate-tmp``: its value file
    if it holds one, its identity file if it has one) in place of the one at ``directory``:
    the marker first, durably, then the steps of ``finish_singleton_switch``."""
    marker = staging + SWITCHING
    temporary = marker + ".tmp"  # the marker appears whole, or not at all
    fd = filesystem.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:  # what the new store has: a value file to move, an identity file to move
        value = b"value" if os.path.exists(staging) else b"none"
        has = b"identity" if os.path.exists(identity_path(staging, Kind.SINGLETON)) else b"-"
        os.write(fd, value + b"," + has)
        filesystem.fsync(fd)
    finally:
        os.close(fd)
    filesystem.rename(temporary, marker)
    filesystem.fsync_directory(os.path.dirname(os.path.abspath(directory)))
    finish_singleton_switch(staging, directory)


def finish_singleton_switch(staging: str, directory: str) -> None:
    """A singleton's switch, from wherever a kill left it (its marker is there); each step
    is done again only if it was not."""
    parent = os.path.dirname(os.path.abspath(directory))
    new_identity = identity_path(staging, Kind.SINGLETON)
    with open(staging + SWITCHING, "rb") as marker:
        content = marker.read()
    if content not in _MARKERS:  # not one this code wrote whole: no switch began
        filesystem.remove_tree(staging + SWITCHING)
        return
    holds_value, _, has_identity = content.partition(b",")
    if has_identity != b"identity" or os.path.exists(new_identity):  # else all is done
        filesystem.remove_tree(identity_path(directory, Kind.SINGLETON))
        filesystem.remove_tree(link_path(directory, Kind.SINGLETON))  # the old (retired) one
        filesystem.fsync_directory(parent)
        if os.path.exists(staging):
            filesystem.rename(staging, directory)
        elif holds_value != b"value":
            filesystem.remove_tree(directory)
        filesystem.fsync_directory(parent)
        if has_identity == b"identity":
            filesystem.rename(new_identity, identity_path(directory, Kind.SINGLETON))
            filesystem.fsync_directory(parent)
    filesystem.remove_tree(staging + SWITCHING)


def finish_cut_short_switch(
    directory: str, name: str, expected: identity.Identity | None = None
) -> None:
    """Finish, under its writer lock, the switch a kill cut short at the singleton
    ``directory`` (none there: nothing to do). With ``expected`` (a load of that
    identity), only when the singleton it puts in place is of that identity, or has none
    (a snapshot of a store made before identities: any class may load it, as any such
    store); else nothing changes, not even the lock file, and the load is refused."""
    staging = directory + STAGING

    def wanted() -> bool:  # (read without the lock too: a switch moves the identity whole)
        if not os.path.exists(staging + SWITCHING):
            return False
        if expected is None:
            return True
        target = _switch_target(staging, directory, name)
        return target is None or target.same_as(expected)

    if not wanted():
        return
    lock = WriterLock(directory + ".lock", name, directory)
    try:  # again: the switch may have ended, or another begun, meanwhile
        if wanted():
            finish_singleton_switch(staging, directory)
    finally:
        lock.release()


def _switch_target(staging: str, directory: str, name: str) -> identity.Identity | None:
    """The identity of the singleton that the switch under way puts in place: None when
    it has none, or its marker is not one a switch wrote (or is gone)."""
    try:
        with open(staging + SWITCHING, "rb") as marker:
            content = marker.read()
    except FileNotFoundError:
        return None
    if content not in _MARKERS or not content.endswith(b",identity"):
        return None
    staged = identity.read(identity_path(staging, Kind.SINGLETON), name, directory)
    if staged is not None:
        return staged
    return identity.read(identity_path(directory, Kind.SINGLETON), name, directory)


def _remove(staging: str, cls: type[Store]) -> None:
    """Delete a store at ``staging`` (of ``cls``'s files), if there, durably."""
    paths = [staging]
    if _files(cls) is Kind.SINGLETON:
        paths += [
            staging + ".lock",
            identity_path(staging, Kind.SINGLETON),
            staging + ".tmp",
            staging + SWITCHING + ".tmp",
        ]
    if any(os.path.lexists(path) for path in paths):
        for path in paths:
            filesystem.remove_tree(path)
        filesystem.fsync_directory(os.path.dirname(os.path.abspath(staging)))
