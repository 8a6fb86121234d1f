"""Stores written by the engine of one data file (tests/data/format1.tar.gz) load."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import construct
import pytest

from l2_stores import Mode, make_indexable_removable
from l2_stores.engine.datafile import DataFile
from l2_stores.engine.framing import Expected
from l2_stores.engine.log import LogWriter
from l2_stores.engine.run import Run
from l2_stores.engine.runstack import convert_legacy
from tests.helpers import format1
from tests.helpers.legacy import write_data_file

ARCHIVE = Path(__file__).parent / "data" / "format1.tar.gz"


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path


@pytest.mark.parametrize("mode", [Mode.READ_ONLY, Mode.READ_WRITE, "reopened"])
def test_every_kind_loads_with_its_bindings(stores: Path, mode: Mode | str) -> None:
    loads = 2 if mode == "reopened" else 1
    load_mode = Mode.READ_WRITE if mode == "reopened" else mode
    assert isinstance(load_mode, Mode)
    for _ in range(loads):
        with format1.Blocks.load(stores / "blocks", load_mode) as blocks:
            assert dict(blocks.items()) == format1.blocks()
        with format1.Levels.load(stores / "levels", load_mode) as levels:
            assert dict(levels.items()) == format1.levels()
            assert levels.find(7) is None and levels.find(8) == format1.digest("l", 8)
        with format1.Messages.load(stores / "messages", load_mode) as messages:
            assert {k: (v, h) for k, (v, h) in messages.items()} == format1.messages()


def test_written_to_after_loading(stores: Path) -> None:
    with format1.Blocks.load(stores / "blocks", index_buffer_size=50) as blocks:
        for i in range(300):
            blocks.add(format1.digest("new", i), format1.digest("w", i))
    expected = format1.blocks() | {
        format1.digest("new", i): format1.digest("w", i) for i in range(300)
    }
    with format1.Blocks.load(stores / "blocks", Mode.READ_ONLY) as blocks:
        assert dict(blocks.items()) == expected


SMALL = Expected("legacy", 8, 8)


def legacy_store(directory: Path, count: int, generation: int = 5) -> dict[bytes, bytes]:
    """A store of the format before runs: ``data.<generation>`` and a log of a few records."""
    directory.mkdir(parents=True)
    bindings = {i.to_bytes(8, "big"): (i * 7).to_bytes(8, "big") for i in range(count)}
    write_data_file(str(directory / f"data.{generation:08d}"), SMALL, bindings, generation)
    log = LogWriter.create(str(directory / f"log.{generation:08d}"), generation, SMALL, False)
    for i in range(0, 50, 5):
        log.append_set(i.to_bytes(8, "big"), b"logged!!", flush=True)
        bindings[i.to_bytes(8, "big")] = b"logged!!"
    log.append_remove((1).to_bytes(8, "big"), flush=True)
    del bindings[(1).to_bytes(8, "big")]
    log.close()
    return bindings


Small = make_indexable_removable("legacy", construct.Bytes(8), construct.Bytes(8))


def test_a_data_file_converts_in_pieces_when_it_is_big(tmp_path: Path) -> None:
    bindings = {i.to_bytes(8, "big"): i.to_bytes(8, "little") for i in range(1000)}
    path = tmp_path / "data.00000003"
    write_data_file(str(path), SMALL, bindings, 3, tag=9)
    data = DataFile(str(path), SMALL)
    target = tmp_path / "run.00000000-00000002"
    convert_legacy(data, str(tmp_path), str(target), SMALL, chunk=64)
    data.close()
    run = Run(str(target), SMALL)
    assert list(run.rows()) == sorted(bindings.items())
    assert (run.lo, run.hi, run.tag) == (0, 2, 9)
    run.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.00000003", target.name]


def test_a_kill_during_the_conversion_leaves_a_store_that_loads(tmp_path: Path) -> None:
    """A writer converting a big data file is killed at random moments; every load
    after it gives the store's bindings, and the last converts it for good."""
    directory = tmp_path / "legacy"
    bindings = legacy_store(directory, 300_000)
    rng = random.Random("conversion kills")
    converted = False
    for attempt in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CONVERTING_CHILD, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == "loading\n"
        time.sleep(rng.uniform(0.05, 1.5) if attempt < 3 else 0)
        child.kill()
        child.wait()
        names = sorted(os.listdir(directory))
        with Small.load(directory, Mode.READ_ONLY) as reader:
            assert dict(reader.items()) == bindings, (attempt, names)
        converted = converted or not any(name.startswith("data.") for name in names)
    with Small.load(directory) as store:
        assert dict(store.items()) == bindings
    names = sorted(os.listdir(directory))
    assert names == ["identity", "lock", "log.00000005", "run.00000000-00000004"], names
    with Small.load(directory, Mode.READ_ONLY) as reader:
        assert dict(reader.items()) == bindings
    print(f"a kill came after the conversion: {converted}")


CONVERTING_CHILD = """
import sys
import construct
from l2_stores import make_indexable_removable
Small = make_indexable_removable("legacy", construct.Bytes(8), construct.Bytes(8))
print("loading", flush=True)
with Small.load(sys.argv[1]) as store:
    pass
print("loaded", flush=True)
sys.stdin.read()
"""
