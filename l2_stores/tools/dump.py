"""``l2-stores dump``: the live bindings of one store, as hex, in key order."""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import StoreError
from ..stores import identity
from ..stores.base import Store
from ..stores.layout import Kind
from .on_disk import StoreOnDisk


def bindings(
    store: StoreOnDisk,
    limit: int | None = None,
    *,
    start: str | None = None,
    stop: str | None = None,
    reverse: bool = False,
) -> Iterator[dict[str, Any]]:
    """The bindings of ``store`` with ``start <= key < stop`` (see :func:`parse_key`), as
    ``{"key", "value"[, "header"]}`` hex strings, in key order (``reverse``: descending);
    with ``"decoded"`` too (role to JSON value) when the store's recorded codecs can be
    rebuilt (see :func:`decoders`)."""
    key_size = store.sizes().key
    low = None if start is None or key_size is None else parse_key(start, key_size, store)
    high = None if stop is None or key_size is None else parse_key(stop, key_size, store)
    parsers = decoders(store)
    opened = store.open()
    if opened is None:
        return
    with opened:
        for row in itertools.islice(_rows(store.kind, opened, low, high, reverse), limit):
            if parsers:
                row["decoded"] = {
                    role: _decoded(parsers[role], bytes.fromhex(row[role]))
                    for role in ("key", "header", "value")
                    if role in row and role in parsers
                }
            yield row


def decoders(store: StoreOnDisk) -> dict[str, Callable[[bytes], Any]]:
    """Per role (key, value, header), a parser rebuilt from the store's recorded codecs;
    empty when none is recorded (a role whose codec cannot be rebuilt is left out)."""
    try:
        recorded = store.identity()
    except StoreError:
        return {}
    if recorded is None:
        return {}
    found = {}
    for role, description in recorded.codecs.items():
        codec = identity.construct_of(description)
        if codec is not None:
            found[role] = codec.parse
    return found


def _decoded(parse: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return jsonable(parse(data))
    except Exception as error:  # a codec's own failure: shown, not raised
        return {"error": f"{type(error).__name__}: {error}"}


def jsonable(value: Any) -> Any:
    """What ``construct`` parsed, as JSON values: containers as objects, bytes as hex."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return repr(value)


def parse_key(text: str, key_size: int, store: StoreOnDisk) -> bytes:
    """A key given on the command line: ``2 * key_size`` hex digits (a whole key, as
    ``dump`` prints it), ``0x`` and hex digits (a prefix, zeros after it), or a decimal
    number (a big-endian integer key, as ``Int32ub`` and the like encode it)."""
    digits = text[2:] if text.lower().startswith("0x") else text
    whole = len(text) == 2 * key_size and all(ch in string.hexdigits for ch in text)
    try:
        if whole or digits is not text:
            key = bytes.fromhex(digits)
            if len(key) > key_size:
                raise ValueError(f"{len(key)} bytes, the keys have {key_size}")
            return key.ljust(key_size, b"\x00")
        if text.isdigit():
            return int(text).to_bytes(key_size, "big")
        raise ValueError("neither hex digits nor a number")
    except (ValueError, OverflowError) as error:
        raise StoreError(
            f"bad key {text!r}: {error}; give {2 * key_size} hex digits, 0x and a hex "
            "prefix, or a number",
            name=store.name,
            path=store.path,
        ) from None


def _rows(
    kind: Kind, store: Store, start: bytes | None, stop: bytes | None, reverse: bool
) -> Iterator[dict[str, Any]]:
    if kind is Kind.SINGLETON:
        value = store.read()  # type: ignore[attr-defined]
        if value is not None:
            yield {"value": value.hex()}
    elif kind is Kind.INDEXED_FILE:
        pairs = store.items(start, stop, reverse=reverse)  # type: ignore[attr-defined]
        for key, (value, header) in pairs:
            yield {"key": key.hex(), "header": header.hex(), "value": value.hex()}
    else:
        for key, value in store.items(start, stop, reverse=reverse):  # type: ignore[attr-defined]
            yield {"key": key.hex(), "value": value.hex()}
