"""A Prometheus histogram that takes a whole array of observations in one call.

The per-sample solver histograms see one value per sample: with prometheus_client's `Histogram`
that is a Python call, a lock and a bucket search per sample, on the solver thread. Here a batch
of samples costs one `numpy.searchsorted` and one `bincount` under one lock; the exposition is
the same (`_bucket{le}` cumulative, `_sum`, `_count`).

Per-request latencies come one at a time: `observe` only appends to a queue, folded in bulk when
it holds `FOLD_AT` values and whenever the series are read, so a scrape sees every value
observed before it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

FOLD_AT = 1024  # queued single observations folded at once (and at every read)


@dataclass
class _Series:
    """One label set: counts per bucket (the last for +Inf) and the sum of the observations."""

    counts: np.ndarray
    total: float = 0.0


class BulkHistogram(Collector):
    """`name` with `labelnames`, bucket upper bounds `buckets` (+Inf added)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # `le` as written
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        # single observations not yet folded: appended by any thread, drained under the lock
        # with popleft (both atomic: a value appended during a fold waits for the next one)
        self._queued: deque[tuple[tuple[str, ...], float]] = deque()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Record one value: a queue append (the hot path of every request), folded later."""
        self._queued.append((labels, value))
        if len(self._queued) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the queued single observations into the series, one bulk update per label set."""
        with self._lock:
            grouped: dict[tuple[str, ...], list[float]] = {}
            for _ in range(len(self._queued)):
                labels, value = self._queued.popleft()
                grouped.setdefault(labels, []).append(value)
            for labels, values in grouped.items():
                self._add(labels, np.array(values, dtype=np.float64))

    def observe_many(self, labels: Sequence[str], values: np.ndarray) -> None:
        """Record every value of `values` (finite ones: NaN or inf would poison `_sum`)."""
        with self._lock:
            self._add(tuple(labels), np.asarray(values, dtype=np.float64))

    def _add(self, key: tuple[str, ...], values: np.ndarray) -> None:
        """Under the lock: `values` into the series of `key`."""
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        # bucket i holds values in (bounds[i-1], bounds[i]]: `le` is inclusive
        where = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(where, minlength=len(self._bounds) + 1)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(np.zeros_like(counts))
        series.counts += counts
        series.total += float(values.sum())

    def remove(self, *labels: str) -> None:
        self.fold()  # what was observed before the removal goes with the series
        with self._lock:
            self._series.pop(tuple(labels), None)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        self.fold()
        with self._lock:
            snapshot = [(k, np.cumsum(s.counts), s.total) for k, s in self._series.items()]
        for labels, cumulative, total in snapshot:
            buckets = [(edge, float(n)) for edge, n in zip(self._edges, cumulative, strict=True)]
            family.add_metric(list(labels), buckets, total)
        yield family
