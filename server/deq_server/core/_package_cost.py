"""What an exported program costs at the largest batch, measured without running it.

The scan (`_package_scan`) bounds each size a program names, but sizes compose: repeat a tensor
by 4096 twice, or multiply the batch by itself in shape arithmetic, and one call allocates
terabytes. So before a program runs on real data it runs on fake tensors (torch's
FakeTensorMode: shapes and dtypes propagate, nothing is allocated) at the largest batch the
server will ever give it, and its peak memory and its FLOPs are checked against caps.

The check at the largest batch bounds every smaller one because sizes can only grow with the
batch: the scan admits only `+` and `*` in shape arithmetic (no `-`, `//`, `%`), and sizes that
depend on tensor values (nonzero, item) are refused here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

# The most FLOPs one program call may take at the largest batch: about a minute of a CPU core's
# matmul throughput. (A hidden-4096 dense cell takes 3.4e10 at 1024 rows.)
MAX_CALL_FLOPS = 10**13


class CostError(ValueError):
    """A program that would take more memory or FLOPs than allowed, or whose sizes depend on
    the values of its tensors."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # torch.fx appends its own notes to args[0] on the way out


@dataclass(frozen=True)
class Cost:
    """One program call: the most bytes its intermediate tensors hold at once, and its FLOPs
    (matmuls and convolutions)."""

    peak_bytes: int
    flops: int


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Meter(torch.fx.Interpreter):
    """Runs a graph node by node, noting each storage its outputs make: its size and the span
    of nodes from the one that made it to the last use of any node that references it."""

    def __init__(self, module: torch.fx.GraphModule, max_bytes: int) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.max_bytes = max_bytes
        self.index = {node: i for i, node in enumerate(module.graph.nodes)}
        self.last_use = {
            node: max((self.index[user] for user in node.users), default=i)
            for node, i in self.index.items()
        }
        self.spans: dict[int, list[int]] = {}  # storage -> [bytes, first node, last use]
        self.kept: list[Tensor] = []  # fake, so free: keeps storage addresses from being reused

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op in ("placeholder", "get_attr", "output"):
            return out  # inputs and weights are not the program's to allocate
        for t in _tensors(out):
            self.kept.append(t)
            storage = t.untyped_storage()
            size = storage.nbytes()
            if size > self.max_bytes:
                raise CostError(
                    f"{n.name} ({n.target}) makes a tensor of {size} bytes, above {self.max_bytes}"
                )
            span = self.spans.setdefault(storage._cdata, [size, self.index[n], 0])
            span[2] = max(span[2], self.last_use[n])
        return out

    def peak(self) -> int:
        """Bytes held at once, at the worst node."""
        change: dict[int, int] = {}
        for size, start, end in self.spans.values():
            change[start] = change.get(start, 0) + size
            change[end + 1] = change.get(end + 1, 0) - size
        peak = held = 0
        for i in sorted(change):
            held += change[i]
            peak = max(peak, held)
        return peak


def measure(
    module: torch.fx.GraphModule, inputs: Callable[[], tuple[Tensor, ...]], max_bytes: int
) -> Cost:
    """Run `module` on fake `inputs()` (built inside the fake mode); raise CostError past
    `max_bytes` held at once or MAX_CALL_FLOPS."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as flops:
            meter = _Meter(module, max_bytes)
            meter.run(*inputs())
    except CostError as exc:
        raise CostError(exc.reason) from None
    except Exception as exc:  # DataDependentOutputException, DynamicOutputShapeException, ...
        raise CostError(
            f"its sizes cannot be computed from the input shapes alone "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    cost = Cost(peak_bytes=meter.peak(), flops=flops.get_total_flops())
    if cost.peak_bytes > max_bytes:
        raise CostError(f"it holds {cost.peak_bytes} bytes at once, above {max_bytes}")
    if cost.flops > MAX_CALL_FLOPS:
        raise CostError(f"it takes {cost.flops:.3g} FLOPs, above {MAX_CALL_FLOPS:.0e}")
    return cost
