"""Atomic batches across stores: the journal, the log's parts, the API, and kills."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import construct
import pytest

import l2_stores
from l2_stores import (
    Mode,
    ReadOnlyError,
    StoreClosedError,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)
from l2_stores.batches import JOURNAL_DIRECTORY, Batch
from l2_stores.engine import filesystem
from l2_stores.engine import journal as journal_module
from l2_stores.engine.framing import Expected
from l2_stores.engine.hooks import Point
from l2_stores.engine.journal import Journal, Part, read_link
from l2_stores.engine.log import read_log
from l2_stores.tools.on_disk import find_stores
from l2_stores.tools.verify import verify
from tests.helpers import batch_writer
from tests.helpers.child import Child
from tests.helpers.interrupts import interrupt_at
from tests.helpers.power_loss import PowerLossFileSystem, choose_modes

HELPERS = Path(__file__).parent / "helpers"
Levels = make_indexable("levels", construct.Int32ub, construct.Bytes(32))
Head = make_singleton("head", construct.Int32ub)
Blocks = make_indexed_file("blocks", construct.Bytes(8), construct.GreedyBytes, construct.Int32ub)
Notes = make_simple_indexed_file(
    "notes", construct.Int32ub, construct.GreedyBytes, construct.Int16ub, len
)
Messages = make_indexable_removable("messages", construct.Int32ub, construct.Bytes(8))


def value(n: int) -> bytes:
    return n.to_bytes(4, "big") * 8


def first_block(levels: Any, messages: Any) -> Batch:
    """A batch binding 1 in ``levels`` and in ``messages``, not committed yet."""
    batch = l2_stores.batch(levels, messages)
    batch.views[0].add(1, value(1))
    batch.views[1].add(1, b"message1")
    return batch


def commit_interrupted_after_its_point(batch: Batch) -> None:
    """Commit ``batch`` with a Ctrl-C after its commit point, before any store took its
    part: every store misses its part (the next load takes it from the journal)."""

    def interrupt() -> None:
        raise KeyboardInterrupt

    batch.hooks.add("part_ended", interrupt)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()


# ------------------------------------------------------------------ journal


def test_journal_records_come_back_in_order(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"), create=True)
    seqs = [
        journal.append([Part(7, n, b"x" * n), Part(9, n, b"")], fsync=n % 2 == 0)
        for n in range(1, 6)
    ]
    journal.close()
    assert seqs == [1, 2, 3, 4, 5]
    again = Journal(str(tmp_path / "j"), create=False)
    records = list(again.records())
    assert [record.seq for record in records] == seqs
    assert [record.parts[0].data for record in records] == [b"x" * n for n in range(1, 6)]
    assert again.parts_of(9) == {n: b"" for n in range(1, 6)}
    assert again.append([Part(7, 6, b"y")], fsync=False) == 6
    again.close()


def test_a_torn_journal_tail_is_cut_and_a_synced_record_after_damage_is_corruption(
    tmp_path: Path,
) -> None:
    journal = Journal(str(tmp_path / "j"), create=True)
    for n in range(1, 4):
        journal.append([Part(1, n, b"abc")], fsync=True)
    (segment,) = journal.segments
    journal.close()
    whole = Path(segment).read_bytes()
    Path(segment).write_bytes(whole[: len(whole.rstrip(b"\0")) - 5])  # record 3 torn
    torn = Journal(str(tmp_path / "j"), create=False)
    assert [record.seq for record in torn.records()] == [1, 2]
    torn.close()
    third = whole.index(b"L2SB", whole.index(b"L2SB", 65) + 1)  # where record 3 began
    assert not any(Path(segment).read_bytes()[third:])  # zeros now: room for records
    damaged = bytearray(whole)
    damaged[64 + 22] ^= 1  # the first record's payload: records after it were fsynced
    Path(segment).write_bytes(bytes(damaged))
    with pytest.raises(l2_stores.CannotLoadStore, match="offset 64"):
        Journal(str(tmp_path / "j"), create=False)


def test_journal_segments_are_trimmed_once_their_parts_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 200)
    journal = Journal(str(tmp_path / "j"), create=True)
    for n in range(1, 11):
        journal.append([Part(1, n, b"p" * 50), Part(2, n, b"q")], fsync=False)
    assert len(journal.segments) > 3
    assert journal.trim({1: 10}) == 0  # participant 2 unknown: nothing goes
    assert journal.trim({1: 4, 2: 4}) >= 1
    assert min(journal.parts_of(1)) <= 5
    journal.trim({1: 10, 2: 10})
    assert len(journal.segments) == 1  # the last one stays, to append to
    journal.close()


def test_a_retired_participant_does_not_hold_the_journal_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 200)
    journal = Journal(str(tmp_path / "j"), create=True)
    for n in range(1, 11):
        journal.append([Part(1, n, b"p" * 50), Part(2, n, b"q")], fsync=False)
    assert journal.trim({1: 10}) == 0  # participant 2 unknown: nothing goes
    journal.retire(2, 6)  # its store is gone, holding 6 parts
    assert journal.trim({1: 10}) >= 1
    journal.close()
    again = Journal(str(tmp_path / "j"), create=False)  # the retirement is durable
    assert again.retired == {2: 6}
    again.retire(2, 10)
    again.trim({1: 10})
    assert len(again.segments) == 1
    again.close()


def test_records_across_the_room_allocated_ahead_read_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "ALLOCATE_STEP", 4096)
    rng = random.Random(5)
    journal = Journal(str(tmp_path / "j"), create=True)
    sizes = [rng.choice([10, 300, 4000, 9000]) for _ in range(60)]
    for n, size in enumerate(sizes, 1):
        journal.append([Part(1, n, bytes([n % 256]) * size)], fsync=n % 3 == 0)
        if n % 20 == 0:  # reopened: the room after the records is kept
            journal.close()
            journal = Journal(str(tmp_path / "j"), create=False)
    records = list(journal.records())
    journal.close()
    assert [len(record.parts[0].data) for record in records] == sizes
    assert all(
        record.parts[0].data == bytes([n % 256]) * len(record.parts[0].data)
        for n, record in enumerate(records, 1)
    )


def test_a_second_process_cannot_open_the_journal(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"), create=True)
    try:
        with pytest.raises(l2_stores.StoreLockedError):
            Journal(str(tmp_path / "j"), create=False)
    finally:
        journal.close()


# --------------------------------------------------------------- log parts


def test_a_part_cut_short_binds_nothing(tmp_path: Path) -> None:
    store = Levels.load(tmp_path / "levels")
    store.add(1, value(1))
    store._engine.apply_part([(b"\0\0\0\2", value(2)), (b"\0\0\0\3", value(3))])
    log_path = store._engine._log.path
    expected = Expected("levels", 4, 32)
    store._engine._log.flush()
    whole = Path(log_path).read_bytes()
    record = 1 + 4 + 32 + 4
    end = 64 + 5 * record  # a set, begin, two sets, end
    scan = read_log(log_path, expected)
    assert scan.parts == 1 and set(scan.bindings) == {b"\0\0\0\1", b"\0\0\0\2", b"\0\0\0\3"}
    store._engine.close(durable=False)
    store._lifetime.close()
    Path(log_path).write_bytes(whole[: end - record])  # the end record lost
    scan = read_log(log_path, expected)
    assert scan.parts == 0 and set(scan.bindings) == {b"\0\0\0\1"}
    assert scan.open_part == 3 * record and scan.end == 64 + record
    reloaded = Levels.load(tmp_path / "levels")
    assert dict(reloaded.items()) == {1: value(1)}
    reloaded.add(4, value(4))
    reloaded.close()
    assert dict(Levels.load(tmp_path / "levels", Mode.READ_ONLY).items()) == {
        1: value(1),
        4: value(4),
    }


def test_parts_are_counted_through_merges_and_reloads(tmp_path: Path) -> None:
    store = Levels.load(tmp_path / "levels", index_buffer_size=7)
    for n in range(1, 41):
        store._engine.apply_part([(n.to_bytes(4, "big"), value(n))])
    store._engine.wait_merge()
    assert store._engine.parts == 40
    assert store._engine.durable_parts >= 30
    store.close()
    again = Levels.load(tmp_path / "levels", Mode.READ_ONLY)
    assert again._engine.parts == 40 and len(again) == 40
    again.close()


# --------------------------------------------------------------------- API


def test_a_batch_commits_every_write_or_none(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    messages.add(9, b"old mess")
    with l2_stores.batch(levels, messages) as (levels_b, messages_b):
        levels_b.add(1, value(1))
        messages_b.add(1, b"message1")
        messages_b.remove(9)
        # read-your-writes, and nothing reaches the stores yet
        assert levels_b.find(1) == value(1) and levels.find(1) is None
        assert 9 not in messages_b and 9 in messages
        assert len(messages_b) == 1 and len(messages) == 1
        assert list(messages_b.items()) == [(1, b"message1")]
        assert levels_b[1] == value(1) and levels_b.get(2, "none") == "none"
    assert levels.find(1) == value(1) and messages.find(1) == b"message1" and 9 not in messages
    with pytest.raises(StoreClosedError):
        levels_b.add(2, value(2))

    with pytest.raises(RuntimeError), l2_stores.batch(levels, messages) as (levels_b, messages_b):
        levels_b.add(2, value(2))
        messages_b.remove(1)
        raise RuntimeError("the block failed")
    assert 2 not in levels and messages.find(1) == b"message1"
    assert sorted(os.listdir(tmp_path)) == [JOURNAL_DIRECTORY, "levels", "messages"]
    levels.close()
    messages.close()


def test_indexed_files_in_a_batch(tmp_path: Path) -> None:
    blocks = Blocks.load(tmp_path / "blocks")
    notes = Notes.load(tmp_path / "notes")
    blocks.append(b"old-blok", b"x" * 5000, 1)
    with l2_stores.batch(blocks, notes) as (blocks_b, notes_b):
        blocks_b.append(b"new-blok", b"y" * 8000, 2)
        blocks_b.append(b"old-blok", b"z", 3)
        notes_b.append(7, b"note")
        assert blocks_b.read(b"old-blok") == (b"z", 3) and blocks.read(b"old-blok")[1] == 1
        assert blocks_b.header(b"new-blok") == 2 and b"new-blok" not in blocks
        assert [key for key, _ in blocks_b.items(reverse=True)] == [b"old-blok", b"new-blok"]
        assert len(blocks_b) == 2 and notes_b[7] == (b"note", 4) and len(notes) == 0
    assert blocks.read(b"new-blok") == (b"y" * 8000, 2) and blocks.read(b"old-blok") == (b"z", 3)
    with pytest.raises(KeyError), l2_stores.batch(blocks, notes) as (blocks_b, notes_b):
        notes_b.append(8, b"lost")
        blocks_b.append(b"new-blok", b"lost", 9)
        _ = notes_b[9]
    assert 8 not in notes and blocks.header(b"new-blok") == 2
    blocks.close()
    notes.close()
    blocks = Blocks.load(tmp_path / "blocks", Mode.READ_ONLY)
    assert dict(blocks.items()) == {b"new-blok": (b"y" * 8000, 2), b"old-blok": (b"z", 3)}
    blocks.close()


def test_plain_writes_after_a_batch_survive_reloads(tmp_path: Path) -> None:
    for round_ in range(3):
        levels = Levels.load(tmp_path / "levels")
        head = Head.load(tmp_path / "head")
        if round_ == 0:
            with l2_stores.batch(levels, head) as (levels_b, head_b):
                levels_b.add(1, value(1))
                head_b.write(1)
                assert head_b.read() == 1 and head.read() is None
            levels.add(1, value(2))  # after the batch: last write wins, now and later
            head.write(2)
        assert (levels.find(1), head.read()) == (value(2), 2)
        assert head._part_count() == 1 and levels._part_count() == 1
        levels.close()
        head.close()
    head = Head.load(tmp_path / "head")
    with l2_stores.batch(head) as (head_b,):
        head_b.delete()
    assert head.read() is None and head._part_count() == 2
    head.delete()  # keeps the count in a DELETED file
    head.close()
    head = Head.load(tmp_path / "head")
    assert head.read() is None and head._part_count() == 2
    head.close()


def test_a_batch_view_reads_plain_writes_made_meanwhile(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    batch = l2_stores.batch(levels)
    (view,) = batch.views
    view.add(1, value(1))
    levels.add(1, value(100))
    levels.add(2, value(2))
    assert view.find(1) == value(1) and view.find(2) == value(2)
    assert list(view.keys()) == [1, 2] and list(view.keys(reverse=True)) == [2, 1]
    batch.commit()
    assert levels.find(1) == value(1)  # the batch's commit came after the plain write
    levels.close()


def test_batch_refusals_come_before_anything(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    with pytest.raises(ValueError):
        l2_stores.batch()
    with pytest.raises(ValueError):
        l2_stores.batch(levels, levels)
    with pytest.raises(ReadOnlyError):
        l2_stores.batch(levels.readonly())
    reader = Levels.load(tmp_path / "levels", Mode.READ_ONLY)
    with pytest.raises(ReadOnlyError):
        l2_stores.batch(reader)
    reader.close()
    levels.close()
    with pytest.raises(StoreClosedError):
        l2_stores.batch(levels)
    assert not (tmp_path / JOURNAL_DIRECTORY).exists()


def test_a_store_links_to_its_journal_once(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    with l2_stores.batch(levels) as (view,):
        view.add(1, value(1))
    link = read_link(str(tmp_path / "levels" / "batch"), "levels")
    assert link is not None and link.journal_directory() == str(tmp_path / JOURNAL_DIRECTORY)
    with l2_stores.batch(levels) as (view,):
        view.add(2, value(2))
    assert read_link(str(tmp_path / "levels" / "batch"), "levels") == link
    levels.close()


def test_a_committed_part_the_store_lacks_is_taken_at_its_next_load(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    batch = l2_stores.batch(levels, messages)
    levels_b, messages_b = batch.views
    levels_b.add(1, value(1))
    messages_b.add(1, b"message1")

    def crash() -> None:
        raise KeyboardInterrupt  # the process dies here: nothing after runs

    batch.hooks.add("journal_written", crash)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    assert levels.find(1) is None  # committed, not taken
    levels._engine.close(durable=False)  # as a kill leaves them
    messages._engine.close(durable=False)
    levels._batch.abandon()
    messages._batch.abandon()
    levels = Levels.load(tmp_path / "levels")  # alone: its partner is not loaded
    assert levels.find(1) == value(1)
    levels.close()
    messages = Messages.load(tmp_path / "messages")
    assert messages.find(1) == b"message1"
    messages.close()


def test_a_store_whose_journal_was_deleted_loads_alone(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    with l2_stores.batch(levels) as (view,):
        view.add(1, value(1))
    levels.close()
    for name in os.listdir(tmp_path / JOURNAL_DIRECTORY):
        os.unlink(tmp_path / JOURNAL_DIRECTORY / name)
    os.rmdir(tmp_path / JOURNAL_DIRECTORY)
    again = Levels.load(tmp_path / "levels")
    assert again.find(1) == value(1)
    again.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_a_dict(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    witness: dict[str, dict[int, bytes]] = {"levels": {}, "messages": {}}
    levels = Levels.load(tmp_path / "levels", index_buffer_size=16)
    messages = Messages.load(tmp_path / "messages", index_buffer_size=16)
    for step in range(120):
        roll = rng.random()
        if roll < 0.1:
            levels.close()
            messages.close()
            levels = Levels.load(tmp_path / "levels", index_buffer_size=16)
            messages = Messages.load(tmp_path / "messages", index_buffer_size=16)
            continue
        if roll < 0.3:
            key = rng.randrange(50)
            levels.add(key, value(step))
            witness["levels"][key] = value(step)
            continue
        batch = l2_stores.batch(levels, messages)
        levels_b, messages_b = batch.views
        staged = {"levels": dict(witness["levels"]), "messages": dict(witness["messages"])}
        for _ in range(rng.randrange(1, 6)):
            key = rng.randrange(50)
            if rng.random() < 0.3:
                messages_b.remove(key)
                staged["messages"].pop(key, None)
            elif rng.random() < 0.5:
                messages_b.add(key, step.to_bytes(8, "big"))
                staged["messages"][key] = step.to_bytes(8, "big")
            else:
                levels_b.add(key, value(step))
                staged["levels"][key] = value(step)
        assert dict(messages_b.items()) == staged["messages"]
        assert len(levels_b) == len(staged["levels"])
        if rng.random() < 0.25:
            batch.rollback()
        else:
            batch.commit()
            witness = staged
        assert dict(levels.items()) == witness["levels"]
        assert dict(messages.items()) == witness["messages"]
    levels.close()
    messages.close()


# ------------------------------------------------------------------- kills


def check_batches(directory: Path, acked: int, with_head: bool = True) -> int:
    """``batch_writer.check``: every batch whole or absent, in order, the acked ones there."""
    return batch_writer.check(str(directory), acked, with_head)


@pytest.mark.parametrize("fsync", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batches_survive_sigkill(tmp_path: Path, seed: int, fsync: bool) -> None:
    rng = random.Random(seed)
    directory = tmp_path / "node"
    acked = 0
    for round_ in range(4):
        mode = rng.choice(["none", "journal", "ended", "part"])
        kill = "none" if mode == "none" else f"{mode}:{acked + rng.randrange(1, 30)}"
        args = [directory, seed, rng.choice([8, 50, 1000]), 400, kill]
        child = Child(
            HELPERS / "batch_writer.py",
            [*args, *(["fsync"] if fsync else [])],
            tmp_path / f"stderr{round_}",
        )
        child.wait_for(lambda c=child: any(line == "ready" for line in c.lines))
        if mode == "none":
            wanted = rng.randrange(1, 60)
            child.wait_for(lambda c=child, w=wanted: c.acks >= w or c.eof)
        else:
            child.wait_for(lambda c=child: c.eof)
        child.kill()
        acks = [int(line.split()[1]) for line in child.lines if line.startswith("ack ")]
        assert "Traceback" not in child.stderr(), child.stderr()
        acked = max([acked, *acks])
        if mode != "none":  # killed in the commit of this batch, after its commit point
            acked = max(acked, int(kill.split(":")[1]))
        acked = check_batches(directory, acked)


def test_tools_check_the_link_and_skip_the_journal(tmp_path: Path) -> None:
    from l2_stores.engine import files
    from l2_stores.tools.on_disk import find_stores

    levels = Levels.load(tmp_path / "levels")
    with l2_stores.batch(levels) as (view,):
        view.add(1, value(1))
    levels.close()
    assert [store.path for store in find_stores(str(tmp_path))] == [str(tmp_path / "levels")]
    link = tmp_path / "levels" / "batch"

    def findings() -> list[str]:
        checks = dict(files.index_checks(str(tmp_path / "levels")))
        return [str(finding) for finding in checks[str(link)](str(link), "levels")]

    assert findings() == []
    damaged = bytearray(link.read_bytes())
    damaged[70] ^= 1
    link.write_bytes(bytes(damaged))
    assert findings() and "damaged batch link" in findings()[0]
    with pytest.raises(l2_stores.CannotLoadStore, match="damaged batch link"):
        Levels.load(tmp_path / "levels")


def test_a_singleton_file_of_version_1_loads_and_is_rewritten_as_version_2(
    tmp_path: Path,
) -> None:
    import struct
    import zlib

    body = struct.pack("<8sHHIQ", b"L2SSING\0", 1, 0, 4, 4) + (41).to_bytes(4, "big")
    (tmp_path / "head").write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
    head = Head.load(tmp_path / "head", Mode.READ_ONLY)
    assert head.read() == 41
    head.close()
    head = Head.load(tmp_path / "head")
    assert head.read() == 41 and head._part_count() == 0
    with l2_stores.batch(head) as (view,):
        view.write(42)
    head.close()
    raw = (tmp_path / "head").read_bytes()
    assert raw[8:10] == (2).to_bytes(2, "little") and len(raw) == 32 + 4 + 4
    head = Head.load(tmp_path / "head")
    assert head.read() == 42 and head._part_count() == 1
    head.close()


# ---------------------------------------------------------------- snapshots


def test_a_snapshot_shows_one_moment_and_refuses_writes(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels", index_buffer_size=4)
    blocks = Blocks.load(tmp_path / "blocks", index_buffer_size=4)
    head = Head.load(tmp_path / "head")
    for n in range(10):
        levels.add(n, value(n))
        blocks.append(n.to_bytes(8, "big"), b"b" * n, n)
    head.write(9)
    with l2_stores.snapshot(levels, blocks, head) as (levels_s, blocks_s, head_s):
        for n in range(10, 30):  # writes, merges and a GC after the snapshot
            levels.add(n, value(n))
            blocks.append(n.to_bytes(8, "big"), b"c" * n, n)
        head.write(29)
        levels.gc(l2_stores.Retain([29]), background=False)
        blocks.gc(l2_stores.Retain([(29).to_bytes(8, "big")]), background=False)
        assert len(levels) == 1 and len(levels_s) == 10
        assert list(levels_s.keys()) == list(range(10)) and levels_s[3] == value(3)
        assert blocks_s.read((9).to_bytes(8, "big")) == (b"b" * 9, 9)
        assert next(key for key, _ in blocks_s.items(reverse=True)) == (9).to_bytes(8, "big")
        assert head_s.read() == 9 and head.read() == 29
        with pytest.raises(ReadOnlyError):
            levels_s.add(1, value(1))
        with pytest.raises(ReadOnlyError):
            head_s.write(1)
    with pytest.raises(StoreClosedError):
        levels_s.find(1)
    for store in (levels, blocks, head):
        store.close()


def test_snapshots_never_show_part_of_a_batch(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels", index_buffer_size=8)
    blocks = Blocks.load(tmp_path / "blocks", index_buffer_size=8)
    head = Head.load(tmp_path / "head")

    def commit_blocks() -> None:
        for n in range(1, 301):
            with l2_stores.batch(levels, blocks, head) as (levels_b, blocks_b, head_b):
                levels_b.add(n, value(n))
                blocks_b.append(value(n)[:8], b"x" * n, n)
                head_b.write(n)

    def read_snapshot() -> None:
        with l2_stores.snapshot(levels, blocks, head) as (levels_s, blocks_s, head_s):
            top = head_s.read() or 0
            assert len(levels_s) == top == len(blocks_s)
            assert levels_s.find(top + 1) is None
            if top:
                assert blocks_s.read(value(top)[:8]) == (b"x" * top, top)

    run_with_readers(commit_blocks, read_snapshot)
    assert head.read() == 300 and len(levels) == 300
    for store in (levels, blocks, head):
        store.close()


def test_readers_beside_commits_see_each_store_with_all_of_a_part_or_none(
    tmp_path: Path,
) -> None:
    """Plain readers (no snapshot) run beside the commits' writes; a commit's take of a
    part of two keys per store never shows one of them alone, and a reader who saw a
    batch in ``levels`` finds it in ``blocks`` after, while small logs make the commits
    hand logs over to merges as they go."""
    levels = Levels.load(tmp_path / "levels", index_buffer_size=4)
    blocks = Blocks.load(tmp_path / "blocks", index_buffer_size=4)

    def commit_blocks() -> None:
        for n in range(1, 201):
            with l2_stores.batch(levels, blocks) as (levels_b, blocks_b):
                levels_b.add(n, value(n))
                levels_b.add(100_000 + n, value(n))
                blocks_b.append(value(n)[:8], b"x" * n, n)
                blocks_b.append(value(100_000 + n)[:8], b"y" * n, n)

    def read() -> None:
        keys = list(levels.keys())
        assert len(keys) % 2 == 0 and len(levels) % 2 == 0, keys
        assert keys[len(keys) // 2 :] == [100_000 + key for key in keys[: len(keys) // 2]]
        assert len(list(blocks.keys())) % 2 == 0
        top = len(keys) // 2
        if top:
            assert blocks.read(value(top)[:8]) == (b"x" * top, top)

    run_with_readers(commit_blocks, read)
    assert len(levels) == 400 and len(blocks) == 400
    levels.close()
    blocks.close()


def run_with_readers(write: Callable[[], None], read: Callable[[], None], readers: int = 3) -> None:
    """Run ``write`` in a thread, and ``read`` again and again in ``readers`` others until
    it ends; fail with what any of them raised."""
    failures: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            write()
        except BaseException as error:  # reported below
            failures.append(error)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                read()
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures


def test_asyncio_batches_and_snapshots(tmp_path: Path) -> None:
    import asyncio

    from l2_stores import aio

    async def main() -> None:
        levels = await aio.load(Levels, tmp_path / "levels")
        head = await aio.load(Head, tmp_path / "head")
        async with aio.batch(levels, head) as (levels_b, head_b):
            await levels_b.add(1, value(1))
            await head_b.write(1)
            assert await levels_b.find(1) == value(1) and await levels.find(1) is None
            assert [key async for key in levels_b.keys(reverse=True)] == [1]
        assert await levels.find(1) == value(1) and await head.read() == 1
        with pytest.raises(RuntimeError):
            async with aio.batch(levels, head) as (levels_b, head_b):
                await levels_b.add(2, value(2))
                raise RuntimeError
        assert await levels.find(2) is None
        async with aio.snapshot(levels, head) as (levels_s, head_s):
            await levels.add(3, value(3))
            assert [key async for key in levels_s] == [1]
            assert await head_s.read() == 1 and await levels_s.find(3) is None
        await levels.close()
        await head.close()

    asyncio.run(main())


# ---------------------------------------------------------------- failures

FAILING_COMMIT_CHILD = """
import os, resource, signal, sys
import construct
import l2_stores
from l2_stores import CannotWriteToStore, make_indexable, make_indexed_file, make_singleton
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
directory = sys.argv[1]
Levels = make_indexable("levels", construct.Int32ub, construct.Bytes(32))
Blocks = make_indexed_file("blocks", construct.Bytes(8), construct.GreedyBytes, construct.Int32ub)
Head = make_singleton("head", construct.Int32ub)
levels = Levels.load(os.path.join(directory, "levels"))
blocks = Blocks.load(os.path.join(directory, "blocks"))
head = Head.load(os.path.join(directory, "head"))
with l2_stores.batch(levels, blocks, head) as (l, b, h):
    l.add(1, bytes(32)); b.append(b"block001", b"x" * 100, 1); h.write(1)
