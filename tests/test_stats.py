"""store.stats() and the Prometheus collector: the figures move as the operations happen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import construct
import pytest

from l2_stores import (
    Mode,
    Retain,
    StoreClosedError,
    StoreStats,
    aio,
    make_indexable_removable,
    make_indexed_file,
    make_singleton,
)
from l2_stores.engine.log import record_size

KEY, VALUE = construct.Int32ub, construct.Bytes(16)
Levels = make_indexable_removable("levels", KEY, VALUE)
Blocks = make_indexed_file("blocks", KEY, construct.GreedyBytes, construct.Bytes(4))
Head = make_singleton("head", construct.Bytes(8))
RECORD = 1 + 4 + 16 + 4  # op, key, value, CRC: a log record of Levels


def test_a_record_is_what_the_test_counts() -> None:
    from l2_stores.engine.framing import Expected

    assert record_size(Expected("levels", 4, 16)) == RECORD


def test_indexable_figures_follow_writes_merges_and_gcs(tmp_path: Path) -> None:
    with Levels.load(tmp_path / "levels", index_buffer_size=50) as store:
        empty = store.stats()
        assert isinstance(empty, StoreStats)
        assert (empty.bindings, empty.runs, empty.merges, empty.bytes_written) == (0, 0, 0, 0)
        assert empty.kind == "indexable_removable" and empty.name == "levels"
        assert set(empty.disk_bytes) == {"runs", "logs", "other"}
        for level in range(400):
            store.add(level, bytes(16))
        store.remove(3)
        store.flush()
        written = store.stats()
        assert written.bindings == 399
        assert written.bytes_written >= 401 * RECORD
        assert written.merges >= 1 and written.runs >= 1 and written.merge_seconds > 0
        assert written.pending_records < 401
        assert written.disk_bytes["runs"] > 0 and written.disk_bytes["other"] > 0
        assert written.gc_runs == 0
        store.gc(Retain(range(10)), background=False)
        collected = store.stats()
        assert (collected.gc_runs, collected.bindings) == (1, 9)
        assert collected.gc_seconds > 0
        assert collected.bytes_written > written.bytes_written  # the GC's run
    with Levels.load(tmp_path / "levels", Mode.READ_ONLY) as reader:
        figures = reader.stats()
        assert (figures.bindings, figures.bytes_written, figures.merges) == (9, 0, 0)
    with pytest.raises(StoreClosedError):
        reader.stats()


def test_indexed_file_figures_count_values_and_the_cache(tmp_path: Path) -> None:
    with Blocks.load(tmp_path / "blocks", cache_size=4) as store:
        for key in range(20):
            store.append(key, b"v" * 1000, b"hhhh")
        figures = store.stats()
        assert figures.disk_bytes["values"] >= 20_000
        assert figures.bytes_written >= 20_000
        before = (figures.cache_hits, figures.cache_misses)
        store.read(19)  # appended last: cached
        store.read(0)  # pushed out of a cache of 4
        after = store.stats()
        assert (after.cache_hits - before[0], after.cache_misses - before[1]) == (1, 1)


def test_singleton_figures(tmp_path: Path) -> None:
    with Head.load(tmp_path / "head") as head:
        assert head.stats().bindings == 0
        head.write(b"12345678")
        first = head.stats()
        assert first.bindings == 1 and first.bytes_written > 8
        assert first.disk_bytes["value"] > 8 and first.disk_bytes["other"] > 0
        head.write(b"87654321")
        assert head.stats().bytes_written == 2 * first.bytes_written
        head.delete()
        assert head.stats().bindings == 0


def test_asyncio_stats(tmp_path: Path) -> None:
    async def main() -> StoreStats:
        async with aio.open(Levels, tmp_path / "levels") as store:
            await store.add(1, bytes(16))
            return await store.stats()

    assert asyncio.run(main()).bindings == 1


def test_the_prometheus_collector_scrapes_every_open_store(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from l2_stores import metrics

    registry = prometheus_client.CollectorRegistry()
    metrics.register(registry)
    levels = Levels.load(tmp_path / "levels", index_buffer_size=50)
    head = Head.load(tmp_path / "head")
    try:
        for level in range(200):
            levels.add(level, bytes(16))
        head.write(b"12345678")
        text = prometheus_client.generate_latest(registry).decode()
        samples = {
            (sample.name, sample.labels.get("path"), sample.labels.get("file")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        levels_path, head_path = str(tmp_path / "levels"), str(tmp_path / "head")
        assert samples[("l2_stores_bindings", levels_path, None)] == 200
        assert samples[("l2_stores_bindings", head_path, None)] == 1
        assert samples[("l2_stores_written_bytes_total", levels_path, None)] >= 200 * RECORD
        assert samples[("l2_stores_merges_total", levels_path, None)] >= 1
        assert samples[("l2_stores_disk_bytes", head_path, "value")] > 8
    finally:
        levels.close()
        head.close()
    after = prometheus_client.generate_latest(registry).decode()
    assert str(tmp_path / "levels") not in after  # closed stores are not scraped
