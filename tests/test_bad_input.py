"""Bad input: wrong codecs and values, misuse, and damaged files.

Each case must raise the error API.md names, never return wrong data, and
leave every file of the store as it was (compared byte for byte).
Offsets come from the layouts documented in ``l2_stores/engine/framing.py``,
``log.py``, ``run.py`` and ``stores/singleton.py``.
"""

from __future__ import annotations

import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotLoadStore,
    CannotReadFromStore,
    CodecError,
    DecodingError,
    Mode,
    ReadOnlyError,
    StoreClosedError,
    fixed,
    make_indexable,
    make_indexable_removable,
    make_singleton,
)
from l2_stores.engine.framing import Expected
from l2_stores.engine.run import Run
from l2_stores.stores import singleton

KEY = construct.Bytes(32)
Plain = make_indexable("bad_plain", KEY, KEY)
Removable = make_indexable_removable("bad_removable", KEY, KEY)
Single = make_singleton("bad_single", KEY)
GreedySingle = make_singleton("bad_greedy_single", construct.GreedyBytes)

MODES = [Mode.READ_ONLY, Mode.READ_WRITE]
MODE_IDS = ["ro", "rw"]
HEADER = struct.Struct("<8sHHIIIQQB19xI")
HEADER_SIZE = 64
RECORD = 1 + 32 + 32 + 4
ROW = 32 + 32 + 4
SINGLETON_HEADER = singleton.HEADER_SIZE

# errors a damaged store may raise; anything else (or wrong data) is a bug
DAMAGE_ERRORS = (CannotLoadStore, CannotReadFromStore, DecodingError)


# --------------------------------------------------------------------------
# helpers


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative name."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def build(
    directory: Path, count: int, buffer: int, seed: str = "build", cls: Any = Removable
) -> dict[bytes, bytes]:
    """A store of ``count`` fresh keys, closed (every merge finished)."""
    rng = random.Random(seed)
    state = {rng.randbytes(32): rng.randbytes(32) for _ in range(count)}
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=buffer) as store:
        for key, value in state.items():
            store.add(key, value)
            store._engine.wait_merge()  # merges at every buffer_size adds, not when they end
    return state


