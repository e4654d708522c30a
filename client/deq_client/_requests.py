"""The one request builder of the SDK, shared by ``DEQClient`` and ``AsyncDEQClient``.

Everything a caller passes is validated here, before any RPC, and mapped onto the protos; errors
name the argument (or config key) and the values it accepts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar

import numpy as np

from deq_client._errors import InvalidArgumentError, InvalidArgumentTypeError
from deq_client._tensor import TensorLike, as_numpy, dtype_name, to_proto
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import (
    GRADIENT_MODES,
    LOSSES,
    METHODS,
    OPTIMIZERS,
    STOP_MODES,
    Method,
    StopMode,
)

_UINT32_MAX = 2**32 - 1


class InferOptions(TypedDict, total=False):
    """The keyword options of ``infer`` / ``infer_many`` (see ``infer_request``)."""

    version: str | None
    tol: float | Sequence[float] | TensorLike | None
    max_iter: int | None
    method: Method | None
    stop_mode: StopMode | None
    allow_partial: bool
    budget_ms: float | None
    initial_state: TensorLike | None
    return_state: bool


TRAIN_CONFIG_KEYS = frozenset(
    {
        "version",
        "optimizer",
        "learning_rate",
        "weight_decay",
        "momentum",
        "loss",
        "gradient_mode",
        "backward_tol",
        "backward_max_iter",
        "tol",
        "max_iter",
        "method",
        "stop_mode",
        "max_grad_norm",
        "jacobian_reg_weight",
        "max_steps",
        "publish_as",
    }
)
"""The keys a ``train`` config may hold; ``loss`` and ``learning_rate`` are required."""
_TRAIN_REQUIRED = ("loss", "learning_rate")


E = TypeVar("E", bound=int)


def _choice(field: str, value: object, choices: Mapping[str, E]) -> E:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(name) for name in choices)
        raise InvalidArgumentError(f"{field}: unknown value {value!r}; expected one of {valid}")
    return choices[value]


def _real(field: str, value: object, *, minimum: float, strict: bool) -> float:
    """A finite float ``> minimum`` (``strict``) or ``>= minimum``; bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentTypeError(f"{field}: expected a number, got {type(value).__name__}")
    number = float(value)
    ok = number > minimum if strict else number >= minimum
    if not (math.isfinite(number) and ok):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise InvalidArgumentError(f"{field}: must be finite and {bound}, got {number!r}")
    return number


