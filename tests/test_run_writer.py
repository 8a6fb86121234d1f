"""The C run builder and the C merge of runs (``_runs.RunBuilder``) against the Python writer.

``RunWriter(..., accelerated=False)`` writes a run in Python; by default,
with the C builder, the same class hands the byte work to C. Both must write
the same file, byte for byte, for any rows; a C merge of runs must write the
same file as the Python ``write_run`` of ``merged_rows`` of them; a damaged
input row, a cancellation, a failed fsync leave no file behind.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2_stores.engine import accel, filesystem
from l2_stores.engine.framing import Expected
from l2_stores.engine.levels import Span
from l2_stores.engine.run import REMOVED, Removed, Run, RunWriter, check_run
from l2_stores.engine.runstack import Cancelled, merge_runs, merged_rows, write_run
from l2_stores.errors import CannotReadFromStore

if accel.AcceleratedRunBuilder is None:
    pytest.skip(
        "the C run builder is not in use (not built, or L2_STORES_PURE_PYTHON=1)",
        allow_module_level=True,
    )

Row = tuple[bytes, bytes | Removed]


def write_rows(
    path: Path,
    expected: Expected,
    rows: list[Row],
    capacity: int,
    *,
    accelerated: bool,
    batched: bool = True,
) -> bytes:
    """Write ``rows`` (in key order) with the C builder or in Python; the file's bytes."""
    writer = RunWriter(str(path), expected, 2, 9, capacity, tag=5, accelerated=accelerated)
    assert writer.accelerated == accelerated
    if batched:
        for start in range(0, len(rows), 97):
            writer.add_rows(rows[start : start + 97])
    else:
        for key, value in rows:
            writer.add(key, value)
    writer.finish(fsync=False)
    assert writer.count == len(rows)
    return path.read_bytes()


def assert_same_run(tmp_path: Path, expected: Expected, rows: list[Row], capacity: int) -> None:
    python = write_rows(tmp_path / "python", expected, rows, capacity, accelerated=False)
    c = write_rows(tmp_path / "c", expected, rows, capacity, accelerated=True)
    assert c == python
    c_one_by_one = write_rows(
        tmp_path / "c1", expected, rows, capacity, accelerated=True, batched=False
    )
    assert c_one_by_one == python
    assert [finding for finding in check_run(str(tmp_path / "c")) if finding.problem] == []
    for name in ("python", "c", "c1"):
        (tmp_path / name).unlink()


def model_rows(rng: random.Random, count: int, key_size: int, value_size: int) -> list[Row]:
    keys: set[bytes] = set()
    while len(keys) < min(count, 256**key_size):
        keys.add(rng.randbytes(key_size))
    return [
        (key, REMOVED if rng.random() < 0.2 else rng.randbytes(value_size)) for key in sorted(keys)
    ]


@settings(max_examples=120, deadline=None)
@given(
    key_size=st.integers(1, 40),
    value_size=st.integers(0, 40),
    count=st.integers(0, 400),
    extra=st.integers(0, 300),
    seed=st.integers(0, 2**32),
)
def test_c_builder_writes_the_python_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    key_size: int,
    value_size: int,
    count: int,
    extra: int,
    seed: int,
) -> None:
    tmp_path = tmp_path_factory.mktemp("runs")
    rows = model_rows(random.Random(seed), count, key_size, value_size)
    assert_same_run(tmp_path, Expected("t", key_size, value_size), rows, len(rows) + extra)


@pytest.mark.parametrize(
    ("key_size", "value_size", "count"),
    [(4, 8, 20_000), (8, 0, 5000), (2, 3, 21_000)],
)
def test_dense_big_endian_counters(
    tmp_path: Path, key_size: int, value_size: int, count: int
) -> None:
    rng = random.Random(count)
    rows: list[Row] = [
        (
            (i * 3).to_bytes(key_size, "big"),
            REMOVED if i % 11 == 0 else rng.randbytes(value_size),
        )
        for i in range(count)
    ]
    assert_same_run(tmp_path, Expected("t", key_size, value_size), rows, count + 17)


