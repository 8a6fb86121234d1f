"""The figures of every store open in this process, for Prometheus (extra ``[metrics]``).

::

    from prometheus_client import start_http_server
    from l2_stores import metrics

    metrics.register()          # in prometheus_client's default registry
    start_http_server(9100)

Each metric has the labels ``store`` (its name), ``path``, ``kind`` and ``mode``
(``read_write`` or ``read_only``: one store may be loaded both ways at once);
``l2_stores_disk_bytes`` has ``file`` too (``runs``, ``logs``, ``values``,
``value``, ``other``). Counters count since the store was loaded.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .errors import StoreError
from .stores.base import open_stores
from .stores.stats import StoreStats

__all__ = ["StoresCollector", "register"]

_LABELS = ["store", "path", "kind", "mode"]
#: StoreStats field -> (metric name, help, counter?)
_FIELDS = {
    "bindings": ("l2_stores_bindings", "Live bindings.", False),
    "runs": ("l2_stores_runs", "Sorted runs on disk.", False),
    "pending_records": ("l2_stores_pending_records", "Bindings in logs, not in a run yet.", False),
    "merges": ("l2_stores_merges", "Merges done.", True),
    "merge_seconds": ("l2_stores_merge_seconds", "Time spent in merges.", True),
    "bytes_written": ("l2_stores_written_bytes", "Bytes sent to storage.", True),
    "gc_runs": ("l2_stores_gc_runs", "Garbage collections done.", True),
    "gc_seconds": ("l2_stores_gc_seconds", "Time spent in garbage collections.", True),
    "cache_hits": ("l2_stores_cache_hits", "Cache lookups that found their key.", True),
    "cache_misses": ("l2_stores_cache_misses", "Cache lookups that did not.", True),
}


class StoresCollector(Collector):
    """A Prometheus collector of ``store.stats()`` for every open store."""

    def collect(self) -> Iterator[Metric]:
        """The metrics of the stores open now."""
        figures: list[StoreStats] = []
        for store in open_stores():
            try:
                figures.append(store.stats())
            except StoreError:
                continue  # closed meanwhile, or its files gone: the others are scraped
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for field, (name, documentation, counter) in _FIELDS.items():
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            families[field] = kind(name, documentation, labels=_LABELS)
        disk = GaugeMetricFamily(
            "l2_stores_disk_bytes", "Bytes on disk, by kind of file.", labels=[*_LABELS, "file"]
        )
        for stats in figures:
            labels = [stats.name, stats.path, stats.kind, stats.mode]
            for field, family in families.items():
                family.add_metric(labels, float(getattr(stats, field)))
            for file, size in stats.disk_bytes.items():
                disk.add_metric([*labels, file], float(size))
        yield from families.values()
        yield disk


def register(registry: CollectorRegistry = REGISTRY) -> StoresCollector:
    """Register a :class:`StoresCollector` in ``registry`` (prometheus_client's default)."""
    collector = StoresCollector()
    registry.register(collector)
    return collector