def only(directory: Path, prefix: str) -> Path:
    found = [p for p in directory.iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def first(directory: Path, prefix: str) -> Path:
    """The first file whose name starts with ``prefix`` (the oldest run, say)."""
    return min(p for p in directory.iterdir() if p.name.startswith(prefix))


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def patch_header(path: Path, offset: int, data: bytes) -> None:
    """Overwrite header bytes and recompute the header crc32 (bytes 60..63)."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    raw[60:64] = zlib.crc32(bytes(raw[:60])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


class RunLayout:
    """Offsets of a run's sections (run.py), and its keys."""

    def __init__(self, path: Path) -> None:
        run = Run(str(path), Expected("bad_removable", 32, 32))
        self.geometry = run.geometry
        self.count, self.hi = run.count, run.hi
        self.keys = [key for key, _ in run.rows()]
        run.close()
        g = self.geometry
        self.rows = g.rows
        assert g.size == path.stat().st_size, "run layout differs from run.py"


def message_without_paths(error: BaseException, *paths: Path) -> str:
    text = str(error)
    for path in sorted(paths, key=lambda p: -len(str(p))):
        text = text.replace(str(path), "<path>")
    return text


def assert_names(error: BaseException, name: str, path: Path) -> None:
    text = str(error)
    assert name in text, text
    assert str(path) in text, text


def expect_load_error(
    cls: Any, path: Path, mode: Mode, files_root: Path, **options: Any
) -> CannotLoadStore:
    """The load raises CannotLoadStore and leaves every file byte-identical."""
    before = snapshot(files_root)
    with pytest.raises(CannotLoadStore) as caught:
        store = cls.load(path, mode, **options)
        store.close()
    assert snapshot(files_root) == before, f"a failed {mode.name} load changed the files"
    assert cls.name in str(caught.value)
    return caught.value


def check_never_wrong(store: Any, state: dict[bytes, bytes], probes: set[bytes]) -> dict[str, int]:
    """Every read either raises a damage error or returns exactly the truth."""
    outcome = {"errors": 0, "correct": 0}
    try:
        seen: dict[bytes, bytes] = {}
        for key, value in store.items():
            assert key not in seen, "items() gave a key twice"
            assert state.get(key) == value, f"items() gave wrong data for {key.hex()}"
            seen[key] = value
        assert seen == state, "items() lost bindings without an error"
        outcome["correct"] += 1
    except DAMAGE_ERRORS:
        outcome["errors"] += 1
    for key in sorted(set(state) | probes):
        for name, read, want in (
            ("find", store.find, state.get(key)),
            ("mem", store.mem, key in state),
        ):
            try:
                got = read(key)
            except DAMAGE_ERRORS:
                outcome["errors"] += 1
                continue
            assert got == want, f"{name}({key.hex()}) gave {got!r}, not {want!r}"
            outcome["correct"] += 1
    return outcome


# --------------------------------------------------------------------------
# codecs: wrong keys and refused values


# (ints are left out: construct.Bytes builds an int, the library refuses it)
BAD_KEYS = [b"k" * 31, b"k" * 33, b"", "k" * 32, None, bytearray(b"k" * 31)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_wrong_key_is_codec_error(tmp_path: Path, mode: Mode) -> None:
    directory = tmp_path / "store"
    state = build(directory, 12, buffer=5)
    files = snapshot(directory)
    with Removable.load(directory, mode, index_buffer_size=5) as store:
        operations: list[tuple[str, Callable[[Any], Any]]] = [
            ("find", store.find),
            ("mem", store.mem),
        ]
        if mode is Mode.READ_WRITE:
            operations += [
                ("add", lambda k: store.add(k, b"v" * 32)),
                ("add-noflush", lambda k: store.add(k, b"v" * 32, flush=False)),
                ("remove", store.remove),
            ]
        for _name, operation in operations:
            for key in BAD_KEYS:
                with pytest.raises(CodecError) as caught:
                    operation(key)
                assert isinstance(caught.value, ValueError)
                assert_names(caught.value, Removable.name, directory)
        assert dict(store.items()) == state
    assert snapshot(directory) == files, "a refused key changed the files"


VALUE_CASES: list[tuple[str, Any, list[Any], Any]] = [
    ("bytes32", construct.Bytes(32), [b"v" * 31, b"v" * 33, "v" * 32, None], b"g" * 32),
    ("int32ub", construct.Int32ub, [-1, 2**32, 2**40, "12", None, 1.5], 77),
    (
        "struct",
        construct.Struct("a" / construct.Int32ub, "b" / construct.Bytes(4)),
        [{"a": 1}, {"b": b"abcd"}, {"a": 1, "b": b"abc"}, {"a": -5, "b": b"abcd"}, 3, None],
        {"a": 1, "b": b"abcd"},
    ),
]


@pytest.mark.parametrize(
    ("codec", "bad_values", "good"),
    [case[1:] for case in VALUE_CASES],
    ids=[case[0] for case in VALUE_CASES],
)
def test_refused_value_is_codec_error_and_writes_nothing(
    tmp_path: Path, codec: Any, bad_values: list[Any], good: Any
) -> None:
    cls = make_indexable_removable("bad_values", construct.Bytes(8), codec)
    directory = tmp_path / "store"
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=3) as store:
        for i in range(7):
            store.add(bytes([i]) * 8, good)
    # reopened: no merge is running while the files are compared
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=3) as store:
        expected = dict(store.items())
        assert len(expected) == 7
        files = snapshot(directory)
        for bad in bad_values:
            for key in (b"n" * 8, b"\x00" * 8):  # a new key, and a bound one
                for flush in (True, False):
                    with pytest.raises(CodecError) as caught:
                        store.add(key, bad, flush=flush)
                    assert_names(caught.value, cls.name, directory)
            store.flush()
            assert snapshot(directory) == files, f"refusing {bad!r} changed the files"
        assert store.find(b"n" * 8) is None
        assert dict(store.items()) == expected
    with cls.load(directory, Mode.READ_ONLY) as store:
        assert dict(store.items()) == expected

    # the same codec as a singleton value
    single = make_singleton("bad_single_values", codec)
    path = tmp_path / "single"
    with single.load(path) as store:
        store.write(good)
        files = snapshot(tmp_path)
        for bad in bad_values:
            with pytest.raises(CodecError) as caught:
                store.write(bad)
            assert_names(caught.value, single.name, path)
        assert snapshot(tmp_path) == files
        assert store.read() == good
    with single.load(path, Mode.READ_ONLY) as store:
        assert store.read() == good