values = max(os.path.getsize(os.path.join(directory, "blocks", name))
             for name in os.listdir(os.path.join(directory, "blocks")) if name.startswith("values"))
resource.setrlimit(resource.RLIMIT_FSIZE, (values + 50, resource.RLIM_INFINITY))
try:
    with l2_stores.batch(levels, blocks, head) as (l, b, h):
        l.add(2, bytes(32)); b.append(b"block002", b"y" * 8000, 2); h.write(2)
except CannotWriteToStore as error:
    print("refused", "File too large" in str(error))
print("after", levels.find(2) is None, blocks.read(b"block002") is None, head.read())
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with l2_stores.batch(levels, blocks, head) as (l, b, h):
    l.add(3, bytes(32)); b.append(b"block003", b"z" * 8000, 3); h.write(3)
for store in (levels, blocks, head):
    store.close()
"""


def test_a_commit_the_disk_refuses_applies_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", FAILING_COMMIT_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.split() == ["refused", "True", "after", "True", "True", "1"], out.stderr
    levels = Levels.load(tmp_path / "levels")
    blocks = Blocks.load(tmp_path / "blocks")
    head = Head.load(tmp_path / "head")
    assert list(levels.keys()) == [1, 3] and head.read() == 3
    assert sorted(blocks.keys()) == [b"block001", b"block003"]
    assert blocks.read(b"block003") == (b"z" * 8000, 3)
    for store in (levels, blocks, head):
        store.close()


def test_a_journal_that_cannot_be_written_applies_nothing(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    head = Head.load(tmp_path / "head")
    with l2_stores.batch(levels, head) as (levels_b, head_b):
        levels_b.add(1, value(1))
        head_b.write(1)
    journal = levels._batch.group.journal
    good_fd, journal._fd = journal._fd, os.open(os.devnull, os.O_RDONLY)  # writes fail: EBADF
    with pytest.raises(l2_stores.CannotWriteToStore), l2_stores.batch(levels, head) as views:
        views[0].add(2, value(2))
        views[1].write(2)
    os.close(journal._fd)
    journal._fd = good_fd
    assert levels.find(2) is None and head.read() == 1 and len(levels) == 1
    levels.add(3, value(3))  # the stores go on
    with l2_stores.batch(levels, head) as (levels_b, head_b):
        levels_b.add(4, value(4))
        head_b.write(4)
    levels.close()
    head.close()
    levels = Levels.load(tmp_path / "levels")
    head = Head.load(tmp_path / "head")
    assert list(levels.keys()) == [1, 3, 4] and head.read() == 4
    assert levels._part_count() == 2 and head._part_count() == 2
    levels.close()
    head.close()


# -------------------------------------------------------------- power loss


@pytest.mark.parametrize("with_head", [True, False], ids=["head", "no-head"])
@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
def test_a_power_loss_leaves_whole_batches_in_commit_order(
    tmp_path: Path, fsync: bool, with_head: bool
) -> None:
    """Images of what a power loss would leave, taken at seeded calls while blocks commit
    (``tests/helpers/power_loss.py``): every batch whole or absent, in commit order, each
    one acknowledged before the image there with ``fsync``. Without a singleton and
    without fsync, nothing fsyncs the journal: the stores' unsynced parts may outlive
    its records."""
    root, state = tmp_path / "root", tmp_path / "state"
    rng = random.Random(f"batches {fsync} {with_head}")
    captures: list[tuple[Path, int]] = []
    acked = [0]
    next_capture = [rng.randint(1, 9)]
    one_at_a_time = threading.Lock()

    def hook(call: str, number: int) -> None:
        with one_at_a_time:
            if number < next_capture[0]:
                return
            next_capture[0] = number + rng.randint(1, 9)
            image = tmp_path / f"image{len(captures):03d}-{call}"
            fs.capture(str(image), random.Random(f"{fsync} {number}"), **choose_modes(rng))
            captures.append((image, acked[0]))

    fs = PowerLossFileSystem(str(root), str(state), hook)
    with filesystem.installed(fs):
        stores = batch_writer.load(str(root), 8, fsync, with_head)
        for n in range(1, 41):
            batch_writer.commit_block(l2_stores.batch(*stores), n)
            acked[0] = n
        for store in stores:
            store.close()
    fs.close()
    assert len(captures) > 10
    for image, acknowledged in captures:
        try:
            problems = verify(find_stores(str(image))).problems
        except l2_stores.CannotLoadStore:
            problems = []
        assert problems == [], f"{image.name}: {problems}"
        check_batches(image, acknowledged if fsync else 0, with_head)


# ------------------------------------------------------------------ readers


def test_read_only_snapshots_never_show_part_of_a_batch(tmp_path: Path) -> None:
    writer = batch_writer.load(str(tmp_path), 8, False)
    batch_writer.commit_block(l2_stores.batch(*writer), 1)
    readers = [
        cls.load(tmp_path / name, Mode.READ_ONLY)
        for cls, name in (
            (batch_writer.Levels, "levels"),
            (batch_writer.Blocks, "blocks"),
            (batch_writer.Messages, "messages"),
            (batch_writer.Head, "head"),
        )
    ]
    failures: list[BaseException] = []
    done = threading.Event()

    def commit() -> None:
        try:
            for n in range(2, 121):
                batch_writer.commit_block(l2_stores.batch(*writer), n)
        except BaseException as error:  # reported by the test
            failures.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=commit)
    thread.start()
    seen = set()
    while not done.is_set() or not seen:
        with l2_stores.snapshot(*readers) as (levels, blocks, messages, head):
            top = head.read().level
            seen.add(top)
            assert len(levels) == top == len(blocks) and levels.find(top + 1) is None
            assert blocks.header(batch_writer.level_hash(top)) == top
            assert sorted(messages.keys()) == list(range(max(1, top - 2), top + 1))
    thread.join()
    assert not failures, failures
    assert len(seen) > 1
    for store in (*readers, *writer):
        store.close()


def test_a_read_only_snapshot_hides_a_batch_its_writer_left_half_applied(
    tmp_path: Path,
) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    with l2_stores.batch(levels, messages) as (levels_b, messages_b):
        levels_b.add(1, value(1))
        messages_b.add(1, b"message1")
    batch = l2_stores.batch(levels, messages)
    batch.views[0].add(2, value(2))
    batch.views[1].add(2, b"message2")

    def die() -> None:
        raise KeyboardInterrupt  # the writer stops here: levels ended its part, messages not

    batch.hooks.add("part_ended", die)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    levels_r = Levels.load(tmp_path / "levels", Mode.READ_ONLY)
    messages_r = Messages.load(tmp_path / "messages", Mode.READ_ONLY)
    assert levels_r.find(2) == value(2)  # a store alone shows its whole part
    with l2_stores.snapshot(levels_r, messages_r) as (levels_s, messages_s):
        assert list(levels_s.keys()) == [1] and list(messages_s.keys()) == [1]
    levels._engine.close(durable=False)  # as the dead writer leaves them
    messages._engine.close(durable=False)
    levels._batch.abandon()
    messages._batch.abandon()
    levels = Levels.load(tmp_path / "levels")  # a writer completes the batch
    messages = Messages.load(tmp_path / "messages")
    with l2_stores.snapshot(levels_r, messages_r) as (levels_s, messages_s):
        assert list(levels_s.keys()) == [1, 2] and list(messages_s.keys()) == [1, 2]
    for store in (levels_r, messages_r, levels, messages):
        store.close()


def test_a_snapshot_of_bytes_keys_reads_on_the_fast_path_and_closes(tmp_path: Path) -> None:
    Hashes = make_indexable("hashes", construct.Bytes(32), construct.Bytes(32))
    store = Hashes.load(tmp_path / "hashes", index_buffer_size=4)
    for n in range(10):
        store.add(value(n), value(n + 1))
    snapshot = l2_stores.snapshot(store)
    (view,) = snapshot.views
    store.add(value(0), value(99))
    assert view.find(value(0)) == value(1) and view.get(value(50)) is None
    assert view[value(3)] == value(4) and value(3) in view and len(view) == 10
    snapshot.close()
    with pytest.raises(StoreClosedError):
        view.find(value(0))
    with l2_stores.snapshot(store) as (view,):
        assert view.find(value(0)) == value(99)
        store.close()
        with pytest.raises(StoreClosedError):
            view.find(value(0))


def test_a_read_only_process_never_sees_part_of_a_batch(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A writer much faster than the reader's syncs, merging every few blocks, moves the
    # parts a reader must hide into runs before the reader is done: the reader then
    # gives up (see the design's "Batches"). Here: a merge every 600 blocks or so, a block
    # every millisecond: a node's pace, and more.
    writer = batch_writer.load(str(tmp_path), 2000, False)
    batch_writer.commit_block(l2_stores.batch(*writer), 1)
    reader = subprocess.Popen(
        [sys.executable, str(HELPERS / "batch_reader.py"), str(tmp_path), "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    n = 1
    while reader.poll() is None and n < 3000:
        n += 1
        batch_writer.commit_block(l2_stores.batch(*writer), n)
        time.sleep(0.001)
    out, err = reader.communicate(timeout=60)
    for store in writer:
        store.close()
    words = out.split()
    assert words[:1] == ["ok"], out + err
    assert int(words[2]) > 1  # it saw the head move


def test_a_batch_refuses_stores_linked_to_different_journals_at_commit(tmp_path: Path) -> None:
    a = Levels.load(tmp_path / "one" / "a")
    b = Levels.load(tmp_path / "two" / "b")
    c = Levels.load(tmp_path / "three" / "c")
    with l2_stores.batch(a) as (view,):
        view.add(1, value(1))  # a: the journal of one/
    with l2_stores.batch(c) as (view,):
        view.add(1, value(1))  # c: the journal of three/
    first = l2_stores.batch(a, b)  # b has no journal yet
    first.views[0].add(2, value(2))
    first.views[1].add(2, value(2))
    with l2_stores.batch(b, c) as (b_view, c_view):  # links b to c's journal
        b_view.add(3, value(3))
        c_view.add(3, value(3))
    with pytest.raises(ValueError, match="different batch journals"):
        first.commit()
    assert 2 not in a and 2 not in b
    for store in (a, b, c):
        store.close()


def test_a_store_that_missed_its_part_refuses_batches_until_loaded_again(
    tmp_path: Path,
) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    batch = first_block(levels, messages)
    log = levels._engine._log
    saved = [log._fd]

    def break_the_log() -> None:  # the end record's write fails (EBADF), as an EIO would
        saved.append(os.open(os.devnull, os.O_RDONLY))
        log._fd = saved[-1]

    batch.hooks.add("journal_written", break_the_log)
    with pytest.raises(l2_stores.CannotWriteToStore, match="load it again"):
        batch.commit()
    log._fd = saved[0]
    os.close(saved[1])
    assert messages.find(1) == b"message1"  # the other store took its part
    assert levels.find(1) is None
    with (
        pytest.raises(l2_stores.CannotWriteToStore, match="load it again"),
        l2_stores.batch(levels, messages) as views,
    ):
        views[0].add(2, value(2))
        views[1].add(2, b"message2")
    assert 2 not in messages
    levels.close()
    levels = Levels.load(tmp_path / "levels")  # takes the part from the journal
    assert levels.find(1) == value(1)
    with l2_stores.batch(levels, messages) as (levels_b, messages_b):
        levels_b.add(3, value(3))
        messages_b.add(3, b"message3")
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    assert list(levels.keys()) == [1, 3] and levels._part_count() == 2
    levels.close()


def test_two_processes_batch_their_own_stores_in_one_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    a, b = Levels.load(tmp_path / "a"), Levels.load(tmp_path / "b")
    with l2_stores.batch(a, b) as (a_view, b_view):
        a_view.add(1, value(1))
        b_view.add(1, value(1))
    child = f"""