def test_every_one_byte_key_and_rows_past_a_write_chunk(tmp_path: Path) -> None:
    rows: list[Row] = [(bytes([i]), bytes([i]) * 3) for i in range(256)]
    assert_same_run(tmp_path, Expected("t", 1, 3), rows, 256)
    rng = random.Random(1)
    big = model_rows(rng, 20_000, 32, 32)  # 1.36 MB of rows: more than one chunk
    assert_same_run(tmp_path, Expected("t", 32, 32), big, len(big))


@pytest.mark.parametrize("shared", [0, 7, 254, 255, 256, 299])
def test_long_shared_prefixes(tmp_path: Path, shared: int) -> None:
    rng = random.Random(shared)
    prefix = rng.randbytes(shared)
    rows = [(prefix + key, value) for key, value in model_rows(rng, 300, 300 - shared, 5)]
    assert_same_run(tmp_path, Expected("t", 300, 5), rows, 400)
    assert_same_run(tmp_path, Expected("t", 300, 5), rows[:1], 1)


def test_empty_runs(tmp_path: Path) -> None:
    for capacity in (0, 1, 1000):
        assert_same_run(tmp_path, Expected("t", 32, 36), [], capacity)


def write_bindings_of(
    path: Path,
    expected: Expected,
    bindings: dict[bytes, bytes | None],
    *,
    accelerated: bool,
    drop_removals: bool,
) -> bytes:
    writer = RunWriter(str(path), expected, 2, 9, len(bindings), tag=5, accelerated=accelerated)
    writer.add_bindings(bindings, drop_removals=drop_removals)
    writer.finish(fsync=False)
    return path.read_bytes()


