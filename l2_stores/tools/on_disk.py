"""Stores as found on disk: what kind each path holds, its sizes, and raw store classes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import construct

from ..engine.files import index_header, index_lock
from ..engine.framing import FileHeader
from ..errors import CannotLoadStore
from ..factories import make_indexable_removable, make_indexed_file, make_singleton
from ..mode import Mode
from ..stores import identity
from ..stores.base import Store
from ..stores.layout import INDEX_DIRECTORY, Kind, classify, identity_path
from ..stores.singleton import VARIABLE_SIZE, read_singleton_file


@dataclass(frozen=True)
class Sizes:
    """Encoding sizes found in a store's file headers (``value`` None when variable)."""

    key: int | None
    value: int | None
    header: int = 0


@dataclass(frozen=True)
class StoreOnDisk:
    """A store found at ``path``."""

    path: str
    kind: Kind

    @property
    def name(self) -> str:
        """The store's name: the recorded one, else the last component of its path."""
        try:
            recorded = self.identity()
        except CannotLoadStore:
            recorded = None
        return recorded.name if recorded is not None else self._path_name

    @property
    def _path_name(self) -> str:
        """The last component of the store's path: its name where none is recorded."""
        return os.path.basename(os.path.normpath(self.path)) or self.path

    def identity(self) -> identity.Identity | None:
        """The store's recorded identity (None for a store made before identities).

        Raises :class:`CannotLoadStore` when its file is damaged.
        """
        return identity.read(identity_path(self.path, self.kind), self._path_name, self.path)

    @property
    def index_directory(self) -> str | None:
        """The directory of the store's index (None for a singleton)."""
        if self.kind is Kind.INDEXABLE:
            return self.path
        if self.kind is Kind.INDEXED_FILE:
            return os.path.join(self.path, INDEX_DIRECTORY)
        return None

    @property
    def lock_path(self) -> str:
        """The store's writer lock file."""
        if self.kind is Kind.SINGLETON:
            return self.path + ".lock"
        directory = self.index_directory
        assert directory is not None
        return index_lock(directory)

    def files(self) -> dict[str, int]:
        """Every file of the store (relative path to its store) and its size in bytes."""
        if self.kind is Kind.SINGLETON:
            found = {os.path.basename(self.path): os.path.getsize(self.path)}
            for beside in (self.lock_path, identity_path(self.path, self.kind)):
                if os.path.exists(beside):
                    found[os.path.basename(beside)] = os.path.getsize(beside)
            return found
        found = {}
        for root, _, names in os.walk(self.path):
            for name in names:
                full = os.path.join(root, name)
                try:
                    found[os.path.relpath(full, self.path)] = os.path.getsize(full)
                except FileNotFoundError:
                    continue  # deleted by a running writer meanwhile
        return dict(sorted(found.items()))

    def sizes(self) -> Sizes:
        """The encoding sizes of the store, read from a file header.

        Raises :class:`CannotLoadStore` when the header cannot be read.
        """
        if self.kind is Kind.SINGLETON:
            found = read_singleton_file(self.path, self.name)
            if found is None:
                raise CannotLoadStore("singleton file missing", name=self.name, path=self.path)
            return Sizes(None, None if found[0] == VARIABLE_SIZE else found[0])
        header = _index_header(self)
        if header is None:
            return Sizes(None, None, 0)
        if self.kind is Kind.INDEXED_FILE:
            return Sizes(header.key_size, None, header.header_size)
        return Sizes(header.key_size, header.value_size)

    def raw_class(self) -> type[Store] | None:
        """A store class that reads this store as bytes; None when it has no bindings yet."""
        sizes = self.sizes()
        if sizes.key is None and self.kind is not Kind.SINGLETON:
            return None
        return raw_class(self.name, self.kind, sizes)

    def open(self, mode: Mode = Mode.READ_ONLY, **options: Any) -> Store | None:
        """This store loaded with raw codecs; None when it has no bindings yet."""
        cls = self.raw_class()
        return None if cls is None else cls.load(self.path, mode, **options)  # type: ignore[attr-defined]


def raw_class(name: str, kind: Kind, sizes: Sizes) -> type[Store]:
    """A store class of ``kind`` named ``name`` with byte codecs of ``sizes``: it loads any
    store of that kind's files and sizes, whatever its identity, and records none."""
    cls: type[Store]
    if kind is Kind.SINGLETON:
        value: Any = construct.GreedyBytes if sizes.value is None else construct.Bytes(sizes.value)
        cls = make_singleton(name, value)
    elif kind is Kind.INDEXED_FILE:
        assert sizes.key is not None
        key = construct.Bytes(sizes.key)
        cls = make_indexed_file(name, key, construct.GreedyBytes, construct.Bytes(sizes.header))
    else:
        assert sizes.key is not None and sizes.value is not None
        cls = make_indexable_removable(
            name, construct.Bytes(sizes.key), construct.Bytes(sizes.value)
        )
    cls._checks_identity = False
    return cls


def _index_header(store: StoreOnDisk) -> FileHeader | None:
    directory = store.index_directory
    assert directory is not None
    return index_header(directory, store.name)


def find_stores(path: str) -> list[StoreOnDisk]:
    """The store at ``path``, or every store below the directory ``path``, sorted by path.

    Raises :class:`CannotLoadStore` when ``path`` is missing or holds no store.
    """
    if not os.path.exists(path):
        raise CannotLoadStore("no such file or directory", path=path)
    kind = classify(path)
    if kind is not None:
        return [StoreOnDisk(path, kind)]
    found: list[StoreOnDisk] = []
    if os.path.isdir(path):
        _collect(path, found)
    if not found:
        raise CannotLoadStore("holds no store", path=path)
    return found


#: Suffixes of the stores an import, a migration or a salvage builds or sets aside (see
#: ``snapshot``, ``migration`` and ``salvage``): not stores.
IMPORT_LEFTOVERS = (".import-tmp", ".import-old", ".migrate-tmp", ".salvage-tmp", ".salvage-index")


def _collect(directory: str, found: list[StoreOnDisk]) -> None:
    for name in sorted(os.listdir(directory)):
        if name.endswith(IMPORT_LEFTOVERS):
            continue
        child = os.path.join(directory, name)
        kind = classify(child)
        if kind is not None:
            found.append(StoreOnDisk(child, kind))
        elif os.path.isdir(child) and not os.path.islink(child):
            _collect(child, found)
