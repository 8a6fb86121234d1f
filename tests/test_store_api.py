"""API behaviours of the Foundation stores: factories, lifetime, views, modes, codecs.

Every test here checks one behaviour of the public contract (``shared/API.md``)
of ``make_singleton``, ``make_indexable`` and ``make_indexable_removable`` stores.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import construct
import pytest

import l2_stores
from l2_stores import (
    CodecError,
    IndexableRemovableStore,
    IndexableStore,
    Mode,
    ReadOnlyError,
    SingletonStore,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    fixed,
    make_indexable,
    make_indexable_removable,
    make_singleton,
)

KEY = construct.Bytes(32)
VALUE = construct.Bytes(32)
STRUCT = construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))

Plain = make_indexable("api_plain", KEY, VALUE)
Removable = make_indexable_removable("api_removable", KEY, VALUE)
Structs = make_indexable("api_struct", KEY, STRUCT)
StructSingleton = make_singleton("api_struct_singleton", STRUCT)
BlobSingleton = make_singleton("api_blob_singleton", construct.GreedyBytes)
Fixed4Singleton = make_singleton("api_fixed4_singleton", construct.Bytes(4))

VARIABLE_CODECS = [
    pytest.param(construct.GreedyBytes, id="GreedyBytes"),
    pytest.param(construct.PascalString(construct.VarInt, "utf8"), id="PascalString"),
    pytest.param(
        construct.Struct("n" / construct.Int8ub, "rest" / construct.GreedyBytes),
        id="Struct-ending-GreedyBytes",
    ),
]


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def value(i: int, tag: int = 0) -> bytes:
    return bytes([tag]) + i.to_bytes(31, "big")


def plain(found: Any) -> Any:
    """A decoded value as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    return found


def bindings(store: Any) -> dict[Any, Any]:
    """``store.items()`` as a dict, after checking that no key is yielded twice."""
    items = list(store.items())
    keys = [k for k, _ in items]
    assert len(keys) == len(set(keys)), "items() yielded a key twice"
    listed = list(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(keys), "keys() and items() disagree"
    return {k: plain(v) for k, v in items}


def assert_names_store(error: BaseException, store_name: str, path: Any) -> None:
    message = str(error)
    assert store_name in message, f"{message!r} does not name the store {store_name!r}"
    assert os.fspath(path) in message, f"{message!r} does not name the path {path}"


# ---------------------------------------------------------------- factories


@pytest.mark.parametrize(
    ("factory", "base"),
    [
        (make_indexable, IndexableStore),
        (make_indexable_removable, IndexableRemovableStore),
    ],
)
def test_indexable_factories_return_bound_subclasses(
    factory: Callable[..., type], base: type
) -> None:
    cls = factory("bound_store", KEY, STRUCT)
    assert isinstance(cls, type)
    assert issubclass(cls, base)
    assert issubclass(cls, IndexableStore)
    assert cls.name == "bound_store"
    assert cls.key_codec is KEY
    assert cls.value_codec is STRUCT


def test_removable_factory_has_remove_and_plain_one_does_not() -> None:
    assert hasattr(Removable, "remove")
    assert not hasattr(Plain, "remove")
    assert not issubclass(Plain, IndexableRemovableStore)


def test_singleton_factory_returns_bound_subclass() -> None:
    cls = make_singleton("bound_singleton", STRUCT)
    assert isinstance(cls, type)
    assert issubclass(cls, SingletonStore)
    assert cls.name == "bound_singleton"
    assert cls.value_codec is STRUCT


def test_factories_bind_independent_classes() -> None:
    first = make_indexable("first_store", KEY, VALUE)
    second = make_indexable("second_store", construct.Bytes(4), STRUCT)
    assert first is not second
    assert (first.name, first.key_codec, first.value_codec) == ("first_store", KEY, VALUE)
    assert second.name == "second_store"
    assert second.value_codec is STRUCT


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda name: make_singleton(name, VALUE), id="singleton"),
        pytest.param(lambda name: make_indexable(name, KEY, VALUE), id="indexable"),
        pytest.param(lambda name: make_indexable_removable(name, KEY, VALUE), id="removable"),
    ],
)
def test_empty_name_is_a_value_error(make: Callable[[str], type]) -> None:
    with pytest.raises(ValueError):
        make("")


@pytest.mark.parametrize("factory", [make_indexable, make_indexable_removable])
@pytest.mark.parametrize("codec", VARIABLE_CODECS)
@pytest.mark.parametrize("role", ["key", "value"])
def test_non_fixed_codec_is_refused_at_factory_time(
    factory: Callable[..., type], codec: Any, role: str
) -> None:
    codecs = (codec, VALUE) if role == "key" else (KEY, codec)
    with pytest.raises(CodecError) as caught:
        factory("variable_store", *codecs)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, StoreError)


