"""salvage: every binding whose checksums verify is copied; what cannot be read is named."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    CannotWriteToStore,
    Mode,
    batch,
    make_indexable_removable,
    make_indexed_file,
    make_singleton,
    salvage,
)
from l2_stores.engine.framing import HEADER_SIZE
from l2_stores.stores import identity
from tests.helpers.child import Child

Levels = make_indexable_removable("levels", construct.Int32ub, construct.Bytes(16))
Blocks = make_indexed_file("blocks", construct.Int32ub, construct.GreedyBytes, construct.Bytes(4))
Head = make_singleton("head", construct.Bytes(8))


def value_of(key: int) -> bytes:
    return key.to_bytes(4, "big") * 4


def build_levels(path: Path, count: int = 300) -> dict[int, bytes]:
    """Each key written once, in runs and in the log: a flipped byte loses at most one."""
    with Levels.load(path, index_buffer_size=64) as store:
        for key in range(count):
            store.add(key, value_of(key))
    return {key: value_of(key) for key in range(count)}


def build_blocks(path: Path, count: int = 120) -> dict[int, tuple[bytes, bytes]]:
    with Blocks.load(path, index_buffer_size=32) as store:
        for key in range(count):
            store.append(key, value_of(key) * (1 + key % 5), key.to_bytes(4, "big"))
    return {key: (value_of(key) * (1 + key % 5), key.to_bytes(4, "big")) for key in range(count)}


def read(cls: Any, path: Path) -> dict[Any, Any]:
    with cls.load(path, Mode.READ_ONLY) as store:
        return dict(store.items())


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_one_flipped_row_loses_one_binding(tmp_path: Path) -> None:
    """The finding of the issue: 249 of 250 bindings back, the bad row named."""
    source = tmp_path / "d"
    for name in ("a", "b", "c"):
        build_levels(source / name, 250)
    run = sorted(p for p in (source / "b").iterdir() if p.name.startswith("run."))[0]
    flip(run, run.stat().st_size // 2)
    report = salvage(source, tmp_path / "out")
    found = {Path(store.source).name: store for store in report.stores}
    assert (found["a"].bindings, found["b"].bindings, found["c"].bindings) == (250, 249, 250)
    assert not found["a"].lost and not found["c"].lost
    assert [finding.file for finding in found["b"].lost] == [str(run)]
    assert not report.complete
    copied = read(Levels, tmp_path / "out" / "b")
    assert len(copied) == 249 and all(value_of(key) == value for key, value in copied.items())
    assert identity.read(str(tmp_path / "out" / "b" / "identity")) == Levels._identity()
    with pytest.raises(CannotWriteToStore):
        salvage(source, tmp_path / "out")


@pytest.mark.parametrize("seed", range(3))
def test_byte_flips_anywhere_never_give_wrong_data(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    source = tmp_path / "levels"
    state = build_levels(source)
    files = [p for p in sorted(source.iterdir()) if p.name != "lock"]
    for attempt in range(12):
        victim = rng.choice(files)
        offset = rng.randrange(victim.stat().st_size)
        damaged = tmp_path / f"damaged{attempt}"
        damaged.mkdir()
        for file in source.iterdir():
            (damaged / file.name).write_bytes(file.read_bytes())
        flip(damaged / victim.name, offset)
        report = salvage(damaged, tmp_path / f"out{attempt}")
        (store,) = report.stores
        copied = read(Levels, tmp_path / f"out{attempt}") if store.bindings else {}
        assert all(state[key] == value for key, value in copied.items()), (victim, offset)
        if len(copied) < len(state):
            assert store.lost, (victim, offset)
            assert all(finding.file.startswith(str(damaged)) for finding in store.lost)
        if victim.name.startswith("run.") and len(copied) < len(state) - 1:
            # more than one binding gone: the run's header could not be read
            assert any("run not read" in finding.what for finding in store.lost), store.lost


def test_overwrites_and_removals_come_out_as_the_store_has_them(tmp_path: Path) -> None:
    rng = random.Random("salvage model")
    state: dict[int, bytes] = {}
    with Levels.load(tmp_path / "levels", index_buffer_size=16) as store:
        for _ in range(600):
            key = rng.randrange(80)
            if rng.random() < 0.25:
                store.remove(key, flush=False)
                state.pop(key, None)
            else:
                value = rng.randbytes(16)
                store.add(key, value, flush=False)
                state[key] = value
    report = salvage(tmp_path / "levels", tmp_path / "out")
    assert report.complete and report.stores[0].bindings == len(state)
    assert read(Levels, tmp_path / "out") == state


def test_an_indexed_file_loses_only_its_damaged_value(tmp_path: Path) -> None:
    state = build_blocks(tmp_path / "blocks")
    values = sorted(p for p in (tmp_path / "blocks").iterdir() if p.name.startswith("values."))
    with Blocks.load(tmp_path / "blocks", Mode.READ_ONLY) as store:
        pointer = store._engine.get((7).to_bytes(4, "big"))
    offset, _, number = identity_free_pointer(pointer)
    flip(tmp_path / "blocks" / f"values.{number:08d}", offset + 20)
    report = salvage(tmp_path / "blocks", tmp_path / "out")
    (done,) = report.stores
    assert done.bindings == len(state) - 1
    assert [f.offset for f in done.lost] == [offset] and "key 00000007" in done.lost[0].what
    copied = read(Blocks, tmp_path / "out")
    assert copied == {key: pair for key, pair in state.items() if key != 7}
    assert values  # the store has values files


def identity_free_pointer(entry: bytes) -> tuple[int, int, int]:
    from l2_stores.engine.values import POINTER

    offset, length, number = POINTER.unpack_from(entry)
    return offset, length, number


def test_singletons_whole_or_named(tmp_path: Path) -> None:
    with Head.load(tmp_path / "d" / "head") as head:
        head.write(b"12345678")
    with Head.load(tmp_path / "d" / "bad") as bad:
        bad.write(b"abcdefgh")
    flip(tmp_path / "d" / "bad", 40)
    report = salvage(tmp_path / "d", tmp_path / "out")
    found = {Path(store.source).name: store for store in report.stores}
    assert found["head"].bindings == 1 and not found["head"].lost
    assert found["bad"].bindings == 0 and found["bad"].lost
    with Head.load(tmp_path / "out" / "head", Mode.READ_ONLY) as head:
        assert head.read() == b"12345678"
    assert not (tmp_path / "out" / "bad").exists()


def test_the_command_line_salvages(tmp_path: Path) -> None:
    build_levels(tmp_path / "levels", 100)
    run = sorted(p for p in (tmp_path / "levels").iterdir() if p.name.startswith("run."))[0]
    flip(run, run.stat().st_size // 2)
    proc = subprocess.run(
        [sys.executable, "-m", "l2_stores", "salvage", tmp_path / "levels", tmp_path / "out"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "99 bindings, 1 unreadable" in proc.stdout and str(run) in proc.stdout
    assert len(read(Levels, tmp_path / "out")) == 99


def test_a_kill_leaves_no_target_or_the_whole_of_it(tmp_path: Path) -> None:
    rng = random.Random("salvage kills")
    source = tmp_path / "d"
    state = build_levels(source / "levels", 2000)
    build_blocks(source / "blocks", 50)
    outcomes = set()
    for attempt in range(6):
        target = tmp_path / f"out{attempt}"
        child = Child(Path(__file__).parent / "helpers" / "salvaging.py", [source, target],
                      tmp_path / "stderr")  # fmt: skip
        assert child.wait_for(partial(child.seen, "salvaging")), child.stderr()
        if attempt == 0:  # right after the target is in place
            assert child.wait_for(partial(child.seen, f"renamed {target.name}")), child.lines
        else:
            time.sleep(rng.uniform(0, 0.6))
        child.kill()
        if target.exists():
            outcomes.add("whole")
            assert read(Levels, target / "levels") == state
            assert len(read(Blocks, target / "blocks")) == 50
        else:
            outcomes.add("none")
            salvage(source, target)
            assert read(Levels, target / "levels") == state
        assert not [name for name in os.listdir(tmp_path) if "salvage" in name]
    assert outcomes == {"whole", "none"}, outcomes


def test_a_damaged_record_inside_a_batch_part_loses_the_whole_part(tmp_path: Path) -> None:
    """Never a mix: the part's other records do not come back as loose writes."""
    small = make_indexable_removable("small", construct.Int32ub, construct.Bytes(4))
    with small.load(tmp_path / "levels") as levels, Head.load(tmp_path / "head") as head:
        for key in (1, 2, 3):
            levels.add(key, b"old%d" % key)
        with batch(levels, head) as (levels_b, head_b):
            for key in (1, 2, 3):
                levels_b.add(key, b"new%d" % key)
            head_b.write(b"h" * 8)
        levels.add(4, b"aft4")  # after the part: kept
    log = tmp_path / "levels" / "log.00000000"
    size = 1 + 4 + 4 + 4
    data = bytearray(log.read_bytes())
    ops = [data[at] & 0x7F for at in range(HEADER_SIZE, len(data) - size + 1, size)]
    begin = ops.index(5)  # the part's begin; its records: sets of 1, 2, 3, then its end
    data[HEADER_SIZE + (begin + 2) * size + 6] ^= 0xFF  # the set of key 2
    log.write_bytes(bytes(data))
    report = salvage(tmp_path / "levels", tmp_path / "out")
    assert read(small, tmp_path / "out") == {1: b"old1", 2: b"old2", 3: b"old3", 4: b"aft4"}
    reasons = " / ".join(finding.what for finding in report.stores[0].lost)
    assert "unreadable" in reasons and "not taken" in reasons, reasons


SINGLETON_IN_A_BATCH = """
import os, sys, construct, l2_stores
from l2_stores import make_indexable, make_singleton
root = sys.argv[1]
levels = make_indexable("levels", construct.Int32ub, construct.Bytes(4)).load(root + "/levels")
head = make_singleton("head", construct.Bytes(8)).load(root + "/head")
head.write(b"1" * 8)
with l2_stores.batch(levels, head) as (levels_b, head_b):
    levels_b.add(1, b"new1")
    head_b.write(b"9" * 8)
os._exit(0)  # killed: the batch's value is in the journal only
"""


def test_a_singleton_value_only_the_journal_holds_is_salvaged(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", SINGLETON_IN_A_BATCH, str(tmp_path)], check=True)
    salvage(tmp_path / "head", tmp_path / "out")
    with Head.load(tmp_path / "out", Mode.READ_ONLY) as head:
        assert head.read() == b"9" * 8
    with Head.load(tmp_path / "head") as head:
        assert head.read() == b"9" * 8  # what a load gives
