"""Iteration-level batching: a fixed pool of solver slots that samples join and leave every step.

`solve` takes a batch, runs it to the end and returns. A `SlotPool` never ends: the caller admits
samples into free slots, calls `step()` (one f evaluation and one method step over the busy
slots), and gets back the samples that retired in that step, each at its own tolerance, cap or
stop verdict. Per sample, the arithmetic is `solve`'s: same residuals, same retirement rules, same
lowest-residual state, and a method history that starts empty when the sample joins (Anderson's
per-row masks keep a newcomer from mixing with the previous occupant of its slot or with its
neighbours). Only methods whose state is updated in place (`SLOTTED`) can run here.

Layout: the buffers have a fixed number of rows. A newcomer takes the lowest free slot and a step
works on views of rows [:hi], hi = 1 + the highest busy slot: the full, fixed shape at load (what a
CUDA graph capture needs), fewer rows when the pool is nearly empty, and no state ever moves
between slots. Host work per step: one device-to-host copy of the retirement flags.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._methods import make_method
from ._rows import STOP_MODES, Observation, Rows, advance, verdicts
from ._status import RUNNING

log = logging.getLogger("deq_server.core.slots")

# Given the owners of slots [:hi] (None for a free slot), the per-slot stop statuses
# (0 = keep going), or None when nothing stops.
SlotStopHook = Callable[[Sequence[Any]], Tensor | None]


def _is_compile_error(exc: BaseException) -> bool:
    """An error of torch.compile itself (tracing or code generation), not of the step."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


@dataclass
class Retired:
    """Samples that left the pool in one step: who they belong to and their results (on the
    pool's device). `z` is each sample's lowest-residual iterate, as in `SolveResult`."""

    owners: list[Any]
    z: Tensor
    iterations: Tensor
    residual: Tensor
    status: Tensor


def _tensor_fields(state: Any) -> list[str]:
    """Names of a method state's per-row tensors (none for a stateless method); 0-d tensors
    (Anderson's ring position) are shared by all rows."""
    if state is None:
        return []
    return [
        f.name
        for f in dataclasses.fields(state)
        if isinstance(t := getattr(state, f.name), Tensor) and t.dim() > 0
    ]


