"""The solver driver: per-sample tolerances, retirement, statuses, hooks, safeguards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import Tensor

from deq_server.core import METHODS, Progress, Status, solve

METHOD_NAMES = sorted(METHODS)


def contractive_problem(
    batch: int, d: int, gen: torch.Generator, rho: float = 0.8
) -> tuple[Tensor, Tensor]:
    """W with spectral norm rho and a batch of injections, float64."""
    a = torch.randn(d, d, dtype=torch.float64, generator=gen)
    w = rho * a / torch.linalg.matrix_norm(a, ord=2)
    inj = torch.randn(batch, d, dtype=torch.float64, generator=gen)
    return w, inj


def tanh_cell(w: Tensor):
    def f(z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + inj)

    return f


class RowCounter:
    """Wraps a cell and records, per call, which original rows were evaluated."""

    def __init__(self, f):
        self.f = f
        self.calls: list[list[int]] = []

    def __call__(self, z: Tensor, inj: Tensor, rows: Tensor) -> Tensor:
        self.calls.append(rows.tolist())
        return self.f(z, inj)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_sample_meets_its_own_tolerance_and_retires_for_good(method, gen):
    batch = 12
    w, inj = contractive_problem(batch, 16, gen)
    tol = torch.where(torch.arange(batch) % 2 == 0, 1e-2, 1e-10).to(torch.float64)
    counter = RowCounter(tanh_cell(w))
    rows = torch.arange(batch)
    result = solve(
        counter,
        torch.zeros(batch, 16, dtype=torch.float64),
        args=(inj, rows),
        tol=tol,
        max_iter=200,
        method=method,
        stop_mode="rel",
    )
    assert (result.status == Status.CONVERGED).all()
    assert (result.residual <= tol).all()
    loose, tight = result.iterations[::2], result.iterations[1::2]
    assert loose.max() < tight.min()
    # Each row was evaluated exactly `iterations` times, in consecutive calls from the first:
    # once retired it never reappears.
    seen = Counter(r for call in counter.calls for r in call)
    for r in range(batch):
        assert seen[r] == result.iterations[r]
        present = [r in call for call in counter.calls]
        assert present == [True] * seen[r] + [False] * (len(present) - seen[r])
    assert result.steps == len(counter.calls) == int(result.iterations.max())


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_reported_residual_is_the_residual_of_the_returned_state(method, stop_mode, gen):
    w, inj = contractive_problem(6, 10, gen)
    f = tanh_cell(w)
    result = solve(
        f,
        torch.zeros(6, 10, dtype=torch.float64),
        args=(inj,),
        tol=1e-8,
        max_iter=100,
        method=method,
        stop_mode=stop_mode,
    )
    fz = f(result.z, inj)
    abs_res = (fz - result.z).norm(dim=1)
    expected = abs_res if stop_mode == "abs" else abs_res / fz.norm(dim=1)
    # Recomputing with another batch size rounds differently: allow float64 noise only.
    torch.testing.assert_close(result.residual, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_per_sample_max_iter_caps_each_row(method, gen):
    w, inj = contractive_problem(4, 10, gen, rho=0.95)
    caps = torch.tensor([1, 3, 5, 400])
    result = solve(
        tanh_cell(w),
        torch.zeros(4, 10, dtype=torch.float64),
        args=(inj,),
        tol=1e-14,
        max_iter=caps,
        method=method,
        stop_mode="abs",
    )
    assert result.status[:3].tolist() == [Status.MAX_ITER] * 3
    assert result.iterations[:3].tolist() == [1, 3, 5]
    assert result.status[3] == Status.CONVERGED


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_batched_rows_equal_solo_solves(method, gen):
    """Per-row state: a row's result does not depend on its neighbours."""
    batch = 5
    w, inj = contractive_problem(batch, 12, gen, rho=0.9)
    f = tanh_cell(w)
    tol = torch.logspace(-2, -10, batch, dtype=torch.float64)
    together = solve(
        f,
        torch.zeros(batch, 12, dtype=torch.float64),
        args=(inj,),
        tol=tol,
        max_iter=300,
        method=method,
    )
    for r in range(batch):
        alone = solve(
            f,
            torch.zeros(1, 12, dtype=torch.float64),
            args=(inj[r : r + 1],),
            tol=tol[r : r + 1],
            max_iter=300,
            method=method,
        )
        assert alone.iterations.item() == together.iterations[r].item()
        assert alone.status.item() == together.status[r].item()
        torch.testing.assert_close(alone.z[0], together.z[r], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_poisoned_neighbour_changes_nothing_for_the_others(method, gen):
    w, inj = contractive_problem(4, 8, gen)

    def f(z: Tensor, inj: Tensor, poison: Tensor) -> Tensor:
        out = torch.tanh(z @ w.T + inj)
        return torch.where(poison[:, None] & (z.abs().sum(1, keepdim=True) > 0), torch.nan, out)

    clean = torch.zeros(4, dtype=torch.bool)
    poisoned = torch.tensor([False, True, False, False])
    z0 = torch.zeros(4, 8, dtype=torch.float64)
    a = solve(f, z0, args=(inj, clean), tol=1e-10, max_iter=100, method=method)
    b = solve(f, z0, args=(inj, poisoned), tol=1e-10, max_iter=100, method=method)
    assert b.status[1] == Status.NONFINITE
    assert torch.isfinite(b.z).all()
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(a.iterations[keep], b.iterations[keep])
    torch.testing.assert_close(a.z[keep], b.z[keep], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_expansive_tanh_cell_fails_honestly_with_finite_states(method, gen):
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    w = 3.0 * q  # spectral norm 3
    inj = torch.randn(8, d, dtype=torch.float64, generator=gen)
    result = solve(
        tanh_cell(w),
        torch.zeros(8, d, dtype=torch.float64),
        args=(inj,),
        tol=1e-8,
        max_iter=100,
        method=method,
    )
    failed = {Status.DIVERGED, Status.NONFINITE, Status.MAX_ITER}
    assert set(result.status.tolist()) <= failed | {Status.CONVERGED}
    assert (result.status != Status.CONVERGED).any()
    assert torch.isfinite(result.z).all()
    bad = result.status != Status.CONVERGED
    assert (result.residual[bad] > 1e-8).all()


def test_expansive_linear_picard_is_diverged_then_nonfinite_never_nan(gen):
    """Picard on z <- 3 Q z + c grows geometrically. (Anderson and Broyden may instead find the
    unstable fixed point of this linear map, which is a correct answer.)"""
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    inj = torch.randn(4, d, dtype=torch.float64, generator=gen)
    z0 = torch.ones(4, d, dtype=torch.float64)

    def run(divergence: float):
        return solve(
            lambda z, c: z @ (3.0 * q).T + c,
            z0,
            args=(inj,),
            tol=1e-8,
            max_iter=10_000,
            method="picard",
            divergence=divergence,
        )

    result = run(divergence=1e5)
    assert (result.status == Status.DIVERGED).all()
    assert torch.isfinite(result.z).all()
    assert torch.isfinite(result.residual).all()
    # With divergence detection off, the iterates overflow: NONFINITE, still a finite state.
    result = run(divergence=float("inf"))
    assert (result.status == Status.NONFINITE).all()
    assert torch.isfinite(result.z).all()


def test_singular_anderson_system_takes_plain_steps_instead_of_raising():
    # g = f(z) - z is constant, so every history difference is zero: the Gram matrix is exactly 0.
    c = torch.ones(3, 4, dtype=torch.float64)
    result = solve(
        lambda z, c: z + c,
        torch.zeros(3, 4, dtype=torch.float64),
        args=(c,),
        tol=1e-6,
        max_iter=20,
        method="anderson",
        reg=0.0,
    )
    assert (result.status == Status.MAX_ITER).all()
    assert torch.isfinite(result.z).all()
    # A plain step each iteration from z0 = 0: the lowest-residual iterate is the start.
    assert torch.equal(result.iterations, torch.full((3,), 20))


def test_duplicate_history_columns_do_not_break_anderson(gen):
    # A linear map on a 1-D space gives rank-1 histories: the mixing system is singular for m > 1.
    _w, inj = contractive_problem(3, 1, gen, rho=0.5)
    result = solve(
        lambda z, c: 0.5 * z + c,
        torch.zeros(3, 1, dtype=torch.float64),
        args=(inj,),
        tol=1e-12,
        max_iter=50,
        method="anderson",
        m=5,
        reg=0.0,
    )
    assert (result.status == Status.CONVERGED).all()
    torch.testing.assert_close(result.z, 2 * inj)


def test_stop_hook_retires_rows_with_the_status_it_returns(gen):
    batch = 6
    w, inj = contractive_problem(batch, 10, gen, rho=0.95)
    seen: list[Progress] = []

    def should_stop(p: Progress) -> Tensor | None:
        seen.append(p)
        if p.step < 3:
            return None
        verdict = torch.where(p.active % 3 == 0, int(Status.DEADLINE), 0)
        return torch.where(p.active % 3 == 1, int(Status.CANCELLED), verdict)

    result = solve(
        tanh_cell(w),
        torch.zeros(batch, 10, dtype=torch.float64),
        args=(inj,),
        tol=1e-12,
        max_iter=500,
        should_stop=should_stop,
    )
    assert result.status.tolist() == [
        Status.DEADLINE,
        Status.CANCELLED,
        Status.CONVERGED,
        Status.DEADLINE,
        Status.CANCELLED,
        Status.CONVERGED,
    ]
    assert (result.iterations[result.status != Status.CONVERGED] == 3).all()
    assert torch.isfinite(result.z).all()
    assert seen[0].active.tolist() == list(range(batch))
    assert seen[-1].active.tolist() in ([2, 5], [2], [5])
    assert all(p.residual.shape == p.active.shape for p in seen)


def test_convergence_wins_over_the_hook_in_the_same_iteration(gen):
    w, inj = contractive_problem(2, 4, gen)
    result = solve(
        tanh_cell(w),
        torch.zeros(2, 4, dtype=torch.float64),
        args=(inj,),
        tol=1e3,
        max_iter=10,
        should_stop=lambda p: torch.full_like(p.active, int(Status.DEADLINE)),
    )
    assert (result.status == Status.CONVERGED).all()


def test_non_tensor_and_multi_dim_args_travel_with_rows(gen):
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=gen)

    def f(z: Tensor, x: Tensor, scale: float) -> Tensor:
        return scale * torch.tanh(z) + x

    result = solve(f, torch.zeros_like(x), args=(x, 0.5), tol=1e-12, max_iter=200)
    assert result.z.shape == x.shape
    torch.testing.assert_close(result.z, f(result.z, x, 0.5), rtol=0, atol=1e-10)


def test_empty_batch_returns_empty_result():
    result = solve(lambda z: z, torch.zeros(0, 3), tol=1e-3, max_iter=5)
    assert result.z.shape == (0, 3)
    assert result.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "newton"}, ValueError, "unknown method 'newton'"),
        ({"stop_mode": "max"}, ValueError, "unknown stop_mode"),
        ({"m": 3, "method": "picard"}, TypeError, "m"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"tol": torch.ones(3)}, ValueError, r"tol must be a scalar or shape \(2,\)"),
        ({"method": "anderson", "beta": 0.0}, ValueError, "beta"),
        ({"method": "anderson", "m": 0}, ValueError, "history"),
        ({"method": "broyden", "m": 0}, ValueError, "history"),
        ({"method": "picard", "damping": 1.5}, ValueError, "damping"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs, error, match):
    opts = {"tol": 1e-3, "max_iter": 5, **kwargs}
    with pytest.raises(error, match=match):
        solve(lambda z: z * 0.5, torch.ones(2, 3), **opts)


