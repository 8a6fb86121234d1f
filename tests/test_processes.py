"""Stores shared between processes: the writer lock, and READ_ONLY readers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    Mode,
    StoreLockedError,
    make_indexable,
    make_indexable_removable,
    make_singleton,
)

HELPERS = Path(__file__).parent / "helpers"
HOLDER = HELPERS / "holder.py"
READER = HELPERS / "reader.py"
GUARD = 60.0

KEY = construct.Bytes(32)
Plain = make_indexable("proc_plain", KEY, KEY)
Removable = make_indexable_removable("proc_removable", KEY, KEY)
Single = make_singleton("proc_single", KEY)


def spawn(script: Path, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=GUARD)
        pytest.fail(f"child exited ({proc.returncode}) without answering:\n{err[-3000:]}")
    return line.strip()


def send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str]) -> None:
    """Make sure the child is gone (deadlock guard for failing tests)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=GUARD)


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def expect_locked(load: Any, name: str, path: Path) -> None:
    with pytest.raises(StoreLockedError) as caught:
        load()
    message = str(caught.value)
    assert name in message, message
    assert str(path) in message, message


# --------------------------------------------------------------------------
# the writer lock across processes


@pytest.mark.parametrize("ending", ["close", "sigkill"])
@pytest.mark.parametrize("kind", ["indexable", "singleton"])
def test_writer_lock_across_processes(tmp_path: Path, kind: str, ending: str) -> None:
    path = tmp_path / ("store" if kind == "indexable" else "single")
    cls: Any = Plain if kind == "indexable" else Single
    value = b"w" * 32
    # something in the store beforehand, so the READ_ONLY load has data to see
    with cls.load(path, Mode.READ_WRITE) as store:
        if kind == "indexable":
            store.add(b"k" * 32, value)
        else:
            store.write(value)

    holder = spawn(HOLDER, kind, path)
    try:
        assert read_line(holder) == "ready"
        for _ in range(2):  # a failed attempt does not disturb the holder's lock
            expect_locked(lambda: cls.load(path, Mode.READ_WRITE), cls.name, path)
        # a reader beside the other process's writer works
        with cls.load(path, Mode.READ_ONLY) as reader:
            if kind == "indexable":
                assert reader.find(b"k" * 32) == value
            else:
                assert reader.read() == value
        if ending == "close":
            send(holder, "close")
            assert read_line(holder) == "closed"
            holder.wait(timeout=GUARD)
            assert holder.returncode == 0
        else:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=GUARD)
            assert holder.returncode == -signal.SIGKILL
    finally:
        finish(holder)

    # the OS released the lock with the process: the parent can write now
    with cls.load(path, Mode.READ_WRITE) as store:
        if kind == "indexable":
            assert store.find(b"k" * 32) == value
            store.add(b"k" * 32, b"x" * 32)
        else:
            assert store.read() == value
            store.write(b"x" * 32)


@pytest.mark.parametrize("kind", ["indexable", "singleton"])
def test_lock_of_this_process_blocks_other_processes(tmp_path: Path, kind: str) -> None:
    """After a failed second load in this process, the first still holds the lock."""
    path = tmp_path / ("store" if kind == "indexable" else "single")
    cls: Any = Plain if kind == "indexable" else Single
    with cls.load(path, Mode.READ_WRITE):
        expect_locked(lambda: cls.load(path, Mode.READ_WRITE), cls.name, path)
        holder = spawn(HOLDER, kind, path)
        try:
            _, err = holder.communicate(timeout=GUARD)
        finally:
            finish(holder)
        assert holder.returncode != 0
        assert "StoreLockedError" in err, err[-2000:]
    holder = spawn(HOLDER, kind, path)
    try:
        assert read_line(holder) == "ready"
        send(holder, "close")
        assert read_line(holder) == "closed"
    finally:
        finish(holder)


# --------------------------------------------------------------------------
# the writer lock within one process