import construct, l2_stores
Levels = l2_stores.make_indexable("levels", construct.Int16ub, construct.Bytes(4))
c, d = Levels.load({str(tmp_path / "c")!r}), Levels.load({str(tmp_path / "d")!r})
with l2_stores.batch(c, d) as (c_view, d_view):
    c_view.add(1, b"cccc")
    d_view.add(1, b"dddd")
print(c._batch.group.journal.directory)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / f"{JOURNAL_DIRECTORY}.2"), out.stderr
    a.close()
    b.close()


@pytest.mark.parametrize("point", ["part_written", "journal_written", "part_ended"])
def test_readers_run_while_a_commit_writes_its_files_and_writers_wait(
    tmp_path: Path, point: Point
) -> None:
    blocks = Blocks.load(tmp_path / "blocks")
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    head = Head.load(tmp_path / "head")
    levels.add(1, value(1))
    seen: dict[str, object] = {}
    writer_done = threading.Event()

    def writer() -> None:
        levels.add(3, value(3))
        writer_done.set()

    def beside_the_commit() -> None:  # another thread, while the commit is at its point
        def reads() -> None:
            seen["find"] = (levels.find(1), levels.find(2), messages.find(2))
            seen["keys"] = (list(levels.keys()), len(messages), 2 in levels)
            seen["others"] = (blocks.read(b"block002"), len(blocks), head.read())

        reader = threading.Thread(target=reads)
        reader.start()
        reader.join(10)
        seen["reader_finished"] = not reader.is_alive()
        seen["writer"] = threading.Thread(target=writer)
        seen["writer"].start()  # type: ignore[attr-defined]
        time.sleep(0.05)
        seen["writer_waited"] = not writer_done.is_set()

    batch = l2_stores.batch(blocks, levels, messages, head)  # (blocks' values first)
    batch.views[0].append(b"block002", b"content", 2)
    batch.views[1].add(2, value(2))
    batch.views[2].add(2, b"message2")
    batch.views[3].write(2)
    fired: list[bool] = []

    def once() -> None:  # (the point may be reached once per store)
        if not fired:
            fired.append(True)
            beside_the_commit()

    batch.hooks.add(point, once)
    batch.commit()
    seen["writer"].join(10)  # type: ignore[attr-defined]
    assert seen["reader_finished"], f"a reader waited for the commit at {point}"
    assert seen["find"] == (value(1), None, None)  # nothing of the batch before it binds
    assert seen["keys"] == ([1], 0, False) and seen["others"] == (None, 0, None)
    assert seen["writer_waited"], "a plain write ran inside the commit"
    assert writer_done.is_set()
    assert list(levels.items()) == [(1, value(1)), (2, value(2)), (3, value(3))]
    assert messages.find(2) == b"message2" and blocks.read(b"block002") == (b"content", 2)
    assert head.read() == 2
    for store in (blocks, levels, messages, head):
        store.close()
    levels = Levels.load(tmp_path / "levels")
    assert list(levels.keys()) == [1, 2, 3]
    levels.close()


