"""`deq_device_memory_bytes{device, kind}`: memory of the serving device, read at scrape time.

A collector rather than a gauge someone must remember to update: every scrape reads the numbers
fresh, and nothing runs between scrapes. Kinds:
- device "cpu", kind "rss": the process's resident memory (always; on a GPU host it is the host
  side of the story).
- device "cuda:N", kinds "allocated" (tensors alive), "reserved" (held by PyTorch's caching
  allocator, what other processes cannot use) and "total" (the card's capacity), for every visible
  card once the process has initialised CUDA (a CPU-only server never does, and a scrape must not
  be what creates a CUDA context). These are PyTorch's own counters: reading them starts no kernel
  and waits for none.

The collector needs no knowledge of the serving device, so `Metrics` registers it on its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

NAME = "deq_device_memory_bytes"
_HELP = "Memory of the serving device by kind (CPU: process RSS; CUDA: allocated/reserved/total)."


def _resident_bytes() -> float | None:
    """The process's resident set size from /proc (Linux), or None where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


class DeviceMemoryCollector(Collector):
    """Exports deq_device_memory_bytes for the process and for every initialised CUDA card."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(NAME, _HELP, labels=["device", "kind"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(NAME, _HELP, labels=["device", "kind"])
        rss = _resident_bytes()
        if rss is not None:
            family.add_metric(["cpu", "rss"], rss)
        if torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                label = f"cuda:{index}"
                family.add_metric([label, "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([label, "reserved"], float(torch.cuda.memory_reserved(index)))
                total = torch.cuda.get_device_properties(index).total_memory
                family.add_metric([label, "total"], float(total))
        yield family