def test_args_must_be_batch_first():
    with pytest.raises(ValueError, match="batch-first"):
        solve(lambda z, w: z @ w, torch.ones(2, 3), args=(torch.ones(3, 3),), tol=1e-3, max_iter=5)


def test_status_values_are_stable_and_documented():
    assert [s.value for s in Status] == [1, 2, 3, 4, 5, 6]
    assert [s.name for s in Status] == [
        "CONVERGED",
        "MAX_ITER",
        "DIVERGED",
        "NONFINITE",
        "DEADLINE",
        "CANCELLED",
    ]
    assert all(s.message for s in Status)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cuda_matches_cpu(method, gen):
    w, inj = contractive_problem(8, 32, gen)
    cpu = solve(
        tanh_cell(w),
        torch.zeros(8, 32, dtype=torch.float64),
        args=(inj,),
        tol=1e-10,
        max_iter=200,
        method=method,
    )
    wc, ic = w.cuda(), inj.cuda()
    gpu = solve(
        tanh_cell(wc),
        torch.zeros(8, 32, dtype=torch.float64, device="cuda"),
        args=(ic,),
        tol=1e-10,
        max_iter=200,
        method=method,
    )
    assert torch.equal(cpu.status, gpu.status.cpu())
    torch.testing.assert_close(cpu.z, gpu.z.cpu(), rtol=1e-8, atol=1e-10)


def constant_cell(z: Tensor, inj: Tensor) -> Tensor:
    """f(z, u) = u: the fixed point is u, reached after one step."""
    return inj.clone()


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_an_infinite_first_residual_retires_the_row_at_once_as_nonfinite(stop_mode, method, gen):
    """abs <= divergence * first abs holds for inf <= 1e5 * inf: the first evaluation itself must
    stop a row whose residual is infinite, while its neighbours converge as they would alone."""
    inj = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    inj[0] = float("inf")
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    opts = {"tol": 1e-10, "max_iter": 50, "method": method, "stop_mode": stop_mode}
    result = solve(constant_cell, z0, args=(inj,), **opts)
    assert result.status[0] == Status.NONFINITE
    assert result.iterations[0] == 1
    assert torch.isfinite(result.z[0]).all()  # the best state seen: z0
    clean = solve(constant_cell, z0[1:], args=(inj[1:],), **opts)
    assert (result.status[1:] == Status.CONVERGED).all()
    assert torch.equal(result.iterations[1:], clean.iterations)
    torch.testing.assert_close(result.z[1:], inj[1:], rtol=0, atol=0)
