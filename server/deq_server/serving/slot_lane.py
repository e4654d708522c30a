"""Iteration-level (continuous) batching: requests join and leave the solver batch every step.

A `SlotLane` owns a `SlotPool` for one model version and method setting. Each engine turn: admit
waiting samples into free slots (FIFO; a request larger than the free slots is admitted in
parts), run one solver iteration over the busy slots, and hand each retired sample's result to
its request; a request completes when its last sample retires. A loose request therefore leaves
after a few iterations even when a tight one holds the neighbouring slots, and a cancelled or
late request frees its slots within one step. Only methods whose state is row-local (`SLOTTED`)
run here; the others get a `BatchLane`.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deq_server.core import SlotPool, SolveResult, nonfinite_outputs

from .scheduler import (
    SolveJob,
    SolveOutcome,
    Ticket,
    frozen,
    host_cat,
    limit_of,
    numpy_dtype,
    shared_settings,
    ticket_settings,
    unstarted,
    verdict,
)

BatchObserver = Callable[[str, int], None]


@dataclass(eq=False, kw_only=True)
class _SlotTicket(Ticket):
    """A request's per-sample settings and results, host-side (numpy: per-sample bookkeeping
    without a torch call per sample or step)."""

    y: np.ndarray
    z: np.ndarray
    iterations: np.ndarray
    residual: np.ndarray
    status: np.ndarray
    admitted: int = 0
    done: int = 0
    started: float | None = None
    first_step: int = 0


class SlotLane:
    """A slot pool for one model version and method setting, with its FIFO of waiting requests.

    `on_batch(model_name, busy_slots)` is called once per step (for deq_batch_size)."""

    def __init__(
        self, job: SolveJob, slots: int, on_batch: BatchObserver | None, compile_step: bool
    ) -> None:
        # Weakly held: a version the registry unloaded frees its lane as soon as no request
        # holds it (the lane key's id() is checked against this reference before reuse).
        self.source = weakref.ref(job.model)
        self.model = frozen(job.model)  # shared with other lanes of the same model
        self.name = job.model_name
        shared = shared_settings(job)
        ref = next(self.model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.np_dtype = numpy_dtype(ref.dtype)
        with torch.no_grad():
            probe = self.model.inject(
                torch.zeros(1, *self.model.input_shape, dtype=self.dtype, device=self.device)
            )
        self.pool = SlotPool(
            self.model.cell,
            slots=slots,
            state_shape=self.model.state_shape,
            inj_shape=probe.shape[1:],
            dtype=self.dtype,
            device=self.device,
            compile=compile_step,
            **shared,
        )
        self.waiting: deque[_SlotTicket] = deque()
        self.active: dict[_SlotTicket, None] = {}  # admitted, not finished; insertion-ordered
        self.idle_since = time.monotonic()
        self._on_batch = on_batch

    @property
    def idle(self) -> bool:
        return not self.waiting and self.pool.busy == 0

    def queue(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> None:
        rows, model, real = job.x.shape[0], self.model, self.np_dtype
        tol, max_iter = ticket_settings(job, model, self.dtype)
        self.waiting.append(
            _SlotTicket(
                job=job,
                future=future,
                limit=limit_of(job),
                tol=tol,
                max_iter=max_iter,
                y=np.empty((rows, *model.output_shape), dtype=real),
                z=np.empty((rows, *model.state_shape), dtype=real),
                iterations=np.empty(rows, dtype=np.int64),
                residual=np.empty(rows, dtype=real),
                status=np.empty(rows, dtype=np.int64),
            )
        )

    def admit(self) -> list[Ticket]:
        """FIFO: fill free slots from the head of the queue, one batched injection for all;
        returns the requests dropped because their caller left while they waited."""
        chunks: list[tuple[_SlotTicket, int, int]] = []
        dropped: list[Ticket] = []
        free, now = self.pool.free, time.monotonic()
        while self.waiting and free:
            ticket = self.waiting[0]
            if ticket.admitted == 0 and ticket.future.done():  # the caller left while queued
                self.waiting.popleft()
                ticket.outcome = unstarted(ticket.job, self.model)
                dropped.append(ticket)
                continue
            k = min(free, ticket.rows - ticket.admitted)
            chunks.append((ticket, ticket.admitted, k))
            if ticket.admitted == 0:
                ticket.started, ticket.first_step = now, self.pool.steps
                self.active[ticket] = None
            ticket.admitted += k
            free -= k
            if ticket.admitted == ticket.rows:
                self.waiting.popleft()
        if not chunks:
            return dropped
        x = host_cat([t.job.x[s : s + k] for t, s, k in chunks]).to(self.device, self.dtype)
        # The start is the request's warm start or, as `solve`'s, the model's init_state.
        if all(t.job.z0 is None for t, _, _ in chunks):
            z0 = self.model.init_state(x)
        else:
            z0 = torch.cat(
                [
                    t.job.z0[s : s + k].to(self.device, self.dtype)
                    if t.job.z0 is not None
                    else self.model.init_state(x[:k])
                    for t, s, k in chunks
                ]
            )
        tol = np.concatenate([t.tol[s : s + k] for t, s, k in chunks])
        cap = np.concatenate([t.max_iter[s : s + k] for t, s, k in chunks])
        with torch.no_grad():
            inj = self.model.inject(x)
        self.pool.admit(
            [(t, s + i) for t, s, k in chunks for i in range(k)],
            z0.to(self.device),
            inj,
            torch.from_numpy(tol),  # on the host: the pool checks them without a device sync
            torch.from_numpy(cap),
        )
        return dropped

    def _should_stop(self, owners: Iterable[tuple[_SlotTicket, int] | None]) -> Tensor | None:
        now = time.monotonic()
        verdicts = {t: v for t in self.active if (v := verdict(t.job, t.limit, now))}
        if not verdicts:
            return None
        per_slot = [verdicts.get(o[0], 0) if o is not None else 0 for o in owners]
        return torch.tensor(per_slot, dtype=torch.int64)

    def turn(self) -> list[Ticket]:
        finished = self.admit()
        busy = self.pool.busy
        if busy == 0:
            return finished
        if self._on_batch is not None:
            self._on_batch(self.name, busy)
        with torch.no_grad():
            retired = self.pool.step(self._should_stop)
            if retired is None:
                return finished
            y_t = self.model.head(retired.z)
            status_t = nonfinite_outputs(y_t, retired.status)
            y = y_t.cpu().numpy()
        z, iterations = retired.z.cpu().numpy(), retired.iterations.cpu().numpy()
        residual, status = retired.residual.cpu().numpy(), status_t.cpu().numpy()
        groups: dict[_SlotTicket, tuple[list[int], list[int]]] = {}
        for pos, (ticket, sample) in enumerate(retired.owners):
            positions, samples = groups.setdefault(ticket, ([], []))
            positions.append(pos)
            samples.append(sample)
        for ticket, (positions, samples) in groups.items():
            ticket.y[samples] = y[positions]
            ticket.z[samples] = z[positions]
            ticket.iterations[samples] = iterations[positions]
            ticket.residual[samples] = residual[positions]
            ticket.status[samples] = status[positions]
            ticket.done += len(samples)
            if ticket.done == ticket.rows:
                del self.active[ticket]
                finished.append(self._complete(ticket, busy))
        if self.idle:
            self.idle_since = time.monotonic()
        return finished

    def _complete(self, ticket: _SlotTicket, busy: int) -> Ticket:
        now = time.monotonic()
        started = ticket.started if ticket.started is not None else now
        result = SolveResult(
            z=torch.from_numpy(ticket.z),
            iterations=torch.from_numpy(ticket.iterations),
            residual=torch.from_numpy(ticket.residual),
            status=torch.from_numpy(ticket.status),
            steps=self.pool.steps - ticket.first_step,
        )
        y = torch.from_numpy(ticket.y)
        ticket.outcome = SolveOutcome(
            y, result, started - ticket.job.submitted, now - started, busy
        )
        return ticket

    def fail(self, exc: BaseException) -> list[Ticket]:
        tickets: list[Ticket] = list(self.active)
        tickets += [t for t in self.waiting if t not in self.active]
        self.active.clear()
        self.waiting.clear()
        for ticket in tickets:
            ticket.error = exc
        return tickets
