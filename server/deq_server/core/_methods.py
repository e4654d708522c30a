"""Fixed-point methods as small step objects; the loop, counting and retirement live in `_solve`.

Each method sees flattened active rows only: `z` (A, n) the current iterate, `g = f(z) - z` its
residual vector. `step` returns the next iterate; `select` keeps a subset of rows when samples
retire. Every update is row-local, so one sample's history never influences another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Method(Protocol):
    """What the driver needs from a fixed-point method."""

    def init(self, z: Tensor) -> Any: ...

    def step(self, state: Any, z: Tensor, g: Tensor) -> Tensor: ...

    def select(self, state: Any, keep: Tensor) -> Any: ...


def _finite_rows(x: Tensor) -> Tensor:
    return torch.isfinite(x).all(dim=1)


def _plain_where_bad(z_next: Tensor, z: Tensor, g: Tensor, beta: float) -> Tensor:
    """Safeguard: rows whose proposed step is not finite take a plain damped step instead."""
    return torch.where(_finite_rows(z_next)[:, None], z_next, z + beta * g)


@dataclass(frozen=True)
class Picard:
    """Plain fixed-point iteration z <- z + damping * (f(z) - z)."""

    damping: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"picard damping must be in (0, 1], got {self.damping}")

    def init(self, z: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, g: Tensor) -> Tensor:
        return z + self.damping * g if self.damping != 1.0 else z + g

    def select(self, state: None, keep: Tensor) -> None:
        return None


@dataclass
class _History:
    """Ring buffer of the last m difference pairs per row, shared by Anderson and Broyden.

    `a`, `b`: (A, m, n) difference pairs; `count`: (A,) pairs written for this row (capped at m);
    `ptr`: next slot to write (global: rows that join later simply have fewer valid slots).
    """

    a: Tensor
    b: Tensor
    z_prev: Tensor
    g_prev: Tensor
    count: Tensor
    has_prev: Tensor
    ptr: int

    @classmethod
    def empty(cls, z: Tensor, m: int) -> _History:
        rows, n = z.shape
        return cls(
            a=z.new_zeros(rows, m, n),
            b=z.new_zeros(rows, m, n),
            z_prev=torch.zeros_like(z),
            g_prev=torch.zeros_like(z),
            count=torch.zeros(rows, dtype=torch.int64, device=z.device),
            has_prev=torch.zeros(rows, dtype=torch.bool, device=z.device),
            ptr=0,
        )

    def push(self, a: Tensor, b: Tensor, ok: Tensor) -> None:
        """Write one pair per row into the current slot; rows with `ok` False store zeros."""
        m = self.a.shape[1]
        slot = self.ptr % m
        keep = ok.to(a.dtype)[:, None]
        self.a[:, slot] = a * keep
        self.b[:, slot] = b * keep
        # A row whose pair is unusable restarts its history rather than mixing stale slots.
        self.count = torch.where(ok, (self.count + 1).clamp_max(m), 0)
        self.ptr += 1

    def valid(self) -> Tensor:
        """(A, m) mask of the slots that hold this row's most recent `count` pairs."""
        m = self.a.shape[1]
        slots = torch.arange(m, device=self.a.device)
        age = (self.ptr - 1 - slots) % m  # 0 = newest slot
        return age[None, :] < self.count[:, None]

    def remember(self, z: Tensor, g: Tensor) -> None:
        self.z_prev = z
        self.g_prev = g
        self.has_prev = torch.ones_like(self.has_prev)

    def select(self, keep: Tensor) -> _History:
        return _History(
            a=self.a.index_select(0, keep),
            b=self.b.index_select(0, keep),
            z_prev=self.z_prev.index_select(0, keep),
            g_prev=self.g_prev.index_select(0, keep),
            count=self.count.index_select(0, keep),
            has_prev=self.has_prev.index_select(0, keep),
            ptr=self.ptr,
        )