def _count(field: str, value: object, *, minimum: int) -> int:
    """An int in ``[minimum, 2**32 - 1]`` (the proto's uint32); bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentTypeError(f"{field}: expected an int, got {type(value).__name__}")
    number = int(value)
    if not minimum <= number <= _UINT32_MAX:
        raise InvalidArgumentError(f"{field}: must be in [{minimum}, {_UINT32_MAX}], got {number}")
    return number


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidArgumentTypeError(f"{field}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _text(field: str, value: object, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentTypeError(f"{field}: expected a string, got {type(value).__name__}")
    if not (allow_empty or value):
        raise InvalidArgumentError(f"{field}: must not be empty")
    return value


def solver_options(
    *,
    tol: object = None,
    max_iter: object = None,
    method: object = None,
    stop_mode: object = None,
    allow_partial: object = False,
    budget_ms: object = None,
    batch: int | None = None,
) -> pb.SolverOptions:
    """Validates and maps solver options; a sequence/array ``tol`` becomes ``sample_tol``.

    ``batch`` is the batch size per-sample tolerances must match (``None``: not checked).
    """
    options = pb.SolverOptions(allow_partial=_flag("allow_partial", allow_partial))
    if tol is not None:
        values, _ = as_numpy(tol, "tol")  # type: ignore[arg-type]
        if values.ndim == 0:
            options.tol = _real("tol", values.item(), minimum=0.0, strict=True)
        else:
            if values.ndim != 1 or values.dtype.kind not in "iuf":
                raise InvalidArgumentError(
                    f"tol: expected a number or a 1-D sequence of numbers, got shape {values.shape} of {values.dtype}"
                )
            if batch is not None and values.shape[0] != batch:
                raise InvalidArgumentError(
                    f"tol: {values.shape[0]} per-sample tolerances for a batch of {batch}"
                )
            floats = values.astype(np.float64)
            if not (np.isfinite(floats).all() and (floats > 0).all()):
                raise InvalidArgumentError("tol: every per-sample tolerance must be finite and > 0")
            options.sample_tol.extend(floats.tolist())
    if max_iter is not None:
        options.max_iter = _count("max_iter", max_iter, minimum=1)
    if method is not None:
        options.method = _choice("method", method, METHODS)
    if stop_mode is not None:
        options.stop_mode = _choice("stop_mode", stop_mode, STOP_MODES)
    if budget_ms is not None:
        options.budget_ms = _real("budget_ms", budget_ms, minimum=0.0, strict=True)
    return options


def infer_request(
    model: str,
    x: TensorLike,
    *,
    version: str | None = None,
    tol: float | Sequence[float] | TensorLike | None = None,
    max_iter: int | None = None,
    method: Method | None = None,
    stop_mode: StopMode | None = None,
    allow_partial: bool = False,
    budget_ms: float | None = None,
    initial_state: TensorLike | None = None,
    return_state: bool = False,
) -> pb.InferRequest:
    """Builds an ``InferRequest`` for the batch ``x`` (batch first).

    Args:
        model: The model name.
        x: The input batch: a numpy array, nested sequence or torch tensor, batch first.
        version: A published version to pin; ``None`` means the latest.
        tol: The tolerance, > 0: one float for every sample, or one per sample (``sample_tol``).
        max_iter: The iteration cap per sample.
        method: ``"picard"``, ``"anderson"`` or ``"broyden"``; ``None`` uses the model's default.
        stop_mode: ``"abs"`` or ``"rel"``; ``None`` uses the model's default.
        allow_partial: Answer with the best iterates (status DEADLINE) when the deadline comes
            first instead of failing with DEADLINE_EXCEEDED.
        budget_ms: A latency budget in milliseconds.
        initial_state: A warm start for the fixed-point state, batch first.
        return_state: Whether the response carries the fixed-point state.

    Raises:
        DEQError: code INVALID_ARGUMENT, before any RPC; also a ``ValueError`` (a value out of
            range, an unknown string, an unsupported tensor) or a ``TypeError`` (a wrong type).
    """
    tensor = to_proto(x, "x")
    if not tensor.shape:
        raise InvalidArgumentError(
            "x: expected a batch-first array with at least one dimension, got a scalar"
        )
    batch = tensor.shape[0]
    request = pb.InferRequest(
        model=_text("model", model, allow_empty=False),
        input=tensor,
        solver=solver_options(
            tol=tol,
            max_iter=max_iter,
            method=method,
            stop_mode=stop_mode,
            allow_partial=allow_partial,
            budget_ms=budget_ms,
            batch=batch,
        ),
        return_state=_flag("return_state", return_state),
    )
    if version is not None:
        request.version = _text("version", version)
    if initial_state is not None:
        state = to_proto(initial_state, "initial_state")
        if not state.shape or state.shape[0] != batch:
            raise InvalidArgumentError(
                f"initial_state: batch dimension must be {batch} like x, got shape {list(state.shape)}"
            )
        request.initial_state.CopyFrom(state)
    return request


def check_infer_options(options: InferOptions) -> None:
    """Validates everything in ``options`` that does not depend on a batch (before a stream)."""
    unknown = set(options) - set(InferOptions.__annotations__)
    if unknown:
        raise InvalidArgumentTypeError(
            f"unknown infer options {sorted(unknown)}; expected {sorted(InferOptions.__annotations__)}"
        )
    solver_options(
        tol=options.get("tol"),
        max_iter=options.get("max_iter"),
        method=options.get("method"),
        stop_mode=options.get("stop_mode"),
        allow_partial=options.get("allow_partial", False),
        budget_ms=options.get("budget_ms"),
    )
    _flag("return_state", options.get("return_state", False))
    if options.get("version") is not None:
        _text("version", options.get("version"))


def infer_stream_request(
    request_id: int, model: str, x: TensorLike, options: InferOptions
) -> pb.InferStreamRequest:
    """One ``InferStreamRequest``; ids are the item's position in the stream, as a string."""
    return pb.InferStreamRequest(
        request_id=str(request_id), request=infer_request(model, x, **options)
    )


def infer_stream_requests(
    model: str, xs: Iterable[TensorLike], options: InferOptions
) -> Iterator[pb.InferStreamRequest]:
    """The InferStream requests for ``xs``, converted lazily as gRPC sends them."""
    for index, x in enumerate(xs):
        yield infer_stream_request(index, model, x, options)


