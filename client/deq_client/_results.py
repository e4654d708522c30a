"""What the SDK returns: responses decoded from the protos into numpy arrays and plain values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt

from deq_client._errors import DEQError, MalformedResponseError, status_code
from deq_client._requests import InferOptions
from deq_client._tensor import dtype_name, from_proto
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import METHODS, STATUSES, STOP_MODES, name_of


def status_name(value: int) -> str:
    """``"CONVERGED"`` for ``SAMPLE_STATUS_CONVERGED``; values this SDK does not know read ``"UNKNOWN_7"``."""
    return name_of(STATUSES, value) or f"UNKNOWN_{value}"


@dataclass(frozen=True)
class Timings:
    """Server-side durations of one request, in seconds."""

    queue_seconds: float
    solve_seconds: float
    total_seconds: float


@dataclass(frozen=True, eq=False)
class InferResult:
    """The output of one ``infer`` call and an honest per-sample report of the solve.

    ``iterations``, ``residual`` and ``status`` hold one entry per sample; ``status`` holds
    ``SampleStatus`` values (1 CONVERGED, 2 MAX_ITER, 3 DIVERGED, 4 NONFINITE, 5 DEADLINE,
    6 CANCELLED) and ``status_names`` their names. Non-convergence is not an error.
    """

    output: npt.NDArray[Any]
    iterations: npt.NDArray[np.int64]
    residual: npt.NDArray[np.float64]
    status: npt.NDArray[np.int64]
    status_names: list[str]
    model_version: str
    timings: Timings
    state: npt.NDArray[Any] | None = None

    @property
    def converged(self) -> npt.NDArray[np.bool_]:
        """Per sample: whether the residual met the tolerance."""
        converged: npt.NDArray[np.bool_] = self.status == pb.SAMPLE_STATUS_CONVERGED
        return converged

    @classmethod
    def from_proto(cls, response: pb.InferResponse) -> InferResult:
        """Decodes an ``InferResponse``; a malformed tensor raises ``MalformedResponseError``."""
        if not response.HasField("output"):
            raise MalformedResponseError("InferResponse.output: missing")
        timings = response.timings
        return cls(
            output=from_proto(response.output, "InferResponse.output"),
            iterations=np.array(response.iterations, dtype=np.int64),
            residual=np.array(response.residual, dtype=np.float64),
            status=np.array(response.status, dtype=np.int64),
            status_names=[status_name(value) for value in response.status],
            model_version=response.model_version,
            timings=Timings(timings.queue_seconds, timings.solve_seconds, timings.total_seconds),
            state=(
                from_proto(response.state, "InferResponse.state")
                if response.HasField("state")
                else None
            ),
        )


def solver_defaults(options: pb.SolverOptions) -> InferOptions:
    """The set fields of ``SolverOptions`` under ``infer``'s keyword names.

    So ``client.infer(name, x, **info.solver_defaults)`` repeats the model's defaults.
    """
    defaults: InferOptions = {}
    if options.sample_tol:
        defaults["tol"] = list(options.sample_tol)
    elif options.HasField("tol"):
        defaults["tol"] = options.tol
    if options.HasField("max_iter"):
        defaults["max_iter"] = options.max_iter
    method, stop_mode = name_of(METHODS, options.method), name_of(STOP_MODES, options.stop_mode)
    if method is not None:
        defaults["method"] = method  # type: ignore[typeddict-item]
    if stop_mode is not None:
        defaults["stop_mode"] = stop_mode  # type: ignore[typeddict-item]
    if options.allow_partial:
        defaults["allow_partial"] = True
    if options.HasField("budget_ms"):
        defaults["budget_ms"] = options.budget_ms
    return defaults


@dataclass(frozen=True)
class ModelInfo:
    """A served model: versions, config, per-sample shapes, solver defaults, device, dtype."""

    name: str
    versions: list[str]
    latest_version: str
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    state_shape: tuple[int, ...]
    solver_defaults: InferOptions
    device: str
    dtype: str
    training: bool

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> ModelInfo:
        """Decodes a ``ModelInfo``; ``config_json`` must be a JSON object (or empty)."""
        try:
            config = json.loads(info.config_json) if info.config_json else {}
        except json.JSONDecodeError as error:
            raise MalformedResponseError(
                f"ModelInfo.config_json: not valid JSON: {error}"
            ) from error
        if not isinstance(config, dict):
            raise MalformedResponseError("ModelInfo.config_json: expected a JSON object")
        return cls(
            name=info.name,
            versions=list(info.versions),
            latest_version=info.latest_version,
            config=config,
            input_shape=tuple(info.input_shape),
            output_shape=tuple(info.output_shape),
            state_shape=tuple(info.state_shape),
            solver_defaults=solver_defaults(info.solver_defaults),
            device=info.device,
            dtype=dtype_name(info.dtype),
            training=info.training,
        )


@dataclass(frozen=True)
class TrainEvent:
    """One event of a Train stream: an optimizer step (``kind == "step"``) or the commit.

    Step events fill the step fields (``step`` .. ``skip_reason``); the final ``"committed"``
    event fills ``model``, ``version`` and ``steps`` (skipped steps excluded). Fields of the other
    kind are ``None``.
    """

    kind: Literal["step", "committed"]
    step: int | None = None
    loss: float | None = None
    grad_norm: float | None = None
    forward_iterations_mean: float | None = None
    forward_iterations_max: int | None = None
    backward_iterations_mean: float | None = None
    backward_iterations_max: int | None = None
    forward_residual_max: float | None = None
    backward_residual_max: float | None = None
    samples_per_second: float | None = None
    skipped: bool = False
    skip_reason: str = ""
    model: str | None = None
    version: str | None = None
    steps: int | None = None

    @classmethod
    def from_proto(cls, response: pb.TrainResponse) -> TrainEvent:
        """Decodes a ``TrainResponse``; an empty event raises ``MalformedResponseError``."""
        which = response.WhichOneof("event")
        if which == "step":
            s = response.step
            return cls(
                kind="step",
                step=s.step,
                loss=s.loss,
                grad_norm=s.grad_norm,
                forward_iterations_mean=s.forward_iterations_mean,
                forward_iterations_max=s.forward_iterations_max,
                backward_iterations_mean=s.backward_iterations_mean,
                backward_iterations_max=s.backward_iterations_max,
                forward_residual_max=s.forward_residual_max,
                backward_residual_max=s.backward_residual_max,
                samples_per_second=s.samples_per_second,
                skipped=s.skipped,
                skip_reason=s.skip_reason,
            )
        if which == "committed":
            c = response.committed
            return cls(kind="committed", model=c.model, version=c.version, steps=c.steps)
        raise MalformedResponseError("TrainResponse.event: empty (neither step nor committed)")


class InOrder:
    """Puts ``InferStream`` responses back in request order (ids are positions: "0", "1", ...).

    ``push`` returns the items that became ready: an ``InferResult``, or the ``DEQError`` (with
    ``request_id``) of a failed request, which the client raises when the caller reaches it.
    ``finish`` checks that every sent request was answered.
    """

    def __init__(self) -> None:
        self._waiting: dict[int, pb.InferStreamResponse] = {}
        self._next = 0

    def push(self, response: pb.InferStreamResponse) -> list[InferResult | DEQError]:
        """Files one response; returns the items now ready, in request order."""
        try:
            index = int(response.request_id)
        except ValueError:
            index = -1
        if index < self._next or index in self._waiting:
            raise DEQError(
                grpc.StatusCode.INTERNAL,
                f"InferStream answered an unknown or repeated request id {response.request_id!r}",
            )
        self._waiting[index] = response
        ready: list[InferResult | DEQError] = []
        while self._next in self._waiting:
            item = self._waiting.pop(self._next)
            self._next += 1
            if item.error_code:
                code = status_code(item.error_code)
                ready.append(DEQError(code, item.error_message, item.request_id))
            else:
                ready.append(InferResult.from_proto(item.response))
        return ready

    def finish(self, sent: int) -> None:
        """Raises ``DEQError`` when the stream ended before answering all ``sent`` requests."""
        if self._next < sent:
            raise DEQError(
                grpc.StatusCode.INTERNAL,
                f"InferStream ended after {self._next} of {sent} responses",
            )
