"""The bookkeeping both solver drivers share: one row per sample, advanced by one kernel.

`solve` (a batch run to its end, active rows compacted as they retire) and `SlotPool` (fixed
slots that samples join and leave) differ only in where rows live. After every f evaluation
both call `observe` (count the evaluation, measure residuals, keep the lowest-residual iterate,
decide who keeps running) and, for the rows that stop, `verdicts` (why each stopped). The
arithmetic of a sample is therefore the same in both, by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._status import RUNNING, Status

STOP_MODES = ("abs", "rel")


@dataclass
class Rows:
    """Per-row state, updated in place (so rows may be views of a slot pool's buffers).

    evals: f-evaluations so far; cap: max_iter; tol: tolerance in the stop mode; first: the
    first absolute residual; best: the lowest residual so far; best_z: its iterate (flattened).
    `first` and `best` are inf until the row's first evaluation.
    """

    evals: Tensor
    cap: Tensor
    tol: Tensor
    first: Tensor
    best: Tensor
    best_z: Tensor

    @classmethod
    def start(cls, z: Tensor, tol: Tensor, cap: Tensor) -> Rows:
        """Rows starting at `z` (R, W), with their tolerances (R,) and caps (R,)."""
        inf = torch.full_like(tol, float("inf"))
        return cls(torch.zeros_like(cap), cap, tol, inf, inf.clone(), z.clone())

    def select(self, index: Tensor) -> Rows:
        """The rows at `index` (new tensors)."""
        return Rows(*(t.index_select(0, index) for t in self._tensors()))

    def head(self, n: int) -> Rows:
        """Views of rows [:n]: writes go to these rows."""
        return Rows(*(t[:n] for t in self._tensors()))

    def put(self, at: Tensor, rows: Rows) -> None:
        """Write `rows` into the rows at `at` (admission into slots)."""
        for mine, theirs in zip(self._tensors(), rows._tensors(), strict=True):
            mine.index_copy_(0, at, theirs.to(mine.dtype))

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class Observation:
    """One evaluation's measurements: g = f(z) - z, the absolute and in-mode residuals, and
    which rows keep running by the solver's own rules (tolerance, cap, divergence, finiteness)."""

    g: Tensor
    abs_res: Tensor
    res: Tensor
    running: Tensor


def residual_norms(fz: Tensor, g: Tensor, stop_mode: str) -> tuple[Tensor, Tensor]:
    """(abs, in-mode) residuals per row of flattened tensors, g = f(z) - z:
    abs = ||g||, rel = abs / ||f(z)||."""
    abs_res = torch.linalg.vector_norm(g, dim=1)
    if stop_mode == "abs":
        return abs_res, abs_res
    tiny = torch.finfo(fz.dtype).tiny
    return abs_res, abs_res / torch.linalg.vector_norm(fz, dim=1).clamp_min_(tiny)


def observe(rows: Rows, z: Tensor, fz: Tensor, stop_mode: str, divergence: float) -> Observation:
    """Account for one evaluation fz = f(z) of every row (both (R, W)), in place.

    Written as few tensor operations as it can be: on small batches each one costs more than
    its arithmetic (a few microseconds of dispatch on a CPU), and this runs every iteration."""
    rows.evals += 1
    g = fz - z
    abs_res, res = residual_norms(fz, g, stop_mode)
    # `out=` a row field: the selection is written in place, no separate copy
    torch.where(rows.evals == 1, abs_res, rows.first, out=rows.first)
    better = res < rows.best  # False for NaN
    torch.where(better, res, rows.best, out=rows.best)
    torch.where(better.unsqueeze(1), z, rows.best_z, out=rows.best_z)
    running = res > rows.tol  # NaN fails every comparison, so a NaN row stops
    running &= rows.evals < rows.cap
    # Divergence and finiteness at once: an infinite residual fails `<= finite max` even where
    # divergence * first is inf (a first residual of inf); a norm is >= 0.
    running &= abs_res <= (rows.first * divergence).clamp_(max=torch.finfo(abs_res.dtype).max)
    return Observation(g, abs_res, res, running)


def advance(
    f: Callable[..., Tensor],
    method: Any,
    z: Tensor,
    shape: Sequence[int],
    args: Sequence[Any],
    rows: Rows,
    state: Any,
    stop_mode: str,
    divergence: float,
) -> tuple[Observation, Tensor]:
    """One iteration on the active rows z (R, W): evaluate f, account for it (rows updated in
    place), and propose the next iterate (the method's state updated in place). The one body of
    every solver's iteration: `BatchSolve`, `SlotPool` and the compiled `CompiledIteration`."""
    fz = f(z.view(-1, *shape), *args).reshape(z.shape[0], -1)
    seen = observe(rows, z, fz, stop_mode, divergence)
    return seen, method.step(state, z, seen.g)


def verdicts(rows: Rows, seen: Observation, divergence: float, stop: Tensor | None) -> Tensor:
    """Every row's status (RUNNING where none applies), in priority order: CONVERGED >
    NONFINITE > DIVERGED > MAX_ITER, then the caller's `stop` (CANCELLED, DEADLINE, ...)."""
    status = torch.zeros_like(rows.evals)
    status.masked_fill_(rows.evals >= rows.cap, int(Status.MAX_ITER))
    status.masked_fill_(seen.abs_res > divergence * rows.first, int(Status.DIVERGED))
    status.masked_fill_(~torch.isfinite(seen.res), int(Status.NONFINITE))
    status.masked_fill_(seen.res <= rows.tol, int(Status.CONVERGED))
    if stop is not None:
        status = torch.where(status == RUNNING, stop, status)
    return status
