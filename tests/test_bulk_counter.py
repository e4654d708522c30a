"""BulkCounter exports what prometheus_client's Counter would for the same increments."""

from __future__ import annotations

import threading
from unittest.mock import patch

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from test_bulk_histogram import exposition

from deq_server.serving.bulk_counter import BulkCounter

increments = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([1.0, 2.5, 0.0])), max_size=80
)


@given(steps=increments, fold_at=st.sampled_from([1, 4, 1024]))
def test_bulk_equals_one_by_one(steps: list[tuple[str, float]], fold_at: int) -> None:
    """The same totals whenever the folds happen (every increment, every few, only on read)."""
    reference, bulk = CollectorRegistry(), CollectorRegistry()
    one = Counter("c", "doc", ["model"], registry=reference)
    many = BulkCounter("c", "doc", ["model"], bulk)
    with patch("deq_server.serving.bulk_counter.FOLD_AT", fold_at):
        for label, amount in steps:
            one.labels(label).inc(amount)
            many.inc((label,), amount)
    assert exposition(bulk) == exposition(reference)
    for label in {label for label, _ in steps}:
        assert many.value((label,)) == sum(a for lab, a in steps if lab == label)


def test_refuses_to_go_down() -> None:
    with pytest.raises(ValueError, match="only goes up"):
        BulkCounter("c", "doc", ["model"], CollectorRegistry()).inc(("a",), -1.0)


def test_remove_takes_queued_increments_with_it() -> None:
    registry = CollectorRegistry()
    many = BulkCounter("c", "doc", ["model"], registry)
    many.inc(("a",))
    many.inc(("b",))
    many.remove("a")
    assert exposition(registry) == {("c_total", (("model", "b"),)): 1.0}


def test_no_increment_lost_to_concurrent_reads() -> None:
    """Increments from one thread while another reads (and so folds) all the time: the total
    is exact (appends and popleft are atomic; a fold never drops what arrives during it)."""
    registry = CollectorRegistry()
    many = BulkCounter("c", "doc", ["model"], registry)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            exposition(registry)

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for _ in range(20_000):
            many.inc(("a",))
    finally:
        stop.set()
        reader.join()
    assert many.value(("a",)) == 20_000