@pytest.mark.parametrize("codec", VARIABLE_CODECS)
def test_singleton_accepts_variable_size_codecs(codec: Any) -> None:
    cls = make_singleton("variable_singleton", codec)
    assert cls.value_codec is codec


@pytest.mark.parametrize(
    "codec",
    [construct.Bytes(32), construct.Int32ub, construct.Int64sl, STRUCT],
    ids=["Bytes32", "Int32ub", "Int64sl", "Struct"],
)
def test_fixed_returns_its_argument(codec: Any) -> None:
    assert fixed(codec) is codec
    assert fixed(codec, name="some_codec") is codec


def test_fixed_refuses_a_variable_codec_naming_it() -> None:
    with pytest.raises(CodecError) as caught:
        fixed(construct.GreedyBytes)
    assert "GreedyBytes" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("codec", VARIABLE_CODECS)
def test_fixed_refuses_variable_codecs_with_the_given_name(codec: Any) -> None:
    with pytest.raises(CodecError) as caught:
        fixed(codec, name="my_special_codec")
    assert "my_special_codec" in str(caught.value)


# ------------------------------------------------------------------ imports

ERROR_NAMES = [
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
OTHER_NAMES = [
    "Mode",
    "IdleWaiter",
    "fixed",
    "make_singleton",
    "make_indexable",
    "make_indexable_removable",
    "SingletonStore",
    "IndexableStore",
    "IndexableRemovableStore",
]


@pytest.mark.parametrize("name", ERROR_NAMES + OTHER_NAMES)
def test_public_name_is_importable_from_the_package(name: str) -> None:
    assert hasattr(l2_stores, name), f"l2_stores.{name} is missing"
    namespace: dict[str, Any] = {}
    exec(f"from l2_stores import {name}", namespace)
    assert namespace[name] is getattr(l2_stores, name)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_error_derives_from_store_error(name: str) -> None:
    error_class = getattr(l2_stores, name)
    assert issubclass(error_class, Exception)
    assert issubclass(error_class, l2_stores.StoreError)


def test_codec_error_is_also_a_value_error() -> None:
    assert issubclass(l2_stores.CodecError, ValueError)


def test_mode_is_an_enum_with_the_two_modes() -> None:
    import enum

    assert issubclass(Mode, enum.Enum)
    assert {m.name for m in Mode} >= {"READ_ONLY", "READ_WRITE"}
    assert Mode.READ_ONLY is not Mode.READ_WRITE


# ------------------------------------------------------------ path and mode


def test_indexable_exposes_path_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Plain.load(path) as store:
        assert os.fspath(store.path) == os.fspath(path)
        assert store.mode is Mode.READ_WRITE
    with Plain.load(path, Mode.READ_ONLY) as store:
        assert os.fspath(store.path) == os.fspath(path)
        assert store.mode is Mode.READ_ONLY


def test_singleton_exposes_path_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with StructSingleton.load(path) as store:
        assert os.fspath(store.path) == os.fspath(path)
        assert store.mode is Mode.READ_WRITE
    with StructSingleton.load(path, Mode.READ_ONLY) as store:
        assert store.mode is Mode.READ_ONLY


def test_load_accepts_str_paths(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    with Plain.load(path) as store:
        store.add(key(1), value(1))
    with Plain.load(path) as store:
        assert store.find(key(1)) == value(1)


# ----------------------------------------------------------------- lifetime


def test_context_manager_closes_indexable(tmp_path: Path) -> None:
    with Removable.load(tmp_path / "store") as store:
        store.add(key(1), value(1))
        assert store.find(key(1)) == value(1)
    with pytest.raises(StoreClosedError):
        store.find(key(1))
    # The lock was released: loading again works.
    with Removable.load(tmp_path / "store") as again:
        assert again.find(key(1)) == value(1)


def test_context_manager_closes_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Plain.load(tmp_path / "store") as store:
        store.add(key(1), value(1))
        raise RuntimeError("boom")
    with pytest.raises(StoreClosedError):
        store.mem(key(1))
    with Plain.load(tmp_path / "store") as again:
        assert again.find(key(1)) == value(1)


def test_context_manager_closes_singleton(tmp_path: Path) -> None:
    with Fixed4Singleton.load(tmp_path / "single") as store:
        store.write(b"abcd")
    with pytest.raises(StoreClosedError):
        store.read()
    with Fixed4Singleton.load(tmp_path / "single") as again:
        assert again.read() == b"abcd"


def test_close_is_idempotent(tmp_path: Path) -> None:
    store = Removable.load(tmp_path / "store")
    store.add(key(1), value(1))
    store.close()
    store.close()
    with store:
        pass
    store.close()
    single = Fixed4Singleton.load(tmp_path / "single")
    single.close()
    single.close()
    with pytest.raises(StoreClosedError):
        store.find(key(1))
    with pytest.raises(StoreClosedError):
        single.read()


INDEXABLE_CALLS: dict[str, Callable[[Any], Any]] = {
    "find": lambda s: s.find(key(1)),
    "mem": lambda s: s.mem(key(1)),
    "add": lambda s: s.add(key(2), value(2)),
    "add-noflush": lambda s: s.add(key(2), value(2), flush=False),
    "remove": lambda s: s.remove(key(1)),
    "flush": lambda s: s.flush(),
    "keys": lambda s: list(s.keys()),
    "items": lambda s: list(s.items()),
    "sync": lambda s: s.sync(),
    "readonly": lambda s: s.readonly(),
}


@pytest.mark.parametrize("call", list(INDEXABLE_CALLS), ids=list(INDEXABLE_CALLS))
def test_indexable_calls_after_close_raise_store_closed(tmp_path: Path, call: str) -> None:
    path = tmp_path / "store"
    store = Removable.load(path, index_buffer_size=2)
    for i in range(5):
        store.add(key(i), value(i))
    store.close()
    with pytest.raises(StoreClosedError) as caught:
        INDEXABLE_CALLS[call](store)
    assert_names_store(caught.value, Removable.name, path)
    # Nothing was written by the refused call.
    with Removable.load(path) as again:
        assert bindings(again) == {key(i): value(i) for i in range(5)}


@pytest.mark.parametrize("call", ["keys", "items"])
def test_iterator_taken_before_close_raises_store_closed(tmp_path: Path, call: str) -> None:
    # Nearly everything lives in the data file (merged with buffer 1), and
    # no merge runs when the iterator is taken: iterating goes through it.
    path = tmp_path / "store"
    with Plain.load(path, index_buffer_size=1) as filler:
        for i in range(20):
            filler.add(key(i), value(i))
    store = Plain.load(path)
    iterator = iter(getattr(store, call)())
    next(iterator)
    store.close()
    with pytest.raises(StoreClosedError) as caught:
        for _ in iterator:
            pass
    assert_names_store(caught.value, Plain.name, path)


SINGLETON_CALLS: dict[str, Callable[[Any], Any]] = {
    "read": lambda s: s.read(),
    "write": lambda s: s.write(b"wxyz"),
    "delete": lambda s: s.delete(),
    "sync": lambda s: s.sync(),
    "readonly": lambda s: s.readonly(),
}


@pytest.mark.parametrize("call", list(SINGLETON_CALLS), ids=list(SINGLETON_CALLS))
def test_singleton_calls_after_close_raise_store_closed(tmp_path: Path, call: str) -> None:
    path = tmp_path / "single"
    store = Fixed4Singleton.load(path)
    store.write(b"abcd")
    store.close()
    with pytest.raises(StoreClosedError) as caught:
        SINGLETON_CALLS[call](store)
    assert_names_store(caught.value, Fixed4Singleton.name, path)
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"abcd"


@pytest.mark.parametrize("mode", [Mode.READ_ONLY, Mode.READ_WRITE])
def test_read_only_calls_after_close_raise_store_closed(tmp_path: Path, mode: Mode) -> None:
    path = tmp_path / "store"
    with Plain.load(path) as writer:
        writer.add(key(1), value(1))
    store = Plain.load(path, mode)
    store.close()
    for call in ("find", "mem", "keys", "items", "sync", "readonly"):
        with pytest.raises(StoreClosedError):
            INDEXABLE_CALLS[call](store)


# -------------------------------------------------------------- readonly()


def test_readonly_view_sees_writes_through_the_store(tmp_path: Path) -> None:
    with Removable.load(tmp_path / "store", index_buffer_size=2) as store:
        store.add(key(0), value(0))
        view = store.readonly()
        assert view.find(key(0)) == value(0)
        for i in range(1, 10):
            store.add(key(i), value(i))
        store.remove(key(0))
        store.add(key(1), value(1, tag=9), flush=False)
        assert view.find(key(0)) is None
        assert not view.mem(key(0))
        assert view.find(key(1)) == value(1, tag=9)
        assert view.mem(key(5))
        expected = {key(i): value(i) for i in range(2, 10)}
        expected[key(1)] = value(1, tag=9)
        assert bindings(view) == expected
        assert bindings(store) == expected


def test_readonly_view_refuses_every_write(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Removable.load(path) as store:
        store.add(key(1), value(1))
        view = store.readonly()
        writes: dict[str, Callable[[], Any]] = {
            "add": lambda: view.add(key(2), value(2)),
            "add-noflush": lambda: view.add(key(1), value(7), flush=False),
            "remove": lambda: view.remove(key(1)),
            "remove-absent": lambda: view.remove(key(3)),
            "flush": lambda: view.flush(),
        }
        for name, write in writes.items():
            with pytest.raises(ReadOnlyError) as caught:
                write()
            assert Removable.name in str(caught.value), name
        assert bindings(store) == {key(1): value(1)}
        assert bindings(view) == {key(1): value(1)}
        # The store itself is still writable.
        store.add(key(2), value(2))
        assert view.find(key(2)) == value(2)
    with Removable.load(path) as again:
        assert bindings(again) == {key(1): value(1), key(2): value(2)}


def test_view_of_a_view_is_read_only(tmp_path: Path) -> None:
    with Plain.load(tmp_path / "store") as store:
        store.add(key(1), value(1))
        view = store.readonly().readonly()
        assert view.find(key(1)) == value(1)
        with pytest.raises(ReadOnlyError):
            view.add(key(2), value(2))


def test_closing_a_view_leaves_the_store_open(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Removable.load(path) as store:
        store.add(key(1), value(1))
        view = store.readonly()
        view.close()
        view.close()
        # The store goes on working, reads and writes.
        assert store.find(key(1)) == value(1)
        store.add(key(2), value(2))
        store.remove(key(1))
        assert bindings(store) == {key(2): value(2)}
        # The closed view is closed.
        with pytest.raises(StoreClosedError):
            view.find(key(2))
        # A new view works.
        assert store.readonly().find(key(2)) == value(2)
    with Removable.load(path) as again:
        assert bindings(again) == {key(2): value(2)}


def test_closing_the_store_closes_its_views(tmp_path: Path) -> None:
    store = Plain.load(tmp_path / "store")
    store.add(key(1), value(1))
    view = store.readonly()
    store.close()
    with pytest.raises(StoreClosedError):
        view.find(key(1))
    with pytest.raises(StoreClosedError):
        list(view.items())


def test_singleton_view_sees_writes_through_the_store(tmp_path: Path) -> None:
    with Fixed4Singleton.load(tmp_path / "single") as store:
        view = store.readonly()
        assert view.read() is None
        store.write(b"abcd")
        assert view.read() == b"abcd"
        store.write(b"efgh")
        assert view.read() == b"efgh"
        store.delete()
        assert view.read() is None


def test_singleton_view_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with Fixed4Singleton.load(path) as store:
        store.write(b"abcd")
        view = store.readonly()
        assert view.read() == b"abcd"
        with pytest.raises(ReadOnlyError) as caught:
            view.write(b"efgh")
        assert Fixed4Singleton.name in str(caught.value)
        with pytest.raises(ReadOnlyError) as caught:
            view.delete()
        assert Fixed4Singleton.name in str(caught.value)
        assert store.read() == b"abcd"
        view.close()
        # Closing the view leaves the singleton open and writable.
        store.write(b"ijkl")
        assert store.read() == b"ijkl"
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"ijkl"


# ------------------------------------------------------------- READ_ONLY


def test_read_only_indexable_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Removable.load(path) as writer:
        writer.add(key(1), value(1))
    with Removable.load(path, Mode.READ_ONLY) as reader:
        assert reader.find(key(1)) == value(1)
        for write in (
            lambda: reader.add(key(2), value(2)),
            lambda: reader.add(key(2), value(2), flush=False),
            lambda: reader.remove(key(1)),
            lambda: reader.flush(),
        ):
            with pytest.raises(ReadOnlyError) as caught:
                write()
            assert Removable.name in str(caught.value)
        with pytest.raises(ReadOnlyError):
            reader.readonly().add(key(2), value(2))
        assert bindings(reader) == {key(1): value(1)}
    with Removable.load(path) as again:
        assert bindings(again) == {key(1): value(1)}


def test_read_only_singleton_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with Fixed4Singleton.load(path) as writer:
        writer.write(b"abcd")
    with Fixed4Singleton.load(path, Mode.READ_ONLY) as reader:
        assert reader.read() == b"abcd"
        with pytest.raises(ReadOnlyError):
            reader.write(b"efgh")
        with pytest.raises(ReadOnlyError):
            reader.delete()
        assert reader.read() == b"abcd"
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"abcd"


@pytest.mark.parametrize("cls", [Plain, Removable, Structs])
def test_read_only_load_of_missing_indexable_is_empty_and_creates_nothing(
    tmp_path: Path, cls: type[IndexableStore]
) -> None:
    path = tmp_path / "missing" / "parent" / "store"
    with cls.load(path, Mode.READ_ONLY) as store:
        assert store.find(key(1)) is None
        assert not store.mem(key(1))
        assert list(store.keys()) == []
        assert list(store.items()) == []
        store.sync()
        assert list(store.items()) == []
    assert list(tmp_path.iterdir()) == []


def test_read_only_load_of_empty_existing_directory_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.mkdir()
    with Plain.load(path, Mode.READ_ONLY) as store:
        assert list(store.items()) == []
        assert store.find(key(0)) is None
    assert list(path.iterdir()) == []


@pytest.mark.parametrize("cls", [Fixed4Singleton, StructSingleton, BlobSingleton])
def test_read_only_load_of_missing_singleton_is_empty_and_creates_nothing(
    tmp_path: Path, cls: type[SingletonStore]
) -> None:
    for path in (tmp_path / "single", tmp_path / "missing" / "parent" / "single"):
        with cls.load(path, Mode.READ_ONLY) as store:
            assert store.read() is None
            store.sync()
            assert store.read() is None
        assert list(tmp_path.iterdir()) == []


def test_read_only_singleton_sync_sees_later_writes(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with (
        Fixed4Singleton.load(path, Mode.READ_ONLY) as reader,
        Fixed4Singleton.load(path) as writer,
    ):
        writer.write(b"abcd")
        assert reader.read() is None
        reader.sync()
        assert reader.read() == b"abcd"
        writer.delete()
        assert reader.read() == b"abcd"
        reader.sync()
        assert reader.read() is None


# ------------------------------------------------------------ READ_WRITE load


def test_read_write_load_creates_nested_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "store"
    with Plain.load(path) as store:
        assert path.is_dir()
        store.add(key(1), value(1))
        names = os.listdir(path)
        assert "lock" in names
        assert any(name.startswith("log.") for name in names)
    with Plain.load(path) as again:
        assert again.find(key(1)) == value(1)


def test_read_write_singleton_load_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "z" / "single"
    with Fixed4Singleton.load(path) as store:
        assert path.parent.is_dir()
        assert store.read() is None
        store.write(b"abcd")
        assert path.is_file()
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"abcd"


# -------------------------------------------------------- bindings semantics


@pytest.mark.parametrize("buffer", [1, 2, 10_000])
def test_add_replaces_the_earlier_binding(tmp_path: Path, buffer: int) -> None:
    path = tmp_path / "store"
    with Plain.load(path, index_buffer_size=buffer) as store:
        store.add(key(1), value(1))
        store.add(key(2), value(2))
        store.add(key(1), value(1, tag=1))
        store.add(key(3), value(3))
        store.add(key(1), value(1, tag=2))
        assert store.find(key(1)) == value(1, tag=2)
        assert bindings(store) == {
            key(1): value(1, tag=2),
            key(2): value(2),
            key(3): value(3),
        }
    with Plain.load(path, index_buffer_size=buffer) as again:
        assert again.find(key(1)) == value(1, tag=2)
        assert len(list(again.items())) == 3


def test_add_replaces_struct_values(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Structs.load(path, index_buffer_size=2) as store:
        store.add(key(1), {"level": 1, "hash": value(1)})
        store.add(key(2), {"level": 2, "hash": value(2)})
        store.add(key(1), construct.Container(level=7, hash=value(7)))
        found = store.find(key(1))
        assert (found.level, found.hash) == (7, value(7))
        assert plain(found) == {"level": 7, "hash": value(7)}
    with Structs.load(path) as again:
        assert bindings(again) == {
            key(1): {"level": 7, "hash": value(7)},
            key(2): {"level": 2, "hash": value(2)},
        }


@pytest.mark.parametrize("buffer", [1, 3, 10_000])
def test_remove_of_an_absent_key_is_a_no_op(tmp_path: Path, buffer: int) -> None:
    path = tmp_path / "store"
    with Removable.load(path, index_buffer_size=buffer) as store:
        store.remove(key(9))
        assert list(store.items()) == []
        store.add(key(1), value(1))
        store.remove(key(9))
        store.remove(key(9), flush=False)
        assert bindings(store) == {key(1): value(1)}
        store.remove(key(1))
        store.remove(key(1))
        assert not store.mem(key(1))
        assert store.find(key(1)) is None
        assert list(store.items()) == []
    with Removable.load(path, index_buffer_size=buffer) as again:
        assert list(again.items()) == []
        again.add(key(1), value(1, tag=3))
        assert again.find(key(1)) == value(1, tag=3)


def _data_files(path: Path) -> list[str]:
    return [name for name in os.listdir(path) if name.startswith("run.")]


def test_items_once_each_after_merges_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "store"
    expected: dict[bytes, bytes] = {}
    with Removable.load(path, index_buffer_size=2) as store:
        for i in range(40):
            store.add(key(i), value(i))
            expected[key(i)] = value(i)
        # Remove keys added long ago: they were merged into the data file.
        for i in range(10):
            store.remove(key(i))
            del expected[key(i)]
        assert bindings(store) == expected
        # Re-add some removed keys, replace some merged ones.
        for i in range(5, 8):
            store.add(key(i), value(i, tag=1))
            expected[key(i)] = value(i, tag=1)
        for i in range(20, 25):
            store.add(key(i), value(i, tag=2))
            expected[key(i)] = value(i, tag=2)
        # And remove a key that was just re-added.
        store.remove(key(6))
        del expected[key(6)]
        assert bindings(store) == expected
        for i in range(60):
            assert store.find(key(i)) == expected.get(key(i))
            assert store.mem(key(i)) == (key(i) in expected)
        assert len(list(store.keys())) == len(expected)
    assert _data_files(path), "no merge happened with index_buffer_size=2"
    with Removable.load(path, index_buffer_size=2) as again:
        assert bindings(again) == expected
        # Removing everything leaves nothing behind.
        for k in list(expected):
            again.remove(k)
        assert list(again.items()) == []
        assert list(again.keys()) == []
    with Removable.load(path) as last:
        assert list(last.items()) == []


# ------------------------------------------------------------ codec errors

BAD_KEYS = [
    pytest.param(b"k" * 31, id="31-bytes"),
    pytest.param(b"k" * 33, id="33-bytes"),
    pytest.param(b"", id="empty"),
    pytest.param(bytearray(31), id="bytearray-31"),
    pytest.param("k" * 32, id="str"),
    pytest.param(None, id="None"),
    pytest.param(32, id="int"),
]


@pytest.mark.parametrize("bad", BAD_KEYS)
@pytest.mark.parametrize("operation", ["find", "mem", "add", "remove"])
def test_wrong_key_raises_codec_error_and_changes_nothing(
    tmp_path: Path, bad: Any, operation: str
) -> None:
    path = tmp_path / "store"
    expected = {key(i): value(i) for i in range(5)}
    with Removable.load(path, index_buffer_size=2) as store:
        for k, v in expected.items():
            store.add(k, v)
        call = {
            "find": lambda: store.find(bad),
            "mem": lambda: store.mem(bad),
            "add": lambda: store.add(bad, value(9)),
            "remove": lambda: store.remove(bad),
        }[operation]
        with pytest.raises(CodecError) as caught:
            call()
        assert_names_store(caught.value, Removable.name, path)
        assert bindings(store) == expected
    with Removable.load(path) as again:
        assert bindings(again) == expected


BAD_BYTES_VALUES = [
    pytest.param(b"v" * 31, id="31-bytes"),
    pytest.param(b"v" * 33, id="33-bytes"),
    pytest.param(b"", id="empty"),
    pytest.param(None, id="None"),
    pytest.param("v" * 32, id="str"),
]
BAD_STRUCT_VALUES = [
    pytest.param({"level": 1}, id="missing-hash"),
    pytest.param({"hash": b"h" * 32}, id="missing-level"),
    pytest.param({"level": -1, "hash": b"h" * 32}, id="negative-level"),
    pytest.param({"level": 2**32, "hash": b"h" * 32}, id="level-too-big"),
    pytest.param({"level": 1, "hash": b"h" * 31}, id="short-hash"),
    pytest.param({"level": 1, "hash": b"h" * 33}, id="long-hash"),
    pytest.param({"level": "one", "hash": b"h" * 32}, id="str-level"),
    pytest.param(None, id="None"),
]


def _check_bad_value(cls: type[IndexableStore], path: Path, good: Any, bad: Any) -> None:
    with cls.load(path, index_buffer_size=2) as store:
        store.add(key(1), good)
        store.add(key(2), good)
        for target, flush in ((key(1), True), (key(3), True), (key(3), False)):
            with pytest.raises(CodecError) as caught:
                store.add(target, bad, flush=flush)
            assert_names_store(caught.value, cls.name, path)
        assert plain(store.find(key(1))) == plain(good)
        assert store.find(key(3)) is None
        assert not store.mem(key(3))
        assert bindings(store) == {key(1): plain(good), key(2): plain(good)}
    with cls.load(path) as again:
        assert bindings(again) == {key(1): plain(good), key(2): plain(good)}


@pytest.mark.parametrize("bad", BAD_BYTES_VALUES)
def test_wrong_bytes_value_raises_codec_error_and_writes_nothing(tmp_path: Path, bad: Any) -> None:
    _check_bad_value(Removable, tmp_path / "store", value(1), bad)


@pytest.mark.parametrize("bad", BAD_STRUCT_VALUES)
def test_wrong_struct_value_raises_codec_error_and_writes_nothing(tmp_path: Path, bad: Any) -> None:
    _check_bad_value(Structs, tmp_path / "store", {"level": 5, "hash": b"h" * 32}, bad)


# ------------------------------------------------------------ flush / fsync


def test_unflushed_writes_are_visible_at_once_and_survive_close(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Removable.load(path) as store:
        store.add(key(1), value(1), flush=False)
        assert store.find(key(1)) == value(1)
        assert store.mem(key(1))
        assert bindings(store) == {key(1): value(1)}
        store.add(key(2), value(2), flush=False)
        store.add(key(1), value(1, tag=1), flush=False)
        store.remove(key(2), flush=False)
        store.add(key(3), value(3), flush=False)
        assert bindings(store) == {key(1): value(1, tag=1), key(3): value(3)}
    with Removable.load(path) as again:
        assert bindings(again) == {key(1): value(1, tag=1), key(3): value(3)}


def test_unflushed_writes_survive_close_across_merges(tmp_path: Path) -> None:
    path = tmp_path / "store"
    expected = {}
    with Removable.load(path, index_buffer_size=3) as store:
        for i in range(25):
            store.add(key(i), value(i), flush=False)
            expected[key(i)] = value(i)
        for i in range(0, 25, 4):
            store.remove(key(i), flush=False)
            del expected[key(i)]
        assert bindings(store) == expected
    with Removable.load(path, index_buffer_size=3) as again:
        assert bindings(again) == expected


def test_flush_makes_unflushed_writes_visible_to_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Plain.load(path) as writer:
        writer.add(key(1), value(1), flush=False)
        writer.flush()
        with Plain.load(path, Mode.READ_ONLY) as reader:
            assert reader.find(key(1)) == value(1)


@pytest.mark.parametrize("buffer", [2, 10_000])
def test_fsync_store_works(tmp_path: Path, buffer: int) -> None:
    path = tmp_path / "store"
    expected = {key(i): value(i) for i in range(10)}
    with Removable.load(path, index_buffer_size=buffer, fsync=True) as store:
        for k, v in expected.items():
            store.add(k, v)
        store.add(key(10), value(10), flush=False)
        store.flush()
        store.remove(key(10))
        for k, v in expected.items():
            assert store.find(k) == v
        assert bindings(store) == expected
    with Removable.load(path, index_buffer_size=buffer, fsync=True) as again:
        assert bindings(again) == expected


# --------------------------------------------------------------- singleton


def test_singleton_read_write_delete(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with Fixed4Singleton.load(path) as store:
        assert store.read() is None
        store.delete()  # deleting nothing is fine
        assert store.read() is None
        store.write(b"abcd")
        assert store.read() == b"abcd"
        store.write(b"efgh")
        assert store.read() == b"efgh"
        store.delete()
        assert store.read() is None
        store.write(b"ijkl")
        store.write(b"mnop")
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"mnop"
        again.delete()
    with Fixed4Singleton.load(path) as last:
        assert last.read() is None


def test_singleton_struct_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with StructSingleton.load(path) as store:
        store.write({"level": 42, "hash": b"h" * 32})
        found = store.read()
        assert (found.level, found.hash) == (42, b"h" * 32)
        assert plain(found) == {"level": 42, "hash": b"h" * 32}
        store.write(construct.Container(level=2**32 - 1, hash=b"z" * 32))
    with StructSingleton.load(path) as again:
        assert plain(again.read()) == {"level": 2**32 - 1, "hash": b"z" * 32}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(bytes(range(256)) * 3, id="768-bytes"),
        pytest.param(random.Random(7).randbytes(1 << 20), id="1MiB"),
    ],
)
def test_singleton_greedy_bytes_round_trip(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "single"
    with BlobSingleton.load(path) as store:
        store.write(b"something else")
        store.write(payload)
        found = store.read()
        assert found is not None
        assert found == payload
    with BlobSingleton.load(path) as again:
        found = again.read()
        assert found is not None
        assert found == payload
    with BlobSingleton.load(path, Mode.READ_ONLY) as reader:
        assert reader.read() == payload


@pytest.mark.parametrize(
    ("cls", "good", "bad"),
    [
        pytest.param(Fixed4Singleton, b"abcd", b"abc", id="bytes-short"),
        pytest.param(Fixed4Singleton, b"abcd", b"abcde", id="bytes-long"),
        pytest.param(Fixed4Singleton, b"abcd", None, id="bytes-None"),
        pytest.param(StructSingleton, {"level": 1, "hash": b"h" * 32}, {"level": 1}, id="struct"),
        pytest.param(
            StructSingleton,
            {"level": 1, "hash": b"h" * 32},
            {"level": -5, "hash": b"h" * 32},
            id="struct-range",
        ),
        pytest.param(BlobSingleton, b"blob", "text", id="greedy-str"),
    ],
)
def test_singleton_refused_value_keeps_the_old_one(
    tmp_path: Path, cls: type[SingletonStore], good: Any, bad: Any
) -> None:
    path = tmp_path / "single"
    with cls.load(path) as store:
        store.write(good)
        with pytest.raises(CodecError) as caught:
            store.write(bad)
        assert_names_store(caught.value, cls.name, path)
        assert plain(store.read()) == plain(good)
    with cls.load(path) as again:
        assert plain(again.read()) == plain(good)


def test_singleton_refused_first_value_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "single"
    with Fixed4Singleton.load(path) as store:
        with pytest.raises(CodecError):
            store.write(b"abc")
        assert store.read() is None
    with Fixed4Singleton.load(path) as again:
        assert again.read() is None


# ----------------------------------------------------------------- locking


def test_second_read_write_load_of_an_indexable_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "store"
    first = Removable.load(path)
    try:
        first.add(key(1), value(1))
        with pytest.raises(StoreLockedError) as caught:
            Removable.load(path)
        assert_names_store(caught.value, Removable.name, path)
        # The first store is unharmed.
        first.add(key(2), value(2))
        assert bindings(first) == {key(1): value(1), key(2): value(2)}
        # READ_ONLY loads take no writer lock.
        with Removable.load(path, Mode.READ_ONLY) as reader:
            assert reader.find(key(1)) == value(1)
    finally:
        first.close()
    with Removable.load(path) as again:
        assert bindings(again) == {key(1): value(1), key(2): value(2)}


def test_lock_is_per_path_not_per_class(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Plain.load(path), pytest.raises(StoreLockedError):
        make_indexable("api_plain", KEY, VALUE).load(path)


def test_second_read_write_load_of_a_singleton_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "single"
    first = Fixed4Singleton.load(path)
    try:
        first.write(b"abcd")
        with pytest.raises(StoreLockedError) as caught:
            Fixed4Singleton.load(path)
        assert_names_store(caught.value, Fixed4Singleton.name, path)
        first.write(b"efgh")
        with Fixed4Singleton.load(path, Mode.READ_ONLY) as reader:
            assert reader.read() == b"efgh"
    finally:
        first.close()
    with Fixed4Singleton.load(path) as again:
        assert again.read() == b"efgh"


def test_failed_load_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Plain.load(path):
        for _ in range(3):
            with pytest.raises(StoreLockedError):
                Plain.load(path)
    with Plain.load(path) as store:
        store.add(key(1), value(1))


# ------------------------------------------------------- buffer size changes


@pytest.mark.parametrize(("first", "second"), [(17, 1), (1, 17), (5, 2), (10_000, 3)])
def test_reload_with_another_index_buffer_size(tmp_path: Path, first: int, second: int) -> None:
    path = tmp_path / "store"
    expected: dict[bytes, bytes] = {}
    with Removable.load(path, index_buffer_size=first) as store:
        for i in range(16):
            store.add(key(i), value(i), flush=i % 2 == 0)
            expected[key(i)] = value(i)
    with Removable.load(path, index_buffer_size=second) as store:
        assert bindings(store) == expected
        for i in range(8, 24):
            store.add(key(i), value(i, tag=1))
            expected[key(i)] = value(i, tag=1)
        store.remove(key(0))
        del expected[key(0)]
        assert bindings(store) == expected
    with Removable.load(path, index_buffer_size=first) as store:
        assert bindings(store) == expected


class _Tagged(bytes):
    """A bytes subclass: not the plain bytes the codec-free fast path takes."""


def test_bytes_codecs_fast_path_agrees_with_the_codecs(tmp_path: Path) -> None:
    size = KEY.sizeof()
    assert Plain._bytes_key_size == size and Structs._bytes_value_size == -1
    key, value = b"k" * size, b"v" * VALUE.sizeof()
    with Plain.load(tmp_path / "plain") as store:
        store.add(bytearray(key), memoryview(value))  # bytes-like: encoded to bytes
        found = store.find(_Tagged(key))
        assert found == value and type(found) is bytes
        assert store.mem(memoryview(key)) and not store.mem(b"x" * size)
        store.add(key, _Tagged(b"w" * len(value)))
        assert type(store.find(key)) is bytes and store.find(key) == b"w" * len(value)
        for bad_value in (value[:-1], value + b"!", "v" * len(value), None):
            with pytest.raises(CodecError):
                store.add(key, bad_value)
        assert store.find(key) == b"w" * len(value)
    with Structs.load(tmp_path / "structs") as store:
        store.add(key, {"level": 7, "hash": b"h" * 32})
        assert store.find(key).level == 7
        with pytest.raises(CodecError):
            store.add(key, b"v" * Structs._value.size)  # bytes of the right size, not a Struct
