"""All solving goes through a scheduler: `submit(job)` returns an awaitable per-request outcome.

`RequestScheduler` is the first implementation: each request is solved on its own on a worker
thread (never on the event loop). Cancellation and deadlines reach the solver through its
per-iteration hook, so a caller that gives up stops costing compute within one iteration.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from deq_server.core import DEQModel, Progress, SolveResult, Status


@dataclass
class SolveJob:
    """One request's solve: the model, its input, solver options and when to give up.

    `deadline` and `budget_deadline` are `time.monotonic()` instants (None = none); either one
    stops the remaining samples with status DEADLINE. `cancelled` stops them with CANCELLED.
    """

    model: DEQModel
    x: Tensor
    solver: dict[str, Any]
    z0: Tensor | None = None
    deadline: float | None = None
    budget_deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class SolveOutcome:
    """The head's output, the per-sample solve report and where the time went."""

    y: Tensor
    result: SolveResult
    queue_seconds: float
    solve_seconds: float


class Scheduler(Protocol):
    """What the servicers need; the continuous-batching scheduler implements the same."""

    async def submit(self, job: SolveJob) -> SolveOutcome: ...

    def pending(self) -> int: ...

    async def close(self) -> None: ...


def stop_hook(job: SolveJob) -> Any:
    """The solver hook that turns cancellation and deadlines into per-sample statuses."""
    limits = [t for t in (job.deadline, job.budget_deadline) if t is not None]
    first_limit = min(limits) if limits else None

    def should_stop(progress: Progress) -> Tensor | None:
        if job.cancelled.is_set():
            return torch.full_like(progress.active, int(Status.CANCELLED))
        if first_limit is not None and time.monotonic() >= first_limit:
            return torch.full_like(progress.active, int(Status.DEADLINE))
        return None

    return should_stop


def run_job(job: SolveJob) -> SolveOutcome:
    """Solve one job on the calling thread."""
    start = time.monotonic()
    with torch.no_grad():
        y, result = job.model(job.x, z0=job.z0, should_stop=stop_hook(job), **job.solver)
    return SolveOutcome(
        y=y,
        result=result,
        queue_seconds=start - job.submitted,
        solve_seconds=time.monotonic() - start,
    )


class RequestScheduler:
    """Each request solved alone on one of `workers` threads, in arrival order."""

    def __init__(self, workers: int = 1) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deq-solver")
        self._pending = 0

    async def submit(self, job: SolveJob) -> SolveOutcome:
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, run_job, job)
        finally:
            self._pending -= 1

    def pending(self) -> int:
        return self._pending

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