def train_config(model: str, config: Mapping[str, Any]) -> pb.TrainRequest:
    """The first message of a Train stream: the session config.

    ``config`` keys are those of ``TRAIN_CONFIG_KEYS``: optimizer (adam|adamw|sgd), learning_rate,
    weight_decay, momentum, loss (mse|cross_entropy), gradient_mode (ift|phantom|jfb),
    backward_tol, backward_max_iter, the forward solver's tol / max_iter / method / stop_mode,
    max_grad_norm, jacobian_reg_weight, max_steps, publish_as, and version (to start from).

    Raises:
        DEQError: code INVALID_ARGUMENT, before any RPC; also a ``TypeError`` (an unknown or
            missing key, a wrong type) or a ``ValueError`` (out of range, an unknown string).
    """
    unknown = set(config) - TRAIN_CONFIG_KEYS
    if unknown:
        raise InvalidArgumentTypeError(
            f"train config: unknown keys {sorted(unknown)}; expected some of {sorted(TRAIN_CONFIG_KEYS)}"
        )
    missing = [key for key in _TRAIN_REQUIRED if config.get(key) is None]
    if missing:
        raise InvalidArgumentTypeError(f"train config: missing required keys {missing}")
    message = pb.TrainConfig(
        model=_text("model", model, allow_empty=False),
        loss=_choice("loss", config["loss"], LOSSES),
        learning_rate=_real("learning_rate", config["learning_rate"], minimum=0.0, strict=True),
        solver=solver_options(
            tol=config.get("tol"),
            max_iter=config.get("max_iter"),
            method=config.get("method"),
            stop_mode=config.get("stop_mode"),
        ),
    )
    if message.solver.sample_tol:
        raise InvalidArgumentError("tol: training takes one tolerance, not per-sample tolerances")
    get = config.get
    if get("version") is not None:
        message.version = _text("version", config["version"])
    if get("optimizer") is not None:
        message.optimizer = _choice("optimizer", config["optimizer"], OPTIMIZERS)
    if get("gradient_mode") is not None:
        message.gradient_mode = _choice("gradient_mode", config["gradient_mode"], GRADIENT_MODES)
    if get("weight_decay") is not None:
        message.weight_decay = _real(
            "weight_decay", config["weight_decay"], minimum=0.0, strict=False
        )
    if get("momentum") is not None:
        message.momentum = _real("momentum", config["momentum"], minimum=0.0, strict=False)
    if get("backward_tol") is not None:
        message.backward_tol = _real(
            "backward_tol", config["backward_tol"], minimum=0.0, strict=True
        )
    if get("backward_max_iter") is not None:
        message.backward_max_iter = _count(
            "backward_max_iter", config["backward_max_iter"], minimum=1
        )
    if get("max_grad_norm") is not None:
        message.max_grad_norm = _real(
            "max_grad_norm", config["max_grad_norm"], minimum=0.0, strict=True
        )
    if get("jacobian_reg_weight") is not None:
        message.jacobian_reg_weight = _real(
            "jacobian_reg_weight", config["jacobian_reg_weight"], minimum=0.0, strict=False
        )
    if get("max_steps") is not None:
        message.max_steps = _count("max_steps", config["max_steps"], minimum=0)
    if get("publish_as") is not None:
        message.publish_as = _text("publish_as", config["publish_as"])
    return pb.TrainRequest(config=message)


def train_batch(index: int, batch: object, loss: int) -> pb.TrainRequest:
    """One batch message; ``batch`` is an ``(inputs, targets)`` pair, ``index`` names it in errors.

    Targets are checked against the loss: int64 classes of shape (batch,) for cross-entropy,
    floats for MSE.
    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise InvalidArgumentTypeError(
            f"batch {index}: expected an (inputs, targets) pair, got {type(batch).__name__}"
        )
    inputs = to_proto(batch[0], f"batch {index} inputs")
    targets = to_proto(batch[1], f"batch {index} targets")
    if not inputs.shape or not targets.shape or inputs.shape[0] != targets.shape[0]:
        raise InvalidArgumentError(
            f"batch {index}: inputs {list(inputs.shape)} and targets {list(targets.shape)} "
            "must share the batch (first) dimension"
        )
    if loss == pb.LOSS_CROSS_ENTROPY and (
        targets.dtype != pb.DATA_TYPE_INT64 or len(targets.shape) != 1
    ):
        raise InvalidArgumentError(
            f"batch {index} targets: cross_entropy takes int64 class labels of shape (batch,), "
            f"got {dtype_name(targets.dtype)} of shape {list(targets.shape)}"
        )
    if loss == pb.LOSS_MSE and targets.dtype == pb.DATA_TYPE_INT64:
        raise InvalidArgumentError(
            f"batch {index} targets: mse takes float targets shaped like the output, got int64"
        )
    return pb.TrainRequest(batch=pb.TrainBatch(inputs=inputs, targets=targets))


def train_requests(
    model: str, batches: Iterable[tuple[TensorLike, TensorLike]], config: Mapping[str, Any]
) -> Iterator[pb.TrainRequest]:
    """The Train stream: the config (validated now, before any RPC), then one message per batch.

    Batches are converted lazily, as gRPC sends them; exhausting ``batches`` half-closes the
    stream, which commits the session.
    """
    first = train_config(model, config)

    def stream() -> Iterator[pb.TrainRequest]:
        yield first
        for index, batch in enumerate(batches):
            yield train_batch(index, batch, first.config.loss)

    return stream()
