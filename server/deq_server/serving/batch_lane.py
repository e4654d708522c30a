"""Request-level batching: requests that queue while a batch is solving are solved together.

A `BatchLane` serves one model version and method setting. When it has room for a batch it takes
the queued requests, FIFO, up to `max_batch` rows (the first one whatever its size), and solves
them as one `BatchSolve`: per-row tolerances and caps, so each sample still retires at its own,
but the batch answers when its slowest sample retires. The engine steps the batch one iteration
per turn, so a long batch never holds up the other lanes. Every method can run here (broyden,
whose state is not row-local, runs only here). With `--compile-step` (by default on a CPU with a
C++ compiler) a lane runs its iterations as one compiled program once `compiled_step` has built
it (eagerly until then).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deq_server.core import BatchSolve, SolveResult, nonfinite_outputs

from .compiled_step import compile_iteration, ready
from .scheduler import (
    PER_SAMPLE,
    SolveJob,
    SolveOutcome,
    Ticket,
    frozen,
    host_cat,
    limit_of,
    shared_settings,
    stop_hook,
    ticket_settings,
    unstarted,
)

BatchObserver = Callable[[str, int], None]


@dataclass
class _Batch:
    """Requests being solved together, and their solve."""

    tickets: list[Ticket]
    run: BatchSolve
    start: float


class BatchLane:
    """Request-level batches for one model version and method setting: at most `batches` solving
    at once (a second starts while the first runs), each stepped once per engine turn.

    `on_batch(model_name, rows)` is called once per batch (for deq_batch_size)."""

    def __init__(
        self,
        job: SolveJob,
        max_batch: int,
        batches: int,
        on_batch: BatchObserver | None,
        compile_step: bool,
    ) -> None:
        self.source = weakref.ref(job.model)
        self.model = frozen(job.model)
        self.name = job.model_name
        self._shared = shared_settings(job)
        ref = next(self.model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self._max_batch, self._batches = max_batch, batches
        self._on_batch = on_batch
        # --compile-step: this lane's iteration as one compiled program, built in the background;
        # only for the model's own solver settings, so that requests naming other ones (method
        # options, stop mode) cannot make the server compile for each of them
        defaults = {k: v for k, v in job.model.solver_options().items() if k not in PER_SAMPLE}
        self._iteration = (
            compile_iteration(job.model, self.model, self.name, self._shared, max_batch)
            if compile_step and self._shared == defaults
            else None
        )
        self.waiting: deque[Ticket] = deque()
        self.solving: list[_Batch] = []
        self.idle_since = time.monotonic()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.solving

    def queue(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> None:
        tol, max_iter = ticket_settings(job, self.model, self.dtype)
        self.waiting.append(
            Ticket(job=job, future=future, limit=limit_of(job), tol=tol, max_iter=max_iter)
        )

    def turn(self) -> list[Ticket]:
        finished: list[Ticket] = []
        if len(self.solving) < self._batches and self.waiting:
            finished += self._start()
        for batch in list(self.solving):
            try:
                batch.run.step()
                if batch.run.done:
                    self.solving.remove(batch)
                    finished += self._finish(batch)
            except Exception as exc:  # this batch's requests get the error, not the lane's
                if batch in self.solving:
                    self.solving.remove(batch)
                for ticket in batch.tickets:
                    ticket.error = exc
                finished += batch.tickets
        if self.idle:
            self.idle_since = time.monotonic()
        return finished

    def _take(self) -> tuple[list[Ticket], list[Ticket]]:
        """The next batch, FIFO up to max_batch rows, and the requests whose caller left."""
        batch: list[Ticket] = []
        dropped: list[Ticket] = []
        rows = 0
        while self.waiting:
            ticket = self.waiting[0]
            if ticket.future.done():
                self.waiting.popleft()
                ticket.outcome = unstarted(ticket.job, self.model)
                dropped.append(ticket)
                continue
            if batch and rows + ticket.rows > self._max_batch:
                break
            batch.append(self.waiting.popleft())
            rows += ticket.rows
        return batch, dropped

    def _start(self) -> list[Ticket]:
        tickets, dropped = self._take()
        if tickets:
            try:
                self.solving.append(self._batch(tickets))
            except Exception as exc:  # e.g. the model's injection: this batch fails, not the lane
                for ticket in tickets:
                    ticket.error = exc
                dropped += tickets
        return dropped

    def _batch(self, tickets: list[Ticket]) -> _Batch:
        start = time.monotonic()
        model, device, jobs = self.model, self.device, [t.job for t in tickets]
        # Host<->device copies happen here, on the engine thread, never on the event loop.
        x = host_cat([job.x for job in jobs]).to(device, self.dtype)
        sizes = [ticket.rows for ticket in tickets]
        if self._on_batch is not None:
            self._on_batch(self.name, x.shape[0])
        solver: dict[str, Any] = dict(self._shared)
        solver["tol"] = torch.from_numpy(np.concatenate([t.tol for t in tickets])).to(device)
        solver["max_iter"] = torch.from_numpy(np.concatenate([t.max_iter for t in tickets])).to(
            device
        )
        if all(job.z0 is None for job in jobs):
            z0 = model.init_state(x)
        else:
            z0 = torch.cat(
                [
                    job.z0.to(device, self.dtype) if job.z0 is not None else model.init_state(job.x)
                    for job in jobs
                ]
            )
        with torch.no_grad():
            inj = model.inject(x)
        run = BatchSolve(
            model.cell,
            z0,
            args=(inj,),
            should_stop=stop_hook(jobs, sizes),
            iteration=ready(self._iteration),
            **solver,
        )
        return _Batch(tickets, run, start)

    def _finish(self, batch: _Batch) -> list[Ticket]:
        result = batch.run.result()
        with torch.no_grad():
            y = self.model.head(result.z)
            status = nonfinite_outputs(y, result.status)
        solve_seconds, rows = time.monotonic() - batch.start, result.z.shape[0]
        # each tensor cut into the requests' rows by one split (views), not a slice per request
        sizes = [ticket.rows for ticket in batch.tickets]
        parts = zip(
            *(
                t.cpu().split(sizes)
                for t in (y, result.z, result.iterations, result.residual, status)
            ),
            strict=True,
        )
        for ticket, (y_part, z, iterations, residual, status_part) in zip(
            batch.tickets, parts, strict=True
        ):
            piece = SolveResult(z, iterations, residual, status_part, result.steps)
            queued = batch.start - ticket.job.submitted
            ticket.outcome = SolveOutcome(y_part, piece, queued, solve_seconds, rows)
        return batch.tickets

    def fail(self, exc: BaseException) -> list[Ticket]:
        tickets = [t for batch in self.solving for t in batch.tickets] + list(self.waiting)
        self.solving.clear()
        self.waiting.clear()
        for ticket in tickets:
            ticket.error = exc
        return tickets
