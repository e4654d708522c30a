"""All solving goes through a scheduler: `submit(job)` returns an awaitable per-request outcome.

`RequestScheduler` batches at request level on worker threads (never on the event loop): a batch
runs until its slowest sample retires. `ContinuousScheduler` (continuous.py, the default) batches
at iteration level. In both, cancellation and deadlines reach the solver every iteration, so a
caller that gives up stops costing compute within one iteration. Both solve with each model's
`frozen()` inference copy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from deq_server.core import DEQModel, Progress, SolveResult, Status

log = logging.getLogger("deq_server.scheduler")


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
    # The served name, for metrics labels.
    model_name: str = ""
    # Called on the solver thread with the job's outcome, even when its caller has gone:
    # per-sample facts are recorded where they are born.
    on_solved: Callable[[SolveOutcome], None] | None = None


@dataclass
class SolveOutcome:
    """The head's output, the per-sample solve report and where the time went."""

    y: Tensor
    result: SolveResult
    queue_seconds: float
    solve_seconds: float
    batch_rows: int


class Scheduler(Protocol):
    """What the servicers need: `RequestScheduler` here, `ContinuousScheduler` in continuous.py."""

    async def submit(self, job: SolveJob) -> SolveOutcome: ...

    def pending(self) -> int: ...

    async def close(self) -> None: ...


def _limit(job: SolveJob) -> float | None:
    limits = [t for t in (job.deadline, job.budget_deadline) if t is not None]
    return min(limits) if limits else None


def _verdict(job: SolveJob, limit: float | None, now: float) -> int:
    """The status that stops a job's samples now, or RUNNING (0)."""
    if job.cancelled.is_set():
        return int(Status.CANCELLED)
    if limit is not None and now >= limit:
        return int(Status.DEADLINE)
    return 0


def stop_hook(jobs: list[SolveJob], row_job: Tensor) -> Any:
    """The solver hook that turns each job's cancellation and deadline into its rows' statuses.

    `row_job[i]` is the index in `jobs` of batch row i. Host work per iteration: one check per job.
    """
    limits = [_limit(job) for job in jobs]

    def should_stop(progress: Progress) -> Tensor | None:
        now = time.monotonic()
        verdicts = [_verdict(job, limit, now) for job, limit in zip(jobs, limits, strict=True)]
        if not any(verdicts):
            return None
        per_job = torch.tensor(verdicts, dtype=torch.int64, device=progress.active.device)
        return per_job[row_job[progress.active]]

    return should_stop


_FROZEN: weakref.WeakKeyDictionary[DEQModel, DEQModel] = weakref.WeakKeyDictionary()
_FROZEN_LOCK = threading.Lock()


def frozen(model: DEQModel) -> DEQModel:
    """The model's inference copy (`DEQModel.frozen`), made once per served model object."""
    with _FROZEN_LOCK:
        copy = _FROZEN.get(model)
        if copy is None:
            copy = _FROZEN[model] = model.frozen()
        return copy


def shared_settings(job: SolveJob) -> dict[str, Any]:
    """The settings a batch must share (all but the per-sample tol and max_iter), with the
    model's defaults filled in: a request naming the default method batches with one that
    names none."""
    options = job.model.solver_options(**job.solver)
    return {k: v for k, v in options.items() if k not in ("tol", "max_iter")}


def batch_key(job: SolveJob) -> tuple[Any, ...]:
    """Jobs with equal keys can share one solve (or one slot pool): same model version and
    shared settings."""
    return (id(job.model), tuple(sorted(shared_settings(job).items())))


def per_sample(job: SolveJob, key: str, default: Any, dtype: torch.dtype) -> np.ndarray:
    """A job's scalar or per-sample setting as one host value per sample, in `dtype`.

    Float settings are clamped to the dtype's range: a tolerance of 1e300 means "stop at once",
    not an overflow to inf in float32.
    """
    value = job.solver.get(key, default)
    if isinstance(value, Tensor):
        out = value.detach().cpu().double().numpy()
    else:
        out = np.full(job.x.shape[0], value, dtype=np.float64)
    kind = torch.empty((), dtype=dtype).numpy().dtype
    if dtype.is_floating_point:
        out = np.minimum(out, np.finfo(kind).max)
    return out.astype(kind)


def _per_row(
    jobs: list[SolveJob], key: str, default: Any, dtype: torch.dtype, device: Any
) -> Tensor:
    """One value per batch row, from each job's scalar or per-sample setting."""
    rows = np.concatenate([per_sample(job, key, default, dtype) for job in jobs])
    return torch.from_numpy(rows).to(device)


