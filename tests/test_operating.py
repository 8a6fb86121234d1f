"""Operating a node's stores: load errors, damaged stores in the tools, backups from Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    ArchiveSummary,
    CannotLoadStore,
    Mode,
    StoreError,
    batch,
    export_archive,
    import_archive,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_singleton,
)
from l2_stores.engine import filesystem
from tests.helpers.faults import FailingFileSystem
from tests.helpers.runs import run_names

Levels = make_indexable("levels", construct.Int32ub, construct.Bytes(32))
KINDS: list[Any] = [
    make_singleton("head", construct.Bytes(8)),
    Levels,
    make_indexable_removable("messages", construct.Int32ub, construct.Bytes(8)),
    make_indexed_file("blocks", construct.Int32ub, construct.GreedyBytes, construct.Bytes(8)),
]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l2_stores", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize("mode", [Mode.READ_WRITE, Mode.READ_ONLY], ids=["rw", "ro"])
@pytest.mark.parametrize("cls", KINDS, ids=[cls.name for cls in KINDS])
def test_a_load_below_a_file_is_a_store_error(tmp_path: Path, cls: Any, mode: Mode) -> None:
    (tmp_path / "a-file").write_bytes(b"x")
    path = tmp_path / "a-file" / "store"
    with pytest.raises(CannotLoadStore) as caught:
        cls.load(path, mode)
    assert caught.value.name == cls.name and caught.value.path == str(path)
    assert "Not a directory" in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def healthy_and_damaged(root: Path) -> tuple[list[Path], Path]:
    """Three stores of 250 bindings under ``root``; one byte of a run row of the middle one
    flipped."""
    paths = [root / name for name in ("a", "b", "c")]
    for path in paths:
        with Levels.load(path, index_buffer_size=50) as store:
            for level in range(250):
                store.add(level, bytes([level]) * 32)
    damaged = paths[1]
    run = damaged / run_names(damaged)[0]
    data = bytearray(run.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the rows, between the header and the index
    run.write_bytes(bytes(data))
    return paths, damaged


def test_info_reports_a_damaged_store_and_goes_on(tmp_path: Path) -> None:
    _, damaged = healthy_and_damaged(tmp_path / "d")
    # info reads no row (the runs count their bindings): damage a file it reads
    identity_file = damaged / "identity"
    identity_file.write_bytes(identity_file.read_bytes()[:-1] + b"\x00")
    proc = cli("info", "--json", tmp_path / "d")
    assert proc.returncode == 1, proc
    entries = {Path(entry["path"]).name: entry for entry in json.loads(proc.stdout)}
    assert set(entries) == {"a", "b", "c"}
    assert entries["a"]["bindings"] == entries["c"]["bindings"] == 250
    assert entries["a"]["problem"] is None and "checksum" in entries["b"]["problem"]
    assert str(damaged) in proc.stderr
    text = cli("info", tmp_path / "d")
    assert text.returncode == 1 and text.stdout.count("bindings        250") == 2
    assert "DAMAGED" in text.stdout


def test_verify_reports_a_damaged_row_and_checks_the_others(tmp_path: Path) -> None:
    _, damaged = healthy_and_damaged(tmp_path / "d")
    proc = cli("verify", tmp_path / "d")
    assert proc.returncode == 1
    assert "in 3 stores" in proc.stdout and str(damaged) in proc.stdout
    assert cli("verify", tmp_path / "d" / "a").returncode == 0


def test_archives_from_python(tmp_path: Path) -> None:
    source = tmp_path / "node"
    with KINDS[0].load(source / "head") as head, Levels.load(source / "levels") as levels:
        head.write(b"h" * 8)
        for level in range(10):
            levels.add(level, bytes([level]) * 32)
        # taken while the writers run
        done = export_archive(source, tmp_path / "backup.tar.gz")
        levels.add(99, bytes(32))
    assert isinstance(done, ArchiveSummary) and (done.stores, done.bindings) == (2, 11)
    with pytest.raises(StoreError):
        export_archive(source, tmp_path / "backup.tar.gz")  # exists: force= replaces
    restored = import_archive(tmp_path / "backup.tar.gz", tmp_path / "restored")
    assert (restored.stores, restored.bindings) == (2, 11)
    with Levels.load(tmp_path / "restored" / "levels", Mode.READ_ONLY) as levels:
        assert dict(levels.items()) == {level: bytes([level]) * 32 for level in range(10)}
    with KINDS[0].load(tmp_path / "restored" / "head", Mode.READ_ONLY) as head:
        assert head.read() == b"h" * 8


def test_dump_decodes_with_the_recorded_codecs(tmp_path: Path) -> None:
    head = make_singleton(
        "head", construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(2))
    )
    with head.load(tmp_path / "head") as store:
        store.write({"level": 7, "hash": b"\xab\xcd"})
    proc = cli("dump", "--decode", tmp_path / "head")
    assert proc.returncode == 0 and proc.stdout.strip() == 'value={"level": 7, "hash": "abcd"}'
    with Levels.load(tmp_path / "levels") as levels:
        levels.add(5, bytes(32))
    row = json.loads(cli("dump", "--json", tmp_path / "levels").stdout)
    assert row["decoded"] == {"key": 5, "value": "00" * 32} and row["key"] == "00000005"


def test_dump_decode_prints_in_hex_what_it_cannot_decode(tmp_path: Path) -> None:
    names = make_indexable("names", construct.Int32ub, construct.PaddedString(4, "utf8"))
    with names.load(tmp_path / "names") as store:
        store.add(5, "ab")
    proc = cli("dump", "--decode", tmp_path / "names")
    assert proc.returncode == 0 and proc.stdout.strip() == "key=5 value=61620000", proc


def test_dump_of_a_damaged_store_prints_what_it_can_and_names_salvage(tmp_path: Path) -> None:
    _, damaged = healthy_and_damaged(tmp_path / "d")
    proc = cli("dump", damaged)
    assert proc.returncode == 1 and "salvage" in proc.stderr
    assert 0 < len(proc.stdout.splitlines()) < 250


def test_an_import_over_a_singleton_in_a_batch_does_not_bring_back_its_batches(
    tmp_path: Path,
) -> None:
    head_cls = KINDS[0]
    node = tmp_path / "node"
    with head_cls.load(node / "head") as head, Levels.load(node / "levels") as levels:
        head.write(b"1" * 8)
        levels.add(1, bytes(32))
        export_archive(node, tmp_path / "backup.tar")
        for n in (2, 3):
            with batch(head, levels) as (head_b, levels_b):
                head_b.write(str(n).encode() * 8)
                levels_b.add(n, bytes(32))
    import_archive(tmp_path / "backup.tar", node, force=True)
    assert not (node / "head.batch").exists()
    journal = node / "l2_stores.journal"
    retired = list(journal.glob("retired.*"))  # the head and the levels it replaced
    assert len(retired) == 2, "a replaced store still holds the journal back"
    with head_cls.load(node / "head") as head:
        assert head.read() == b"1" * 8  # not the replaced store's batches again


def test_an_import_cut_short_in_a_singleton_switch_is_finished_by_the_next(
    tmp_path: Path,
) -> None:
    old = make_singleton("head", construct.Int64ub)
    new = make_singleton("head", construct.Int64ul)  # same size: a wrong read, not a refusal
    with new.load(tmp_path / "source" / "head") as head:
        head.write(7)
    export_archive(tmp_path / "source", tmp_path / "backup.tar")
    with old.load(tmp_path / "node" / "head") as head:
        head.write(5)
    failing = FailingFileSystem("rename")
    failing.failures, failing.passes = 1, 3  # the new identity's rename: the switch's last step
    with filesystem.installed(failing), pytest.raises(StoreError):
        import_archive(tmp_path / "backup.tar", tmp_path / "node", force=True)
    for cls in (old, new):  # mid-switch: neither class may read the value
        with pytest.raises(CannotLoadStore, match="cut short"):
            cls.load(tmp_path / "node" / "head", Mode.READ_ONLY)
    import_archive(tmp_path / "backup.tar", tmp_path / "node", force=True)
    with new.load(tmp_path / "node" / "head") as head:
        assert head.read() == 7