def test_a_commit_interrupted_after_its_point_leaves_the_part_to_the_next_load(
    tmp_path: Path,
) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    blocks = Blocks.load(tmp_path / "blocks")
    head = Head.load(tmp_path / "head")
    messages.add(9, b"message9")
    batch = Batch([levels, messages, blocks, head])
    levels_b, messages_b, blocks_b, head_b = batch.views
    levels_b.add(1, value(1))
    messages_b.add(1, b"message1")
    messages_b.remove(9)
    blocks_b.append(b"block001", b"content", 1)
    head_b.write(1)
    commit_interrupted_after_its_point(batch)  # a Ctrl-C while the readers drain, say
    assert levels.find(1) is None and head.read() is None  # committed, not taken in memory
    with (
        pytest.raises(l2_stores.CannotWriteToStore, match="load it again"),
        l2_stores.batch(levels, messages) as views,
    ):
        views[0].add(2, value(2))  # no second part with the same ordinal
    # Nor a plain write: the part, taken at the next load, would come after it.
    for write in (
        lambda: levels.add(1, value(7)),
        lambda: levels.add(3, value(3), flush=False),
        lambda: messages.remove(1),
        lambda: blocks.append(b"block001", b"later", 7),
        lambda: head.write(7),
        lambda: head.delete(),
    ):
        with pytest.raises(l2_stores.CannotWriteToStore, match=r"missed its part.*load it again"):
            write()
    assert levels.find(1) is None and messages.find(9) == b"message9"
    for store in (levels, messages, blocks, head):
        store.close()
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    blocks = Blocks.load(tmp_path / "blocks")
    head = Head.load(tmp_path / "head")
    assert list(levels.items()) == [(1, value(1))] and head.read() == 1
    assert list(messages.keys()) == [1] and blocks.read(b"block001") == (b"content", 1)
    levels.add(1, value(7))  # the last write wins from now on
    head.write(7)
    with l2_stores.batch(levels, messages) as (levels_b, messages_b):
        levels_b.add(4, value(4))
        messages_b.add(4, b"message4")
    assert levels.find(4) == value(4) and levels._part_count() == 2
    for store in (levels, messages, blocks, head):
        store.close()
    levels = Levels.load(tmp_path / "levels")
    head = Head.load(tmp_path / "head")
    assert levels.find(1) == value(7) and head.read() == 7
    levels.close()
    head.close()