@settings(max_examples=60, deadline=None)
@given(
    key_size=st.integers(1, 40),
    value_size=st.integers(0, 12),
    count=st.integers(0, 3000),
    drop_removals=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_a_logs_bindings_are_written_sorted_as_their_rows_would_be(
    tmp_path_factory: pytest.TempPathFactory,
    key_size: int,
    value_size: int,
    count: int,
    drop_removals: bool,
    seed: int,
) -> None:
    """A flush hands the frozen log's dict (None: a removal), in insertion order: the C
    sort and the Python one write the run of its sorted rows, removals left out or kept."""
    tmp_path = tmp_path_factory.mktemp("bindings")
    rng = random.Random(seed)
    expected = Expected("t", key_size, value_size)
    rows = model_rows(rng, count, key_size, value_size)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    bindings = {key: None if value is REMOVED else value for key, value in shuffled}
    kept = [row for row in rows if not (drop_removals and row[1] is REMOVED)]
    reference = tmp_path / "rows"
    writer = RunWriter(str(reference), expected, 2, 9, len(bindings), tag=5, accelerated=False)
    writer.add_rows(kept)
    writer.finish(fsync=False)
    for accelerated in (False, True):
        written = write_bindings_of(
            tmp_path / f"b{accelerated}",
            expected,
            bindings,
            accelerated=accelerated,
            drop_removals=drop_removals,
        )
        assert written == reference.read_bytes()


def test_bindings_of_other_sizes_are_refused_and_leave_rows_unwritten(tmp_path: Path) -> None:
    expected = Expected("t", 4, 3)
    for bad in ({b"abcd": b"vv"}, {b"abc": b"vvv"}, {b"abcd": 5}):
        writer = RunWriter(str(tmp_path / "run"), expected, 0, 0, 2)
        with pytest.raises(ValueError, match="add_bindings"):
            writer.add_bindings(bad, drop_removals=False)  # type: ignore[arg-type]
        assert writer.count == 0
        writer.abort()
    writer = RunWriter(str(tmp_path / "run"), expected, 0, 0, 2)
    writer.add(b"aaaa", b"vvv")
    with pytest.raises(ValueError, match="add_bindings"):
        writer.add_bindings({b"bbbb": b"vvv"}, drop_removals=False)
    writer.abort()


def outcome(call: object) -> tuple[type[BaseException], str] | None:
    try:
        call()  # type: ignore[operator]
    except (ValueError, TypeError) as error:
        return type(error), str(error)
    return None


@pytest.mark.parametrize(
    "bad",
    [
        [(b"b" * 4, b"v" * 3), (b"a" * 4, b"v" * 3)],  # out of order
        [(b"a" * 4, b"v" * 3), (b"a" * 4, b"v" * 3)],  # twice
        [(b"a" * 5, b"v" * 3)],  # key size
        [(b"a" * 4, b"v" * 2)],  # value size
        [(b"a" * 4, b"v" * 3), (b"b" * 4, b"v" * 3), (b"c" * 4, REMOVED)],  # full
    ],
)
def test_refusals_agree(tmp_path: Path, bad: list[Row]) -> None:
    expected = Expected("t", 4, 3)
    seen = []
    for accelerated in (False, True):
        path = tmp_path / f"run{accelerated}"
        writer = RunWriter(str(path), expected, 0, 0, 2, accelerated=accelerated)
        seen.append(outcome(lambda writer=writer: [writer.add(k, v) for k, v in bad]))
        writer.abort()
        assert not path.exists()
    assert seen[0] is not None and seen[0] == seen[1]


def test_a_failed_finish_leaves_no_file(tmp_path: Path) -> None:
    class FailingFsync(filesystem.FileSystem):
        def fsync(self, fd: int) -> None:
            raise OSError(5, "fsync failed")

    for accelerated in (False, True):
        path = tmp_path / f"run{accelerated}"
        writer = RunWriter(str(path), Expected("t", 4, 3), 0, 0, 2, accelerated=accelerated)
        writer.add(b"aaaa", b"vvv")
        with filesystem.installed(FailingFsync()), pytest.raises(OSError, match="fsync failed"):
            writer.finish()
        assert not path.exists()
        writer.abort()  # the caller's abort: nothing more to do


# ------------------------------------------------------------------ merges


def write_inputs(
    tmp_path: Path, expected: Expected, rng: random.Random, counts: list[int], universe: int
) -> list[Run]:
    """Runs of keys drawn from a common universe (overlapping), oldest first."""
    runs = []
    for index, count in enumerate(counts):
        keys = sorted(
            {rng.randrange(universe).to_bytes(expected.key_size, "big") for _ in range(count)}
        )
        rows: list[Row] = [
            (key, REMOVED if rng.random() < 0.25 else rng.randbytes(expected.value_size))
            for key in keys
        ]
        path = tmp_path / f"input{index}"
        writer = RunWriter(str(path), expected, index, index, len(rows))
        writer.add_rows(rows)
        writer.finish(fsync=False)
        runs.append(Run(str(path), expected))
    return runs


def python_merge(path: Path, expected: Expected, runs: list[Run], drop_removals: bool) -> bytes:
    """The Python writer's run of ``merged_rows`` of ``runs`` (newest first)."""
    writer = RunWriter(
        str(path),
        expected,
        0,
        len(runs) - 1,
        sum(run.count for run in runs),
        tag=3,
        accelerated=False,
    )
    for key, value in merged_rows([run.rows() for run in runs]):
        if not (drop_removals and value is REMOVED):
            writer.add(key, value)
    writer.finish(fsync=False)
    return path.read_bytes()


@pytest.mark.parametrize("drop_removals", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_c_merge_writes_the_python_merge(tmp_path: Path, seed: int, drop_removals: bool) -> None:
    rng = random.Random(seed)
    key_size = rng.choice([1, 2, 4, 8, 32])
    expected = Expected("t", key_size, rng.choice([0, 1, 32]))
    width = rng.randint(1, 9)
    counts = [rng.choice([0, 1, 50, 3000]) for _ in range(width)]
    runs = write_inputs(tmp_path, expected, rng, counts, min(256**key_size, 6000))
    newest_first = runs[::-1]
    try:
        python = python_merge(tmp_path / "python", expected, newest_first, drop_removals)
        span = Span(0, width - 1)
        count = merge_runs(
            str(tmp_path / "c"), expected, span, newest_first, tag=3, drop_removals=drop_removals
        )
        assert (tmp_path / "c").read_bytes() == python
        assert count == Run(str(tmp_path / "c"), expected).count
        # the Python path of merge_runs (runs without C readers) writes the same
        slow = [Run(run.path, expected, accelerated=False) for run in newest_first]
        merge_runs(str(tmp_path / "slow"), expected, span, slow, tag=3, drop_removals=drop_removals)
        assert (tmp_path / "slow").read_bytes() == python
        for run in slow:
            run.close()
    finally:
        for run in runs:
            run.close()


def test_a_damaged_input_row_fails_the_merge_and_leaves_no_file(tmp_path: Path) -> None:
    expected = Expected("t", 8, 8)
    runs = write_inputs(tmp_path, expected, random.Random(3), [2000, 2000, 2000], 10_000)
    for run in runs:
        run.close()
    victim = runs[1]
    g = victim.geometry
    offset = g.rows + 1234 * g.row_size + 3
    with open(victim.path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x10]))
    for accelerated in (True, False):
        opened = [Run(run.path, expected, accelerated=accelerated) for run in runs]
        target = tmp_path / f"merged{accelerated}"
        try:
            with pytest.raises(CannotReadFromStore) as raised:
                merge_runs(str(target), expected, Span(0, 2), opened[::-1])
        finally:
            for run in opened:
                run.close()
        assert raised.value.path == victim.path
        assert raised.value.offset == g.rows + 1234 * g.row_size
        assert not target.exists()


