"""Per-sample solver outcome: data, never an exception."""

from __future__ import annotations

import enum

# Status code held by a row that is still being solved; never returned to callers.
RUNNING = 0


class Status(enum.IntEnum):
    """Why a sample left the solver. Values are mirrored 1:1 by the wire enum (0 = unspecified)."""

    CONVERGED = 1
    MAX_ITER = 2
    DIVERGED = 3
    NONFINITE = 4
    DEADLINE = 5
    CANCELLED = 6

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "residual met the requested tolerance",
    Status.MAX_ITER: "iteration cap reached before the tolerance; state is the lowest-residual iterate",
    Status.DIVERGED: "residual grew far beyond its starting value; state is the lowest-residual iterate",
    Status.NONFINITE: "the cell produced NaN or Inf; state is the last finite, lowest-residual iterate",
    Status.DEADLINE: "stopped at the caller's deadline; state is the lowest-residual iterate",
    Status.CANCELLED: "stopped because the caller cancelled; state is the lowest-residual iterate",
}