class SlotPool:
    """`slots` solver rows for one model and one method setting; each row is one sample.

    `f(z, inj)` maps (A, *state_shape) states and (A, *inj_shape) injections to next states.
    Tolerances and caps are per sample (given at admission); `stop_mode`, the method and its
    options are the pool's. Not thread-safe: one thread admits and steps.
    """

    def __init__(
        self,
        f: Callable[[Tensor, Tensor], Tensor],
        *,
        slots: int,
        state_shape: Sequence[int],
        inj_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        method: str = "anderson",
        stop_mode: str = "rel",
        divergence: float = 1e5,
        compile: bool = False,
        **options: Any,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {stop_mode!r}; expected one of {list(STOP_MODES)}")
        self._method = make_method(method, **options)
        if not getattr(self._method, "SLOTTED", False):
            raise ValueError(f"method {method!r} cannot run in slots (its state is not row-local)")
        self.slots = slots
        self.stop_mode = stop_mode
        self.divergence = divergence
        self.steps = 0
        self._f = f
        self._shape = tuple(state_shape)
        width = math.prod(self._shape)
        self._z = torch.zeros(slots, width, dtype=dtype, device=device)
        self._inj = torch.zeros(slots, *inj_shape, dtype=dtype, device=device)
        # `solve`'s row bookkeeping, one row per slot (a free slot's values are never read)
        self._rows = Rows.start(
            self._z,
            torch.ones(slots, dtype=dtype, device=device),
            torch.ones(slots, dtype=torch.int64, device=device),
        )
        self._state = self._method.init(self._z)
        self._state_fields = _tensor_fields(self._state)
        self._owners: list[Any] = [None] * slots  # None: a free slot
        self._free = list(range(slots))  # a min-heap: newcomers take the lowest free slots
        self._busy = torch.zeros(slots, dtype=torch.bool, device=device)
        self._hi = 0  # 1 + the highest busy slot: a step works on rows [:hi]
        self._count = 0
        # Compiled: one program per bucket of rows (powers of 4 up to `slots`), rows [:hi]
        # rounded up to the next bucket (trailing free rows are computed, never read).
        self._advance: Callable[..., tuple[Observation, Tensor]] = self._advance_eager
        self.compiled = compile
        if compile:
            self._advance = torch.compile(self._advance_eager, dynamic=False, fullgraph=True)

    @property
    def busy(self) -> int:
        return self._count

    @property
    def free(self) -> int:
        return self.slots - self._count

    @property
    def owners(self) -> list[Any]:
        """Owners of the busy slots, in slot order."""
        return [o for o in self._owners[: self._hi] if o is not None]

    def _state_tensors(self) -> list[Tensor]:
        return [getattr(self._state, name) for name in self._state_fields]

    def admit(
        self, owners: Sequence[Any], z0: Tensor, inj: Tensor, tol: Tensor, max_iter: Tensor
    ) -> None:
        """Put k samples into free slots: initial states (k, *state_shape), injections, and their
        own tolerances (k,) and caps (k,). Their first f evaluation happens at the next `step`.

        `tol` and `max_iter` are checked where they are given: pass them on the host to keep the
        check from synchronising with the device."""
        k = len(owners)
        if k > self.free:
            raise ValueError(f"{k} samples do not fit in {self.free} free slots")
        if not bool(((tol > 0) & torch.isfinite(tol)).all()) or not bool((max_iter >= 1).all()):
            raise ValueError("every sample needs a finite tol > 0 and max_iter >= 1")
        device = self._z.device
        tol, max_iter = tol.to(device), max_iter.to(device)
        slots = [heapq.heappop(self._free) for _ in range(k)]  # ascending
        at = torch.tensor(slots, device=device)
        z0 = z0.reshape(k, -1).to(self._z.dtype)
        self._z.index_copy_(0, at, z0)
        self._inj.index_copy_(0, at, inj.to(self._inj.dtype))
        self._rows.put(at, Rows.start(z0, tol.to(self._z.dtype), max_iter))
        for t in self._state_tensors():
            t.index_fill_(0, at, 0)
        self._busy.index_fill_(0, at, True)
        for slot, owner in zip(slots, owners, strict=True):
            self._owners[slot] = owner
        self._hi = max(self._hi, slots[-1] + 1)
        self._count += k

    def step(self, should_stop: SlotStopHook | None = None) -> Retired | None:
        """One iteration over the busy slots; returns the samples that retired (None if none).

        Rows [:hi] are computed, free ones among them too (their values are never read): fixed
        shapes at full load and no moves of state between slots."""
        if self._count == 0:
            return None
        n = self._bucket(self._hi) if self.compiled else self._hi
        z, rows = self._z[:n], self._rows.head(n)
        view = None
        if self._state is not None:  # the method steps views of rows [:n], in place
            prefix = {name: getattr(self._state, name)[:n] for name in self._state_fields}
            view = dataclasses.replace(self._state, **prefix)
        try:
            seen, z_next = self._advance(z, self._inj[:n], rows, view)
        except Exception as exc:
            if not self.compiled or not _is_compile_error(exc):
                raise
            # a cell the compiler cannot take (nothing ran yet): this pool runs eagerly
            log.warning("compiling the slot step failed, running it eagerly: %s", exc)
            self.compiled, self._advance = False, self._advance_eager
            seen, z_next = self._advance(z, self._inj[:n], rows, view)
        self.steps += 1
        running = seen.running
        stop = should_stop(self._owners[:n]) if should_stop is not None else None
        if stop is not None:
            stop = stop.to(device=z.device, dtype=torch.int64)
            running = running & (stop == RUNNING)
        leaving = (self._busy[:n] & ~running).cpu()  # the one host sync per step
        retired = None
        if bool(leaving.any()):
            retired = self._retire(leaving, rows, verdicts(rows, seen, self.divergence, stop))
        self._z[:n] = z_next
        return retired

    def _advance_eager(
        self, z: Tensor, inj: Tensor, rows: Rows, state: Any
    ) -> tuple[Observation, Tensor]:
        """One evaluation of f on rows z, its bookkeeping, and the method's next iterate (rows
        and state updated in place; the retirement reads rows, which the method leaves alone)."""
        return advance(
            self._f, self._method, z, self._shape, (inj,), rows, state,
            self.stop_mode, self.divergence,
        )  # fmt: skip

    def _bucket(self, hi: int) -> int:
        n = 1
        while n < hi:
            n *= 4
        return min(n, self.slots)

    def _retire(self, leaving: Tensor, rows: Rows, status: Tensor) -> Retired:
        """Collect the leaving rows' results and free their slots."""
        done = leaving.nonzero().squeeze(1)
        done_list = done.tolist()
        at = done.to(self._z.device)
        retired = Retired(
            owners=[self._owners[i] for i in done_list],
            z=rows.best_z.index_select(0, at).view(-1, *self._shape),
            iterations=rows.evals.index_select(0, at),
            residual=rows.best.index_select(0, at),
            status=status.index_select(0, at),
        )
        self._busy.index_fill_(0, at, False)
        for i in done_list:
            self._owners[i] = None
            heapq.heappush(self._free, i)
        self._count -= len(done_list)
        while self._hi and self._owners[self._hi - 1] is None:
            self._hi -= 1
        return retired