@pytest.mark.parametrize("kind", ["indexable", "removable", "singleton"])
def test_writer_lock_in_one_process(tmp_path: Path, kind: str) -> None:
    cls: Any = {"indexable": Plain, "removable": Removable, "singleton": Single}[kind]
    path = tmp_path / "sub" / ("store" if kind != "singleton" else "single")
    writer = cls.load(path, Mode.READ_WRITE)
    try:
        expect_locked(lambda: cls.load(path, Mode.READ_WRITE), cls.name, path)
        # the same path through another class of the same codecs, and via a relative path
        other: Any = {
            "singleton": lambda: make_singleton("other_single", KEY),
            "indexable": lambda: make_indexable("other_plain", KEY, KEY),
            "removable": lambda: make_indexable_removable("other_removable", KEY, KEY),
        }[kind]()
        expect_locked(lambda: other.load(path, Mode.READ_WRITE), other.name, path)
        relative = os.path.relpath(path)
        with pytest.raises(StoreLockedError):
            cls.load(relative, Mode.READ_WRITE)
        # READ_ONLY beside the writer sees what was written
        if kind == "singleton":
            writer.write(b"a" * 32)
        else:
            writer.add(b"a" * 32, b"b" * 32)
        with cls.load(path, Mode.READ_ONLY) as reader:
            if kind == "singleton":
                assert reader.read() == b"a" * 32
            else:
                assert reader.find(b"a" * 32) == b"b" * 32
                assert dict(reader.items()) == {b"a" * 32: b"b" * 32}
        # the writer is unaffected by the failed loads and the reader
        if kind == "singleton":
            writer.write(b"c" * 32)
            assert writer.read() == b"c" * 32
        else:
            writer.add(b"c" * 32, b"d" * 32)
            assert writer.find(b"c" * 32) == b"d" * 32
    finally:
        writer.close()
    # closed: the lock is free again, also after a second close
    writer.close()
    with cls.load(path, Mode.READ_WRITE) as again:
        if kind == "singleton":
            assert again.read() == b"c" * 32
        else:
            assert again.find(b"c" * 32) == b"d" * 32


@pytest.mark.parametrize("kind", ["indexable", "singleton"])
def test_lock_released_when_load_fails(tmp_path: Path, kind: str) -> None:
    """A READ_WRITE load that fails on bad files does not keep the lock."""
    path = tmp_path / ("store" if kind == "indexable" else "single")
    cls: Any = Plain if kind == "indexable" else Single
    with cls.load(path, Mode.READ_WRITE) as store:
        if kind == "indexable":
            store.add(b"k" * 32, b"v" * 32)
        else:
            store.write(b"v" * 32)
    wrong: Any = (
        make_indexable("wrong_sizes", KEY, construct.Bytes(8))
        if kind == "indexable"
        else make_singleton("wrong_sizes", construct.Bytes(8))
    )
    for _ in range(2):
        with pytest.raises(Exception) as caught:
            wrong.load(path, Mode.READ_WRITE)
        assert not isinstance(caught.value, StoreLockedError)
    with cls.load(path, Mode.READ_WRITE):
        pass


# --------------------------------------------------------------------------
# READ_ONLY readers in another process


def hexed(state: dict[bytes, bytes]) -> list[list[str]]:
    return sorted([k.hex(), v.hex()] for k, v in state.items())


def reader_sees(proc: subprocess.Popen[str]) -> Any:
    answer = json.loads(read_line(proc))
    assert "error" not in answer, answer
    return answer


@pytest.mark.parametrize("kind", ["plain", "removable"])
def test_read_only_reader_in_another_process(tmp_path: Path, kind: str) -> None:
    cls: Any = Removable if kind == "removable" else Plain
    directory = tmp_path / "store"
    rng = random.Random(f"reader-{kind}")
    state: dict[bytes, bytes] = {}
    writer = cls.load(directory, Mode.READ_WRITE, index_buffer_size=5)

    def write_some(count: int) -> None:
        for _ in range(count):
            roll = rng.random()
            if kind == "removable" and state and roll < 0.25:
                key = rng.choice(sorted(state))
                writer.remove(key, flush=rng.random() < 0.5)
                del state[key]
            elif state and roll < 0.45:
                key = rng.choice(sorted(state))
                state[key] = rng.randbytes(32)
                writer.add(key, state[key], flush=rng.random() < 0.5)
            else:
                key = rng.randbytes(32)
                state[key] = rng.randbytes(32)
                writer.add(key, state[key], flush=rng.random() < 0.5)
        writer.flush()

    try:
        write_some(23)  # several merges: data file and logs
        writer.close()  # no merge running while the files are compared
        files = snapshot(directory)
        reader = spawn(READER, kind, directory)
        try:
            assert reader_sees(reader) == {"items": hexed(state)}
            assert snapshot(directory) == files, "the READ_ONLY load changed files"
            writer = cls.load(directory, Mode.READ_WRITE, index_buffer_size=5)
            for round_number in range(5):
                write_some(rng.choice([3, 17, 40]))
                # the writer still open: sync() shows exactly what was flushed...
                send(reader, "sync")
                assert reader_sees(reader) == {"items": hexed(state)}, round_number
                # ...and with the writer closed, the reader changes no file
                writer.close()
                files = snapshot(directory)
                send(reader, "sync")
                assert reader_sees(reader) == {"items": hexed(state)}
                send(reader, "show")
                assert reader_sees(reader) == {"items": hexed(state)}
                assert snapshot(directory) == files, "the READ_ONLY reader changed files"
                writer = cls.load(directory, Mode.READ_WRITE, index_buffer_size=5)
            # a view taken before further writes stays as it was until sync()
            before = hexed(state)
            write_some(30)
            send(reader, "show")
            shown = reader_sees(reader)["items"]
            send(reader, "sync")
            assert reader_sees(reader) == {"items": hexed(state)}
            assert shown == before or shown == hexed(state), "a READ_ONLY view mixed states"
            send(reader, "quit")
            reader.wait(timeout=GUARD)
            assert reader.returncode == 0, reader.communicate()[1][-2000:]
        finally:
            finish(reader)
    finally:
        writer.close()


