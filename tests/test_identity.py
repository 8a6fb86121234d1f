"""Store identity: a store loads only as the kind and codecs it was created with."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotLoadStore,
    Mode,
    StoreError,
    export_archive,
    import_archive,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)
from l2_stores.engine.filesystem import installed
from l2_stores.stores import identity
from l2_stores.tools.info import describe
from l2_stores.tools.on_disk import find_stores
from tests.helpers import format1
from tests.helpers.faults import FailingFileSystem
from tests.helpers.tree import tree

K = construct.Int32ub
V = construct.Bytes(8)

#: One class of each kind, over the same codecs where the kind has them.
KINDS: dict[str, Any] = {
    "singleton": make_singleton("s", V),
    "indexable": make_indexable("i", K, V),
    "indexable_removable": make_indexable_removable("r", K, V),
    "indexed_file": make_indexed_file("f", K, construct.GreedyBytes, V),
    "simple_indexed_file": make_simple_indexed_file(
        "g", K, construct.GreedyBytes, V, lambda value: bytes(8)
    ),
}


def fill(cls: Any, path: Path) -> None:
    with cls.load(path) as store:
        if cls._kind == "singleton":
            store.write(b"v" * 8)
        elif cls._kind == "indexed_file":
            store.append(1, b"value", b"h" * 8)
        elif cls._kind == "simple_indexed_file":
            store.append(1, b"value")
        else:
            store.add(1, b"v" * 8)


def refused(cls: Any, path: Path, mode: Mode, root: Path) -> CannotLoadStore:
    """The load raises CannotLoadStore naming the store and the path, and changes nothing."""
    before = tree(root)
    with pytest.raises(CannotLoadStore) as caught:
        cls.load(path, mode).close()
    assert tree(root) == before, f"a refused {mode.name} load changed the files"
    assert caught.value.name == cls.name and caught.value.path == str(path)
    return caught.value


@pytest.mark.parametrize("mode", [Mode.READ_WRITE, Mode.READ_ONLY], ids=["rw", "ro"])
@pytest.mark.parametrize("made", list(KINDS))
def test_a_store_loads_only_as_its_kind(tmp_path: Path, made: str, mode: Mode) -> None:
    path = tmp_path / "store"
    fill(KINDS[made], path)
    for other, cls in KINDS.items():
        if other == made:
            continue
        error = refused(cls, path, mode, tmp_path)
        assert error.expected is not None and error.found is not None
        assert error.expected.startswith(other.replace("_", " ")), error.expected
        assert error.found.startswith(made.replace("_", " ")), error.found
    with KINDS[made].load(path, mode):
        pass


def test_an_indexable_store_is_not_loaded_as_an_indexed_file(tmp_path: Path) -> None:
    """The finding of the issue: it used to start a second, empty store beside the first."""
    levels = make_indexable("levels", construct.Int32ub, construct.Bytes(32))
    path = tmp_path / "levels"
    with levels.load(path) as store:
        for level in range(100):
            store.add(level, bytes(32))
    as_file = make_indexed_file("levels", construct.Int32ub, construct.GreedyBytes, K)
    error = refused(as_file, path, Mode.READ_WRITE, tmp_path)
    assert "indexable 'levels' (key Int32ub (4 B), value Bytes(32) (32 B))" in str(error)
    assert (
        error.expected
        == "indexed file 'levels' (key Int32ub (4 B), value GreedyBytes, header Int32ub (4 B))"
    )
    with levels.load(path, Mode.READ_ONLY) as store:
        assert len(store) == 100


CODEC_CHANGES = [
    ("byte order", construct.Int32ub, construct.Int32ul),
    ("sign", construct.Int32ub, construct.Int32sb),
    ("bytes to int", construct.Bytes(4), construct.Int32ub),
    (
        "fields swapped",
        construct.Struct("level" / construct.Int32ub, "round" / construct.Int32ub),
        construct.Struct("round" / construct.Int32ub, "level" / construct.Int32ub),
    ),
    (
        "field renamed",
        construct.Struct("level" / construct.Int32ub),
        construct.Struct("height" / construct.Int32ub),
    ),
    (
        "enum mapping",
        construct.Enum(construct.Int32ub, a=1, b=2),
        construct.Enum(construct.Int32ub, a=2, b=1),
    ),
]


@pytest.mark.parametrize("mode", [Mode.READ_WRITE, Mode.READ_ONLY], ids=["rw", "ro"])
@pytest.mark.parametrize(
    ("made", "loaded"), [c[1:] for c in CODEC_CHANGES], ids=[c[0] for c in CODEC_CHANGES]
)
def test_codecs_of_the_same_size_described_differently_are_refused(
    tmp_path: Path, made: Any, loaded: Any, mode: Mode
) -> None:
    assert made.sizeof() == loaded.sizeof()
    path = tmp_path / "keys"
    with make_indexable("keys", made, V).load(path) as store:
        store.add(made.parse(bytes(made.sizeof() - 1) + b"\x01"), b"v" * 8)
    error = refused(make_indexable("keys", loaded, V), path, mode, tmp_path)
    assert error.expected is not None and error.found is not None
    assert identity.render(identity.describe(loaded)) in error.expected
    assert identity.render(identity.describe(made)) in error.found
    single = tmp_path / "head"
    with make_singleton("head", made).load(single) as head:
        head.write(made.parse(bytes(made.sizeof() - 1) + b"\x02"))
    refused(make_singleton("head", loaded), single, mode, tmp_path)


SAME_CODECS = [
    (
        "compiled",
        construct.Struct("a" / construct.Int32ub),
        construct.Struct("a" / construct.Int32ub).compile(),
    ),
    ("BytesInteger", construct.Int32ub, construct.BytesInteger(4)),
    (
        "little BytesInteger",
        construct.Int16sl,
        construct.BytesInteger(2, signed=True, swapped=True),
    ),
    ("renamed outside a Struct", construct.Bytes(4), "x" / construct.Bytes(4)),
]


@pytest.mark.parametrize(
    ("made", "loaded"), [c[1:] for c in SAME_CODECS], ids=[c[0] for c in SAME_CODECS]
)
def test_codecs_described_alike_load_under_any_name(tmp_path: Path, made: Any, loaded: Any) -> None:
    path = tmp_path / "keys"
    key = made.parse(bytes(made.sizeof()))
    with make_indexable("keys", made, V).load(path) as store:
        store.add(key, b"v" * 8)
    with make_indexable("renamed", loaded, V).load(path) as store:
        assert store.find(key) == b"v" * 8


def test_the_identity_is_recorded_at_creation(tmp_path: Path) -> None:
    for kind, cls in KINDS.items():
        path = tmp_path / kind
        cls.load(path).close()
        file = tmp_path / f"{kind}.identity" if kind == "singleton" else path / "identity"
        recorded = identity.read(str(file))
        assert recorded == identity.Identity(
            kind,
            cls.name,
            {role: identity.describe(getattr(cls, f"{role}_codec")) for role in cls._roles},
        )
    other = make_indexable("i", K, construct.Bytes(16))
    refused(other, tmp_path / "indexable", Mode.READ_WRITE, tmp_path)


@pytest.mark.parametrize("made", list(KINDS))
def test_stores_made_before_identities_load_and_gain_it(tmp_path: Path, made: str) -> None:
    cls = KINDS[made]
    path = tmp_path / "store"
    fill(cls, path)
    file = Path(identity.identity_path(str(path), identity.KIND_FILES[made]))
    file.unlink()  # as a store made before identities
    with cls.load(path, Mode.READ_ONLY):
        pass
    assert not file.exists(), "a READ_ONLY load wrote"
    with cls.load(path):
        pass
    assert identity.read(str(file)) == cls._identity()


@pytest.mark.parametrize(
    ("made", "loaded"),
    [
        ("indexable", "indexed_file"),
        ("indexed_file", "indexable"),
        ("singleton", "indexable"),
        ("indexable", "singleton"),
        ("indexed_file", "singleton"),
    ],
)
def test_stores_made_before_identities_refuse_another_kind_of_files(
    tmp_path: Path, made: str, loaded: str
) -> None:
    path = tmp_path / "store"
    fill(KINDS[made], path)
    Path(identity.identity_path(str(path), identity.KIND_FILES[made])).unlink()
    for mode in (Mode.READ_WRITE, Mode.READ_ONLY):
        refused(KINDS[loaded], path, mode, tmp_path)


def test_the_format1_test_stores_gain_their_identity(tmp_path: Path) -> None:
    """The stores of the earliest format, kept as test data, load and gain the record."""
    with tarfile.open(Path(__file__).parent / "data" / "format1.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    for cls in (format1.Blocks, format1.Levels, format1.Messages):
        path = tmp_path / cls.name
        assert not (path / "identity").exists()
        other = make_indexable(cls.name, construct.Bytes(32), construct.Bytes(16))
        with pytest.raises(CannotLoadStore):  # sizes or files: refused, as before
            other.load(path, Mode.READ_ONLY)
        with cls.load(path) as store:
            assert len(store) > 0
        assert identity.read(str(path / "identity")) == cls._identity()


def test_a_path_of_the_wrong_type_is_a_store_error(tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_bytes(b"not a store")
    for cls in KINDS.values():
        if cls._kind == "singleton":
            continue
        for mode in (Mode.READ_WRITE, Mode.READ_ONLY):
            error = refused(cls, file, mode, tmp_path)
            assert error.found == "a file that is no store", error
    directory = tmp_path / "a-directory"
    directory.mkdir()
    for mode in (Mode.READ_WRITE, Mode.READ_ONLY):
        error = refused(KINDS["singleton"], directory, mode, tmp_path)
        assert error.found == "a directory", error


@pytest.mark.parametrize("kind", ["indexable", "indexed_file", "singleton"])
def test_a_damaged_identity_file_refuses_the_load(tmp_path: Path, kind: str) -> None:
    cls = KINDS[kind]
    path = tmp_path / "store"
    fill(cls, path)
    file = Path(identity.identity_path(str(path), identity.KIND_FILES[kind]))
    data = bytearray(file.read_bytes())
    data[identity.HEADER_SIZE + 3] ^= 0x40
    file.write_bytes(bytes(data))
    before = tree(tmp_path)
    for mode in (Mode.READ_ONLY, Mode.READ_WRITE):
        with pytest.raises(CannotLoadStore) as caught:
            cls.load(path, mode)
        assert tree(tmp_path) == before
        error = caught.value
        assert error.name == cls.name and "checksum" in str(error)
        assert error.path == str(file) and error.offset == identity.HEADER_SIZE
    proc = subprocess.run(
        [sys.executable, "-m", "l2_stores", "verify", str(path)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "identity" in proc.stdout + proc.stderr
    (found,) = find_stores(str(path))
    with pytest.raises(CannotLoadStore) as caught:
        found.identity()  # the tools name it by its directory: no name is recorded
    assert caught.value.name == "store" and "store 'store'" in str(caught.value)
    described = describe(found)  # what info prints
    assert described.identity_damaged and described.problem is not None
    assert any("identity file is damaged" in line for line in described.lines())


def test_a_failed_record_refuses_the_load_and_the_next_load_records(tmp_path: Path) -> None:
    cls = KINDS["indexable"]
    path = tmp_path / "store"
    fill(cls, path)
    (path / "identity").unlink()
    failing = FailingFileSystem("rename")
    failing.failures = 1
    with installed(failing), pytest.raises(CannotLoadStore) as caught:
        cls.load(path)
    assert "identity" in str(caught.value) and isinstance(caught.value, StoreError)
    assert not (path / "identity").exists()
    with cls.load(path) as store:
        assert store.find(1) == b"v" * 8
    assert identity.read(str(path / "identity")) == cls._identity()


def test_a_load_failing_on_a_descriptor_names_the_file(tmp_path: Path) -> None:
    cls = KINDS["indexed_file"]
    path = tmp_path / "store"
    fill(cls, path)
    (values,) = path.glob("values.*")
    with values.open("ab") as file:
        file.write(b"torn")  # the load cuts it, then fsyncs the file
    failing = FailingFileSystem("fsync")
    failing.failures = 1
    with installed(failing), pytest.raises(CannotLoadStore) as caught:
        cls.load(path)
    assert failing.failures == 0
    assert caught.value.path == str(path) and str(values) in str(caught.value)
    with cls.load(path) as store:
        assert store.read(1) == (b"value", b"h" * 8)


def test_descriptions_render_what_construct_tells() -> None:
    cases = {
        construct.Int64ub: "Int64ub",
        construct.Int16sl: "Int16sl",
        construct.Float64b: "Float64b",
        construct.Bytes(32): "Bytes(32)",
        construct.GreedyBytes: "GreedyBytes",
        construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32)): (
            "Struct(level=Int32ub, hash=Bytes(32))"
        ),
        construct.PascalString(construct.Int8ub, "utf8"): (
            "StringEncoded(Prefixed(GreedyBytes, includelength=False, lengthfield=Int8ub), "
            "encoding='utf8')"
        ),
    }
    for codec, text in cases.items():
        assert identity.render(identity.describe(codec)) == text
    assert identity.size_of(identity.describe(construct.Struct("a" / K, "b" / V))) == 12
    assert identity.size_of(identity.describe(construct.GreedyBytes)) is None


def test_an_archive_carries_the_identities(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for kind, cls in KINDS.items():
        fill(cls, source / kind)
    export_archive(str(source), str(tmp_path / "archive.tar"))
    target = tmp_path / "target"
    import_archive(str(tmp_path / "archive.tar"), str(target))
    for kind, cls in KINDS.items():
        file = identity.identity_path(str(target / kind), identity.KIND_FILES[kind])
        assert identity.read(file) == cls._identity(), kind
        with cls.load(target / kind, Mode.READ_ONLY):
            pass
    # replaced by an import, a singleton of another identity takes the archive's
    other = make_singleton("s", construct.Int64ub)
    with other.load(tmp_path / "again" / "singleton") as store:
        store.write(7)
    import_archive(str(tmp_path / "archive.tar"), str(tmp_path / "again"), force=True)
    with KINDS["singleton"].load(tmp_path / "again" / "singleton") as store:
        assert store.read() == b"v" * 8
