"""Request checks that run before any allocation; each failure names the field and expectation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import METHODS, STOP_MODES, name_of

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


@dataclass(frozen=True)
class SolverRequest:
    """A request's solver settings as its protocol carried them, names already decoded, not
    yet checked (None: unset, the model's default)."""

    tol: float | None = None
    sample_tol: tuple[float, ...] = ()
    max_iter: int | None = None
    method: str | None = None
    stop_mode: str | None = None
    budget_ms: float | None = None
    allow_partial: bool = False

    @classmethod
    def of(cls, opts: pb.SolverOptions) -> SolverRequest:
        """From deq.v1 SolverOptions (an unknown enum number is refused, listing the names)."""
        return cls(
            tol=opts.tol if opts.HasField("tol") else None,
            sample_tol=tuple(opts.sample_tol),
            max_iter=opts.max_iter if opts.HasField("max_iter") else None,
            method=_name("solver.method", opts.method, METHODS) if opts.method else None,
            stop_mode=(
                _name("solver.stop_mode", opts.stop_mode, STOP_MODES) if opts.stop_mode else None
            ),
            budget_ms=opts.budget_ms if opts.HasField("budget_ms") else None,
            allow_partial=opts.allow_partial,
        )


def solver_settings(req: SolverRequest, batch: int, config: ServerConfig) -> dict[str, Any]:
    """Per-call solver keyword arguments for `DEQModel.__call__` (unset = model default), every
    value range-checked against the server's caps, the same for every protocol."""
    out: dict[str, Any] = {}
    if req.sample_tol:
        if len(req.sample_tol) != batch:
            raise invalid(
                "solver.sample_tol", f"{batch} values (one per sample)", len(req.sample_tol)
            )
        for i, value in enumerate(req.sample_tol):
            _check_tol(f"solver.sample_tol[{i}]", value, config.min_tol)
        out["tol"] = torch.tensor(req.sample_tol, dtype=torch.float64)
    elif req.tol is not None:
        _check_tol("solver.tol", req.tol, config.min_tol)
        out["tol"] = req.tol
    if req.max_iter is not None:
        if not 1 <= req.max_iter <= config.max_iter_cap:
            raise invalid("solver.max_iter", f"1..{config.max_iter_cap}", req.max_iter)
        out["max_iter"] = req.max_iter
    if req.method is not None:
        if req.method not in METHODS:
            raise invalid("solver.method", f"one of {sorted(METHODS)}", req.method)
        out["method"] = req.method
    if req.stop_mode is not None:
        if req.stop_mode not in STOP_MODES:
            raise invalid("solver.stop_mode", f"one of {sorted(STOP_MODES)}", req.stop_mode)
        out["stop_mode"] = req.stop_mode
    if req.budget_ms is not None and not (math.isfinite(req.budget_ms) and req.budget_ms > 0):
        raise invalid("solver.budget_ms", "a finite number > 0", req.budget_ms)
    return out


def solver_options(opts: pb.SolverOptions, batch: int, config: ServerConfig) -> dict[str, Any]:
    """`solver_settings` of deq.v1 SolverOptions (Train's config, and tests)."""
    return solver_settings(SolverRequest.of(opts), batch, config)


def batch_array(
    t: tensors.WireTensor, field: str, sample_shape: tuple[int, ...], config: ServerConfig
) -> np.ndarray:
    """A float batch shaped (B, *sample_shape), 1 <= B <= max_batch, all finite, checked with
    numpy (no torch call, so cheap on the event loop)."""
    if not t.shape:
        raise invalid(field, f"a tensor shaped [B, {', '.join(map(str, sample_shape))}]", "nothing")
    x = tensors.decode_array(t, field, max_elements=config.max_batch * math.prod(sample_shape))
    if tuple(x.shape[1:]) != sample_shape:
        expected = f"shape [B, {', '.join(map(str, sample_shape))}]"
        raise invalid(f"{field}.shape", expected, list(x.shape))
    if not 1 <= x.shape[0] <= config.max_batch:
        raise invalid(f"{field}.shape[0]", f"a batch of 1..{config.max_batch}", x.shape[0])
    if x.dtype.kind != "f":
        raise invalid(f"{field}.dtype", "a floating type", t.dtype)
    if not np.isfinite(x).all():
        raise invalid(f"{field}.data", "finite values", "NaN or Inf")
    return x


def batch_tensor(
    t: pb.Tensor, field: str, sample_shape: tuple[int, ...], config: ServerConfig
) -> torch.Tensor:
    """`batch_array` of a deq.v1 Tensor, as a torch tensor in its own float dtype."""
    return torch.from_numpy(batch_array(tensors.WireTensor.of(t), field, sample_shape, config))


def cast_array(x: np.ndarray, dtype: np.dtype, field: str) -> np.ndarray:
    """`x` in the serving dtype (itself when it has it already), refused if a narrowing cast
    overflowed values to Inf (`x` was checked finite on arrival, so only a change of dtype needs
    another look)."""
    y = x.astype(dtype, copy=False)
    if y is not x and not np.isfinite(y).all():
        raise invalid(field, f"values within the {dtype} range", "values that overflow it")
    return y