def test_a_store_that_missed_its_part_refuses_a_gc_until_its_next_load(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    levels.add(5, value(5))
    commit_interrupted_after_its_point(first_block(levels, messages))
    with pytest.raises(l2_stores.GcFailed) as failed:
        levels.gc(l2_stores.Retain([5]), background=False)  # the part would undo it
    assert "load it again" in str(failed.value.__cause__)
    assert list(levels.keys()) == [5]
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    assert list(levels.keys()) == [1, 5]
    levels.gc(l2_stores.Retain([5]), background=False)
    assert list(levels.keys()) == [5]
    levels.close()


def test_a_store_that_missed_its_part_refuses_an_asyncio_remove_of_an_absent_key(
    tmp_path: Path,
) -> None:
    import asyncio

    from l2_stores import aio

    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    commit_interrupted_after_its_point(first_block(levels, messages))

    async def remove() -> None:
        await aio.wrap(messages).remove(1)  # absent here; bound by the part at the load

    with pytest.raises(l2_stores.CannotWriteToStore, match="load it again"):
        asyncio.run(remove())
    levels.close()
    messages.close()


class _InterruptedAfterWrite(Messages):  # type: ignore[misc, valid-type]
    """Messages whose batch part is interrupted just after its write (a Ctrl-C)."""

    def _prepare_part(self, data: bytes) -> Any:
        prepared = super()._prepare_part(data)

        class Interrupted:
            make_room, end, take, cancel = (
                prepared.make_room,
                prepared.end,
                prepared.take,
                prepared.cancel,
            )

            def write(self) -> None:
                prepared.write()
                raise KeyboardInterrupt

        return Interrupted()


def test_a_commit_interrupted_just_after_a_parts_write_takes_it_back(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = _InterruptedAfterWrite.load(tmp_path / "messages")
    with pytest.raises(KeyboardInterrupt):
        first_block(levels, messages).commit()
    levels.add(2, value(2))
    messages.add(2, b"message2")  # after the place the part took
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    assert list(levels.keys()) == [2] and list(messages.keys()) == [2]
    levels.close()
    messages.close()


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_commit_interrupted_at_a_parts_pwrite_leaves_the_log_whole(
    tmp_path: Path, after: bool
) -> None:
    """A Ctrl-C just before or just after the ``pwrite`` of the first part (which carries
    the records of earlier ``flush=False`` writes): the batch is not applied, those
    writes and later ones load again."""
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    first_block(levels, messages).commit()  # linked: the next commit's first pwrite is its part
    levels.add(5, value(5), flush=False)
    levels.add(6, value(6), flush=False)
    batch = l2_stores.batch(levels, messages)
    batch.views[0].add(2, value(2))
    batch.views[1].add(2, b"message2")
    with (
        interrupt_at(os.pwrite, "open_part", after=after) as fired,
        pytest.raises(KeyboardInterrupt),
    ):
        batch.commit()
    assert fired and levels.find(2) is None
    levels.add(7, value(7))
    messages.add(7, b"message7")
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    assert list(levels.keys()) == [1, 5, 6, 7] and list(messages.keys()) == [1, 7]
    levels.close()
    messages.close()


def test_a_commit_inside_a_participants_section_runs_alone_there(tmp_path: Path) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    seen: list[bool] = []

    def probe() -> None:  # is levels still closed to readers of other threads?
        seen.append(levels._waiter.try_enter_task(owner=-1))
        if seen[-1]:
            levels._waiter.exit_task()

    batch = first_block(levels, messages)
    batch.hooks.add("journal_written", probe)
    with levels._waiter.force_idle():  # this thread holds levels' section already
        batch.commit()
    assert seen == [False]
    assert levels.find(1) == value(1) and messages.find(1) == b"message1"
    levels.close()
    messages.close()


def test_a_part_that_fails_to_write_gives_the_batch_up_and_takes_back_the_others(
    tmp_path: Path,
) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    batch = first_block(levels, messages)
    written: list[int] = []

    def second_fails() -> None:  # levels' part is written; messages' write "fails"
        written.append(len(written))
        if len(written) == 2:
            raise OSError(28, "No space left on device")

    batch.hooks.add("part_written", second_fails)
    with pytest.raises(OSError, match="No space"):
        batch.commit()
    assert levels.find(1) is None and messages.find(1) is None
    with l2_stores.batch(levels, messages) as (levels_b, messages_b):  # still usable
        levels_b.add(2, value(2))
        messages_b.add(2, b"message2")
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    assert list(levels.keys()) == [2] and list(messages.keys()) == [2]
    levels.close()
    messages.close()


class _PutInterrupted:
    """An indexed file's cache whose puts are interrupted (a Ctrl-C in a commit's take)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def put(self, key: bytes, entry: Any) -> None:
        raise KeyboardInterrupt


def test_a_commit_interrupted_in_an_indexed_files_take_leaves_no_stale_cached_value(
    tmp_path: Path,
) -> None:
    blocks = Blocks.load(tmp_path / "blocks")
    blocks.append(b"blockkey", b"old", 1)
    assert blocks.read(b"blockkey") == (b"old", 1)  # cached
    batch = l2_stores.batch(blocks)
    batch.views[0].append(b"blockkey", b"new", 2)
    blocks._cache = _PutInterrupted(blocks._cache)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    blocks._cache = blocks._cache._cache
    assert blocks.read(b"blockkey") == (b"new", 2) and blocks.header(b"blockkey") == 2
    blocks.close()
    blocks = Blocks.load(tmp_path / "blocks")
    assert blocks.read(b"blockkey") == (b"new", 2)
    blocks.close()


class _CancelInterrupted(Messages):  # type: ignore[misc, valid-type]
    """Messages whose batch part, when taken back, is interrupted (a second Ctrl-C)."""

    def _prepare_part(self, data: bytes) -> Any:
        prepared = super()._prepare_part(data)

        class Interrupted:
            make_room, write, end = prepared.make_room, prepared.write, prepared.end
            take, finish = prepared.take, prepared.finish

            def cancel(self) -> None:
                prepared.cancel()
                raise KeyboardInterrupt

        return Interrupted()


def test_a_second_interrupt_during_the_take_back_still_leaves_the_part_to_the_next_load(
    tmp_path: Path,
) -> None:
    levels = Levels.load(tmp_path / "levels")
    messages = _CancelInterrupted.load(tmp_path / "messages")
    batch = first_block(levels, messages)
    fired: list[bool] = []

    def interrupt() -> None:  # after levels' end, before messages'
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    batch.hooks.add("part_ended", interrupt)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    assert levels._batch.missed and messages._batch.missed
    with (
        pytest.raises(l2_stores.CannotWriteToStore, match="load it again"),
        l2_stores.batch(messages) as (messages_b,),
    ):
        messages_b.add(2, b"message2")  # would take the committed batch's ordinal
    levels.close()
    messages.close()
    levels = Levels.load(tmp_path / "levels")
    messages = Messages.load(tmp_path / "messages")
    assert list(levels.keys()) == [1] and list(messages.keys()) == [1]
    levels.close()
    messages.close()
