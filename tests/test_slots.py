"""`SlotPool`: samples that join and leave a fixed pool every iteration get their solo answers.

Claims (float64, so "equal" means iteration counts and statuses identical, states within 1e-10):
random mixes of tolerances, caps, stop modes and arrival times, in pools small enough that slots
are reused many times, match `solve` run on each sample alone; a neighbour that diverges or turns
NaN does not change a sample's result; the pool refuses methods that cannot run in slots.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from small_models import SMALL_CONFIGS, small_input

from deq_server.core import DEQModel, SlotPool, Status, solve

TOLS = (1e-2, 1e-4, 1e-6, 1e-9)


def make_model(kind: str, seed: int) -> DEQModel:
    torch.manual_seed(seed)
    return DEQModel.from_config(SMALL_CONFIGS[kind]).double().eval()


def run_pool(pool: SlotPool, inj: torch.Tensor, z0, tol, cap, arrivals, should_stop=None):
    """Admit sample i at step arrivals[i] (or when a slot frees), step until all retired.
    Returns {i: (z, iterations, residual, status)}."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    results, step = {}, 0
    while len(results) < len(arrivals):
        ready = [i for i in order if arrivals[i] <= step][: pool.free]
        order = [i for i in order if i not in ready]
        if ready:
            pool.admit(ready, z0[ready], inj[ready], tol[ready], cap[ready])
        retired = pool.step(should_stop)
        step += 1
        if retired is not None:
            for j, i in enumerate(retired.owners):
                results[i] = (
                    retired.z[j],
                    int(retired.iterations[j]),
                    float(retired.residual[j]),
                    int(retired.status[j]),
                )
        assert step < 10_000
    return results


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(SMALL_CONFIGS)),
    method=st.sampled_from(["anderson", "picard"]),
    stop_mode=st.sampled_from(["rel", "abs"]),
    slots=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    samples=st.lists(
        st.tuples(st.sampled_from(TOLS), st.integers(1, 60), st.integers(0, 25)),
        min_size=1,
        max_size=14,
    ),
)
def test_every_sample_gets_its_solo_answer(kind, method, stop_mode, slots, seed, samples):
    model = make_model(kind, seed % 7)
    gen = torch.Generator().manual_seed(seed)
    x = small_input(kind, len(samples), gen)
    tol = torch.tensor([s[0] for s in samples], dtype=torch.float64)
    cap = torch.tensor([s[1] for s in samples])
    arrivals = [s[2] for s in samples]
    with torch.no_grad():
        inj = model.inject(x)
        z0 = model.init_state(x)
        pool = SlotPool(
            model.cell,
            slots=slots,
            state_shape=model.state_shape,
            inj_shape=inj.shape[1:],
            dtype=torch.float64,
            method=method,
            stop_mode=stop_mode,
        )
        results = run_pool(pool, inj, z0, tol, cap, arrivals)
        for i in range(len(samples)):
            solo = solve(
                model.cell,
                z0[i : i + 1],
                args=(inj[i : i + 1],),
                tol=float(tol[i]),
                max_iter=int(cap[i]),
                method=method,
                stop_mode=stop_mode,
            )
            z, iterations, residual, status = results[i]
            assert (iterations, status) == (int(solo.iterations[0]), int(solo.status[0])), i
            torch.testing.assert_close(z, solo.z[0], rtol=1e-10, atol=1e-12)
            # Residuals near 1e-9 carry the rounding of states (~1e-15): relative noise ~1e-6.
            assert math.isclose(residual, float(solo.residual[0]), rel_tol=1e-4, abs_tol=1e-13)


