"""`DEQModel`: injection + cell + head around one `solve`, built from a JSON config."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._cells import Layer, cell_class, resolve_config
from ._compiled import CompiledIteration
from ._implicit import Backward, backward_config, make_backward
from ._solve import SolveResult, StopHook, check_solver_options, solve
from ._status import Status

# torch's parametrization cache is process-global: while any thread is inside `cached()`, no
# entry is dropped. deq-serve never enters it (a forward solves with a `frozen()` copy instead);
# the lock keeps `frozen()` from baking values out of a cache that user code may hold open.
_PARAMETRIZE_CACHE = threading.Lock()

SOLVER_DEFAULTS: dict[str, Any] = {
    "method": "anderson",
    "tol": 1e-4,
    "max_iter": 50,
    "stop_mode": "rel",
}


def _resolve_solver(solver: dict[str, Any] | None) -> dict[str, Any]:
    """Solver defaults of a config: the four keys above plus options of the default method."""
    out = {**SOLVER_DEFAULTS, **(solver or {})}
    options = {k: v for k, v in out.items() if k not in SOLVER_DEFAULTS}
    try:
        check_solver_options(out["tol"], out["max_iter"], out["method"], out["stop_mode"], options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid solver config: {exc}") from exc
    return out


def _call_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Per-call solver settings: config defaults, then overrides. The config's method options
    (e.g. anderson's m) apply only while the call keeps the config's method."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("method", defaults["method"]) != defaults["method"]:
        defaults = {k: v for k, v in defaults.items() if k in SOLVER_DEFAULTS}
    return {**defaults, **given}


class DEQModel(nn.Module):
    """A deep equilibrium model: y = head(z*), z* = cell(z*, inject(x)).

    `model(x)` returns (y, SolveResult). Under autograd (parameters or x requiring grad) y is
    differentiable through the configured backward strategy (implicit by default); the forward
    solve itself never builds a graph. Per-call keyword arguments override the config's solver
    defaults (`tol`, `max_iter`, `method`, `stop_mode`, method options) and `backward`.
    """

    def __init__(self, config: dict[str, Any], layer: nn.Module | None = None) -> None:
        """Build the cell named by `config["cell"]` (built-in or registered), or wrap `layer`,
        an already built one (an exported package's programs), whose config keys `config` holds."""
        super().__init__()
        if layer is None:
            cls = cell_class(config.get("cell"))
            resolved = resolve_config(config, getattr(cls, "REQUIRED"), getattr(cls, "DEFAULTS"))  # noqa: B009
            layer = cls(resolved)
        else:
            resolved = {k: v for k, v in config.items() if k not in ("solver", "backward")}
        resolved["solver"] = _resolve_solver(config.get("solver"))
        self.backward_strategy: Backward = make_backward(config.get("backward", "ift"))
        resolved["backward"] = backward_config(self.backward_strategy)
        self.layer = layer
        self._config = resolved
        # The per-sample shapes, read on every request: plain attributes, not a walk through
        # nn.Module's attribute lookup to the layer each time.
        self._shapes = (
            tuple(self._layer.input_shape),
            tuple(self._layer.output_shape),
            tuple(self._layer.state_shape),
        )
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
    def _layer(self) -> Layer:
        return cast(Layer, self.layer)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (the batch dimension excluded)."""
        return self._shapes[0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output sample."""
        return self._shapes[1]

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample's fixed-point state."""
        return self._shapes[2]

    @property
    def solver_defaults(self) -> Mapping[str, Any]:
        """The config's solver settings, read-only and without `config`'s deep copy (hot path)."""
        return MappingProxyType(self._config["solver"])

    def solver_options(self, **overrides: Any) -> dict[str, Any]:
        """The solver settings a call with these keyword overrides would use (None = default)."""
        return _call_options(self._config["solver"], overrides)

    def frozen(self) -> DEQModel:
        """An inference-only copy (eval, no grad) with every weight parametrization baked into a
        plain weight: nothing recomputed per call, and torch's global parametrization cache unused.
        Made of ordinary tensors even in inference mode (the serving engine's thread): inference
        tensors carry no version counter, which the spectral cap's cache keys on."""
        # baked values must not come from another call's cache
        with _PARAMETRIZE_CACHE, torch.inference_mode(False):
            return self._frozen_copy()

    def _frozen_copy(self) -> DEQModel:
        out = copy.deepcopy(self).eval().requires_grad_(False)
        for module in list(out.modules()):
            if parametrize.is_parametrized(module):
                # Not remove_parametrizations: the copy shares its injected class with `self`,
                # and removing would delete the property from that shared class.
                names: list[str] = list(getattr(module, "parametrizations").keys())  # noqa: B009
                values = {n: getattr(module, n).detach().clone() for n in names}
                module.__class__ = parametrize.type_before_parametrizations(module)
                del module._modules["parametrizations"]
                for n, value in values.items():
                    module.register_parameter(n, nn.Parameter(value, requires_grad=False))
        return out

    def _solver_cell(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The map the no-grad solve iterates: for a model with parametrized weights (weight or
        spectral norm), a `frozen()` copy's cell, so the weights are computed once per call, not
        per iteration, with no process-wide cache or lock held during the solve (a long training
        solve must not block other models' first requests)."""
        if any(parametrize.is_parametrized(m) for m in self.modules()):
            return self.frozen().cell
        return self.cell

    def inject(self, x: Tensor) -> Tensor:
        return self._layer.inject(x)

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        return self._layer.cell(z, inj)

    def head(self, z: Tensor) -> Tensor:
        return self._layer.head(z)

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
        compile: bool = False,
        iteration: CompiledIteration | None = None,
        **solver: Any,
    ) -> tuple[Tensor, SolveResult]:
        """`compile`: the solve's iterations as a torch.compile program; `iteration`: a
        `CompiledIteration` made for this model's cell (see `solve`)."""
        opts = _call_options(self._config["solver"], solver)
        strategy = self.backward_strategy if backward is None else make_backward(backward)
        inj = self.inject(x)
        start = self.init_state(x) if z0 is None else z0
        # Only the (no-grad) solve uses baked weights: `attach` must recompute them with
        # autograd history, or the weights' own parameters would get no gradient.
        cell = self._solver_cell()
        result = solve(
            cell, start, args=(inj.detach(),), should_stop=should_stop, compile=compile,
            iteration=iteration, **opts,
        )  # fmt: skip
        z = result.z
        # Attach whenever anything could receive a gradient: a frozen injection (inj without
        # grad) must not silently cut the cell's trainable weights off (any() stops at the first).
        if torch.is_grad_enabled() and (
            inj.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            z = strategy.attach(self.cell, result, inj)
        y = self.head(z)
        result.status = nonfinite_outputs(y.detach(), result.status)
        return y, result


def nonfinite_outputs(y: Tensor, status: Tensor) -> Tensor:
    """`status` with CONVERGED turned into NONFINITE where the head's output is not finite (a
    converged state can still overflow in the head): no sample is labelled CONVERGED with
    NaN or Inf in its answer."""
    bad = torch.isfinite(y.reshape(y.shape[0], -1)).all(dim=1).logical_not_()
    bad &= status == int(Status.CONVERGED)
    return status.masked_fill(bad, int(Status.NONFINITE))
