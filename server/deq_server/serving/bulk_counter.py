"""A Prometheus counter whose increment is a queue append: for the per-request series.

prometheus_client's `Counter.inc` takes a lock and runs a few Python calls per increment; a
request makes several such calls (started, handled, by outcome), on the event loop that every
request shares. Here `inc` appends to a queue, folded into the totals in bulk when it holds
`FOLD_AT` increments and whenever the series are read, so a scrape sees every increment made
before it. The exposition is a counter's (`<name>_total`), without `_created`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .bulk_histogram import FOLD_AT


class BulkCounter(Collector):
    """`name` (exported as `<name>_total`) with `labelnames`."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, ...], float] = {}
        # appended by any thread, drained under the lock with popleft (both atomic)
        self._queued: deque[tuple[tuple[str, ...], float]] = deque()
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add `amount` (>= 0) to the series of `labels`, in the next fold."""
        if amount < 0:
            raise ValueError(f"a counter only goes up, got {amount}")
        self._queued.append((labels, amount))
        if len(self._queued) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the queued increments into the totals."""
        with self._lock:
            for _ in range(len(self._queued)):
                labels, amount = self._queued.popleft()
                self._totals[labels] = self._totals.get(labels, 0.0) + amount

    def value(self, labels: tuple[str, ...]) -> float:
        """The total of one series so far (0 when it has none)."""
        self.fold()
        with self._lock:
            return self._totals.get(labels, 0.0)

    def remove(self, *labels: str) -> None:
        self.fold()  # what was counted before the removal goes with the series
        with self._lock:
            self._totals.pop(tuple(labels), None)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        self.fold()
        with self._lock:
            snapshot = list(self._totals.items())
        for labels, total in snapshot:
            family.add_metric(list(labels), total)
        yield family
