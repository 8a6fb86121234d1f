"""Factories: bind a store kind to a name and codecs (the Octez functors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .codecs import compile_codec
from .stores.base import Store
from .stores.indexable import IndexableRemovableStore, IndexableStore
from .stores.indexed_file import IndexedFile, SimpleIndexedFile
from .stores.singleton import SingletonStore

_S = TypeVar("_S", bound=Store)


def _bind(
    base: type[_S], name: str, extra: dict[str, Any] | None = None, **codecs: Any
) -> type[_S]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a store needs a non-empty name, got {name!r}")
    attributes: dict[str, Any] = {"name": name, "__module__": base.__module__, **(extra or {})}
    for role, (codec, require_fixed) in codecs.items():
        attributes[f"{role}_codec"] = codec
        attributes[f"_{role}"] = compile_codec(codec, role=role, require_fixed=require_fixed)
    class_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_") if part)
    return type(f"{class_name or 'Store'}{base.__name__}", (base,), attributes)


def make_singleton(name: str, value_codec: Any) -> type[SingletonStore[Any]]:
    """A singleton store class holding one value of ``value_codec``."""
    return _bind(SingletonStore, name, value=(value_codec, False))


def make_indexable(name: str, key_codec: Any, value_codec: Any) -> type[IndexableStore[Any, Any]]:
    """An indexable store class; both codecs must be fixed-size."""
    return _bind(IndexableStore, name, key=(key_codec, True), value=(value_codec, True))


def make_indexable_removable(
    name: str, key_codec: Any, value_codec: Any
) -> type[IndexableRemovableStore[Any, Any]]:
    """An indexable store class with ``remove``; both codecs must be fixed-size."""
    return _bind(IndexableRemovableStore, name, key=(key_codec, True), value=(value_codec, True))


def make_indexed_file(
    name: str, key_codec: Any, value_codec: Any, header_codec: Any
) -> type[IndexedFile[Any, Any, Any]]:
    """An indexed-file store class: fixed-size keys and headers, values of any size."""
    return _bind(
        IndexedFile,
        name,
        key=(key_codec, True),
        value=(value_codec, False),
        header=(header_codec, True),
    )


def make_simple_indexed_file(
    name: str,
    key_codec: Any,
    value_codec: Any,
    header_codec: Any,
    header_of: Callable[[Any], Any],
) -> type[SimpleIndexedFile[Any, Any, Any]]:
    """An indexed-file store class whose headers are ``header_of(value)``."""
    if not callable(header_of):
        raise TypeError(f"header_of must be callable, got {header_of!r}")
    return _bind(
        SimpleIndexedFile,
        name,
        {"header_of": staticmethod(header_of)},
        key=(key_codec, True),
        value=(value_codec, False),
        header=(header_codec, True),
    )
