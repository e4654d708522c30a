"""How gradients reach the parameters through a solved fixed point: small strategy objects.

- `IFT` (default): the implicit function theorem. The backward pass solves the linear fixed point
  g = J^T g + v (J = df/dz at z*, v = dL/dz*) with its own solver, then one vector-Jacobian
  product carries g to the parameters and the input. Memory does not grow with solver depth.
- `Phantom`: k damped unrolled steps from z* (Geng et al. 2021), a cheap approximation.
- `JFB`: one step, the Jacobian-free backward (Fung et al. 2022).
Every strategy runs one or a few cell evaluations with autograd on; the forward solve never does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._solve import SolveResult, check_solver_options, solve

Cell = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class IFT:
    """Implicit backward: solve g = J^T g + v per sample, to `tol` within `max_iter` steps."""

    tol: float = 1e-6
    max_iter: int = 100
    method: str = "anderson"
    stop_mode: str = "rel"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_solver_options(self.tol, self.max_iter, self.method, self.stop_mode, self.options)

    def attach(self, cell: Cell, result: SolveResult, inj: Tensor) -> Tensor:
        z_star = result.z.detach().requires_grad_()
        f_star = cell(z_star, inj)
        # Value z* (so training and inference see the same state); gradient flows into f_star.
        z_out = f_star + (result.z - f_star).detach()
        if z_out.requires_grad:
            z_out.register_hook(self._backward_hook(f_star, z_star, result))
        return z_out

    def _backward_hook(
        self, f_star: Tensor, z_star: Tensor, result: SolveResult
    ) -> Callable[[Tensor | None], Tensor | None]:
        def vjp(rows_g: Tensor, rows_v: Tensor, rows: Tensor) -> Tensor:
            # J^T is block-diagonal over samples: pad retired rows with zeros, take one VJP.
            full = torch.zeros_like(f_star).index_copy_(0, rows, rows_g)
            (jt_g,) = torch.autograd.grad(f_star, z_star, full, retain_graph=True)
            return jt_g.index_select(0, rows) + rows_v

        def hook(v: Tensor | None) -> Tensor | None:
            if v is None:  # no gradient flows to the output (autograd may ask): nothing to solve
                return None
            rows = torch.arange(v.shape[0], device=v.device)
            back = solve(
                vjp,
                v,
                args=(v, rows),
                tol=self.tol,
                max_iter=self.max_iter,
                method=self.method,
                stop_mode=self.stop_mode,
                **self.options,
            )
            result.backward = back
            return back.z

        return hook


@dataclass(frozen=True)
class Phantom:
    """Phantom gradient: `steps` damped steps z <- (1 - damping) z + damping f(z) from z*."""

    steps: int = 5
    damping: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"phantom steps must be an int >= 1, got {self.steps!r}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"phantom damping must be in (0, 1], got {self.damping!r}")

    def attach(self, cell: Cell, result: SolveResult, inj: Tensor) -> Tensor:
        z = result.z.detach()
        for _ in range(self.steps):
            z = (1 - self.damping) * z + self.damping * cell(z, inj)
        return z


@dataclass(frozen=True)
class JFB:
    """Jacobian-free backward: gradient of one cell step from z* (J taken as zero)."""

    def attach(self, cell: Cell, result: SolveResult, inj: Tensor) -> Tensor:
        return cell(result.z.detach(), inj)


Backward = IFT | Phantom | JFB
BACKWARDS: dict[str, type[IFT] | type[Phantom] | type[JFB]] = {
    "ift": IFT,
    "phantom": Phantom,
    "jfb": JFB,
}


def make_backward(spec: str | dict[str, Any] | Backward) -> Backward:
    """A strategy from a name, a config dict {"mode": name, **options}, or a strategy itself."""
    if isinstance(spec, IFT | Phantom | JFB):
        return spec
    options = {"mode": spec} if isinstance(spec, str) else dict(spec)
    mode = options.pop("mode", "ift")
    try:
        cls = BACKWARDS[mode]
    except KeyError:
        raise ValueError(
            f"unknown backward mode {mode!r}; expected one of {sorted(BACKWARDS)}"
        ) from None
    return cls(**options)


def backward_config(strategy: Backward) -> dict[str, Any]:
    """The JSON form of a strategy, inverse of `make_backward`."""
    mode = next(name for name, cls in BACKWARDS.items() if isinstance(strategy, cls))
    return {"mode": mode, **strategy.__dict__}