NOT_FIXED = [
    construct.GreedyBytes,
    construct.PascalString(construct.VarInt, "utf8"),
    construct.Prefixed(construct.Int8ub, construct.GreedyBytes),
    construct.CString("utf8"),
    construct.Struct("a" / construct.Int32ub, "rest" / construct.GreedyBytes),
    construct.Bytes(construct.this.n),
]


@pytest.mark.parametrize("codec", NOT_FIXED, ids=lambda c: type(c).__name__)
def test_non_fixed_codec_refused_at_factory(codec: Any) -> None:
    for factory in (make_indexable, make_indexable_removable):
        with pytest.raises(CodecError):
            factory("not_fixed", codec, KEY)
        with pytest.raises(CodecError):
            factory("not_fixed", KEY, codec)
    with pytest.raises(CodecError) as caught:
        fixed(codec, name="my_codec")
    assert "my_codec" in str(caught.value)
    with pytest.raises(CodecError):
        fixed(codec)
    # a singleton takes any codec
    assert make_singleton("variable_single", codec).value_codec is codec


def test_fixed_accepts_fixed_codecs() -> None:
    for codec in (construct.Bytes(3), construct.Int64ub, construct.Struct("a" / construct.Int8ub)):
        assert fixed(codec) is codec


def test_empty_name_is_value_error() -> None:
    for make in (
        lambda: make_indexable("", KEY, KEY),
        lambda: make_indexable_removable("", KEY, KEY),
        lambda: make_singleton("", KEY),
    ):
        with pytest.raises(ValueError):
            make()


# --------------------------------------------------------------------------
# closed stores and read-only stores


