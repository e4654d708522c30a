"""Request checks that run before any allocation; each failure names the field and expectation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import METHODS, STOP_MODES, name_of
from deq_server.core import DEQModel

from . import tensors
from .config import ServerConfig
from .errors import invalid

MAX_TOL = 1e30  # representable in float32: larger tolerances are surely typos


def _check_tol(field: str, value: float, floor: float) -> None:
    if not math.isfinite(value) or not 0 < value <= MAX_TOL:
        raise invalid(field, f"a number in (0, {MAX_TOL:g}]", value)
    if value < floor:
        raise invalid(field, f">= the server's floor {floor:g}", value)


def _name(field: str, value: int, table: Mapping[str, int]) -> str:
    """The wire name of a set enum value; an unknown number is refused, listing the names."""
    name = name_of(table, value)
    if name is None:
        raise invalid(field, f"one of {sorted(table)}", value)
    return name


def solver_options(opts: pb.SolverOptions, batch: int, config: ServerConfig) -> dict[str, Any]:
    """Per-call solver keyword arguments for `DEQModel.__call__` (unset = model default)."""
    out: dict[str, Any] = {}
    if opts.sample_tol:
        if len(opts.sample_tol) != batch:
            raise invalid(
                "solver.sample_tol", f"{batch} values (one per sample)", len(opts.sample_tol)
            )
        for i, value in enumerate(opts.sample_tol):
            _check_tol(f"solver.sample_tol[{i}]", value, config.min_tol)
        out["tol"] = torch.tensor(list(opts.sample_tol), dtype=torch.float64)
    elif opts.HasField("tol"):
        _check_tol("solver.tol", opts.tol, config.min_tol)
        out["tol"] = opts.tol
    if opts.HasField("max_iter"):
        if not 1 <= opts.max_iter <= config.max_iter_cap:
            raise invalid("solver.max_iter", f"1..{config.max_iter_cap}", opts.max_iter)
        out["max_iter"] = opts.max_iter
    if opts.method != pb.SOLVER_METHOD_UNSPECIFIED:
        out["method"] = _name("solver.method", opts.method, METHODS)
    if opts.stop_mode != pb.STOP_MODE_UNSPECIFIED:
        out["stop_mode"] = _name("solver.stop_mode", opts.stop_mode, STOP_MODES)
    if opts.HasField("budget_ms") and not (math.isfinite(opts.budget_ms) and opts.budget_ms > 0):
        raise invalid("solver.budget_ms", "a finite number > 0", opts.budget_ms)
    return out


def batch_tensor(
    t: pb.Tensor, field: str, sample_shape: tuple[int, ...], config: ServerConfig
) -> torch.Tensor:
    """A float batch shaped (B, *sample_shape), 1 <= B <= max_batch, all finite."""
    if not t.shape:
        raise invalid(field, f"a tensor shaped [B, {', '.join(map(str, sample_shape))}]", "nothing")
    x = tensors.decode(t, field, max_elements=config.max_batch * math.prod(sample_shape))
    if tuple(x.shape[1:]) != sample_shape:
        expected = f"shape [B, {', '.join(map(str, sample_shape))}]"
        raise invalid(f"{field}.shape", expected, list(x.shape))
    if not 1 <= x.shape[0] <= config.max_batch:
        raise invalid(f"{field}.shape[0]", f"a batch of 1..{config.max_batch}", x.shape[0])
    if not x.is_floating_point():
        raise invalid(f"{field}.dtype", "a floating type", t.dtype)
    if not bool(torch.isfinite(x).all()):
        raise invalid(f"{field}.data", "finite values", "NaN or Inf")
    return x


def model_inputs(
    request: pb.InferRequest, model: DEQModel, config: ServerConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The request's input batch and optional warm start, checked against the model."""
    x = batch_tensor(request.input, "input", model.input_shape, config)
    z0 = None
    if request.HasField("initial_state") and request.initial_state.shape:
        z0 = batch_tensor(request.initial_state, "initial_state", model.state_shape, config)
        if z0.shape[0] != x.shape[0]:
            raise invalid("initial_state.shape[0]", f"the input's batch {x.shape[0]}", z0.shape[0])
    return x, z0


def cast(x: torch.Tensor, dtype: torch.dtype, field: str) -> torch.Tensor:
    """`x` in the serving dtype, refused if a narrowing cast overflowed values to Inf.

    `x` was checked finite on arrival, so only a change of dtype needs another look.
    """
    if x.dtype == dtype:
        return x
    y = x.to(dtype=dtype)
    if not bool(torch.isfinite(y).all()):
        raise invalid(field, f"values within the {dtype} range", "values that overflow it")
    return y
