"""Fixed-point methods as small step objects; the loop, counting and retirement live in `_solve`
(and, for iteration-level batching, in `_slots`).

Each method sees flattened active rows only: `z` (A, n) the current iterate, `g = f(z) - z` its
residual vector. `step` returns the next iterate; `select` keeps a subset of rows when samples
retire. Every update is row-local, so one sample's history never influences another's.
Methods whose state updates its tensors in place (`SLOTTED = True`) can also run in a fixed pool of
slots where rows join mid-way: a row whose state tensors are zeroed starts with an empty history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor


class Method(Protocol):
    """What the driver needs from a fixed-point method."""

    def init(self, z: Tensor) -> Any: ...

    def step(self, state: Any, z: Tensor, g: Tensor) -> Tensor: ...

    def select(self, state: Any, keep: Tensor) -> Any: ...


@dataclass(frozen=True)
class Picard:
    """Plain fixed-point iteration z <- z + damping * (f(z) - z)."""

    damping: float = 1.0
    SLOTTED: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"picard damping must be in (0, 1], got {self.damping}")

    def init(self, z: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, g: Tensor) -> Tensor:
        return torch.add(z, g, alpha=self.damping)

    def select(self, state: None, keep: Tensor) -> None:
        return None


@dataclass
class _AndersonState:
    """History of the last m steps per row, laid out so one batched product gives the whole
    least-squares system: E[:, :m] is a ring of residual differences dG and E[:, m] the current
    residual g; X is the matching ring of mixing columns dX + beta dG.

    The ring position `slot` (a 0-d tensor, so that no step depends on a Python number and a
    compiled step never re-traces) is shared by all rows. A dG column a row never wrote is zero
    (a row joins with zeroed state), as is one written without a usable difference (no previous
    iterate yet): a zero column gets gamma = 0, exactly as if absent (see `step`).
    """

    E: Tensor
    X: Tensor
    z_prev: Tensor
    has_prev: Tensor  # (A, 1): 1.0 where z_prev and E[:, m] hold this row's previous step
    slot: Tensor  # () int64: the ring column the next step writes, shared by all rows

    def select(self, keep: Tensor) -> _AndersonState:
        return _AndersonState(
            E=self.E.index_select(0, keep),
            X=self.X.index_select(0, keep),
            z_prev=self.z_prev.index_select(0, keep),
            has_prev=self.has_prev.index_select(0, keep),
            slot=self.slot,
        )


@dataclass(frozen=True)
class Anderson:
    """Type-II Anderson acceleration with window m and residual-scaled regularisation.

    Solves min_gamma ||g - dG gamma||^2 + lam ||gamma||^2 per row with lam = reg * trace(dG^T dG):
    the ridge scales with the residual, so it neither dominates at tight tolerances nor vanishes at
    loose ones (a fixed ridge such as 1e-4 makes Anderson slower than plain iteration near
    convergence). A row whose mixing system has no finite solution takes a plain step.
    """

    m: int = 6
    beta: float = 1.0
    reg: float = 1e-8
    SLOTTED: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or not 1 <= self.m <= 64:
            raise ValueError(f"anderson history m must be an int in 1..64, got {self.m!r}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"anderson beta must be in (0, 1], got {self.beta}")
        if not 0 <= self.reg < math.inf:
            raise ValueError(f"anderson reg must be >= 0, got {self.reg}")

    def init(self, z: Tensor) -> _AndersonState:
        rows, n = z.shape
        return _AndersonState(
            E=z.new_zeros(rows, self.m + 1, n),
            X=z.new_zeros(rows, self.m, n),
            z_prev=torch.zeros_like(z),
            has_prev=z.new_zeros(rows, 1),
            slot=torch.zeros((), dtype=torch.int64, device=z.device),
        )

    def step(self, state: _AndersonState, z: Tensor, g: Tensor) -> Tensor:
        # Rows are independent: a row whose residual went non-finite (it retires) gets a
        # non-finite system, a plain step, and no say in its neighbours' steps.
        # Few tensor operations on purpose: on small batches each costs more than its arithmetic.
        m, at, E, X = self.m, state.slot.view(1), state.E, state.X
        g_prev = E.select(1, m)  # the previous step's residual
        dg = torch.sub(g, g_prev).mul_(state.has_prev)  # zero on a row's first step
        mix = torch.sub(z, state.z_prev).add_(dg, alpha=self.beta)
        E.index_copy_(1, at, dg.unsqueeze(1))
        X.index_copy_(1, at, mix.unsqueeze(1))
        g_prev.copy_(g)
        state.z_prev.copy_(z)
        state.has_prev.fill_(1.0)
        state.slot.add_(1).remainder_(m)

        products = torch.bmm(E, E.transpose(1, 2))[:, :m]  # [dG, g]^T [dG, g]: Gram, rhs
        gram, rhs = products[..., :m], products[..., m:]
        # The ridge, plus the smallest normal number: a zero dG column (never written, or no
        # difference yet) has no coupling and zero rhs, so its gamma is exactly 0 (its X column,
        # finite, then adds nothing), and a row with no columns yet takes a plain step; the
        # system is never singular because of them, with or without a ridge.
        diag = gram.diagonal(dim1=1, dim2=2)
        diag.add_(diag.sum(dim=1, keepdim=True), alpha=self.reg).add_(torch.finfo(z.dtype).tiny)
        gamma = torch.linalg.solve_ex(gram, rhs, check_errors=False)[0]
        # A singular or overflowing system has a non-finite solution (LU divides by a zero
        # pivot): that row takes a plain step. The sum is not finite where an entry is not (or
        # where the entries overflow it, no better).
        gamma.masked_fill_(gamma.sum(dim=1, keepdim=True).isfinite().logical_not_(), 0.0)
        plain = torch.add(z, g, alpha=self.beta)
        if z.shape[1] < 128 and z.device.type == "cpu":
            # z + beta g - sum_j gamma_j X_j as a broadcast product and a sum: for narrow
            # states on CPU about 3x faster than baddbmm's batched (1 x k) @ (k x n) products
            # (and about 2x slower from n = 128 on, where baddbmm takes its fast path).
            return plain.sub_((gamma * X).sum(dim=1))
        return torch.baddbmm(plain.unsqueeze(1), gamma.transpose(1, 2), X, alpha=-1).squeeze(1)

    def select(self, state: _AndersonState, keep: Tensor) -> _AndersonState:
        return state.select(keep)


@dataclass
class _BroydenState:
    """Rank-one terms u_i v_i^T of the inverse-Jacobian estimate; row r uses slots < count[r]."""

    U: Tensor
    V: Tensor
    count: Tensor  # (A,) int64
    z_prev: Tensor
    g_prev: Tensor
    has_prev: Tensor  # (A,) bool

    def select(self, keep: Tensor) -> _BroydenState:
        fields = (self.U, self.V, self.count, self.z_prev, self.g_prev, self.has_prev)
        return _BroydenState(*(t.index_select(0, keep) for t in fields))


@dataclass(frozen=True)
class Broyden:
    """Limited-memory 'good' Broyden on g(z) = f(z) - z with an inverse-Jacobian estimate.

    B = -I + sum_i u_i v_i^T holds at most m rank-one terms (memory O(m n), not O(max_iter n));
    when a row's memory is full it restarts from B = -I (dropping only the oldest term would leave
    the later terms, each built on it, inconsistent). Updates with a vanishing denominator are
    skipped. Safeguard (no line search): a row whose residual grew by more than `growth` since the
    last step restarts its memory and takes a plain step back from the previous iterate.
    """

    m: int = 8
    growth: float = 10.0
    SLOTTED: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or not 1 <= self.m <= 256:
            raise ValueError(f"broyden history m must be an int in 1..256, got {self.m!r}")
        if not 1.0 < self.growth < math.inf:
            raise ValueError(f"broyden growth must be > 1, got {self.growth}")

    def init(self, z: Tensor) -> _BroydenState:
        rows, n = z.shape
        return _BroydenState(
            U=z.new_zeros(rows, self.m, n),
            V=z.new_zeros(rows, self.m, n),
            count=torch.zeros(rows, dtype=torch.int64, device=z.device),
            z_prev=torch.zeros_like(z),
            g_prev=torch.zeros_like(z),
            has_prev=torch.zeros(rows, dtype=torch.bool, device=z.device),
        )

    @staticmethod
    def _apply(u: Tensor, v: Tensor, live: Tensor, x: Tensor) -> Tensor:
        """(-I + U^T V) x per row over the live slots, with U, V stored as (A, m, n)."""
        coef = (v @ x.unsqueeze(2)).squeeze(2) * live
        return -x + (coef.unsqueeze(1) @ u).squeeze(1)

    def _live(self, state: _BroydenState, dtype: torch.dtype) -> Tensor:
        slots = torch.arange(self.m, device=state.count.device)
        return (slots[None, :] < state.count[:, None]).to(dtype)

    def step(self, state: _BroydenState, z: Tensor, g: Tensor) -> Tensor:
        worse = state.has_prev & (g.norm(dim=1) > self.growth * state.g_prev.norm(dim=1))
        full = state.count >= self.m
        state.count = torch.where(worse | full, 0, state.count)

        s = z - state.z_prev
        y = g - state.g_prev
        live = self._live(state, z.dtype)
        b_y = self._apply(state.U, state.V, live, y)
        bt_s = self._apply(state.V, state.U, live, s)  # B^T s swaps the roles of u and v
        den = (s * b_y).sum(dim=1)
        size = s.norm(dim=1) * b_y.norm(dim=1)
        eps = torch.finfo(z.dtype).eps
        ok = state.has_prev & ~worse & torch.isfinite(den) & (den.abs() > eps * size)
        u = (s - b_y) / torch.where(ok, den, 1.0)[:, None]
        # Write every row's new term at its own next slot; only rows with `ok` count it as live.
        at = state.count.clamp_max(self.m - 1)[:, None, None].expand(-1, 1, z.shape[1])
        state.U.scatter_(1, at, u.unsqueeze(1))
        state.V.scatter_(1, at, bt_s.unsqueeze(1))
        state.count = state.count + ok.to(torch.int64)

        retreat = worse[:, None]
        z_back, g_back = state.z_prev, state.g_prev
        state.z_prev = torch.where(retreat, z_back, z)
        state.g_prev = torch.where(retreat, g_back, g)
        state.has_prev = torch.ones_like(state.has_prev)

        z_next = z - self._apply(state.U, state.V, self._live(state, z.dtype), g)
        z_next = torch.where(retreat, z_back + g_back, z_next)
        # A row whose quasi-Newton step is not finite takes a plain step instead.
        return torch.where(torch.isfinite(z_next).all(dim=1, keepdim=True), z_next, z + g)

    def select(self, state: _BroydenState, keep: Tensor) -> _BroydenState:
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
