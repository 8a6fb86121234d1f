"""Power loss: the stores over a file layer that drops, tears and reorders what was not fsynced.

The layer (``tests/helpers/power_loss.py``) records what each fsync and
directory sync made durable; an *image* is what a power loss would leave:
the durable bytes and entries, plus some of the rest (none, all, a prefix,
any subset, torn pages). Images are taken while a workload runs
(``tests/helpers/power_workload.py``): in this process at chosen calls of
the layer, and after a child process was killed with SIGKILL at a chosen
call. Each image must load, READ_ONLY (changing nothing) and READ_WRITE
(the same content), and hold the state after a prefix of the workload: at
least every write acknowledged as durable, at most every write begun, every
GC either committed whole or not at all (and committed if known finished).
Its values must all read back; ``l2-stores verify`` must find no problem,
before the load and after it.

The first tests check the layer itself: each of them fails on a layer that
keeps what it should drop, or drops what it should keep.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.power_loss import (
    PowerLossFileSystem,
    UnknownFile,
    choose_modes,
    copy_tree,
    power_loss_image,
    surviving_bytes,
)
from helpers.power_workload import (
    INDEXED,
    KEYS,
    KINDS,
    Op,
    Progress,
    describe_mismatch,
    load,
    matching_prefix,
    operations,
    parse_report,
    run,
    sha256,
    store_content,
    store_path,
    whole_lines,
)

from l2_stores import CannotLoadStore, Mode, Retain, StoreError
from l2_stores.engine import filesystem
from l2_stores.engine.filesystem import OsFileSystem
from l2_stores.engine.framing import Expected, Finding
from l2_stores.engine.index import Index
from l2_stores.tools.on_disk import find_stores
from l2_stores.tools.verify import verify

HELPERS = Path(__file__).parent / "helpers"
BUFFER = 8  # merges every few writes


# -- the layer itself


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def layer(tmp_path: Path) -> tuple[PowerLossFileSystem, Path]:
    root = tmp_path / "root"
    root.mkdir()
    return PowerLossFileSystem(str(root), str(tmp_path / "state")), root


def image_of(fs: PowerLossFileSystem, tmp_path: Path, name: str, **modes: str) -> Path:
    image = tmp_path / name
    fs.capture(str(image), random.Random(name), **modes)
    return image


def create(fs: PowerLossFileSystem, path: Path, data: bytes, *, sync: bool) -> int:
    fd = fs.open(str(path), os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, data, 0)
    if sync:
        fs.fsync(fd)
    return fd


def test_unsynced_bytes_and_entries_are_lost_and_synced_ones_kept(tmp_path: Path) -> None:
    fs, root = layer(tmp_path)
    os.close(create(fs, root / "synced", b"a" * 5000, sync=True))
    os.close(create(fs, root / "unsynced", b"b" * 100, sync=False))
    fs.fsync_directory(str(root))
    fd = os.open(root / "synced", os.O_RDWR)
    os.pwrite(fd, b"c" * 100, 5000)  # appended, not synced
    os.close(fd)
    os.close(create(fs, root / "unnamed", b"d", sync=True))  # no directory sync
    lost = image_of(fs, tmp_path, "lost", pages="none", names="none")
    assert read(lost / "synced") == b"a" * 5000
    assert read(lost / "unsynced") == b""
    assert read(lost / "unnamed") is None
    kept = image_of(fs, tmp_path, "kept", pages="all", names="all")
    assert read(kept / "synced") == b"a" * 5000 + b"c" * 100
    assert read(kept / "unsynced") == b"b" * 100
    assert read(kept / "unnamed") == b"d"


def test_an_unsynced_rename_or_unlink_may_be_undone(tmp_path: Path) -> None:
    fs, root = layer(tmp_path)
    os.close(create(fs, root / "old", b"old", sync=True))
    fs.fsync_directory(str(root))
    os.close(create(fs, root / "new.tmp", b"new", sync=True))
    fs.rename(str(root / "new.tmp"), str(root / "old"))
    os.close(create(fs, root / "doomed", b"doomed", sync=True))
    fs.fsync_directory(str(root))
    fs.unlink(str(root / "doomed"))
    before = image_of(fs, tmp_path, "before", pages="all", names="none")
    assert read(before / "old") == b"new"  # the rename was synced
    assert read(before / "doomed") == b"doomed"  # the unlink was not
    after = image_of(fs, tmp_path, "after", pages="all", names="all")
    assert read(after / "doomed") is None
    seen = set()
    for number in range(40):
        image = image_of(fs, tmp_path, f"subset{number}", pages="all", names="subset")
        seen.add(read(image / "doomed"))
    assert seen == {None, b"doomed"}


def test_writes_through_a_shared_map_are_seen_and_dropped_like_others(tmp_path: Path) -> None:
    fs, root = layer(tmp_path)
    fd = create(fs, root / "mapped", bytes(3 * 4096), sync=True)
    fs.fsync_directory(str(root))
    view = mmap.mmap(fd, 3 * 4096)
    view[4096:4100] = b"MAPD"
    view[8192:8196] = b"MORE"
    kept = image_of(fs, tmp_path, "kept", pages="all", names="none")
    assert read(kept / "mapped")[4096:4100] == b"MAPD"  # type: ignore[index]
    lost = image_of(fs, tmp_path, "lost", pages="none", names="none")
    assert read(lost / "mapped") == bytes(3 * 4096)
    fs.fsync(fd)
    synced = image_of(fs, tmp_path, "synced", pages="none", names="none")
    assert read(synced / "mapped")[8192:8196] == b"MORE"  # type: ignore[index]
    view.close()
    os.close(fd)


def test_pages_are_kept_out_of_order_and_torn() -> None:
    synced = b"s" * 4096
    current = b"s" * 4096 + b"n" * (4 * 4096)
    outcomes = {
        surviving_bytes(synced, current, random.Random(seed), "torn") for seed in range(200)
    }
    pages = {bytes(out[4096 * p : 4096 * (p + 1)]) for out in outcomes for p in range(1, 5)}
    assert b"n" * 4096 in pages and bytes(4096) in pages
    assert any(0 < page.count(b"n") < 4096 for page in pages), "no torn page"
    gaps = [out for out in outcomes if len(out) == len(current) and out[-1:] == b"n"]
    assert any(bytes(4096) in out[4096:-4096] for out in gaps), "never out of order"
    assert all(out[:4096] == synced for out in outcomes), "synced bytes changed"


def test_an_fsync_of_a_file_created_outside_the_seam_is_refused(tmp_path: Path) -> None:
    fs, root = layer(tmp_path)
    fd = os.open(root / "sneaky", os.O_RDWR | os.O_CREAT)
    with pytest.raises(UnknownFile):
        fs.fsync(fd)
    os.close(fd)


def test_a_killed_recorder_leaves_a_state_the_image_reads(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(HELPERS)!r})
from power_loss import PowerLossFileSystem
fs = PowerLossFileSystem({str(root)!r}, {str(state)!r})
fd = fs.open({str(root / "f")!r}, os.O_RDWR | os.O_CREAT)
os.pwrite(fd, b"durable", 0)
fs.fsync(fd)
fs.fsync_directory({str(root)!r})
os.pwrite(fd, b"-volatile", 7)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", child], timeout=60)
    assert done.returncode == -signal.SIGKILL
    image = tmp_path / "image"
    power_loss_image(str(root), str(state), str(image), random.Random(0), pages="none")
    assert read(image / "f") == b"durable"


# -- the stores


@dataclass
class Capture:
    """An image and what the workload had done when it was taken."""

    path: Path
    low: int
    high: int
    gcs_done: int
    modes: dict[str, str]


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(file.relative_to(path)): file.read_bytes()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def verify_problems(path: Path) -> list[Finding]:
    """What ``l2-stores verify`` calls problems in the stores under ``path`` (none: no store)."""
    try:
        stores = find_stores(str(path))
    except CannotLoadStore:
        return []  # no store there (its directory's creation was lost)
    return verify(stores).problems


def check_image(capture: Capture, kind: str, ops: list[Op], fsync: bool) -> None:
    """The image loads, at a point of the workload allowed by what was acknowledged."""
    where = f"{capture.path.name} {capture.modes}"
    problems = verify_problems(capture.path)
    assert problems == [], f"{where}: verify before any load: {problems}"
    untouched = capture.path.parent / (capture.path.name + "-ro")
    copy_tree(str(capture.path), str(untouched))
    before = tree(untouched)
    options = (
        {"fsync": fsync} if kind == "singleton" else {"index_buffer_size": BUFFER, "fsync": fsync}
    )
    reader_options = {} if kind == "singleton" else {"index_buffer_size": BUFFER}
    with load(kind, store_path(str(untouched), kind), Mode.READ_ONLY, **reader_options) as store:
        seen = store_content(store, kind)
    assert tree(untouched) == before, f"{where}: a READ_ONLY load changed files"
    with load(kind, store_path(str(capture.path), kind), **options) as store:
        content = store_content(store, kind)
    assert content == seen, f"{where}: READ_WRITE and READ_ONLY loads differ"
    found = matching_prefix(
        content, ops, low=capture.low, high=capture.high, gcs_done=capture.gcs_done
    )
    assert found is not None, (
        f"{where}: no prefix of {capture.low}..{capture.high} ops "
        f"(GCs done {capture.gcs_done}) gives the content; "
        + describe_mismatch(content, ops, capture.high)
    )
    problems = verify_problems(capture.path)
    assert problems == [], f"{where}: verify after the load: {problems}"
    with load(kind, store_path(str(capture.path), kind), **options) as store:
        assert store_content(store, kind) == content, f"{where}: a second load differs"


def in_process_captures(
    tmp_path: Path, kind: str, fsync: bool, seed: int, count: int, every: int
) -> tuple[list[Capture], list[Op]]:
    """Run the workload over the layer; take an image every ``every`` calls (seeded jitter)."""
    ops = operations(kind, seed, count)
    root, state = tmp_path / "root", tmp_path / "state"
    rng = random.Random(seed)
    progress = Progress(kind, fsync)
    captures: list[Capture] = []
    next_capture = [rng.randint(1, every)]
    one_at_a_time = threading.Lock()  # the hook runs in the writer's and the merges' threads

    def hook(call: str, number: int) -> None:
        with one_at_a_time:
            if number < next_capture[0]:
                return
            next_capture[0] = number + rng.randint(1, every)
            low, gcs_done = progress.durable, progress.gcs_done
            modes = choose_modes(rng)
            path = tmp_path / f"image{len(captures):03d}-{call}"
            fs.capture(str(path), random.Random(f"{seed} {number}"), **modes)
            captures.append(Capture(path, low, progress.begun, gcs_done, modes))

    fs = PowerLossFileSystem(str(root), str(state), hook)
    options = (
        {"fsync": fsync} if kind == "singleton" else {"index_buffer_size": BUFFER, "fsync": fsync}
    )
    with filesystem.installed(fs):
        path = store_path(str(root), kind)
        def reopen() -> Any:
            return load(kind, path, **options)

        store = run(reopen(), ops, progress, reopen=reopen)
        store.close()
    fs.close()
    return captures, ops


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
@pytest.mark.parametrize("kind", KINDS)
def test_power_loss_at_many_moments_leaves_a_prefix_of_the_writes(
    tmp_path: Path, kind: str, fsync: bool
) -> None:
    captures, ops = in_process_captures(tmp_path, kind, fsync, seed=7, count=240, every=9)
    assert len(captures) > 10
    for capture in captures:
        check_image(capture, kind, ops, fsync)


SOAK = os.environ.get("L2_STORES_SLOW", "") not in ("", "0")


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: opt-in with L2_STORES_SLOW=1")
@pytest.mark.parametrize("seed", range(100, 112))
@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
@pytest.mark.parametrize("kind", KINDS)
def test_power_loss_soak(tmp_path: Path, kind: str, fsync: bool, seed: int) -> None:
    """Many more seeds, longer workloads, an image every few calls."""
    captures, ops = in_process_captures(tmp_path, kind, fsync, seed=seed, count=700, every=6)
    for capture in captures:
        check_image(capture, kind, ops, fsync)
        shutil.rmtree(capture.path)


# -- a child killed with SIGKILL, then the power loss


WRITER = HELPERS / "power_writer.py"


def run_killed_child(
    root: Path, state: Path, kind: str, fsync: bool, seed: int, count: int, kill_at: int
) -> Progress:
    """Run the workload in a child killed at layer call ``kill_at``; what it acknowledged."""
    command = [sys.executable, str(WRITER), str(root), str(state), kind, str(seed), str(count)]
    command += [str(BUFFER), "fsync" if fsync else "no-fsync", str(kill_at)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    progress = Progress(kind, fsync)
    return parse_report(whole_lines(done.stdout), progress, operations(kind, seed, count))


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "simple"])
def test_power_loss_after_a_kill_in_rounds(tmp_path: Path, kind: str, fsync: bool) -> None:
    """Rounds on one store: a child killed at a seeded call, then a power loss image.

    Each round goes on from the image the previous one left, so later rounds
    recover stores that earlier power losses damaged.
    """
    rng = random.Random(f"rounds {kind} {fsync}")
    root = tmp_path / "round0"
    count = 160
    for number in range(6):
        state = tmp_path / f"state{number}"
        seed = rng.randrange(1 << 30)
        # The child begins from the content the last round left: model it as ops.
        base = base_ops(kind, root)
        progress = run_killed_child(
            root, state, kind, fsync, seed, count, kill_at=rng.randint(5, 400)
        )
        image = tmp_path / f"round{number + 1}"
        ops = operations(kind, seed, count)
        lose_power(root, state, image, kind, base, ops, progress, random.Random(seed))
        root = image


@pytest.mark.parametrize("kind", ["indexable", "removable", "indexed"])
def test_a_writer_with_fsync_after_one_without_loses_nothing_it_acknowledged(
    tmp_path: Path, kind: str
) -> None:
    """A child without fsync is killed (no power loss: its writes stay in the page cache);
    a child with fsync goes on from there, is killed, then the power goes: everything the
    second acknowledged, and what it found, is there."""
    rng = random.Random(f"mixed {kind}")
    for number in range(4):
        root, state = tmp_path / f"root{number}", tmp_path / f"state{number}"
        first, second = rng.randrange(1 << 30), rng.randrange(1 << 30)
        run_killed_child(root, state, kind, False, first, 120, kill_at=rng.randint(20, 200))
        base = base_ops(kind, root)
        progress = run_killed_child(
            root, state, kind, True, second, 120, kill_at=rng.randint(5, 150)
        )
        image = tmp_path / f"image{number}"
        ops = operations(kind, second, 120)
        lose_power(root, state, image, kind, base, ops, progress, random.Random(second))


def lose_power(
    root: Path,
    state: Path,
    image: Path,
    kind: str,
    base: list[Op],
    ops: list[Op],
    progress: Progress,
    rng: random.Random,
) -> None:
    """The image a power loss leaves after a killed child, checked against its ``ops``
    (after ``base``, the content it started from)."""
    modes = choose_modes(rng)
    power_loss_image(str(root), str(state), str(image), rng, **modes)
    capture = Capture(
        image, len(base) + progress.durable, len(base) + progress.begun, progress.gcs_done, modes
    )
    check_image(capture, kind, base + ops, progress.fsync)


def base_ops(kind: str, root: Path) -> list[Op]:
    """Operations that rebuild the content a round starts from (read from a copy)."""
    if not root.exists():
        return []
    copy = root.parent / (root.name + "-base")
    copy_tree(str(root), str(copy))
    with load(kind, store_path(str(copy), kind), Mode.READ_ONLY) as store:
        content = store_content(store, kind)
    if kind == "singleton":
        return [("write", content[b""])] if content else []
    return [("add", key, value, True) for key, value in sorted(content.items())]


def test_the_workload_model_refuses_what_no_prefix_gives() -> None:
    ops = operations("removable", 3, 120)
    state: dict[bytes, bytes] = {}
    for op in ops[:60]:
        if op[0] == "add":
            state[op[1]] = op[2]
        elif op[0] == "remove":
            state.pop(op[1], None)
        elif op[0] == "gc":
            break
    assert matching_prefix(state, ops, low=0, high=len(ops), gcs_done=0) is not None
    broken = dict(state)
    broken[b"x" * 32] = b"y" * 32
    assert matching_prefix(broken, ops, low=0, high=len(ops), gcs_done=0) is None
    assert matching_prefix({}, ops, low=10, high=len(ops), gcs_done=0) is None
    assert all(kind in KINDS for kind in INDEXED)


def values_record(key: bytes, value: bytes) -> bytes:
    """A values-file record as ``l2_stores/engine/values.py`` lays it out."""
    length = len(value).to_bytes(4, "little")
    body = length + key + value + length
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_verify_tells_an_unreferenced_values_tail_from_corruption(tmp_path: Path) -> None:
    """Bytes after the last record the index points at are a note, as the load drops them;
    a damaged record the index points at is a problem."""
    path = tmp_path / "store"
    values = {KEYS[i]: bytes([i]) * (100 + i) for i in range(5)}
    with load("indexed", str(path)) as store:
        for key, value in values.items():
            store.append(key, value, sha256(value))
    file = path / "values.00000000"
    written = file.read_bytes()
    orphan = values_record(KEYS[10], b"x" * 300)
    torn = bytes(40) + orphan[40:]  # its first sector never reached the disk
    file.write_bytes(written + torn + orphan)
    findings = verify(find_stores(str(path))).findings
    assert [f for f in findings if f.problem] == []
    assert any(
        "after the records the index points at" in f.what and f.offset == len(written)
        for f in findings
    ), findings
    with load("indexed", str(path)) as store:
        assert store_content(store, "indexed") == values
    assert file.read_bytes() == written, "the writer's load cuts the unreferenced tail"
    damaged = bytearray(written)
    damaged[64 + (12 + 32 + 100) + 4 + 32 + 10] ^= 0x01  # inside the second value
    file.write_bytes(bytes(damaged))
    problems = verify(find_stores(str(path))).problems
    assert problems and all(problem.file == str(file) for problem in problems), problems


def test_a_load_with_fsync_makes_what_it_recovered_durable_first(tmp_path: Path) -> None:
    """A writer without fsync was killed just after sealing its log for a merge; a writer
    with fsync then freezes nothing new but writes a SYNCED record: the power goes before
    the merge ends. The frozen log must have been made durable by that load, or the power
    loss takes its seal and, with it, the acknowledged write of the later log."""
    expected = Expected("mixed", 8, 8)
    root, state = tmp_path / "root", tmp_path / "state"
    held = threading.Event()
    merging = threading.Event()

    def hook(call: str, number: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            merging.set()
            held.wait(30)  # the merge (and its spare log) wait for the image

    fs = PowerLossFileSystem(str(root), str(state), hook)
    directory = str(root / "index")
    with filesystem.installed(fs):
        first = Index(directory, expected, readonly=False, buffer_size=1000)
        for i in range(5):
            first.put(i.to_bytes(8, "big"), b"v" * 8, flush=True)
        log_writer = first._log
        assert log_writer is not None
        log_writer.seal()  # what a freeze writes before its next log appears
        log_writer.abandon()  # killed: no close, no mark, nothing fsynced
        assert first._lock is not None
        first._lock.release()
        second = Index(directory, expected, readonly=False, buffer_size=1000, fsync=True)
        second.put(b"acked\x00\x00\x00", b"w" * 8, flush=True)
        assert merging.wait(30)
        fs.capture(str(tmp_path / "image"), random.Random(0), pages="none", names="none")
        held.set()
        second.close()
    fs.close()
    recovered = Index(str(tmp_path / "image" / "index"), expected, readonly=False)
    try:
        found = dict(recovered.items())
    finally:
        recovered.close()
    assert found.get(b"acked\x00\x00\x00") == b"w" * 8
    assert len(found) == 6


# -- windows between a rename and its directory's fsync, and readers beside a recovering writer
# (each test below failed on an earlier version of the engine)


def held_merges(hold: threading.Event, on: list[bool]) -> Callable[[str, int], None]:
    """A hook that, while ``on[0]``, stops merge threads at their directory syncs until ``hold``
    is set: a kill there, once the writer is abandoned."""

    def hook(call: str, number: int) -> None:
        if on[0] and call == "fsync_directory" and threading.current_thread() is not (
            threading.main_thread()
        ):
            hold.wait(60)

    return hook


def abandon(index: Index) -> None:
    """What a kill leaves of a writer: no close, no flush, the lock released."""
    assert index._log is not None and index._lock is not None
    index._log.abandon()
    index._lock.release()


def test_a_load_with_fsync_makes_the_names_of_the_logs_it_found_durable(tmp_path: Path) -> None:
    """A writer without fsync renames its next log into place (no directory sync) and is
    killed in the merge; a writer with fsync goes on in that log and acknowledges a write."""
    expected = Expected("names", 8, 8)
    root, state = tmp_path / "root", tmp_path / "state"
    hold, on = threading.Event(), [False]
    fs = PowerLossFileSystem(str(root), str(state), held_merges(hold, on))
    directory = str(root / "index")
    with filesystem.installed(fs):
        first = Index(directory, expected, readonly=False, buffer_size=4)
        for i in range(4):
            first.put(i.to_bytes(8, "big"), b"a" * 8, flush=True)
        first.wait_merge()
        on[0] = True
        for i in range(4, 8):  # this freeze installs the spare log 2: no directory sync
            first.put(i.to_bytes(8, "big"), b"b" * 8, flush=True)
        abandon(first)
        # The second writer's merge is held too: the power goes before its directory sync.
        second = Index(directory, expected, readonly=False, buffer_size=4, fsync=True)
        second.put(b"acked\x00\x00\x00", b"w" * 8, flush=True)
        fs.capture(str(tmp_path / "image"), random.Random(0), pages="none", names="none")
        hold.set()
        second.close()
    recovered = Index(str(tmp_path / "image" / "index"), expected, readonly=False)
    try:
        assert dict(recovered.items()).get(b"acked\x00\x00\x00") == b"w" * 8
    finally:
        recovered.close()


def test_a_load_deletes_what_a_merge_superseded_only_once_its_file_is_durably_named(
    tmp_path: Path,
) -> None:
    """A merge renames its data file and is killed before the directory sync; the next load
    (without fsync) must not let a power loss keep its deletion of the old log and lose the
    rename: the old log's fsynced bindings would be nowhere."""
    expected = Expected("superseded", 8, 8)
    root, state = tmp_path / "root", tmp_path / "state"
    hold, on = threading.Event(), [True]
    syncs = [0]

    def hook(call: str, number: int) -> None:
        if call == "fsync_directory" and threading.current_thread() is not (
            threading.main_thread()
        ):
            syncs[0] += 1
            if on[0] and syncs[0] == 2:  # the second: after the rename
                hold.wait(60)

    fs = PowerLossFileSystem(str(root), str(state), hook)
    directory = str(root / "index")
    with filesystem.installed(fs):
        first = Index(directory, expected, readonly=False, buffer_size=4, fsync=True)
        for i in range(4):
            first.put(i.to_bytes(8, "big"), b"a" * 8, flush=True)
        deadline = time.monotonic() + 30
        while "run.00000000-00000000" not in os.listdir(directory):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        abandon(first)
        on[0] = False
        second = Index(directory, expected, readonly=False, buffer_size=4)
        second.put(b"later\x00\x00\x00", b"w" * 8, flush=True)
        images = []
        for seed in range(30):
            image = tmp_path / f"image{seed}"
            fs.capture(str(image), random.Random(seed), pages="none", names="subset")
            images.append(image)
        hold.set()
        second.close()
    for image in images:
        recovered = Index(str(image / "index"), expected, readonly=True)
        try:
            found = dict(recovered.items())
        finally:
            recovered.close()
        assert all(found.get(i.to_bytes(8, "big")) == b"a" * 8 for i in range(4)), image.name


