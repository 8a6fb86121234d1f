"""The demo: ingest with readers and background GC, reopen read-only, verify, resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from l2_stores import Mode, demo


def _run(directory: Path, blocks: int = 300, **options: Any) -> demo.DemoReport:
    settings: dict[str, Any] = {"gc_every": 100, "keep": 50, "readers": 2, **options}
    return demo.run(str(directory), blocks, **settings)


def _stored_levels(directory: Path, levels: range) -> list[int]:
    """The levels whose block is still in the store."""
    with demo.Blocks.load(directory / "blocks", Mode.READ_ONLY) as blocks:
        return [level for level in levels if blocks.mem(demo.block_hash(level))]


def test_a_run_verifies(tmp_path: Path) -> None:
    report = _run(tmp_path)
    assert report.verified, report.problem
    assert report.problem == ""
    assert (report.first_level, report.last_level) == (0, 299)
    assert report.gc_runs >= 1  # the first round always runs
    assert report.gc_runs + report.gc_skipped == 3
    assert report.chain is not None and report.chain[1] == 299 and report.chain[0] <= 250
    assert report.lookups > 0
    # The first round (head 99, keeping 50..99) ran: nothing below 50 can be left.
    assert _stored_levels(tmp_path, range(50)) == []
    lines = report.lines()
    assert lines[0].split() == ["directory", str(tmp_path)]
    assert lines[-1].startswith("verification") and "passed" in lines[-1]
    for row in ("blocks added", "blocks/s", "lookups/s", "GC runs", "GC time", "peak RSS"):
        assert any(line.startswith(row) for line in lines), row


def test_a_second_run_resumes_from_the_head(tmp_path: Path) -> None:
    first = _run(tmp_path)
    second = _run(tmp_path)
    assert first.verified and second.verified, (first.problem, second.problem)
    assert (second.first_level, second.last_level) == (300, 599)
    assert second.chain is not None and second.chain[1] == 599 and second.chain[0] <= 550
    # The second run's first round (head 399, keeping 350..399) always runs.
    assert _stored_levels(tmp_path, range(350)) == []
    assert _stored_levels(tmp_path, range(550, 600)) == list(range(550, 600))
    with demo.LevelsToHashes.load(tmp_path / "levels_to_hashes", Mode.READ_ONLY) as levels:
        assert all(levels.find(level) is None for level in range(350))
        assert all(levels.find(level) == demo.block_hash(level) for level in range(550, 600))


def test_verification_covers_a_chain_longer_than_keep_without_gc(tmp_path: Path) -> None:
    _run(tmp_path, 120, gc_every=1000, readers=0)
    report = _run(tmp_path, 30, gc_every=1000, readers=1)
    assert report.verified, report.problem
    assert report.gc_runs == 0 and report.bytes_before_gc is None
    assert report.chain == (0, 149)
    assert any("no GC ran" in line for line in report.lines())


def test_disk_after_gc_is_smaller_than_before(tmp_path: Path) -> None:
    # One GC, at the last block, so what it drops does not depend on timing.
    report = _run(tmp_path, 300, gc_every=300, keep=50)
    assert report.verified, report.problem
    assert report.gc_runs == 1 and report.gc_skipped == 0
    assert report.bytes_before_gc is not None
    assert report.bytes_after_gc < report.bytes_before_gc
    assert report.chain == (250, 299)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("blocks", 0), ("gc_every", 0), ("keep", 0), ("readers", -1), ("blocks", 1.5)],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, argument: str, value: Any) -> None:
    directory = tmp_path / "data"
    arguments: dict[str, Any] = {"blocks": 10, argument: value}
    with pytest.raises(ValueError, match=argument):
        demo.run(str(directory), **arguments)
    assert not directory.exists()


def _wrong_head(directory: Path) -> None:
    with demo.HeadStore.load(directory / "head") as head:
        head.write({"level": 299, "hash": b"\x01" * 32})


def _wrong_payload(directory: Path) -> None:
    with demo.Blocks.load(directory / "blocks") as blocks:
        block = {"level": 290, "predecessor": demo.block_hash(289), "payload": b"forged"}
        blocks.append(demo.block_hash(290), block)


def _stale_message(directory: Path) -> None:
    with demo.PendingMessages.load(directory / "pending_messages") as pending:
        pending.add(demo.message_hash(5), 5)


def _wrong_level_binding(directory: Path) -> None:
    with demo.LevelsToHashes.load(directory / "levels_to_hashes") as levels:
        levels.add(295, demo.block_hash(7))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_wrong_head, "block at level 300 does not follow block 299"),
        (_wrong_payload, "block at level 290 has a wrong payload"),
        (_stale_message, "pending_messages holds 11 messages"),
        (_wrong_level_binding, "levels_to_hashes maps level 295"),
    ],
)
def test_a_corrupted_store_fails_verification(tmp_path: Path, corrupt: Any, reason: str) -> None:
    assert _run(tmp_path, 300, gc_every=1000).verified
    corrupt(tmp_path)
    # No GC, which could drop the damage, and no readers, which could see it first.
    report = _run(tmp_path, 20, gc_every=1000, readers=0)
    assert not report.verified
    assert reason in report.problem
    assert report.chain is None
    assert report.lines()[-1].startswith("verification") and "FAILED" in report.lines()[-1]
    assert reason in report.lines()[-1]


def test_a_missing_head_fails_verification(tmp_path: Path) -> None:
    assert _run(tmp_path, 50, readers=0).verified
    os.remove(tmp_path / "head")
    # its batch journal still holds the head's last parts: a reader would find it there
    assert demo.verify(str(tmp_path), 49, 50)[0] is None
    os.remove(tmp_path / "head.batch")
    report = demo.verify(str(tmp_path), 49, 50)
    assert report == ("there is no head", None)
