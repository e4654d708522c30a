"""Batched fixed-point solving where each sample retires on its own.

Every iteration evaluates f only on the rows still active, accounts for it with the shared row
kernel (`_rows.observe`: residuals, best iterate, who keeps running), retires rows that met their
tolerance (or their cap, diverged, went non-finite, or were stopped by the caller's hook), and
compacts the active set and the iterate the method proposed for it. The only host
synchronisation per iteration is reading how many rows retired.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._compiled import CompiledIteration
from ._methods import make_method
from ._rows import STOP_MODES, Observation, Rows, advance, verdicts
from ._status import RUNNING, Status

StopMode = str  # "abs" | "rel"


@dataclass
class SolveResult:
    """Per-sample outcome of `solve`.

    z: (B, ...) the lowest-residual iterate of each sample (never NaN when the start was finite).
    iterations: (B,) int64 f-evaluations spent on each sample.
    residual: (B,) residual of `z` in the stop mode used (inf when no finite residual was seen).
    status: (B,) int64 `Status` values.
    steps: batched f calls made (the batch-level cost).
    backward: the implicit backward solve's result, filled in when a backward pass runs.
    """

    z: Tensor
    iterations: Tensor
    residual: Tensor
    status: Tensor
    steps: int
    backward: SolveResult | None = None

    @property
    def converged(self) -> Tensor:
        return self.status == Status.CONVERGED


@dataclass(frozen=True)
class Progress:
    """What the per-iteration hook sees: the solver step, the active rows' original indices
    (a device tensor) and their current residuals."""

    step: int
    active: Tensor
    residual: Tensor


# Returns None to let every row continue, or an int64 tensor (A,) of Status values (0 = continue).
StopHook = Callable[[Progress], Tensor | None]


def _per_sample(
    name: str, value: float | int | Tensor, batch: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Normalise a scalar or (B,) tolerance/cap to a (B,) tensor on the solve's device."""
    if isinstance(value, Tensor):
        if value.shape != (batch,):
            raise ValueError(
                f"{name} must be a scalar or shape ({batch},), got {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_solver_options(
    tol: object, max_iter: object, method: str, stop_mode: str, options: dict[str, Any]
) -> None:
    """Validate scalar solver settings up front (configs are checked when built, not when run)."""
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < float("inf"):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; expected one of {list(STOP_MODES)}")
    make_method(method, **options)


def _check_args(args: Sequence[Any], batch: int) -> None:
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and (a.dim() == 0 or a.shape[0] != batch):
            raise ValueError(
                f"args[{i}] must be batch-first with {batch} rows, got shape {tuple(a.shape)}; "
                "f must not close over batch-sized tensors, and non-batch tensors belong in f"
            )


def _select_args(args: tuple[Any, ...], keep: Tensor) -> tuple[Any, ...]:
    return tuple(a.index_select(0, keep) if isinstance(a, Tensor) else a for a in args)


@functools.cache
def _compiled_advance() -> Callable[..., tuple[Observation, Tensor]]:
    """`advance` compiled once per process (torch.compile keeps one program per cell and
    method it meets, and a batch size of 1 apart from the dynamic one)."""
    return torch.compile(advance, dynamic=True)


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    args: Sequence[Any] = (),
    tol: float | Tensor,
    max_iter: int | Tensor,
    method: str = "anderson",
    stop_mode: StopMode = "rel",
    should_stop: StopHook | None = None,
    divergence: float = 1e5,
    compile: bool = False,
    iteration: CompiledIteration | None = None,
    **options: Any,
) -> SolveResult:
    """Find z = f(z, *args) for every sample of a batch, each to its own tolerance.

    `tol`, `max_iter`: scalars or (B,) tensors. A row diverges when its absolute residual exceeds
    `divergence` times its first one; a row whose residual is not finite (its first one included)
    stops at once as NONFINITE. `options` go to the method (e.g. m, beta for anderson).
    `compile`: each iteration's work (f, bookkeeping, method step) as one torch.compile program
    with a dynamic batch size (compiled on first use; the same answers, see tests).
    `iteration`: a `CompiledIteration` made for this f, method and stop mode, which then runs
    every iteration (ignored where it does not fit the arguments).
    Runs under no_grad; differentiate through `DEQModel`, which attaches implicit gradients.
    """
    run = BatchSolve(
        f,
        z0,
        args=args,
        tol=tol,
        max_iter=max_iter,
        method=method,
        stop_mode=stop_mode,
        should_stop=should_stop,
        divergence=divergence,
        compile=compile,
        iteration=iteration,
        **options,
    )
    while not run.done:
        run.step()
    return run.result()