def run_batch(
    jobs: list[SolveJob],
    on_batch: Callable[[str, int], None] | None = None,
    compile: bool = False,
) -> list[SolveOutcome]:
    """Solve compatible jobs as one batch (per-row tolerances and caps) on the calling thread.

    `on_batch(model_name, rows)` is called once per batch (for deq_batch_size); `compile`
    solves with torch.compile'd iterations.
    """
    start = time.monotonic()
    model = frozen(jobs[0].model)
    defaults = model.solver_defaults
    device = next(model.parameters()).device
    # Host<->device copies happen here, on the solver thread, never on the event loop.
    x = torch.cat([job.x for job in jobs]).to(device)
    sizes = [job.x.shape[0] for job in jobs]
    row_job = torch.repeat_interleave(
        torch.arange(len(jobs), device=device), torch.tensor(sizes, device=device)
    )
    if on_batch is not None:
        on_batch(jobs[0].model_name, x.shape[0])
    solver = shared_settings(jobs[0])
    solver["tol"] = _per_row(jobs, "tol", defaults["tol"], x.dtype, device)
    solver["max_iter"] = _per_row(jobs, "max_iter", defaults["max_iter"], torch.int64, device)
    z0 = None
    if any(job.z0 is not None for job in jobs):
        z0 = torch.cat(
            [job.z0.to(device) if job.z0 is not None else model.init_state(job.x) for job in jobs]
        )
    with torch.no_grad():
        y, result = model(x, z0=z0, should_stop=stop_hook(jobs, row_job), compile=compile, **solver)
    y, z = y.cpu(), result.z.cpu()
    iterations, residual, status = (
        result.iterations.cpu(),
        result.residual.cpu(),
        result.status.cpu(),
    )
    solve_seconds = time.monotonic() - start
    outcomes, offset = [], 0
    for job, rows in zip(jobs, sizes, strict=True):
        part = slice(offset, offset + rows)
        offset += rows
        piece = SolveResult(
            z=z[part],
            iterations=iterations[part],
            residual=residual[part],
            status=status[part],
            steps=result.steps,
        )
        outcome = SolveOutcome(y[part], piece, start - job.submitted, solve_seconds, x.shape[0])
        report(job, outcome)
        outcomes.append(outcome)
    return outcomes


def report(job: SolveJob, outcome: SolveOutcome) -> None:
    """Run the job's `on_solved`: a failing metrics callback must not cost the caller (or the
    batch's other callers) their answers."""
    if job.on_solved is not None:
        try:
            job.on_solved(outcome)
        except Exception:
            log.exception("on_solved callback failed")


def _fail(futures: list[asyncio.Future[SolveOutcome]]) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(RuntimeError("the scheduler is closed"))


class RequestScheduler:
    """Request-level batching: requests that queue while the solver is busy are solved together.

    Compatible requests (same model version and method settings; tolerances and caps may differ)
    are concatenated into one batch of at most `max_batch` rows; each sample still retires at its
    own tolerance, and the batch returns when its slowest sample retires. `workers` batches may be
    in the solver at once, each on its own thread.
    """

    def __init__(
        self,
        workers: int = 1,
        max_batch: int = 256,
        on_batch: Callable[[str, int], None] | None = None,
        compile_step: bool = False,
    ) -> None:
        self._on_batch = on_batch
        self._compile = compile_step
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deq-solver")
        self._workers = workers
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[SolveJob, asyncio.Future[SolveOutcome]]] | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._pending = 0

    def _start(self) -> asyncio.Queue[tuple[SolveJob, asyncio.Future[SolveOutcome]]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._runners = [asyncio.create_task(self._run()) for _ in range(self._workers)]
        return self._queue

    async def submit(self, job: SolveJob) -> SolveOutcome:
        future: asyncio.Future[SolveOutcome] = asyncio.get_running_loop().create_future()
        self._pending += 1
        try:
            await self._start().put((job, future))
            return await future
        finally:
            self._pending -= 1

    def pending(self) -> int:
        return self._pending

    def _take_batch(
        self, first: tuple[SolveJob, asyncio.Future[SolveOutcome]]
    ) -> list[tuple[SolveJob, asyncio.Future[SolveOutcome]]]:
        """The first job plus queued compatible ones, FIFO, up to max_batch rows."""
        assert self._queue is not None
        batch, rows, later = [first], first[0].x.shape[0], []
        key = batch_key(first[0])
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if batch_key(item[0]) == key and rows + item[0].x.shape[0] <= self._max_batch:
                batch.append(item)
                rows += item[0].x.shape[0]
            else:
                later.append(item)
        for item in later:  # keep their order for the next batch
            self._queue.put_nowait(item)
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [
                item for item in self._take_batch(await self._queue.get()) if not item[1].done()
            ]
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, run_batch, [j for j, _ in batch], self._on_batch, self._compile
                )
            except asyncio.CancelledError:  # close(): nobody will finish this batch
                _fail([future for _, future in batch])
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)

    async def close(self) -> None:
        """Stop: queued and running requests fail with RuntimeError (none is left hanging)."""
        for runner in self._runners:
            runner.cancel()
        if self._queue is not None:
            while not self._queue.empty():
                _fail([self._queue.get_nowait()[1]])
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
