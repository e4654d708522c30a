"""Iteration-level (continuous) batching: requests join and leave the solver batch every step.

One solver thread owns a `SlotPool` per lane (a model version plus the method settings that must
be shared by a batch). Each loop turn, per lane: admit waiting samples into free slots (FIFO; a
request larger than the free slots is admitted in parts), run one solver iteration over the busy
slots, and hand each retired sample's result to its request; a request completes when its last
sample retires. A loose request therefore leaves after a few iterations even when a tight one
holds the neighbouring slots, and a cancelled or late request frees its slots within one step.

Methods whose state is not row-local (broyden) are solved by the request-level scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deq_server.core import METHODS, SlotPool, SolveResult, Status, nonfinite_outputs

from .scheduler import (
    RequestScheduler,
    SolveJob,
    SolveOutcome,
    _limit,
    _verdict,
    batch_key,
    frozen,
    per_sample,
    report,
    shared_settings,
)

log = logging.getLogger("deq_server.continuous")

# An idle lane (no busy slot, nobody waiting) is dropped after this long; its buffers go with it.
IDLE_LANE_SECONDS = 30.0

BatchObserver = Callable[[str, int], None]


@dataclass(eq=False)
class _Ticket:
    """One request inside the scheduler: its per-sample settings and where results go."""

    job: SolveJob
    future: asyncio.Future[SolveOutcome]
    # Host-side arrays (numpy: per-sample bookkeeping without a torch call per sample or step).
    tol: np.ndarray
    max_iter: np.ndarray
    y: np.ndarray
    z: np.ndarray
    iterations: np.ndarray
    residual: np.ndarray
    status: np.ndarray
    limit: float | None
    admitted: int = 0
    done: int = 0
    started: float | None = None
    first_step: int = 0
    outcome: SolveOutcome | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.job.x.shape[0])


class _Lane:
    """A slot pool for one model version and method setting, with its FIFO of waiting requests."""

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
        self.np_dtype = torch.empty((), dtype=ref.dtype).numpy().dtype
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
        self.defaults = self.model.solver_defaults  # per-sample tol/max_iter when unset
        self.waiting: deque[_Ticket] = deque()
        self.active: dict[_Ticket, None] = {}  # admitted, not finished; insertion-ordered
        self.idle_since = time.monotonic()
        self._on_batch = on_batch

    @property
    def idle(self) -> bool:
        return not self.waiting and self.pool.busy == 0

    def ticket(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> _Ticket:
        """A job's place in this lane; a job that could fail inside the shared admission (and so
        take its neighbours with it) is refused here, on its own."""
        rows, model, real = job.x.shape[0], self.model, self.np_dtype
        if tuple(job.x.shape[1:]) != model.input_shape or not job.x.is_floating_point():
            raise ValueError(f"input must be float (B, {model.input_shape}), got {job.x.shape}")
        if job.z0 is not None and tuple(job.z0.shape) != (rows, *model.state_shape):
            raise ValueError(f"z0 must be (B, {model.state_shape}), got {tuple(job.z0.shape)}")
        ticket = _Ticket(
            job=job,
            future=future,
            tol=per_sample(job, "tol", self.defaults["tol"], self.dtype),
            max_iter=per_sample(job, "max_iter", self.defaults["max_iter"], torch.int64),
            y=np.empty((rows, *model.output_shape), dtype=real),
            z=np.empty((rows, *model.state_shape), dtype=real),
            iterations=np.empty(rows, dtype=np.int64),
            residual=np.empty(rows, dtype=real),
            status=np.empty(rows, dtype=np.int64),
            limit=_limit(job),
        )
        if not (np.isfinite(ticket.tol).all() and (ticket.tol > 0).all()):
            raise ValueError("every sample needs a finite tol > 0 in the serving dtype")
        if not (ticket.max_iter >= 1).all():
            raise ValueError("every sample needs max_iter >= 1")
        return ticket

    def admit(self) -> None:
        """FIFO: fill free slots from the head of the queue, one batched injection for all."""
        chunks: list[tuple[_Ticket, int, int]] = []
        free, now = self.pool.free, time.monotonic()
        while self.waiting and free:
            ticket = self.waiting[0]
            if ticket.admitted == 0 and ticket.future.done():  # the caller left while queued
                self.waiting.popleft()
                self._drop(ticket)
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
            return
        x = torch.cat([t.job.x[s : s + k] for t, s, k in chunks]).to(self.device, self.dtype)
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

    def _drop(self, ticket: _Ticket) -> None:
        """A request whose caller left before it got a slot: no compute, its samples CANCELLED
        with 0 iterations (so the per-sample metrics still count them)."""
        ticket.y.fill(0)
        ticket.z.fill(0)
        ticket.iterations.fill(0)
        ticket.residual.fill(np.inf)
        ticket.status.fill(int(Status.CANCELLED))
        self._complete(ticket, 0)

    def _should_stop(self, owners: Iterable[tuple[_Ticket, int] | None]) -> Tensor | None:
        now = time.monotonic()
        verdicts = {t: v for t in self.active if (v := _verdict(t.job, t.limit, now))}
        if not verdicts:
            return None
        per_slot = [verdicts.get(o[0], 0) if o is not None else 0 for o in owners]
        return torch.tensor(per_slot, dtype=torch.int64)

    def turn(self) -> list[_Ticket]:
        """Admit, step once, deliver retired samples; returns the requests that completed."""
        self.admit()
        busy = self.pool.busy
        if busy == 0:
            return []
        if self._on_batch is not None:
            self._on_batch(self.name, busy)
        with torch.no_grad():
            retired = self.pool.step(self._should_stop)
            if retired is None:
                return []
            y_t = self.model.head(retired.z)
            status_t = nonfinite_outputs(y_t, retired.status)
            y = y_t.cpu().numpy()
        z, iterations = retired.z.cpu().numpy(), retired.iterations.cpu().numpy()
        residual, status = retired.residual.cpu().numpy(), status_t.cpu().numpy()
        groups: dict[_Ticket, tuple[list[int], list[int]]] = {}
        for pos, (ticket, sample) in enumerate(retired.owners):
            positions, samples = groups.setdefault(ticket, ([], []))
            positions.append(pos)
            samples.append(sample)
        finished = []
        for ticket, (positions, samples) in groups.items():
            ticket.y[samples] = y[positions]
            ticket.z[samples] = z[positions]
            ticket.iterations[samples] = iterations[positions]
            ticket.residual[samples] = residual[positions]
            ticket.status[samples] = status[positions]
            ticket.done += len(samples)
            if ticket.done == ticket.rows:
                del self.active[ticket]
                finished.append(ticket)
        if self.idle:
            self.idle_since = time.monotonic()
        return [self._complete(t, busy) for t in finished]

    def _complete(self, ticket: _Ticket, busy: int) -> _Ticket:
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
        outcome = SolveOutcome(y, result, started - ticket.job.submitted, now - started, busy)
        ticket.outcome = outcome
        report(ticket.job, outcome)
        return ticket

    def fail(self, exc: BaseException) -> list[_Ticket]:
        """Every request of the lane, for failing them all after an error."""
        tickets = list(self.active) + [t for t in self.waiting if t not in self.active]
        self.active.clear()
        self.waiting.clear()
        for ticket in tickets:
            ticket.error = exc
        return tickets


Delivery = tuple[asyncio.Future[SolveOutcome], SolveOutcome | None, BaseException | None]


def _deliver(items: list[Delivery]) -> None:
    """On the event loop: resolve the futures of finished requests (callers that left are skipped)."""
    for future, outcome, error in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]


@dataclass
class _Inbox:
    """Jobs handed from the event loop to the solver thread."""

    items: list[tuple[SolveJob, asyncio.Future[SolveOutcome]]] = field(default_factory=list)
    closed: bool = False


class ContinuousScheduler:
    """Iteration-level batching on one solver thread, `slots` rows per lane (see module doc).

    `on_batch(model_name, busy_slots)` is called once per solver step (for deq_batch_size).
    """

    def __init__(
        self,
        slots: int = 256,
        max_batch: int = 1024,
        on_batch: BatchObserver | None = None,
        compile_step: bool = False,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self._slots = slots
        self._compile = compile_step
        self._on_batch = on_batch
        self._fallback = RequestScheduler(
            workers=1, max_batch=max_batch, on_batch=on_batch, compile_step=compile_step
        )
        self._inbox = _Inbox()
        self._cond = threading.Condition()
        self._lanes: dict[tuple[Any, ...], _Lane] = {}
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="deq-continuous", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return self._pending + self._fallback.pending()

    async def submit(self, job: SolveJob) -> SolveOutcome:
        method = job.solver.get("method") or job.model.solver_defaults["method"]
        if not getattr(METHODS.get(method), "SLOTTED", False):
            return await self._fallback.submit(job)
        if not self._thread.is_alive():
            raise RuntimeError("the scheduler's solver thread is not running")
        future: asyncio.Future[SolveOutcome] = asyncio.get_running_loop().create_future()
        self._pending += 1
        try:
            with self._cond:
                if self._inbox.closed:
                    raise RuntimeError("the scheduler is closed")
                self._inbox.items.append((job, future))
                self._cond.notify()
            return await future
        finally:
            self._pending -= 1

    def _route(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> Delivery | None:
        """Queue a job on its lane (made on first use); a job that cannot be queued fails."""
        try:
            key = batch_key(job)
            lane = self._lanes.get(key)
            if lane is None or lane.source() is not job.model:
                lane = self._lanes[key] = _Lane(job, self._slots, self._on_batch, self._compile)
            lane.waiting.append(lane.ticket(job, future))
        except Exception as exc:
            return (future, None, exc)
        return None

    def _wait_for_work(self) -> list[tuple[SolveJob, asyncio.Future[SolveOutcome]]] | None:
        """New jobs (possibly none while lanes are busy); None when closed."""
        with self._cond:
            while not self._inbox.items and not self._inbox.closed:
                if any(not lane.idle for lane in self._lanes.values()):
                    break
                self._cond.wait(timeout=1.0 if self._lanes else None)
                self._drop_idle_lanes()
            if self._inbox.closed:
                return None
            items, self._inbox.items = self._inbox.items, []
            return items

    def _drop_idle_lanes(self) -> None:
        now = time.monotonic()
        for key, lane in list(self._lanes.items()):
            if lane.idle and (lane.source() is None or now - lane.idle_since >= IDLE_LANE_SECONDS):
                del self._lanes[key]

    def _run(self) -> None:
        checked = time.monotonic()
        while (items := self._wait_for_work()) is not None:
            if time.monotonic() - checked > 1.0:  # under load the thread never waits: check here
                self._drop_idle_lanes()
                checked = time.monotonic()
            done: list[Delivery] = []
            for job, future in items:
                if (failed := self._route(job, future)) is not None:
                    done.append(failed)
            for key, lane in list(self._lanes.items()):
                try:
                    finished = lane.turn()
                except Exception as exc:  # a bug or a bad model: fail its requests, keep serving
                    finished = lane.fail(exc)
                    del self._lanes[key]
                done += [(t.future, t.outcome, t.error) for t in finished]
            self._send(done)
        closed = RuntimeError("the scheduler is closed")
        leftover = [(future, None, closed) for _, future in self._inbox.items]
        for lane in self._lanes.values():
            leftover += [(t.future, None, closed) for t in lane.fail(closed)]
        self._send(leftover)

    @staticmethod
    def _send(done: list[Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        for item in done:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    async def close(self) -> None:
        with self._cond:
            self._inbox.closed = True
            self._cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        await self._fallback.close()
