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

import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.power_loss import (
    PowerLossFileSystem,
    UnknownFile,
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

from l2_stores import CannotLoadStore, Mode
from l2_stores.engine import filesystem
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


def choose_modes(rng: random.Random) -> dict[str, str]:
    return {
        "pages": rng.choice(("none", "all", "prefix", "pages", "torn", "mixed", "mixed")),
        "names": rng.choice(("none", "all", "prefix", "subset", "subset")),
    }


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
    options = {} if kind == "singleton" else {"index_buffer_size": BUFFER, "fsync": fsync}
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
    options = {} if kind == "singleton" else {"index_buffer_size": BUFFER, "fsync": fsync}
    with filesystem.installed(fs):
        store = load(kind, store_path(str(root), kind), **options)
        run(store, ops, progress)
        store.close()
    fs.close()
    return captures, ops


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
@pytest.mark.parametrize("kind", KINDS)
def test_power_loss_at_many_moments_leaves_a_prefix_of_the_writes(
    tmp_path: Path, kind: str, fsync: bool
) -> None:
    if kind == "singleton" and not fsync:
        pytest.skip("singletons have no fsync setting")
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
    if kind == "singleton" and not fsync:
        pytest.skip("singletons have no fsync setting")
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
    if kind == "singleton" and not fsync:
        pytest.skip("singletons have no fsync setting")
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
        ops = operations(kind, seed, count)
        modes = choose_modes(rng)
        image = tmp_path / f"round{number + 1}"
        power_loss_image(str(root), str(state), str(image), random.Random(seed), **modes)
        capture = Capture(
            image, len(base) + progress.durable, len(base) + progress.begun,
            progress.gcs_done, modes,
        )
        check_image(capture, kind, base + ops, fsync)
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
        modes = choose_modes(rng)
        image = tmp_path / f"image{number}"
        power_loss_image(str(root), str(state), str(image), random.Random(second), **modes)
        capture = Capture(
            image, len(base) + progress.durable, len(base) + progress.begun,
            progress.gcs_done, modes,
        )
        check_image(capture, kind, base + operations(kind, second, 120), True)


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