LOCK_HOLDER = """
import sys
from l2_stores.engine.lock import WriterLock
lock = WriterLock(sys.argv[1], "holder", sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_reader_beside_a_writer_still_loading_checks_the_values(tmp_path: Path) -> None:
    """A power loss kept log records whose value it lost; a reader loads while a new writer
    holds the lock but has not recovered yet; then the writer recovers and appends again."""
    path = tmp_path / "store"
    options = {"index_buffer_size": 1000}
    with load("indexed", str(path), **options) as store:
        for i in range(10):
            store.append(KEYS[i], bytes([i]) * 200, sha256(bytes([i]) * 200))
    writer = load("indexed", str(path), **options)
    for i in range(10, 20):
        writer.append(KEYS[i], bytes([i]) * 200, sha256(bytes([i]) * 200))
    abandon(writer._engine)  # killed
    values = path / "values.00000000"
    damaged = bytearray(values.read_bytes())
    size = 12 + 32 + 200
    at = 64 + 12 * size
    damaged[at : at + size] = bytes(size)  # the value of key 12 never reached the disk
    values.write_bytes(bytes(damaged))
    # Another process takes the lock, as a writer does first of all, and stops there.
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path / "index" / "lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    reader = load("indexed", str(path), Mode.READ_ONLY, **options)
    seen = store_content(reader, "indexed")
    assert set(seen) == set(KEYS[:12]), "not the state of one moment"
    holder.communicate("")
    writer = load("indexed", str(path), **options)
    again = [bytes([112]) * 200, *(bytes([i]) * 200 for i in range(30, 40))]
    for key, value in zip([KEYS[12], *KEYS[30:40]], again, strict=True):
        writer.append(key, value, sha256(value))
    writer.flush()
    reader.sync()
    assert store_content(reader, "indexed") == store_content(writer, "indexed")
    reader.close()
    writer.close()


def test_a_reader_that_sees_two_frozen_logs_reads_again(tmp_path: Path) -> None:
    """Between a reader's listing and its reads, the writer's merge switched in and its next
    log filled and froze: the reader reads again, it does not refuse the store."""
    expected = Expected("frozen", 8, 8)
    directory = str(tmp_path / "index")
    hold = threading.Event()

    class HeldMerges(OsFileSystem):
        def fsync_directory(self, path: str) -> None:
            if threading.current_thread() is not threading.main_thread():
                hold.wait(60)
            super().fsync_directory(path)

    class SlowReader(Index):
        reads = 0

        def _read_log(self, generation: int, whole: bool = False) -> Any:
            scan = super()._read_log(generation, whole)
            SlowReader.reads += 1
            if SlowReader.reads == 1:  # log 0 read: the merge ends, log 1 fills and freezes
                assert generation == 0
                hold.set()
                writer.wait_merge()
                for i in range(4, 8):
                    writer.put(i.to_bytes(8, "big"), b"b" * 8, flush=True)
            return scan

    with filesystem.installed(HeldMerges()):
        writer = Index(directory, expected, readonly=False, buffer_size=4)
        for i in range(4):  # the merge of log 0 waits: log 0 and log 1 are both there
            writer.put(i.to_bytes(8, "big"), b"a" * 8, flush=True)
        reader = SlowReader(directory, expected, readonly=True, buffer_size=4)
        try:
            assert SlowReader.reads > 2, "the reader did not read again"
            assert len(dict(reader.items())) == 8
        finally:
            reader.close()
            writer.close()


def test_a_merge_makes_the_names_of_the_values_files_it_points_into_durable(
    tmp_path: Path,
) -> None:
    """A GC made its new values file and was killed before the directory sync; the next
    writer appends there and merges: the merged index must not outlive that file's name."""
    root, state = tmp_path / "root", tmp_path / "state"
    armed = [False]

    def hook(call: str, number: int) -> None:
        if armed[0] and call == "fsync_directory":
            armed[0] = False
            raise OSError(errno.EIO, "killed here")

    fs = PowerLossFileSystem(str(root), str(state), hook)
    path = str(root / "indexed")
    options = {"index_buffer_size": 4}
    with filesystem.installed(fs):
        first = load("indexed", path, **options)
        for i in range(3):
            first.append(KEYS[i], bytes([i]) * 50, sha256(bytes([i]) * 50))
        armed[0] = True  # the GC's new target file: renamed into place, then killed
        with pytest.raises(StoreError):
            first.gc(Retain(KEYS[:3]), background=False)
        abandon(first._engine)
        second = load("indexed", path, **options)
        assert second._values.target.number == 2
        for i in range(3, 11):
            second.append(KEYS[i], bytes([i]) * 50, sha256(bytes([i]) * 50))
        second._engine.wait_merge()
        fs.capture(str(tmp_path / "image"), random.Random(0), pages="none", names="none")
        second.close()
    with load("indexed", str(tmp_path / "image" / "indexed"), **options) as recovered:
        content = store_content(recovered, "indexed")
    assert all(KEYS[i] in content for i in range(3)), "fsynced bindings lost"
