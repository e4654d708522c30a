"""The one data plane: `Infer`, `InferStream` and OIP `ModelInfer` decode into an `InferCall`,
and `Inference.run` answers it with an `Answer` that each protocol encodes its own way.

Validation happens here, once, on the request's bytes with numpy (no torch work on the event
loop); the solver gets owned arrays in the serving dtype, viewed as tensors without a copy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from deq_server.core import Status

from . import validate
from .config import ServerConfig
from .errors import DeadlineExceededError, ResourceExhaustedError, code_of, invalid
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler, SolveJob, SolveOutcome
from .tensors import WireTensor


@dataclass(frozen=True)
class InferCall:
    """One inference request, as any protocol hands it over: decoded, not yet checked."""

    model: str
    version: str
    input: WireTensor
    solver: validate.SolverRequest
    initial_state: WireTensor | None = None
    return_state: bool = False


@dataclass(frozen=True)
class Answer:
    """What an inference produced, in host memory: the head's output and the states as the
    model made them (torch: an exported model may answer in bfloat16, which numpy lacks), the
    per-sample report as arrays, and where the time went."""

    version: str
    output: torch.Tensor
    state: torch.Tensor | None
    iterations: np.ndarray
    residual: np.ndarray
    status: np.ndarray
    queue_seconds: float
    solve_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class _Recorder:
    """A job's `on_solved`: the forward-solve metrics of one model and method. Equal recorders
    share a call, so the engine records all of a turn's requests of a model at once."""

    metrics: Metrics
    model: str
    method: str

    def __call__(self, outcomes: list[SolveOutcome]) -> None:  # on the engine thread
        results = [outcome.result for outcome in outcomes]
        self.metrics.record_solves(self.model, self.method, "forward", results)
        queued = np.fromiter((o.queue_seconds for o in outcomes), np.float64, len(outcomes))
        self.metrics.model(self.model).queued(queued)


def deadline_margin(time_remaining: float) -> float:
    """How long before the caller's deadline to stop, so that a partial answer still reaches it:
    a tenth of the time left, at least 5 ms and at most 50 ms (head, encoding, a busy loop)."""
    return min(max(0.1 * time_remaining, 0.005), 0.05)


class Inference:
    """Answers InferCalls through the registry and the scheduler, counting each in the metrics."""

    def __init__(
        self, registry: Registry, scheduler: Scheduler, metrics: Metrics, config: ServerConfig
    ) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics
        self.config = config
        self._np_dtype = torch.empty((), dtype=registry.dtype).numpy().dtype
        # one recorder per model and method, not one per request (the engine groups by them)
        self._recorders: dict[tuple[str, str], _Recorder] = {}

    async def run(self, call: InferCall, time_remaining: float | None) -> Answer:
        """`_run` plus the request counter and latency histogram, for every protocol."""
        start, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return await self._run(call, time_remaining, start)
        except BaseException as exc:
            code = code_of(exc)
            raise
        finally:
            # Unknown names share one label value: clients must not mint new series.
            label = call.model if call.model in self.registry.models else "unknown"
            self.metrics.model(label).request_done(code.name, time.monotonic() - start)

    def _inputs(
        self, call: InferCall, sample: tuple[int, ...], state: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The input batch and optional warm start, checked and cast to the serving dtype."""
        x = validate.batch_array(call.input, "input", sample, self.config)
        x = validate.cast_array(x, self._np_dtype, "input.data")
        z0 = None
        if call.initial_state is not None and call.initial_state.shape:
            z0 = validate.batch_array(call.initial_state, "initial_state", state, self.config)
            if z0.shape[0] != x.shape[0]:
                raise invalid(
                    "initial_state.shape[0]", f"the input's batch {x.shape[0]}", z0.shape[0]
                )
            z0 = validate.cast_array(z0, self._np_dtype, "initial_state.data")
        return x, z0

    def _recorder(self, model: str, method: str) -> _Recorder:
        recorder = self._recorders.get((model, method))
        if recorder is None:
            if len(self._recorders) >= 1024:  # models come and go: never grow without bound
                self._recorders.clear()
            recorder = self._recorders[model, method] = _Recorder(self.metrics, model, method)
        return recorder

    async def _run(self, call: InferCall, time_remaining: float | None, received: float) -> Answer:
        name = call.model
        _, version = self.registry.resolve(name, call.version)
        pending = self.scheduler.pending()
        if pending >= self.config.max_queue:
            raise ResourceExhaustedError(
                f"{pending} requests are queued (--max-queue {self.config.max_queue}); retry later"
            )
        model = version.model
        x, z0 = self._inputs(call, model.input_shape, model.state_shape)
        solver = validate.solver_settings(call.solver, x.shape[0], self.config)
        deadline = None
        if time_remaining is not None:
            deadline = received + max(time_remaining - deadline_margin(time_remaining), 0.0)
        budget = None
        if call.solver.budget_ms is not None:
            budget = received + call.solver.budget_ms / 1e3
        method = solver.get("method", model.solver_defaults["method"])
        job = SolveJob(
            model=model,
            x=torch.from_numpy(x),  # views of owned arrays: no copy
            solver=solver,
            z0=None if z0 is None else torch.from_numpy(z0),
            deadline=deadline,
            budget_deadline=budget,
            submitted=received,
            model_name=name,
            on_solved=self._recorder(name, method),
        )
        series = self.metrics.model(name)
        series.in_flight += 1
        try:
            outcome = await self.scheduler.submit(job)
        except asyncio.CancelledError:
            job.cancelled.set()  # the caller left: stop the solve within one iteration
            raise
        finally:
            series.in_flight -= 1
        result = outcome.result
        status = result.status.numpy()
        hit_deadline = deadline is not None and time.monotonic() >= deadline
        if hit_deadline and (status == Status.DEADLINE).any() and not call.solver.allow_partial:
            raise DeadlineExceededError(
                "deadline reached before every sample converged; set allow_partial for the "
                "best iterates with status DEADLINE"
            )
        return Answer(
            version=version.version,
            output=outcome.y,
            state=result.z if call.return_state else None,
            iterations=result.iterations.numpy(),
            residual=result.residual.numpy().astype(np.float64),
            status=status,
            queue_seconds=outcome.queue_seconds,
            solve_seconds=outcome.solve_seconds,
            total_seconds=time.monotonic() - received,
        )