def test_a_cancelled_merge_leaves_no_file(tmp_path: Path) -> None:
    expected = Expected("t", 8, 8)
    runs = write_inputs(tmp_path, expected, random.Random(4), [500, 500], 2000)
    try:
        target = tmp_path / "merged"
        with pytest.raises(Cancelled):
            merge_runs(str(target), expected, Span(0, 1), runs, cancel=bytearray(b"\1"))
        assert not target.exists()
    finally:
        for run in runs:
            run.close()


def test_a_merge_is_cancelled_promptly_while_it_runs_without_the_gil(tmp_path: Path) -> None:
    expected = Expected("t", 8, 8)
    count = 150_000
    runs = []
    for index in range(8):
        path = tmp_path / f"input{index}"
        writer = RunWriter(str(path), expected, index, index, count)
        rows: list[Row] = [((i * 8 + index).to_bytes(8, "big"), b"v" * 8) for i in range(count)]
        writer.add_rows(rows)
        writer.finish(fsync=False)
        runs.append(Run(str(path), expected))
    target = tmp_path / "merged"
    cancel = bytearray(1)
    outcome: list[BaseException | int] = []

    def merge() -> None:
        try:
            outcome.append(merge_runs(str(target), expected, Span(0, 7), runs, cancel=cancel))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=merge)
    try:
        thread.start()
        # this thread runs while the merge writes its rows: the GIL is free
        deadline = time.monotonic() + 30
        while not (target.exists() and target.stat().st_size > expected.key_size * 4096):
            assert time.monotonic() < deadline and thread.is_alive()
        cancel[0] = 1
        asked = time.monotonic()
        thread.join(10)
        assert time.monotonic() - asked < 1
        assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
        assert not target.exists()
    finally:
        cancel[0] = 1
        thread.join()
        for run in runs:
            run.close()
        assert not os.path.exists(target)


