"""``l2-stores dump``: every live binding of one store, as hex."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..stores.base import Store
from .on_disk import Kind, StoreOnDisk


def bindings(store: StoreOnDisk, limit: int | None = None) -> Iterator[dict[str, str]]:
    """The bindings of ``store`` as ``{"key", "value"[, "header"]}`` hex strings, in no order."""
    opened = store.open()
    if opened is None:
        return
    with opened:
        yield from itertools.islice(_rows(store.kind, opened), limit)


def _rows(kind: Kind, store: Store) -> Iterator[dict[str, str]]:
    if kind is Kind.SINGLETON:
        value = store.read()  # type: ignore[attr-defined]
        if value is not None:
            yield {"value": value.hex()}
    elif kind is Kind.INDEXED_FILE:
        for key, (value, header) in store.items():  # type: ignore[attr-defined]
            yield {"key": key.hex(), "header": header.hex(), "value": value.hex()}
    else:
        for key, value in store.items():  # type: ignore[attr-defined]
            yield {"key": key.hex(), "value": value.hex()}
