"""deq_device_memory_bytes: the process RSS always, CUDA allocator counters once CUDA is in use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from deq_server.serving.device_metrics import NAME, DeviceMemoryCollector
from deq_server.serving.metrics import Metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.labels["device"], s.labels["kind"]): s.value
        for family in registry.collect()
        if family.name == NAME
        for s in family.samples
    }


def test_every_server_registry_exports_the_process_rss() -> None:
    found = samples(Metrics().registry)
    assert found[("cpu", "rss")] > 10 * 2**20  # torch alone is far bigger than 10 MiB
    assert not torch.cuda.is_initialized()
    assert set(found) == {("cpu", "rss")}  # a scrape must not create a CUDA context


def test_cuda_cards_report_allocated_reserved_and_total(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "memory_allocated", lambda i: 1000 + i)
    monkeypatch.setattr(cuda, "memory_reserved", lambda i: 2000 + i)
    monkeypatch.setattr(cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=9000))
    registry = CollectorRegistry()
    registry.register(DeviceMemoryCollector())
    found = samples(registry)
    assert found[("cuda:1", "allocated")] == 1001
    assert found[("cuda:0", "reserved")] == 2000
    assert found[("cuda:1", "total")] == 9000
    assert len(found) == 1 + 2 * 3
