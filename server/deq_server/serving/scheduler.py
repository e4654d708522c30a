"""What every scheduler shares: the job a servicer submits, the outcome it gets back, the lane
protocol the engine drives, and the rules of a batch (its key, per-sample settings, stop hook).

All solving runs on one engine thread (engine.py) that steps every lane once per turn: a
`SlotLane` (slot_lane.py, iteration-level batching) or a `BatchLane` (batch_lane.py,
request-level batching). Cancellation and deadlines reach the solver every iteration, so a
caller that gives up stops costing compute within one iteration. Lanes solve with each model's
`frozen()` inference copy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from deq_server.core import DEQModel, Progress, SolveResult, Status

log = logging.getLogger("deq_server.scheduler")


class CancelFlag:
    """A one-way flag the event loop sets and the engine thread reads once per iteration:
    `threading.Event`'s `set` and `is_set` without its condition and lock, which cost more than
    the rest of a job's construction. Setting an attribute is atomic, and a reader that sees it
    one iteration late stops one iteration later."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


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
    cancelled: CancelFlag = field(default_factory=CancelFlag)
    submitted: float = field(default_factory=time.monotonic)
    # The served name, for metrics labels.
    model_name: str = ""
    # Per-sample facts are recorded where they are born, in bulk: see `SolveRecorder`.
    on_solved: SolveRecorder | None = None


@dataclass
class SolveOutcome:
    """The head's output, the per-sample solve report and where the time went."""

    y: Tensor
    result: SolveResult
    queue_seconds: float
    solve_seconds: float
    batch_rows: int


# A job's `on_solved`: called on the engine thread once per engine turn with the outcomes of the
# jobs naming it (equal recorders share the call) that finished in that turn, those whose caller
# has gone included. One call per turn, not per request: recording costs per call.
SolveRecorder = Callable[[list[SolveOutcome]], None]


class Scheduler(Protocol):
    """What the servicers need (`engine.Engine` in either mode)."""

    async def submit(self, job: SolveJob) -> SolveOutcome: ...

    def pending(self) -> int: ...

    async def close(self) -> None: ...


@dataclass(eq=False, kw_only=True)
class Ticket:
    """One request inside a lane: where its outcome goes, and its stop instant."""

    job: SolveJob
    future: asyncio.Future[SolveOutcome]
    limit: float | None
    tol: np.ndarray  # (rows,) in the serving dtype
    max_iter: np.ndarray  # (rows,) int64
    outcome: SolveOutcome | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.job.x.shape[0])


class Lane(Protocol):
    """A queue of compatible requests (one `batch_key`) and the solver work for them. The engine
    thread alone calls these; `turn` advances the lane's solving by one iteration."""

    source: weakref.ref[DEQModel]  # the served version; a lane of an unloaded one is dropped
    idle_since: float

    @property
    def idle(self) -> bool: ...

    def queue(self, job: SolveJob, future: asyncio.Future[SolveOutcome]) -> None:
        """Take a request, or raise (before it joins anything) if it could fail its batch."""

    def turn(self) -> list[Ticket]:
        """Admit waiting requests, step once; the requests that completed."""

    def fail(self, exc: BaseException) -> list[Ticket]:
        """Every request of the lane, with `exc` as its error."""


def limit_of(job: SolveJob) -> float | None:
    limits = [t for t in (job.deadline, job.budget_deadline) if t is not None]
    return min(limits) if limits else None


def verdict(job: SolveJob, limit: float | None, now: float) -> int:
    """The status that stops a job's samples now, or RUNNING (0)."""
    if job.cancelled.is_set():
        return int(Status.CANCELLED)
    if limit is not None and now >= limit:
        return int(Status.DEADLINE)
    return 0


def check_shapes(job: SolveJob, model: DEQModel) -> None:
    """Refuse a job whose input or warm start does not fit the model, before it joins a batch
    where its failure would fail its neighbours."""
    rows = job.x.shape[0] if job.x.dim() else 0
    if rows == 0:
        raise ValueError("a request needs at least one sample")
    if tuple(job.x.shape[1:]) != model.input_shape or not job.x.is_floating_point():
        raise ValueError(f"input must be float (B, {model.input_shape}), got {job.x.shape}")
    if job.z0 is not None and tuple(job.z0.shape) != (rows, *model.state_shape):
        raise ValueError(f"z0 must be (B, {model.state_shape}), got {tuple(job.z0.shape)}")


def unstarted(job: SolveJob, model: DEQModel) -> SolveOutcome:
    """The outcome of a request whose caller left before it was solved: no compute, every sample
    CANCELLED with 0 iterations (so the per-sample metrics still count them)."""
    rows, ref = job.x.shape[0], next(model.parameters())
    z = torch.zeros(rows, *model.state_shape, dtype=ref.dtype)
    result = SolveResult(
        z=z,
        iterations=torch.zeros(rows, dtype=torch.int64),
        residual=torch.full((rows,), float("inf"), dtype=ref.dtype),
        status=torch.full((rows,), int(Status.CANCELLED), dtype=torch.int64),
        steps=0,
    )
    y = torch.zeros(rows, *model.output_shape, dtype=ref.dtype)
    return SolveOutcome(y, result, time.monotonic() - job.submitted, 0.0, 0)


def stop_hook(jobs: list[SolveJob], sizes: list[int]) -> Any:
    """The solver hook that turns each job's cancellation and deadline into its rows' statuses.

    Job i holds the next `sizes[i]` rows of the batch. Host work per iteration: one check per
    job; the rows' job numbers are made only once some job stops.
    """
    limits = [limit_of(job) for job in jobs]
    row_job: Tensor | None = None

    def should_stop(progress: Progress) -> Tensor | None:
        nonlocal row_job
        now = time.monotonic()
        verdicts = [verdict(job, limit, now) for job, limit in zip(jobs, limits, strict=True)]
        if not any(verdicts):
            return None
        device = progress.active.device
        if row_job is None:
            row_job = torch.from_numpy(np.repeat(np.arange(len(jobs)), sizes)).to(device)
        per_job = torch.tensor(verdicts, dtype=torch.int64, device=device)
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