def scaled_cell(weight: torch.Tensor):
    """f(z, inj) = scale * tanh(W z + b): inj = [b, scale] per row, so one row can be poisoned."""

    def f(z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        return inj[:, -1:] * torch.tanh(z @ weight.T + inj[:, :-1])

    return f


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_a_poisoned_neighbour_does_not_change_a_sample(poison):
    gen = torch.Generator().manual_seed(3)
    n = 16
    weight = torch.randn(n, n, generator=gen, dtype=torch.float64)
    weight *= 0.9 / torch.linalg.matrix_norm(weight, ord=2)
    f = scaled_cell(weight)
    good = torch.cat([torch.randn(1, n, generator=gen, dtype=torch.float64), torch.ones(1, 1)], 1)
    bad_scale = float("nan") if poison == "nan" else 1e12
    bad = torch.cat([torch.randn(1, n, generator=gen, dtype=torch.float64), torch.ones(1, 1)], 1)
    bad[0, -1] = bad_scale
    z0 = torch.zeros(1, n, dtype=torch.float64)
    alone = solve(f, z0, args=(good,), tol=1e-10, max_iter=100, method="anderson")
    with torch.no_grad():
        pool = SlotPool(f, slots=3, state_shape=(n,), inj_shape=(n + 1,), dtype=torch.float64)
        one, hundred = torch.tensor([1e-10]), torch.tensor([100])
        results = {}

        def collect(retired):
            for j, owner in enumerate(retired.owners if retired is not None else []):
                results[owner] = (retired.z[j], int(retired.iterations[j]), retired.status[j])

        pool.admit(["bad-before"], z0, bad, one, hundred)
        collect(pool.step())
        pool.admit(["good"], z0, good, one, hundred)
        pool.admit(["bad-after"], z0, bad, one, hundred)
        while pool.busy:
            collect(pool.step())
    z, iterations, status = results["good"]
    assert iterations == int(alone.iterations[0])
    assert int(status) == Status.CONVERGED
    torch.testing.assert_close(z, alone.z[0], rtol=1e-12, atol=1e-14)
    if poison == "nan":
        assert int(results["bad-before"][2]) == int(results["bad-after"][2]) == Status.NONFINITE


def test_the_stop_hook_retires_only_the_rows_it_names():
    model = make_model("mlp", 0)
    x = small_input("mlp", 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        inj = model.inject(x)
        pool = SlotPool(
            model.cell, slots=4, state_shape=model.state_shape, inj_shape=(8,), dtype=torch.float64
        )
        tight = torch.full((4,), 1e-12, dtype=torch.float64)
        pool.admit(["a", "b", "c", "d"], model.init_state(x), inj, tight, torch.full((4,), 500))

        def stop_b(owners):
            return torch.tensor([int(Status.CANCELLED) if o == "b" else 0 for o in owners])

        retired = pool.step(stop_b)
    assert retired is not None
    assert retired.owners == ["b"]
    assert int(retired.status[0]) == Status.CANCELLED
    assert int(retired.iterations[0]) == 1
    assert pool.busy == 3
    assert sorted(pool.owners) == ["a", "c", "d"]


def test_methods_with_shared_state_are_refused():
    with pytest.raises(ValueError, match="broyden"):
        SlotPool(
            lambda z, inj: z,
            slots=2,
            state_shape=(3,),
            inj_shape=(3,),
            dtype=torch.float64,
            method="broyden",
        )


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_an_infinite_first_residual_retires_the_slot_at_once_as_nonfinite(method, stop_mode):
    """f(z, u) = u with u = inf for two samples: each leaves its slot after its first evaluation
    as NONFINITE (inf <= divergence * inf must not keep it running); the others converge as solo."""

    def f(z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        return inj.clone()

    gen = torch.Generator().manual_seed(5)
    inj = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    inj[0] = inj[3] = float("inf")
    z0 = torch.zeros(5, 6, dtype=torch.float64)
    tol, cap = torch.full((5,), 1e-10, dtype=torch.float64), torch.full((5,), 50)
    with torch.no_grad():
        pool = SlotPool(
            f,
            slots=3,
            state_shape=(6,),
            inj_shape=(6,),
            dtype=torch.float64,
            method=method,
            stop_mode=stop_mode,
        )
        results = run_pool(pool, inj, z0, tol, cap, arrivals=[0, 0, 1, 2, 2])
    for i in (0, 3):
        z, iterations, _, status = results[i]
        assert (iterations, status) == (1, Status.NONFINITE), i
        assert torch.isfinite(z).all()
    for i in (1, 2, 4):
        solo = solve(
            f,
            z0[i : i + 1],
            args=(inj[i : i + 1],),
            tol=1e-10,
            max_iter=50,
            method=method,
            stop_mode=stop_mode,
        )
        z, iterations, _, status = results[i]
        assert status == Status.CONVERGED
        assert iterations == int(solo.iterations[0])
        torch.testing.assert_close(z, inj[i], rtol=0, atol=0)
