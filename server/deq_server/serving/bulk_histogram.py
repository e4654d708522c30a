"""A Prometheus histogram that takes a whole array of observations in one call.

The per-sample solver histograms see one value per sample: with prometheus_client's `Histogram`
that is a Python call, a lock and a bucket search per sample, on the solver thread. Here a batch
of samples costs one `numpy.searchsorted` and one `bincount` under one lock; the exposition is
the same (`_bucket{le}` cumulative, `_sum`, `_count`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


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
        self._lock = threading.Lock()
        # labels -> (per-bucket counts, the last one for +Inf; sum of observations)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        registry.register(self)

    def observe_many(self, labels: Sequence[str], values: np.ndarray) -> None:
        """Record every value of `values` (finite ones: NaN or inf would poison `_sum`)."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        # bucket i holds values in (bounds[i-1], bounds[i]]: `le` is inclusive
        where = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(where, minlength=len(self._bounds) + 1)
        key = tuple(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (np.zeros(len(self._bounds) + 1, np.int64), [0.0])
            series[0][:] += counts
            series[1][0] += float(values.sum())

    def remove(self, *labels: str) -> None:
        with self._lock:
            self._series.pop(tuple(labels), None)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, c.copy(), s[0]) for k, (c, s) in self._series.items()]
        for labels, counts, total in snapshot:
            cumulative = np.cumsum(counts)
            edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]
            family.add_metric(
                list(labels),
                [(edge, float(n)) for edge, n in zip(edges, cumulative, strict=True)],
                total,
            )
        yield family