# The solver settings each sample has its own of; a batch shares all the others.
PER_SAMPLE = ("tol", "max_iter")


def shared_settings(job: SolveJob) -> dict[str, Any]:
    """The settings a batch must share (all but the per-sample tol and max_iter), with the
    model's defaults filled in: a request naming the default method batches with one that
    names none."""
    options = job.model.solver_options(**job.solver)
    return {k: v for k, v in options.items() if k not in PER_SAMPLE}


_KEYS: weakref.WeakKeyDictionary[DEQModel, dict[tuple[Any, ...], tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


def batch_key(job: SolveJob) -> tuple[Any, ...]:
    """Jobs with equal keys can share one solve (or one slot pool): same model version and
    shared settings. Cached per model and request settings (requests repeat them)."""
    asked = tuple(sorted((k, v) for k, v in job.solver.items() if k not in ("tol", "max_iter")))
    try:
        keys = _KEYS.get(job.model)
        if keys is None:
            keys = _KEYS[job.model] = {}
        key = keys.get(asked)
    except TypeError:  # an unhashable setting (a list, say): no cache, keyed by its text
        return (id(job.model), tuple(sorted((k, repr(v)) for k, v in shared_settings(job).items())))
    if key is None:
        key = (id(job.model), tuple(sorted(shared_settings(job).items())))
        if len(keys) < 64:  # distinct settings are few; a flood of odd ones is not kept
            keys[asked] = key
    return key


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """numpy's twin of a torch dtype (cached: asking torch costs a tensor per call)."""
    return torch.empty((), dtype=dtype).numpy().dtype


@functools.cache
def _float_max(kind: np.dtype[Any]) -> float:
    return float(np.finfo(kind).max)


def host_cat(tensors: list[Tensor]) -> Tensor:
    """torch.cat for many small host tensors, through numpy (torch.cat costs ~15 us a piece
    here, numpy ~0.2 us); other tensors go to torch.cat."""
    if len(tensors) == 1:
        return tensors[0]
    if all(t.device.type == "cpu" and not t.requires_grad for t in tensors):
        return torch.from_numpy(np.concatenate([t.numpy() for t in tensors]))
    return torch.cat(tensors)


def per_sample(job: SolveJob, key: str, default: Any, dtype: torch.dtype) -> np.ndarray:
    """A job's scalar or per-sample setting as one host value per sample, in `dtype`.

    Float settings are clamped to the dtype's range: a tolerance of 1e300 means "stop at once",
    not an overflow to inf in float32.
    """
    value = job.solver.get(key, default)
    kind = numpy_dtype(dtype)
    if isinstance(value, Tensor):
        out = value.detach().cpu().double().numpy()
        if dtype.is_floating_point:
            out = np.minimum(out, _float_max(kind))
        return out.astype(kind)
    if dtype.is_floating_point:
        value = min(value, _float_max(kind))  # NaN stays NaN (min keeps the first)
    return np.full(job.x.shape[0], value, dtype=kind)


def ticket_settings(
    job: SolveJob, model: DEQModel, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """A job's per-sample tolerances (in the model's dtype) and caps, refused alone (ValueError)
    when a shape does not fit, a tolerance is not finite and > 0 in that dtype (1e-50 is 0 in
    float32) or a cap is below 1: checked once per value when it is one scalar (the usual case).
    `dtype` is the model's (passed in: asking the model walks its modules)."""
    check_shapes(job, model)
    defaults, rows = model.solver_defaults, job.x.shape[0]
    tol = per_sample(job, "tol", defaults["tol"], dtype)
    max_iter = per_sample(job, "max_iter", defaults["max_iter"], torch.int64)
    if tol.shape != (rows,) or max_iter.shape != (rows,):
        raise ValueError(f"per-sample tol and max_iter must have shape ({rows},)")
    if isinstance(job.solver.get("tol"), Tensor):
        good = bool(np.isfinite(tol).all() and (tol > 0).all())
    else:  # one value for all: one check in Python
        good = 0.0 < float(tol[0]) < math.inf
    if not good:
        raise ValueError("every sample needs a finite tol > 0 in the serving dtype")
    if isinstance(job.solver.get("max_iter"), Tensor):
        good = bool((max_iter >= 1).all())
    else:
        good = int(max_iter[0]) >= 1
    if not good:
        raise ValueError("every sample needs max_iter >= 1")
    return tol, max_iter


def report(tickets: Iterable[Ticket]) -> None:
    """Give each recorder the outcomes of its jobs among `tickets` in one call (tickets without
    an outcome, failed ones, are skipped): a failing callback must not cost the callers their
    answers."""
    groups: dict[object, tuple[SolveRecorder, list[SolveOutcome]]] = {}
    for ticket in tickets:
        recorder = ticket.job.on_solved
        if ticket.outcome is not None and recorder is not None:
            groups.setdefault(_group_key(recorder), (recorder, []))[1].append(ticket.outcome)
    for recorder, outcomes in groups.values():
        try:
            recorder(outcomes)
        except Exception:
            log.exception("on_solved callback failed")


def _group_key(recorder: SolveRecorder) -> object:
    """Equal recorders share a call; one that cannot be hashed (a plain dataclass, say) is its
    own group, never an error on the engine thread."""
    try:
        hash(recorder)
    except TypeError:
        return ("unhashable", id(recorder))
    return recorder
