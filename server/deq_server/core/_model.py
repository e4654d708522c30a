"""`DEQModel`: injection + cell + head around one `solve`, built from a JSON config."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._cells import CELLS, resolve_config
from ._implicit import Backward, backward_config, make_backward
from ._solve import STOP_MODES, SolveResult, StopHook, solve

SOLVER_DEFAULTS: dict[str, Any] = {
    "method": "anderson",
    "tol": 1e-4,
    "max_iter": 50,
    "stop_mode": "rel",
}


def _resolve_solver(solver: dict[str, Any] | None) -> dict[str, Any]:
    out = {**SOLVER_DEFAULTS, **(solver or {})}
    if out["stop_mode"] not in STOP_MODES:
        raise ValueError(
            f"solver.stop_mode must be one of {list(STOP_MODES)}, got {out['stop_mode']!r}"
        )
    if not (isinstance(out["tol"], int | float) and out["tol"] > 0):
        raise ValueError(f"solver.tol must be a number > 0, got {out['tol']!r}")
    if not (isinstance(out["max_iter"], int) and out["max_iter"] >= 1):
        raise ValueError(f"solver.max_iter must be an int >= 1, got {out['max_iter']!r}")
    return out


class DEQModel(nn.Module):
    """A deep equilibrium model: y = head(z*), z* = cell(z*, inject(x)).

    `model(x)` returns (y, SolveResult). Under autograd (parameters or x requiring grad) y is
    differentiable through the configured backward strategy (implicit by default); the forward
    solve itself never builds a graph. Per-call keyword arguments override the config's solver
    defaults (`tol`, `max_iter`, `method`, `stop_mode`, method options) and `backward`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        kind = config.get("cell")
        if kind not in CELLS:
            raise ValueError(f"unknown cell {kind!r}; expected one of {sorted(CELLS)}")
        cls = CELLS[kind]
        resolved = resolve_config(config, cls.REQUIRED, cls.DEFAULTS)
        resolved["solver"] = _resolve_solver(config.get("solver"))
        self.backward_strategy: Backward = make_backward(config.get("backward", "ift"))
        resolved["backward"] = backward_config(self.backward_strategy)
        self.layer = cls(resolved)
        self._config = resolved
        # Where the weights came from (checkpoint metadata); empty for a fresh model.
        self.provenance: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DEQModel:
        return cls(copy.deepcopy(config))

    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved JSON config (defaults filled in); a copy."""
        return copy.deepcopy(self._config)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.layer.state_shape

    def inject(self, x: Tensor) -> Tensor:
        return self.layer.inject(x)

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        return self.layer.cell(z, inj)

    def head(self, z: Tensor) -> Tensor:
        return self.layer.head(z)

    def init_state(self, x: Tensor) -> Tensor:
        ref = next(self.parameters())
        return torch.zeros(x.shape[0], *self.state_shape, dtype=ref.dtype, device=ref.device)

    def forward(
        self,
        x: Tensor,
        *,
        z0: Tensor | None = None,
        should_stop: StopHook | None = None,
        backward: str | dict[str, Any] | Backward | None = None,
        **solver: Any,
    ) -> tuple[Tensor, SolveResult]:
        opts = {**self._config["solver"], **{k: v for k, v in solver.items() if v is not None}}
        strategy = self.backward_strategy if backward is None else make_backward(backward)
        # Weight parametrizations (norms) are computed once per call, not once per iteration.
        with parametrize.cached():
            inj = self.inject(x)
            start = self.init_state(x) if z0 is None else z0
            result = solve(self.cell, start, args=(inj.detach(),), should_stop=should_stop, **opts)
            z = result.z
            if torch.is_grad_enabled() and inj.requires_grad:
                z = strategy.attach(self.cell, result, inj)
            return self.head(z), result
