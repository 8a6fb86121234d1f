"""migrate: a store rewritten under new codecs or as another kind, switched atomically."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotLoadStore,
    CannotReadFromStore,
    Mode,
    StoreLockedError,
    batch,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
    migrate,
)
from l2_stores.engine import filesystem
from l2_stores.engine.journal import read_link
from l2_stores.migration import finish_singleton_switch
from tests.helpers import migrating
from tests.helpers.child import Child
from tests.helpers.tree import tree

SCRIPT = Path(migrating.__file__)


@pytest.mark.parametrize("kind", ["indexable", "indexed", "singleton"])
def test_a_migration_rewrites_the_store_and_the_old_class_is_refused(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / kind
    migrating.build(kind, path)

    def convert(key: Any, value: Any) -> tuple[Any, Any] | None:
        return migrating.convert(kind, key, value)

    done = migrate(migrating.OLD[kind], migrating.NEW[kind], path, convert, progress=False)
    assert done.switched and done.read == len(migrating.old_state(kind))
    assert done.written == len(migrating.new_state(kind))
    assert migrating.read(migrating.NEW[kind], path) == migrating.new_state(kind)
    with pytest.raises(CannotLoadStore):
        migrating.OLD[kind].load(path, Mode.READ_ONLY)
    leftovers = [name for name in os.listdir(tmp_path) if "migrate" in name]
    assert leftovers == []
    again = migrate(migrating.OLD[kind], migrating.NEW[kind], path, convert, progress=False)
    assert not again.switched
    assert migrating.read(migrating.NEW[kind], path) == migrating.new_state(kind)


def test_codecs_change_without_convert(tmp_path: Path) -> None:
    little = make_indexable("levels", construct.Int32ul, construct.Bytes(4))
    big = make_indexable_removable("levels", construct.Int32ub, construct.Bytes(4))
    with little.load(tmp_path / "levels") as store:
        for level in range(100):
            store.add(level, b"abcd")
    migrate(little, big, tmp_path / "levels", progress=False)
    with big.load(tmp_path / "levels") as store:
        assert list(store.keys()) == list(range(100))  # big-endian now: numeric order
        store.remove(5)
    files = make_indexed_file("f", construct.Int32ub, construct.GreedyBytes, construct.Bytes(1))
    simple = make_simple_indexed_file(
        "f", construct.Int32ub, construct.GreedyBytes, construct.Bytes(1), lambda v: v[:1]
    )
    with files.load(tmp_path / "f") as store:
        store.append(1, b"xyz", b"h")
    migrate(files, simple, tmp_path / "f", progress=False)
    with simple.load(tmp_path / "f") as store:
        assert store.read(1) == (b"xyz", b"x")  # the header is header_of(value) now
        store.append(2, b"qrs")
        assert store.header(2) == b"q"


def test_impossible_migrations_change_nothing(tmp_path: Path) -> None:
    migrating.build("indexable", tmp_path / "levels")
    migrating.build("singleton", tmp_path / "head")
    before = tree(tmp_path)
    old = migrating.OLD["indexable"]
    with pytest.raises(ValueError, match="convert"):
        migrate(old, migrating.NEW["indexed"], tmp_path / "levels")
    with pytest.raises(ValueError, match="singleton"):
        migrate(migrating.OLD["singleton"], old, tmp_path / "head", lambda k, v: (k, v))
    with pytest.raises(CannotLoadStore):  # the store is not of the old class
        migrate(migrating.OLD["singleton"], migrating.NEW["singleton"], tmp_path / "levels")
    with old.load(tmp_path / "levels"), pytest.raises(StoreLockedError):
        migrate(old, migrating.NEW["indexable"], tmp_path / "levels")
    assert tree(tmp_path) == before


def test_a_failing_convert_leaves_the_old_store(tmp_path: Path) -> None:
    migrating.build("indexable", tmp_path / "levels")
    before = tree(tmp_path)

    def convert(key: Any, value: Any) -> tuple[Any, Any]:
        if key == 200:
            raise RuntimeError("bad binding")
        return key, value

    with pytest.raises(RuntimeError, match="bad binding"):
        migrate(
            migrating.OLD["indexable"], migrating.NEW["indexable"], tmp_path / "levels", convert
        )
    assert tree(tmp_path) == before
    assert migrating.read(migrating.OLD["indexable"], tmp_path / "levels") == migrating.old_state(
        "indexable"
    )


#: Where the kills land, beside random moments: at each step of the switch.
KILL_POINTS = {
    "indexable": ["switching", "switched"],
    "indexed": ["switching", "switched"],
    "singleton": [
        "renamed singleton.migrate-tmp",  # the new value written: the old store stays
        "renaming singleton.migrate-tmp.switching",  # the marker, not yet in place
        "renaming singleton",
        "renamed singleton",
        "renaming singleton.identity",
    ],
}


@pytest.mark.parametrize("kind", ["indexable", "indexed", "singleton"])
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_store(tmp_path: Path, kind: str) -> None:
    rng = random.Random(f"migration kills {kind}")
    points: list[str | None] = [*KILL_POINTS[kind], None, None, None, None]
    seen = set()
    for attempt, point in enumerate(points):
        root = tmp_path / str(attempt)
        path = root / kind
        migrating.build(kind, path)
        child = Child(SCRIPT, [kind, path], tmp_path / "stderr")
        assert child.wait_for(partial(child.seen, "migrating")), child.stderr()
        if point is None:
            time.sleep(rng.uniform(0, 0.5))
        else:
            assert child.wait_for(partial(child.seen, point)), (point, child.lines)
        child.kill()
        seen.add(_what_loads(kind, path))
        for name in os.listdir(root):  # nothing but the store and perhaps leftovers
            assert name.startswith(kind), name
        migrate(
            migrating.OLD[kind],
            migrating.NEW[kind],
            path,
            lambda k, v: migrating.convert(kind, k, v),
            progress=False,
        )
        assert migrating.read(migrating.NEW[kind], path) == migrating.new_state(kind)
        assert not [name for name in os.listdir(root) if "migrate" in name]
    assert {"old", "new"} <= seen, seen
    assert (kind == "singleton") == ("switched by a load" in seen), seen


def _what_loads(kind: str, path: Path) -> str:
    """Which store a kill left: the old, the new (each whole), or, mid-way through a
    singleton's switch, the new one once a READ_WRITE load of its class finishes it (the
    old class, and READ_ONLY loads until then, are refused with nothing changed)."""
    loads = {}
    for which, cls in (("old", migrating.OLD[kind]), ("new", migrating.NEW[kind])):
        try:
            loads[which] = migrating.read(cls, path)
        except CannotLoadStore:
            continue
    assert len(loads) <= 1, loads  # never both: one of them would read wrong values
    if not loads:
        marker = Path(f"{path}.migrate-tmp.switching")
        assert kind == "singleton" and marker.exists()
        before = tree(path.parent)
        with pytest.raises(CannotLoadStore, match="cut short"):
            migrating.OLD[kind].load(path)
        assert tree(path.parent) == before
        with migrating.NEW[kind].load(path) as store:
            assert {None: store.read()} == migrating.new_state(kind)
        assert not marker.exists()
        assert migrating.read(migrating.NEW[kind], path) == migrating.new_state(kind)
        return "switched by a load"
    ((which, found),) = loads.items()
    expected = migrating.old_state(kind) if which == "old" else migrating.new_state(kind)
    assert found == expected, which
    return which


def test_a_store_in_a_batch_journal_is_retired_from_it(tmp_path: Path) -> None:
    levels_cls, head_cls = migrating.OLD["indexable"], migrating.OLD["singleton"]
    with levels_cls.load(tmp_path / "levels") as levels, head_cls.load(tmp_path / "head") as head:
        for level in range(1, 4):
            with batch(levels, head) as (levels_b, head_b):
                levels_b.add(level, bytes(8))
                head_b.write(level)
    links = [tmp_path / "levels" / "batch", tmp_path / "head.batch"]
    participants = {read_link(str(link), "x").participant for link in links}  # type: ignore[union-attr]
    migrate(levels_cls, migrating.NEW["indexable"], tmp_path / "levels", progress=False)
    migrate(head_cls, migrating.NEW["singleton"], tmp_path / "head", progress=False)
    assert not any(link.exists() for link in links)  # the new stores are in no journal yet
    journal = tmp_path / "l2_stores.journal"
    retired = {int(p.name.split(".")[1]) for p in journal.glob("retired.*")}
    assert retired == participants
    with migrating.NEW["singleton"].load(tmp_path / "head") as head:
        assert head.read() == 3  # not the journal's old parts again, under the new codec
    with migrating.NEW["indexable"].load(tmp_path / "levels") as levels:
        assert list(levels.keys()) == [1, 2, 3]


def test_an_empty_singleton_migrates(tmp_path: Path) -> None:
    old, new = migrating.OLD["singleton"], migrating.NEW["singleton"]
    old.load(tmp_path / "head").close()  # never written: an identity, no value
    assert migrate(old, new, tmp_path / "head", progress=False).switched
    with new.load(tmp_path / "head") as head:
        assert head.read() is None
    with old.load(tmp_path / "h2") as head:
        head.write(5)
    migrate(old, new, tmp_path / "h2", lambda key, value: None, progress=False)
    with new.load(tmp_path / "h2") as head:
        assert head.read() is None
    with pytest.raises(CannotLoadStore, match="no store there"):
        migrate(old, new, tmp_path / "typo", progress=False)
    assert not (tmp_path / "typo").exists()


def test_a_read_only_reader_refuses_a_migrated_store(tmp_path: Path) -> None:
    migrating.build("indexable", tmp_path / "levels")
    old = migrating.OLD["indexable"]
    with old.load(tmp_path / "levels", Mode.READ_ONLY) as reader:
        migrate(old, migrating.NEW["indexable"], tmp_path / "levels", progress=False)
        with pytest.raises(CannotReadFromStore, match="replaced"):
            reader.sync()


def test_the_command_line_migrates(tmp_path: Path) -> None:
    (tmp_path / "node_stores.py").write_text(
        textwrap.dedent(
            """
            import construct
            from l2_stores import make_indexable
            Old = make_indexable("levels", construct.Int32ul, construct.Bytes(4))
            New = make_indexable("levels", construct.Int32ub, construct.Bytes(4))
            def double(key, value):
                return key * 2, value
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import node_stores  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    with node_stores.Old.load(tmp_path / "levels") as store:
        for level in range(10):
            store.add(level, b"abcd")
    proc = subprocess.run(
        [sys.executable, "-m", "l2_stores", "migrate", "levels", "--from", "node_stores:Old",
         "--to", "node_stores:New", "--convert", "node_stores:double"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "10 bindings read, 10 written" in proc.stdout
    with node_stores.New.load(tmp_path / "levels", Mode.READ_ONLY) as store:
        assert list(store.keys()) == list(range(0, 20, 2))
    bad = subprocess.run(
        [sys.executable, "-m", "l2_stores", "migrate", "levels", "--from", "nowhere:Old",
         "--to", "node_stores:New"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1 and "nowhere" in bad.stderr


def _cut_short_switch_to(cls: Any, path: Path, value: int) -> None:
    """What a migration to ``cls`` killed right after its marker leaves at ``path``."""
    staging = Path(f"{path}.migrate-tmp")
    with cls.load(staging) as store:
        store.write(value)
    Path(f"{staging}.lock").unlink()
    Path(f"{staging}.switching").write_bytes(b"value,identity")


def test_a_switch_begun_while_a_load_waits_for_the_lock_is_not_finished_by_it(
    tmp_path: Path,
) -> None:
    """The load of class X saw a switch to X; before it holds the lock, another process
    finishes it and a migration to Y is cut short: the load must leave Y's switch alone."""
    w_cls, x_cls, y_cls = (make_singleton("s", codec) for codec in (
        construct.Int16ub, construct.Int32ub, construct.Int64ub))  # fmt: skip
    path = tmp_path / "s"
    with w_cls.load(path) as store:
        store.write(1)
    _cut_short_switch_to(x_cls, path, 2)

    class Racing(filesystem.OsFileSystem):
        raced = False

        def open(self, name: str, flags: int, mode: int = 0o644) -> int:
            if name == f"{path}.lock" and not Racing.raced:
                Racing.raced = True
                finish_singleton_switch(f"{path}.migrate-tmp", str(path))
                _cut_short_switch_to(y_cls, path, 3)
            return super().open(name, flags, mode)

    with filesystem.installed(Racing()), pytest.raises(CannotLoadStore, match="cut short"):
        x_cls.load(path)
    assert Racing.raced and Path(f"{path}.migrate-tmp.switching").exists()
    with y_cls.load(path) as store:  # Y's switch, whole, finished by Y's load
        assert store.read() == 3


def test_a_marker_cut_short_means_no_switch_began(tmp_path: Path) -> None:
    """A kill as the marker was written leaves it empty: the next migrate must not take
    it for a switch under way (it would move the value without its identity)."""
    path = tmp_path / "singleton"
    migrating.build("singleton", path)
    Path(f"{path}.migrate-tmp.switching").write_bytes(b"")
    migrate(migrating.OLD["singleton"], migrating.NEW["singleton"], path,
            lambda k, v: migrating.convert("singleton", k, v), progress=False)  # fmt: skip
    assert migrating.read(migrating.NEW["singleton"], path) == migrating.new_state("singleton")