def test_write_run_and_merge_runs_agree_on_the_count(tmp_path: Path) -> None:
    expected = Expected("t", 4, 4)
    rows: list[Row] = [(i.to_bytes(4, "big"), REMOVED if i % 3 else b"vvvv") for i in range(999)]
    assert write_run(str(tmp_path / "a"), expected, Span(0, 0), rows, 999) == 999
    assert (
        write_run(str(tmp_path / "b"), expected, Span(0, 0), rows, 999, drop_removals=True) == 333
    )
    run = Run(str(tmp_path / "a"), expected)
    try:
        merged = merge_runs(str(tmp_path / "c"), expected, Span(0, 0), [run], drop_removals=True)
        assert merged == 333
    finally:
        run.close()
    assert (tmp_path / "c").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize("through_a_map", [True, False])
def test_index_sections_written_through_a_map_are_the_same_bytes(
    tmp_path: Path, through_a_map: bool
) -> None:
    """Large index sections are written through a shared map of the file (not kept in
    private memory), rows added and merged alike: the same file as the Python writer's."""
    rng = random.Random(8)
    expected = Expected("t", 16, 8)
    rows = model_rows(rng, 5000, 16, 8)
    threshold = 0 if through_a_map else 1 << 40
    paths = []
    for name, accelerated in (("python", False), ("c", True)):
        path = tmp_path / name
        writer = RunWriter(
            str(path),
            expected,
            2,
            9,
            len(rows) + 100,
            tag=5,
            accelerated=accelerated,
            map_index_from=threshold,
        )
        assert writer.mapped == (accelerated and through_a_map)
        writer.add_rows(rows)
        writer.finish(fsync=False)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    # a merge into a mapped writer: the bytes of write_run of the merged rows
    halves = [dict(rows[::2]), dict(rows[1::2])]
    inputs = []
    for number, half in enumerate(halves):
        path = tmp_path / f"half{number}"
        writer = RunWriter(str(path), expected, number, number, len(half), accelerated=False)
        writer.add_rows(sorted(half.items()))
        writer.finish(fsync=False)
        inputs.append(Run(str(path), expected))
    try:
        merged = RunWriter(
            str(tmp_path / "merged"),
            expected,
            2,
            9,
            len(rows) + 100,
            tag=5,
            map_index_from=threshold,
        )
        assert merged.mapped == through_a_map
        readers = tuple(run.reader for run in inputs)
        assert None not in readers
        assert merged.merge(readers, drop_removals=False)  # type: ignore[arg-type]
        merged.finish(fsync=False)
    finally:
        for run in inputs:
            run.close()
    assert (tmp_path / "merged").read_bytes() == paths[0].read_bytes()


def test_a_mapped_writer_aborted_leaves_no_file(tmp_path: Path) -> None:
    expected = Expected("t", 16, 8)
    path = tmp_path / "run"
    writer = RunWriter(str(path), expected, 0, 0, 100_000, map_index_from=0)
    assert writer.mapped
    writer.add_rows(model_rows(random.Random(1), 1000, 16, 8))
    writer.abort()
    assert not path.exists()


FULL_DISK_CHILD = """
import sys
from l2_stores.engine.framing import Expected
from l2_stores.engine.run import RunWriter
path, accelerated, map_from = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
try:
    writer = RunWriter(path, Expected("full", 16, 16), 0, 0, 200_000,
                       accelerated=accelerated, map_index_from=map_from)
    writer.add_rows([(i.to_bytes(16, "big"), bytes(16)) for i in range(200_000)])
    writer.finish(fsync=False)
except OSError as error:
    print("OSError", error.errno)
else:
    print("written")
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only): a disk that fills up."""
    import shutil
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize(
    ("accelerated", "map_from"),
    [(False, 0), (True, 0), (True, 1 << 40)],
    ids=["python", "c-map", "c"],
)
def test_a_full_disk_is_an_oserror_never_a_sigbus(
    small_disk: Path, accelerated: bool, map_from: int
) -> None:
    """A run bigger than the disk: its writer raises ENOSPC (a writer that stored into a
    map of unallocated blocks would die of SIGBUS instead)."""
    import errno
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            FULL_DISK_CHILD,
            str(small_disk / "run"),
            str(int(accelerated)),
            str(map_from),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["OSError", str(errno.ENOSPC)]