def test_closed_indexable_store(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    state = build(directory, 9, buffer=4)
    store = Removable.load(directory, Mode.READ_WRITE, index_buffer_size=4)
    view = store.readonly()
    store.close()
    store.close()  # idempotent
    key = next(iter(state))
    calls: list[Callable[[], Any]] = [
        lambda: store.find(key),
        lambda: store.mem(key),
        lambda: store.add(key, b"v" * 32),
        lambda: store.add(key, b"v" * 32, flush=False),
        lambda: store.remove(key),
        store.flush,
        store.sync,
        store.readonly,
        lambda: list(store.keys()),
        lambda: list(store.items()),
        lambda: view.find(key),
        lambda: list(view.items()),
    ]
    files = snapshot(directory)
    for call in calls:
        with pytest.raises(StoreClosedError) as caught:
            call()
        assert_names(caught.value, Removable.name, directory)
    assert snapshot(directory) == files


@pytest.mark.parametrize("started", [True, False], ids=["started", "unstarted"])
@pytest.mark.parametrize("what", ["items", "keys"])
def test_iterator_used_after_close(tmp_path: Path, what: str, started: bool) -> None:
    """An items()/keys() iterator taken before close() and used after it."""
    directory = tmp_path / "store"
    state = build(directory, 9, buffer=4)  # 8 rows in the data file, 1 in the log
    store = Removable.load(directory, Mode.READ_WRITE, index_buffer_size=4)
    iterator = store.items() if what == "items" else store.keys()
    if started:
        first = next(iterator)
        assert (first[0] if what == "items" else first) in state
    store.close()
    with pytest.raises(StoreClosedError):
        list(iterator)


def test_closed_singleton(tmp_path: Path) -> None:
    path = tmp_path / "single"
    store = Single.load(path)
    store.write(b"s" * 32)
    view = store.readonly()
    store.close()
    store.close()
    files = snapshot(tmp_path)
    for call in (
        store.read,
        lambda: store.write(b"t" * 32),
        store.delete,
        store.sync,
        store.readonly,
        view.read,
    ):
        with pytest.raises(StoreClosedError) as caught:
            call()
        assert_names(caught.value, Single.name, path)
    assert snapshot(tmp_path) == files


@pytest.mark.parametrize("how", ["view", "read_only"])
def test_read_only_writes_refused(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "store"
    state = build(directory, 9, buffer=4)
    writer = Removable.load(directory, Mode.READ_WRITE, index_buffer_size=4)
    try:
        if how == "view":
            store = writer.readonly()
        else:
            writer.close()
            store = Removable.load(directory, Mode.READ_ONLY)
        files = snapshot(directory)
        key = next(iter(state))
        for call in (
            lambda: store.add(key, b"v" * 32),
            lambda: store.add(b"n" * 32, b"v" * 32, flush=False),
            lambda: store.remove(key),
            lambda: store.remove(b"n" * 32),
            store.flush,
        ):
            with pytest.raises(ReadOnlyError) as caught:
                call()
            assert_names(caught.value, Removable.name, directory)
        assert snapshot(directory) == files
        assert dict(store.items()) == state
        assert store.readonly().find(key) == state[key]
        store.close()
        if how == "view":  # closing a view leaves the store open
            assert writer.find(key) == state[key]
            writer.add(b"n" * 32, b"w" * 32)
            assert writer.find(b"n" * 32) == b"w" * 32
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["view", "read_only"])
def test_read_only_singleton_writes_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "single"
    writer = Single.load(path)
    writer.write(b"s" * 32)
    try:
        if how == "view":
            store = writer.readonly()
        else:
            writer.close()
            store = Single.load(path, Mode.READ_ONLY)
        files = snapshot(tmp_path)
        for call in (lambda: store.write(b"t" * 32), store.delete):
            with pytest.raises(ReadOnlyError) as caught:
                call()
            assert_names(caught.value, Single.name, path)
        assert snapshot(tmp_path) == files
        assert store.read() == b"s" * 32
        store.close()
    finally:
        writer.close()


# --------------------------------------------------------------------------
# other codec sizes, other format versions


SIZE_CASES = [
    ("value8", construct.Bytes(32), construct.Bytes(8), ("32", "8")),
    ("key20", construct.Bytes(20), construct.Bytes(32), ("32", "20")),
    ("both", construct.Int64ub, construct.Int16ub, ("32", "8", "2")),
]


# ``recorded``: the store's identity says its codecs; without it (a store made before
# identities), the files' headers say their sizes.
RECORDED = pytest.mark.parametrize("recorded", [True, False], ids=["identity", "no-identity"])


@RECORDED
@pytest.mark.parametrize("merged", [False, True], ids=["log-only", "with-data-file"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("key", "value", "sizes"), [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES]
)
def test_other_codec_sizes_refused(
    tmp_path: Path,
    key: Any,
    value: Any,
    sizes: tuple[str, ...],
    mode: Mode,
    merged: bool,
    recorded: bool,
) -> None:
    directory = tmp_path / "store"
    build(directory, 20, buffer=8 if merged else 100)
    if not recorded:
        (directory / "identity").unlink()
    other = make_indexable("resized", key, value)
    error = expect_load_error(other, directory, mode, directory)
    text = message_without_paths(error, directory)
    assert "expected" in text.lower() and "found" in text.lower(), text
    for size in sizes:
        assert re.search(rf"\b{size}\b", text), (size, text)


SINGLETON_SIZE_CASES = [
    ("fixed-to-fixed", construct.Bytes(32), b"s" * 32, construct.Bytes(8), ("32", "8")),
    ("fixed-to-greedy", construct.Bytes(32), b"s" * 32, construct.GreedyBytes, ("32",)),
    ("greedy-to-fixed", construct.GreedyBytes, b"s" * 32, construct.Bytes(32), ("32",)),
    ("int-to-int", construct.Int32ub, 5, construct.Int64ub, ("4", "8")),
]


@RECORDED
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("written", "value", "read_as", "sizes"),
    [c[1:] for c in SINGLETON_SIZE_CASES],
    ids=[c[0] for c in SINGLETON_SIZE_CASES],
)
def test_singleton_other_codec_sizes_refused(
    tmp_path: Path,
    written: Any,
    value: Any,
    read_as: Any,
    sizes: tuple[str, ...],
    mode: Mode,
    recorded: bool,
) -> None:
    path = tmp_path / "single"
    with make_singleton("sized", written).load(path) as store:
        store.write(value)
    if not recorded:
        (tmp_path / "single.identity").unlink()
    other = make_singleton("resized_single", read_as)
    error = expect_load_error(other, path, mode, tmp_path)
    text = message_without_paths(error, path)
    assert "expected" in text.lower() and "found" in text.lower(), text
    for size in sizes:
        assert re.search(rf"\b{size}\b", text), (size, text)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("which", ["log.", "run."])
def test_other_format_version_refused(tmp_path: Path, which: str, mode: Mode) -> None:
    directory = tmp_path / "store"
    build(directory, 20, buffer=8)
    target = first(directory, which)
    patch_header(target, 8, struct.pack("<H", 9))  # logs read versions 1 and 2
    error = expect_load_error(Removable, directory, mode, directory)
    assert "version" in str(error).lower(), str(error)
    assert re.search(r"\b9\b", message_without_paths(error, directory)), str(error)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_singleton_other_format_version_refused(tmp_path: Path, mode: Mode) -> None:
    path = tmp_path / "single"
    with Single.load(path) as store:
        store.write(b"s" * 32)
    raw = bytearray(path.read_bytes())
    raw[8:10] = struct.pack("<H", 7)
    raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    error = expect_load_error(Single, path, mode, tmp_path)
    assert "version" in str(error).lower(), str(error)
    assert re.search(r"\b7\b", message_without_paths(error, path)), str(error)


# --------------------------------------------------------------------------
# flipped bytes


def add_leftovers(directory: Path) -> None:
    """What a kill can leave beside a store: merge temporaries and a torn log tail.

    A successful READ_WRITE load would remove or cut these; a failed one must not.
    """
    log = only(directory, "log.")
    generation = int(log.name.split(".")[1])
    (directory / f"run.{generation:08d}-{generation:08d}.tmp").write_bytes(b"partial run")
    (directory / f"log.{generation + 1:08d}.tmp").write_bytes(b"partial log")
    with open(log, "ab") as file:
        file.write(b"\x01torn")


@pytest.mark.parametrize("leftovers", [False, True], ids=["clean", "with-leftovers"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("record", "offset"),
    [(7, 0), (7, 1), (7, 20), (7, 40), (7, 66), (0, 5), (18, 68), (19, 3), (19, 68)],
    ids=[
        "mid-op",
        "mid-key0",
        "mid-key",
        "mid-value",
        "mid-crc",
        "first",
        "second-last",
        "last-key",
        "last-crc",
    ],
)
def test_flipped_log_record_refused(
    tmp_path: Path, record: int, offset: int, mode: Mode, leftovers: bool
) -> None:
    """A bad checksum before the close's mark is corruption: the close fsynced it."""
    directory = tmp_path / "store"
    build(directory, 20, buffer=100)
    log = only(directory, "log.")
    assert log.stat().st_size == HEADER_SIZE + 21 * RECORD  # and the close's mark
    flip(log, HEADER_SIZE + record * RECORD + offset, 0x10)
    if leftovers:
        add_leftovers(directory)
    error = expect_load_error(Removable, directory, mode, directory)
    assert "offset" in str(error) or "record" in str(error), str(error)


@pytest.mark.parametrize("leftovers", [False, True], ids=["clean", "with-leftovers"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("which", ["log.", "run."])
@pytest.mark.parametrize("offset", [0, 7, 8, 10, 12, 16, 20, 24, 32, 40, 41, 50, 59, 60, 63])
def test_flipped_file_header_refused(
    tmp_path: Path, offset: int, which: str, mode: Mode, leftovers: bool
) -> None:
    directory = tmp_path / "store"
    build(directory, 20, buffer=8)
    flip(first(directory, which), offset, 0x04)
    if leftovers:
        add_leftovers(directory)
    expect_load_error(Removable, directory, mode, directory)


@pytest.fixture
def big_store(tmp_path: Path) -> tuple[Path, dict[bytes, bytes], RunLayout]:
    """2,400 rows in one run, 5 more bindings in the log."""
    directory = tmp_path / "store"
    state = build(directory, 2405, buffer=2400, seed="big")
    layout = RunLayout(only(directory, "run."))
    assert layout.count == 2400 and layout.geometry.pages >= 2
    return directory, state, layout


ABSENT = {bytes([i]) * 32 for i in range(40)}


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("part", [0, 31, 32, 63, 64, 67], ids=lambda p: f"byte{p}")
def test_flipped_run_row_never_gives_wrong_data(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout], part: int, mode: Mode
) -> None:
    directory, state, layout = big_store
    index = 123
    victim = layout.keys[index]
    flip(only(directory, "run."), layout.rows + index * ROW + part, 0x01)
    files = snapshot(directory)
    with Removable.load(directory, mode) as store:
        with pytest.raises(CannotReadFromStore) as caught:
            store.find(victim)
        assert Removable.name in str(caught.value)
        with pytest.raises(CannotReadFromStore):
            store.mem(victim)
        outcome = check_never_wrong(store, state, ABSENT)
        assert outcome["errors"] >= 3  # items(), find and mem of the victim
        assert outcome["correct"] > 2 * 290  # the other rows are still readable
        if mode is Mode.READ_WRITE:
            with pytest.raises(CannotReadFromStore):
                store.remove(victim)
    assert snapshot(directory) == files, "reading a damaged row changed the files"


def test_flipped_run_row_stays_detected_through_merges(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout],
) -> None:
    """Merges copy old rows with their checksums: the damage is not laundered."""
    directory, state, layout = big_store
    victim = layout.keys[200]
    flip(only(directory, "run."), layout.rows + 200 * ROW + 40, 0x80)
    rng = random.Random("through merges")
    with Removable.load(directory, Mode.READ_WRITE, index_buffer_size=50) as store:
        for _ in range(260):
            key, value = rng.randbytes(32), rng.randbytes(32)
            store.add(key, value)
            state[key] = value
    assert max(int(p.name.split("-")[1]) for p in directory.glob("run.*")) > layout.hi
    with Removable.load(directory, Mode.READ_ONLY) as store:
        with pytest.raises(CannotReadFromStore):
            store.find(victim)
        check_never_wrong(store, state, ABSENT)


INDEX_SECTIONS = ["filter", "fences", "radix", "page-crc"]


def index_offset(layout: RunLayout, section: str) -> int:
    g = layout.geometry
    return {
        "filter": g.filter + 3,
        "fences": g.fence + 32 * (g.fences // 2) + 5,
        "radix": g.radix + 4,
        "page-crc": g.page_crcs + 1,
    }[section]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("section", INDEX_SECTIONS)
def test_flipped_run_index_fails_lookups_that_use_it(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout], section: str, mode: Mode
) -> None:
    """A damaged byte of a run's filter, fences, radix or page checksums: every lookup
    that reads its page raises, the others answer right, the log still answers."""
    directory, state, layout = big_store
    flip(only(directory, "run."), index_offset(layout, section), 0x20)
    files = snapshot(directory)
    in_log = set(state) - set(layout.keys)
    with Removable.load(directory, mode) as store:
        failed = 0
        for key in sorted(set(layout.keys) | ABSENT):
            if key in in_log:
                continue
            try:
                assert store.find(key) == state.get(key)
            except CannotReadFromStore as error:
                assert Removable.name in str(error)
                failed += 1
        assert failed, "the damage went unseen"
        for key in in_log:  # bindings in the log do not need the run
            assert store.find(key) == state[key]
        check_never_wrong(store, state, ABSENT)
    assert snapshot(directory) == files


def test_run_merges_rebuild_a_damaged_index_from_checked_rows(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout],
) -> None:
    """Merges read rows, each checked, and write a fresh filter and index: a damaged
    index page is not carried over, and acknowledged adds stay readable."""
    directory, state, layout = big_store
    flip(only(directory, "run."), index_offset(layout, "fences"), 0x02)
    rng = random.Random("damaged merge")
    with Removable.load(directory, Mode.READ_WRITE, index_buffer_size=20) as store:
        while store._engine._stack.spans[0].hi == 0:  # until a merge took run 0
            store._engine.wait_merge()
            for _ in range(20):
                key, value = rng.randbytes(32), rng.randbytes(32)
                store.add(key, value)
                state[key] = value
        store._engine.wait_merge()
    names = sorted(p.name for p in directory.glob("run.*"))
    assert names[0] != "run.00000000-00000000", names  # merged with later runs
    for mode in MODES:
        with Removable.load(directory, mode) as store:
            assert check_never_wrong(store, state, ABSENT)["errors"] == 0


@pytest.mark.parametrize("leftovers", [False, True], ids=["clean", "with-leftovers"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("offset", [64, 72, 80, 88, 92, 100, 101, 102, 110, 123, 124, 127])
def test_flipped_run_header_refused(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout],
    offset: int,
    mode: Mode,
    leftovers: bool,
) -> None:
    directory, _, _ = big_store
    flip(only(directory, "run."), offset, 0x01)
    if leftovers:
        add_leftovers(directory)
    expect_load_error(Removable, directory, mode, directory)


@pytest.mark.parametrize("codec", ["fixed", "greedy"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_every_flipped_singleton_byte_refused(tmp_path: Path, mode: Mode, codec: str) -> None:
    path = tmp_path / "single"
    cls: Any = Single if codec == "fixed" else GreedySingle
    value = bytes(range(32)) if codec == "fixed" else b"variable sized value " * 3
    with cls.load(path) as store:
        store.write(value)
    original = path.read_bytes()
    assert len(original) == SINGLETON_HEADER + len(value) + 4
    for offset in range(len(original)):
        for mask in (0x01, 0xFF):
            raw = bytearray(original)
            raw[offset] ^= mask
            path.write_bytes(bytes(raw))
            expect_load_error(cls, path, mode, tmp_path)
    path.write_bytes(original)
    with cls.load(path, mode) as store:
        assert store.read() == value


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_failed_singleton_load_keeps_tmp_leftover(tmp_path: Path, damage: str) -> None:
    """A failed READ_WRITE load must leave every file as it was, a .tmp included."""
    path = tmp_path / "single"
    with Single.load(path) as store:
        store.write(b"s" * 32)
    if damage == "flip":
        flip(path, SINGLETON_HEADER + 3)
    else:
        path.write_bytes(path.read_bytes()[:30])
    (tmp_path / "single.tmp").write_bytes(b"an unfinished write")
    expect_load_error(Single, path, Mode.READ_ONLY, tmp_path)
    expect_load_error(Single, path, Mode.READ_WRITE, tmp_path)


# --------------------------------------------------------------------------
# truncated files


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    "keep",
    [
        "zero",
        "half-header",
        "header",
        "mid-run-header",
        "mid-filter",
        "mid-rows",
        "before-page-crcs",
        "minus-one",
    ],
)
def test_truncated_run_refused(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout], keep: str, mode: Mode
) -> None:
    directory, _, layout = big_store
    data = only(directory, "run.")
    g = layout.geometry
    size = {
        "zero": 0,
        "half-header": 30,
        "header": HEADER_SIZE,
        "mid-run-header": HEADER_SIZE + 20,
        "mid-filter": g.filter + 100,
        "mid-rows": g.rows + 1000,
        "before-page-crcs": g.page_crcs,
        "minus-one": g.size - 1,
    }[keep]
    os.truncate(data, size)
    expect_load_error(Removable, directory, mode, directory)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("size", [0, 1, 8, 30, 63])
def test_log_cut_in_its_header_refused(tmp_path: Path, size: int, mode: Mode) -> None:
    directory = tmp_path / "store"
    build(directory, 20, buffer=8)
    os.truncate(only(directory, "log."), size)
    expect_load_error(Removable, directory, mode, directory)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("size", [0, 1, 12, 23, 24, 27, 31, 32, 40, 67])
def test_truncated_singleton_refused(tmp_path: Path, size: int, mode: Mode) -> None:
    path = tmp_path / "single"
    with Single.load(path) as store:
        store.write(b"s" * 32)
    assert path.stat().st_size == SINGLETON_HEADER + 32 + 4
    os.truncate(path, size)
    expect_load_error(Single, path, mode, tmp_path)


# --------------------------------------------------------------------------
# every byte flipped, one at a time


def sweep_store(directory: Path) -> dict[bytes, bytes]:
    """Buffer 4: runs, and a log holding an add, an overwrite and a remove."""
    rng = random.Random("sweep")
    state: dict[bytes, bytes] = {}
    with Removable.load(directory, Mode.READ_WRITE, index_buffer_size=4) as store:
        for number in range(28):
            if state and number % 5 == 4:
                key = sorted(state)[number % len(state)]
            else:
                key = rng.randbytes(32)
            state[key] = rng.randbytes(32)
            store.add(key, state[key])
    # (closed: every merge done, so that the log holds ops 29..31 alone whatever
    # the merge threads' pace; a longer one would be merged by a READ_WRITE close)
    with Removable.load(directory, Mode.READ_WRITE, index_buffer_size=4) as store:
        store.remove(sorted(state)[1])  # ops 29..31 land in the log
        del state[sorted(state)[1]]
        key = sorted(state)[2]
        state[key] = b"\xee" * 32
        store.add(key, state[key])
        key = b"\x01" * 32
        state[key] = b"\x02" * 32
        store.add(key, state[key])
    return state


def flips(directory: Path) -> Iterator[tuple[str, int]]:
    """Every byte of the store's files, but the lock and the mark that ends the log.

    The mark binds nothing, and a damaged last record is one a kill or a
    power loss may have left: it is dropped, harmlessly.
    """
    for name in sorted(os.listdir(directory)):
        if name != "lock":
            size = (directory / name).stat().st_size
            if name.startswith("log."):
                size -= RECORD
            for offset in range(size):
                yield name, offset


def test_every_flipped_byte_is_detected_or_harmless(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    state = sweep_store(directory)
    names = sorted(os.listdir(directory))
    assert {n.split(".")[0] for n in names} == {"identity", "run", "lock", "log"}, names
    log = only(directory, "log.")
    # the last ops (as many as the merges, on their threads, left there) and the close's mark
    assert (log.stat().st_size - HEADER_SIZE) % RECORD == 0
    assert log.stat().st_size >= HEADER_SIZE + 4 * RECORD
    assert log.read_bytes()[-RECORD] == 0x83
    probes = ABSENT | {sorted(state)[0][:31] + b"\x00"}
    rng = random.Random("sweep flips")
    positions = list(flips(directory))
    rw_sample = set(rng.sample(positions, 300))
    undetected: list[tuple[str, int]] = []
    for name, offset in positions:
        target = directory / name
        original = target.read_bytes()
        raw = bytearray(original)
        raw[offset] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(raw))
        damaged = snapshot(directory)
        modes = MODES if (name, offset) in rw_sample else [Mode.READ_ONLY]
        for mode in modes:
            errors = 0
            try:
                with Removable.load(directory, mode, index_buffer_size=4) as store:
                    errors = check_never_wrong(store, state, probes)["errors"]
            except CannotLoadStore:
                errors = 1
            assert snapshot(directory) == damaged, (name, offset, mode, "files changed")
            if not errors:
                undetected.append((name, offset))
        target.write_bytes(original)
    assert not undetected, f"flips with no effect at all (unchecked bytes?): {undetected}"
    with Removable.load(directory, Mode.READ_ONLY) as store:
        assert dict(store.items()) == state


# --------------------------------------------------------------------------
# missing files


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_missing_run_refused(
    big_store: tuple[Path, dict[bytes, bytes], RunLayout], mode: Mode
) -> None:
    """A log of generation G > 0 alone: the flushed bindings are gone, not absent.

    ``log.G`` is only created once ``log.G-1`` is frozen, and ``log.G-1`` stays
    until its run is in place, so a lone ``log.G`` with no run holding the
    generations below it cannot come from a crash: loading it as a store
    without the 2,400 flushed bindings would return wrong data (None).
    """
    directory, _, _ = big_store
    only(directory, "run.").unlink()
    expect_load_error(Removable, directory, mode, directory)
