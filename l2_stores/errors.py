"""The error hierarchy of l2_stores: every error is a :class:`StoreError`."""

from __future__ import annotations

import os

__all__ = [
    "StoreError",
    "CannotLoadStore",
    "CannotReadFromStore",
    "CannotWriteToStore",
    "DecodingError",
    "CodecError",
    "GcFailed",
    "ReadOnlyError",
    "StoreClosedError",
    "StoreLockedError",
]


class StoreError(Exception):
    """Base of every error raised by l2_stores.

    ``name`` is the store's name and ``path`` its location on disk, when known;
    both appear in the message. A corruption error also carries the ``offset``
    of the bad bytes in the file ``path``.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ) -> None:
        self.name = name
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.reason = message
        where = ""
        if name is not None:
            where = f"store {name!r}"
        if self.path is not None:
            where = f"{where} at {self.path}" if where else f"at {self.path}"
        super().__init__(f"{where}: {message}" if where else message)


class CannotLoadStore(StoreError):
    """The store's files could not be opened, or are not what was expected.

    When the store is of another kind or codecs than the loading class,
    ``expected`` and ``found`` say both in words (None otherwise).
    """

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message, name=name, path=path, offset=offset)
        self.expected = expected
        self.found = found


class CannotReadFromStore(StoreError):
    """A read found corrupted or unreadable data."""


class CannotWriteToStore(StoreError):
    """A write could not be carried out."""


class DecodingError(StoreError):
    """Stored bytes could not be decoded by the store's codec."""


class CodecError(StoreError, ValueError):
    """A codec is unsuitable, or refused to encode a value."""


class GcFailed(StoreError):
    """A garbage collection failed; the store was left as it was."""


class ReadOnlyError(StoreError):
    """A write was attempted on a read-only store or view."""


class StoreClosedError(StoreError):
    """The store was used after :meth:`close`."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""
