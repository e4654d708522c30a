"""The engine: one solver thread that drives every lane, in either scheduling mode.

The event loop hands jobs over (`submit`); the engine thread routes each to the lane of its
`batch_key` (made on first use), then turns every lane once per loop: admit, one solver iteration,
deliver what completed back to the caller's event loop. A lane is a `SlotLane` (iteration-level
batching) or a `BatchLane` (request-level batching); the mode decides which:

- `ContinuousScheduler`: slot lanes for row-local methods, batch lanes for the others (broyden);
- `RequestScheduler`: batch lanes for every method.

Because every lane advances one iteration per turn, no batch (a long broyden solve, say) holds up
the others, and a lone request on an idle engine starts solving as soon as the thread wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deq_server.core import METHODS

from .batch_lane import BatchLane
from .scheduler import (
    Lane,
    SolveJob,
    SolveOutcome,
    Ticket,
    batch_key,
    report,
    shared_settings,
)
from .slot_lane import SlotLane

log = logging.getLogger("deq_server.engine")

# An idle lane (nothing solving, nobody waiting) is dropped after this long; its buffers go with it.
IDLE_LANE_SECONDS = 30.0

BatchObserver = Callable[[str, int], None]
Delivery = tuple[asyncio.Future[SolveOutcome], SolveOutcome | None, BaseException | None]
Job = tuple[SolveJob, asyncio.Future[SolveOutcome]]


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
    """Jobs handed from the event loop to the engine thread."""

    items: list[Job] = field(default_factory=list)
    closed: bool = False


class Engine:
    """One engine thread and its lanes (see the module doc); implements `Scheduler`.

    `slotted`: row-local methods get slot lanes of `slots` rows (else batch lanes of at most
    `max_batch` rows, `batches` of them solving at once per lane). `on_batch(model, rows)`: per
    slot step (busy slots) or per request-level batch (its rows), for deq_batch_size.
    """

    def __init__(
        self,
        *,
        slotted: bool,
        slots: int = 256,
        max_batch: int = 1024,
        batches: int = 1,
        on_batch: BatchObserver | None = None,
        compile_step: bool = False,
    ) -> None:
        if slots < 1 or max_batch < 1 or batches < 1:
            raise ValueError(
                f"slots, max_batch and batches must be >= 1, got {slots}, {max_batch}, {batches}"
            )
        self._slotted = slotted
        self._slots, self._max_batch, self._batches = slots, max_batch, batches
        self._compile = compile_step
        self._on_batch = on_batch
        self._inbox = _Inbox()
        self._cond = threading.Condition()
        self._lanes: dict[tuple[Any, ...], Lane] = {}
        # jobs submitted during the current event-loop iteration, per loop (see submit)
        self._outboxes: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="deq-engine", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        """Requests submitted and not yet answered."""
        return self._pending

    async def submit(self, job: SolveJob) -> SolveOutcome:
        """Solve `job` (queued with the jobs submitted in the same event-loop iteration: they
        reach the engine together, so requests that arrive together are batched together)."""
        if not self._thread.is_alive():
            raise RuntimeError("the scheduler's engine thread is not running")
        if self._inbox.closed:
            raise RuntimeError("the scheduler is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SolveOutcome] = loop.create_future()
        self._pending += 1
        try:
            outbox = self._outboxes.setdefault(loop, [])
            outbox.append((job, future))
            if len(outbox) == 1:
                loop.call_soon(self._flush, loop)
            return await future
        finally:
            self._pending -= 1

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: hand this iteration's jobs to the engine, one lock and one wake-up
        for all of them."""
        items = self._outboxes.pop(loop, [])
        if not items:
            return
        with self._cond:
            if self._inbox.closed:
                closed = RuntimeError("the scheduler is closed")
                _deliver([(future, None, closed) for _, future in items])
                return
            self._inbox.items += items
            self._cond.notify()

    def _lane(self, job: SolveJob) -> Lane:
        method = shared_settings(job)["method"]
        if self._slotted and getattr(METHODS.get(method), "SLOTTED", False):
            return SlotLane(job, self._slots, self._on_batch, self._compile)
        return BatchLane(job, self._max_batch, self._batches, self._on_batch, self._compile)

    def _route(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> Delivery | None:
        """Queue a job on its lane (made on first use); a job that cannot be queued fails."""
        try:
            key = batch_key(job)
            lane = self._lanes.get(key)
            if lane is None or lane.source() is not job.model:
                lane = self._lanes[key] = self._lane(job)
            lane.queue(job, future)
        except Exception as exc:
            return (future, None, exc)
        return None

    def _wait_for_work(self) -> list[Job] | None:
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
        try:
            # Inference mode, not just no_grad: no version counters or view tracking, about a
            # fifth less per torch call on small batches; what the engine makes never needs
            # autograd (Train solves on its own thread).
            with torch.inference_mode():
                self._serve()
        finally:  # however the loop ended, nobody is left waiting
            with self._cond:
                self._inbox.closed = True
                leftover, self._inbox.items = self._inbox.items, []
            closed = RuntimeError("the scheduler is closed")
            failed: list[Delivery] = [(future, None, closed) for _, future in leftover]
            for lane in self._lanes.values():
                with contextlib.suppress(Exception):
                    failed += [(t.future, None, closed) for t in lane.fail(closed)]
            self._lanes.clear()
            self._send(failed)

    def _serve(self) -> None:
        checked = time.monotonic()
        while (items := self._wait_for_work()) is not None:
            if time.monotonic() - checked > 1.0:  # under load the thread never waits: check here
                self._drop_idle_lanes()
                checked = time.monotonic()
            done: list[Delivery] = []
            for job, future in items:
                if (failed := self._route(job, future)) is not None:
                    done.append(failed)
            finished: list[Ticket] = []
            for key, lane in list(self._lanes.items()):
                try:
                    finished += lane.turn()
                except Exception as exc:  # a bug or a bad model: fail its requests, keep serving
                    log.exception("a solver lane failed; its requests get the error")
                    finished += lane.fail(exc)
                    del self._lanes[key]
            report(finished)  # the turn's metrics in bulk, before the callers see their answers
            done += [(t.future, t.outcome, t.error) for t in finished]
            self._send(done)

    @staticmethod
    def _send(done: list[Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        for item in done:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    async def close(self) -> None:
        """Stop: queued and solving requests fail with RuntimeError (none is left hanging)."""
        self._flush(asyncio.get_running_loop())  # this iteration's jobs: failed with the rest
        with self._cond:
            self._inbox.closed = True
            self._cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


class ContinuousScheduler(Engine):
    """Iteration-level batching: slot lanes of `slots` rows, batch lanes for broyden."""

    def __init__(
        self,
        slots: int = 256,
        max_batch: int = 1024,
        on_batch: BatchObserver | None = None,
        compile_step: bool = False,
    ) -> None:
        super().__init__(
            slotted=True, slots=slots, max_batch=max_batch, on_batch=on_batch,
            compile_step=compile_step,
        )  # fmt: skip


class RequestScheduler(Engine):
    """Request-level batching for every method: batches of at most `max_batch` rows, `workers`
    of them solving at once per lane (interleaved on the one engine thread)."""

    def __init__(
        self,
        workers: int = 1,
        max_batch: int = 256,
        on_batch: BatchObserver | None = None,
        compile_step: bool = False,
    ) -> None:
        super().__init__(
            slotted=False, max_batch=max_batch, batches=workers, on_batch=on_batch,
            compile_step=compile_step,
        )  # fmt: skip