def test_read_only_singleton_reader_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "single"
    writer = Single.load(path, Mode.READ_WRITE)
    try:
        reader = spawn(READER, "singleton", path)
        try:
            assert reader_sees(reader) == {"value": None}
            for number in range(4):
                value = bytes([number]) * 32
                writer.write(value)
                send(reader, "sync")
                assert reader_sees(reader) == {"value": value.hex()}
            writer.delete()
            send(reader, "sync")
            assert reader_sees(reader) == {"value": None}
            writer.write(b"z" * 32)
            files = snapshot(tmp_path)
            send(reader, "sync")
            assert reader_sees(reader) == {"value": (b"z" * 32).hex()}
            assert snapshot(tmp_path) == files
            send(reader, "quit")
            reader.wait(timeout=GUARD)
            assert reader.returncode == 0
        finally:
            finish(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["plain", "removable", "singleton"])
def test_read_only_load_of_missing_path_creates_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "missing" / "deeper" / "store"
    # in another process
    reader = spawn(READER, kind, path)
    try:
        expected = {"value": None} if kind == "singleton" else {"items": []}
        assert reader_sees(reader) == expected
        send(reader, "sync")
        assert reader_sees(reader) == expected
        send(reader, "quit")
        reader.wait(timeout=GUARD)
        assert reader.returncode == 0
    finally:
        finish(reader)
    assert listing(tmp_path) == []
    # and in this one
    cls: Any = {"plain": Plain, "removable": Removable, "singleton": Single}[kind]
    with cls.load(path, Mode.READ_ONLY) as store:
        if kind == "singleton":
            assert store.read() is None
        else:
            assert list(store.items()) == []
            assert store.find(b"k" * 32) is None
        store.sync()
    assert listing(tmp_path) == []


def test_read_only_reader_started_before_the_writer_exists(tmp_path: Path) -> None:
    """A reader loaded on an empty path picks up the store once a writer made it."""
    directory = tmp_path / "store"
    reader = spawn(READER, "plain", directory)
    try:
        assert reader_sees(reader) == {"items": []}
        state = {bytes([i]) * 32: bytes([i + 1]) * 32 for i in range(12)}
        with Plain.load(directory, Mode.READ_WRITE, index_buffer_size=5) as writer:
            for key, value in state.items():
                writer.add(key, value)
            send(reader, "sync")
            assert reader_sees(reader) == {"items": hexed(state)}
        send(reader, "quit")
        reader.wait(timeout=GUARD)
    finally:
        finish(reader)


@pytest.mark.parametrize("kind", ["plain", "removable"])
def test_read_only_sync_racing_with_writes_and_merges(tmp_path: Path, kind: str) -> None:
    """sync() while the writer adds, removes and merges: always a state the writer had."""
    cls: Any = Removable if kind == "removable" else Plain
    directory = tmp_path / "store"
    rng = random.Random(f"race-{kind}")
    state: dict[bytes, bytes] = {}
    with cls.load(directory, Mode.READ_WRITE, index_buffer_size=5) as writer:

        def one_op() -> None:
            roll = rng.random()
            if kind == "removable" and state and roll < 0.25:
                key = rng.choice(sorted(state))
                writer.remove(key)
                del state[key]
            else:
                key = rng.choice(sorted(state)) if state and roll < 0.45 else rng.randbytes(32)
                state[key] = rng.randbytes(32)
                writer.add(key, state[key])

        for _ in range(12):
            one_op()
        reader = spawn(READER, kind, directory)
        try:
            assert reader_sees(reader) == {"items": hexed(state)}
            for _ in range(80):
                # the reader syncs at some moment while these ops run
                window = [hexed(state)]
                send(reader, "sync")
                for _ in range(rng.choice([1, 6, 15])):
                    one_op()
                    window.append(hexed(state))
                seen = reader_sees(reader)["items"]
                assert seen in window, "sync() gave a state the writer never had"
            send(reader, "sync")
            assert reader_sees(reader) == {"items": hexed(state)}
            send(reader, "quit")
            reader.wait(timeout=GUARD)
            assert reader.returncode == 0
        finally:
            finish(reader)