class BatchSolve:
    """`solve` one iteration at a time, for a scheduler that interleaves a batch with other work
    (the engine thread steps every lane once per turn). `solve(...)` is
    `run = BatchSolve(...); while not run.done: run.step(); run.result()`; same arguments."""

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        *,
        args: Sequence[Any] = (),
        tol: float | Tensor,
        max_iter: int | Tensor,
        method: str = "anderson",
        stop_mode: StopMode = "rel",
        should_stop: StopHook | None = None,
        divergence: float = 1e5,
        compile: bool = False,
        iteration: CompiledIteration | None = None,
        **options: Any,
    ) -> None:
        if stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {stop_mode!r}; expected one of {list(STOP_MODES)}")
        self._method = make_method(method, **options)
        if not z0.is_floating_point() or z0.dim() == 0:
            raise ValueError(f"z0 must be a floating tensor with a batch dimension, got {z0.dtype}")
        batch, self._shape = z0.shape[0], z0.shape[1:]
        width = self._shape.numel()
        device, dtype = z0.device, z0.dtype
        self._args = tuple(args)
        _check_args(self._args, batch)
        tol_t = _per_sample("tol", tol, batch, dtype, device)
        cap_t = _per_sample("max_iter", max_iter, batch, torch.int64, device)
        # one reduction per check (NaN propagates through aminmax and fails `0 <`)
        if batch:
            tol_lo, tol_hi = torch.aminmax(tol_t)
            if not (float(tol_lo) > 0 and float(tol_hi) < math.inf):
                raise ValueError("tol must be finite and > 0 for every sample")
            if int(cap_t.min()) < 1:
                raise ValueError("max_iter must be >= 1 for every sample")
        self._f, self._stop_mode, self._divergence = f, stop_mode, divergence
        self._should_stop = should_stop
        self._advance = _compiled_advance() if compile else advance
        self._iteration = None
        if iteration is not None and iteration.fits(
            f, self._method, z0.reshape(batch, -1), self._args, stop_mode
        ):
            self._iteration = iteration  # rows only shrink from here: it fits every step
        self._z0 = z0
        # The outcome per batch row (best iterate, evaluations, residual, status): the retiring
        # rows' own tensors when they all retire at once, else buffers filled as they retire.
        self._out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        with torch.no_grad():
            # The active rows, compacted as rows retire; `index` maps them to the batch.
            self._index = torch.arange(batch, device=device)
            self._z = z0.detach().reshape(batch, width)
            self._rows = Rows.start(self._z, tol_t, cap_t)
            self._state = self._method.init(self._z)
        self.steps = 0

    @property
    def done(self) -> bool:
        """Every row has retired."""
        return self._z.shape[0] == 0

    @property
    def rows(self) -> int:
        """Rows still solving."""
        return int(self._z.shape[0])

    def step(self) -> None:
        """One iteration on the active rows: evaluate, retire who stops, compact the rest (none
        once `done`)."""
        if self.done:
            return
        with torch.no_grad():
            self._step()

    def _step(self) -> None:
        rows, z, device = self._rows, self._z, self._z.device
        # the next iterate is proposed for every active row, the retiring ones too (a method's
        # step is row-local, so the rows that stay get what they would alone)
        if self._iteration is not None:  # the same iteration as one compiled program
            seen, z_next, rows, self._state = self._iteration(z, self._args, rows, self._state)
            self._rows = rows
        else:
            seen, z_next = self._advance(
                self._f, self._method, z, self._shape, self._args, rows, self._state,
                self._stop_mode, self._divergence,
            )  # fmt: skip
        self.steps += 1
        running, stop = seen.running, None
        if self._should_stop is not None:
            stop = self._should_stop(Progress(self.steps, self._index, seen.res))
            if stop is not None:
                stop = stop.to(device=device, dtype=torch.int64)
                running = running & (stop == RUNNING)
        n_keep = int(running.sum())  # the one host sync per iteration
        if n_keep == z.shape[0]:
            self._z = z_next
            return
        status = verdicts(rows, seen, self._divergence, stop)
        if n_keep == 0:  # every active row retires (a lone request's last step): no reordering
            self._retire(self._index, rows.best_z, rows.evals, rows.best, status)
            self._z = z[:0]
            return
        order = torch.argsort((~running).to(torch.int8), stable=True)
        keep, done = order[:n_keep], order[n_keep:]
        self._retire(
            self._index.index_select(0, done),
            *(t.index_select(0, done) for t in (rows.best_z, rows.evals, rows.best, status)),
        )
        self._rows, self._index = rows.select(keep), self._index.index_select(0, keep)
        self._z = z_next.index_select(0, keep)
        self._args = _select_args(self._args, keep)
        self._state = self._method.select(self._state, keep)

    def _retire(
        self, at: Tensor, best_z: Tensor, evals: Tensor, best: Tensor, status: Tensor
    ) -> None:
        """Record the outcome of retiring rows at their batch positions `at`."""
        outcome = (best_z, evals, best, status)
        if self._out is None and at.shape[0] == self._z0.shape[0]:
            self._out = outcome  # the whole batch, in order (nothing retired or moved before)
            return
        if self._out is None:
            rows = self._z0.shape[0]
            best_z, evals, best, status = (
                torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in outcome
            )
            self._out = (best_z, evals, best, status)
        for out, value in zip(self._out, outcome, strict=True):
            out.index_copy_(0, at, value)

    def result(self) -> SolveResult:
        """The per-sample outcome (once `done`)."""
        if not self.done:
            raise RuntimeError(f"{self.rows} rows are still solving")
        if self._out is None:  # an empty batch
            z0 = self._z0
            empty = torch.empty(0, dtype=torch.int64, device=z0.device)
            return SolveResult(z0.clone(), empty, z0.new_empty(0), empty.clone(), self.steps)
        z, iterations, residual, status = self._out
        return SolveResult(
            z=z.view_as(self._z0),
            iterations=iterations,
            residual=residual,
            status=status,
            steps=self.steps,
        )