@dataclass(frozen=True)
class Anderson:
    """Type-II Anderson acceleration with window m and residual-scaled regularisation.

    Solves min_gamma ||g - dG gamma||^2 + lam ||gamma||^2 per row, with lam = reg * mean(diag(dG dG^T)):
    the ridge scales with the residual, so it neither dominates at tight tolerances nor vanishes at
    loose ones (a fixed ridge such as 1e-4 makes Anderson slower than plain iteration near
    convergence). A row whose mixing system is singular or non-finite takes a plain step.
    """

    m: int = 5
    beta: float = 1.0
    reg: float = 1e-8

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError(f"anderson history m must be >= 1, got {self.m}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"anderson beta must be in (0, 1], got {self.beta}")
        if self.reg < 0:
            raise ValueError(f"anderson reg must be >= 0, got {self.reg}")

    def init(self, z: Tensor) -> _History:
        return _History.empty(z, self.m)

    def step(self, state: _History, z: Tensor, g: Tensor) -> Tensor:
        # The driver only steps rows with a finite residual, so z and g are finite here.
        state.push(z - state.z_prev, g - state.g_prev, state.has_prev)  # a = dX, b = dG
        state.remember(z, g)

        valid = state.valid().to(z.dtype)
        dX, dG = state.a, state.b
        gram = (dG @ dG.transpose(1, 2)) * (valid[:, :, None] * valid[:, None, :])
        rhs = (dG @ g.unsqueeze(2)).squeeze(2) * valid
        n_valid = valid.sum(dim=1).clamp_min(1.0)
        lam = self.reg * gram.diagonal(dim1=1, dim2=2).sum(dim=1) / n_valid
        # Valid slots get the ridge on the diagonal, unused slots a 1 (their gamma is then 0).
        diag = valid * lam[:, None] + (1.0 - valid)
        system = gram + torch.diag_embed(diag)
        gamma, info = torch.linalg.solve_ex(system, rhs.unsqueeze(2), check_errors=False)
        gamma = gamma.transpose(1, 2)  # (A, 1, m)
        good = (info == 0) & torch.isfinite(gamma).all(dim=2).squeeze(1)
        gamma = torch.where(good[:, None, None], gamma, 0.0)

        z_next = z + self.beta * g - (gamma @ dX).squeeze(1)
        return z_next - self.beta * (gamma @ dG).squeeze(1)

    def select(self, state: _History, keep: Tensor) -> _History:
        return state.select(keep)


@dataclass(frozen=True)
class Broyden:
    """Limited-memory 'good' Broyden on g(z) = f(z) - z with an inverse-Jacobian estimate.

    B = -I + sum_i u_i v_i^T holds at most m rank-one terms (memory O(m n), not O(max_iter n));
    when full, the oldest term is overwritten. Updates with a vanishing denominator are skipped.
    Safeguard (no line search): a row whose residual grew by more than `growth` since the last
    step drops its memory and takes a plain step back from the previous iterate.
    """

    m: int = 8
    growth: float = 2.0

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError(f"broyden history m must be >= 1, got {self.m}")
        if self.growth <= 1.0:
            raise ValueError(f"broyden growth must be > 1, got {self.growth}")

    def init(self, z: Tensor) -> _History:
        return _History.empty(z, self.m)

    @staticmethod
    def _apply(u: Tensor, v: Tensor, valid: Tensor, x: Tensor) -> Tensor:
        """(-I + U^T V) x per row over the valid slots, with U, V stored as (A, m, n)."""
        coef = (v @ x.unsqueeze(2)).squeeze(2) * valid
        return -x + (coef.unsqueeze(1) @ u).squeeze(1)

    def step(self, state: _History, z: Tensor, g: Tensor) -> Tensor:
        g_norm = g.norm(dim=1)
        worse = state.has_prev & (g_norm > self.growth * state.g_prev.norm(dim=1))
        state.count = torch.where(worse, 0, state.count)

        s = z - state.z_prev
        y = g - state.g_prev
        valid = state.valid().to(z.dtype)
        b_y = self._apply(state.a, state.b, valid, y)
        bt_s = self._apply(state.b, state.a, valid, s)  # B^T s swaps the roles of u and v
        den = (s * b_y).sum(dim=1)
        size = s.norm(dim=1) * b_y.norm(dim=1)
        eps = torch.finfo(z.dtype).eps
        ok = state.has_prev & ~worse & torch.isfinite(den) & (den.abs() > eps * size)
        safe_den = torch.where(ok, den, 1.0)
        retreat_z, retreat_g = state.z_prev, state.g_prev
        state.push((s - b_y) / safe_den[:, None], bt_s, ok)
        state.remember(
            torch.where(worse[:, None], retreat_z, z), torch.where(worse[:, None], retreat_g, g)
        )

        valid = state.valid().to(z.dtype)
        z_next = z - self._apply(state.a, state.b, valid, g)
        z_next = torch.where(worse[:, None], retreat_z + retreat_g, z_next)
        return _plain_where_bad(z_next, z, g, 1.0)

    def select(self, state: _History, keep: Tensor) -> _History:
        return state.select(keep)


METHODS: dict[str, type[Picard] | type[Anderson] | type[Broyden]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
}


def make_method(name: str, **options: Any) -> Method:
    """Build a method by name; unknown names raise ValueError, unknown options TypeError."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None
    return cls(**options)
