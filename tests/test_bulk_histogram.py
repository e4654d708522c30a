"""BulkHistogram exports what prometheus_client's Histogram would for the same observations."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deq_server.serving.bulk_histogram import BulkHistogram
from deq_server.serving.metrics import ITERATIONS, RESIDUALS

values = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=1e4, allow_nan=False),
        st.sampled_from([*ITERATIONS, *RESIDUALS, float("inf"), float("nan")]),
    ),
    max_size=60,
)


def exposition(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but `_created`, by name and labels, as Prometheus would read them."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def same(mine: dict, theirs: dict) -> None:  # type: ignore[type-arg]
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():  # bucket counts exact; sums up to the order of addition
        assert mine[key] == pytest.approx(value, rel=1e-12), key


@given(first=values, second=values, buckets=st.sampled_from([ITERATIONS, RESIDUALS]))
def test_bulk_equals_one_by_one(first: list[float], second: list[float], buckets) -> None:  # type: ignore[no-untyped-def]
    reference, bulk = CollectorRegistry(), CollectorRegistry()
    one = Histogram("h", "doc", ["model"], buckets=buckets, registry=reference)
    many = BulkHistogram("h", "doc", ["model"], buckets=buckets, registry=bulk)
    for label, batch in (("a", first), ("b", second), ("a", second)):
        for value in batch:
            if np.isfinite(value):  # what record_solve always did: no inf or NaN in _sum
                one.labels(label).observe(value)
        many.observe_many((label,), np.array(batch, dtype=np.float64))
    # Histogram shows a label's series once `.labels()` is called, BulkHistogram once a finite
    # value arrives: compare the labels both have, and that only empty ones are missing
    mine, theirs = exposition(bulk), exposition(reference)
    same(mine, {k: v for k, v in theirs.items() if k in mine})
    assert all(v == 0 for k, v in theirs.items() if k not in mine)
    one.remove("a")
    many.remove("a")
    assert not any(dict(labels).get("model") == "a" for _, labels in exposition(bulk))


@given(
    observations=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.floats(min_value=0, max_value=20)), max_size=80
    ),
    fold_at=st.sampled_from([1, 3, 1024]),
)
def test_single_observations_equal_one_by_one(
    observations: list[tuple[str, float]], fold_at: int
) -> None:
    """`observe` queues and folds (at FOLD_AT, and on every read) to what prometheus_client's
    Histogram shows for the same values, whenever the folds happen."""
    reference, bulk = CollectorRegistry(), CollectorRegistry()
    one = Histogram("h", "doc", ["model"], buckets=ITERATIONS, registry=reference)
    many = BulkHistogram("h", "doc", ["model"], buckets=ITERATIONS, registry=bulk)
    with patch("deq_server.serving.bulk_histogram.FOLD_AT", fold_at):
        for label, value in observations:
            one.labels(label).observe(value)
            many.observe((label,), value)
    mine, theirs = exposition(bulk), exposition(reference)
    same(mine, theirs)


def test_remove_takes_queued_observations_with_it() -> None:
    bulk = CollectorRegistry()
    many = BulkHistogram("h", "doc", ["model"], buckets=ITERATIONS, registry=bulk)
    many.observe(("a",), 1.0)
    many.remove("a")  # the queued value belongs to the removed series: it must not revive it
    assert exposition(bulk) == {}
