"""The engine: one thread steps every lane once per turn, in both scheduling modes.

Claims: a long request-level batch (broyden) does not hold up a slot lane; in request mode a
second batch starts while the first solves only when `workers` allows it; in both modes a bad job
fails alone, and a caller that leaves before its solve starts costs nothing and is reported
CANCELLED with 0 iterations. Synchronisation is on the engine's per-step callback.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from small_models import slow_model_dir
from test_continuous import Steps, assert_solo

from deq_server.core import BatchSolve, Status, load_checkpoint, solve
from deq_server.models import bundled_checkpoints
from deq_server.serving.engine import ContinuousScheduler, RequestScheduler
from deq_server.serving.scheduler import SolveJob, frozen


def slow(tmp_path):
    return load_checkpoint(slow_model_dir(tmp_path) / "slow.safetensors").eval()


def make(kind: str, steps: Steps, workers: int = 1):
    if kind == "continuous":
        return ContinuousScheduler(slots=4, on_batch=steps)
    return RequestScheduler(workers=workers, on_batch=steps)


def test_a_stepped_batch_solve_is_solve():
    """BatchSolve stepped by hand: rows only leave, it refuses a result before the end, and it
    ends where solve ends, row for row (float64)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, dtype=torch.float64, generator=gen) * 0.3
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    tol = torch.tensor([1e-2, 1e-6, 1e-10, 1e-4, 1e-8], dtype=torch.float64)

    def f(z, inj):
        return torch.tanh(z @ w.T + inj)

    want = solve(f, torch.zeros_like(x), args=(x,), tol=tol, max_iter=40)
    run = BatchSolve(f, torch.zeros_like(x), args=(x,), tol=tol, max_iter=40)
    with pytest.raises(RuntimeError):
        run.result()
    rows = []
    while not run.done:
        run.step()
        rows.append(run.rows)
    got = run.result()
    assert rows == sorted(rows, reverse=True)  # rows leave, none come back
    assert rows[-1] == 0
    assert got.steps == want.steps == len(rows)
    assert got.iterations.tolist() == want.iterations.tolist()
    assert got.status.tolist() == want.status.tolist()
    assert torch.equal(got.z, want.z)


def test_a_long_broyden_batch_does_not_hold_up_a_slot_lane(tmp_path):
    model = slow(tmp_path)
    x = torch.randn(1, 8)

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=4, on_batch=steps)
        long = SolveJob(model, x, {"method": "broyden", "max_iter": 10**5})
        long_call = asyncio.ensure_future(scheduler.submit(long))
        await steps.wait_for(1)  # the broyden batch is solving
        loose = SolveJob(model, x, {"method": "picard", "tol": 1e3})  # abs tol above ||f(0)||
        outcome = await scheduler.submit(loose)
        still_solving = not long_call.done()
        long.cancelled.set()
        cancelled = await long_call
        await scheduler.close()
        return outcome, still_solving, cancelled

    outcome, still_solving, cancelled = asyncio.run(main())
    assert still_solving
    assert outcome.result.status.tolist() == [int(Status.CONVERGED)]
    assert cancelled.result.status.tolist() == [int(Status.CANCELLED)]


@pytest.mark.parametrize("workers", [1, 2])
def test_request_batches_run_side_by_side_only_as_workers_allow(tmp_path, workers):
    model = slow(tmp_path)
    x = torch.randn(1, 8)

    async def main():
        steps = Steps()
        scheduler = make("request", steps, workers)
        long = SolveJob(model, x, {"max_iter": 300})  # needs all 300 (tol 1e-9 at rho 0.999)
        long_call = asyncio.ensure_future(scheduler.submit(long))
        await steps.wait_for(1)  # the long batch is solving
        loose = SolveJob(model, x, {"tol": 1e3})
        loose_call = asyncio.ensure_future(scheduler.submit(loose))
        done, _ = await asyncio.wait({long_call, loose_call}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        outcomes = await asyncio.gather(long_call, loose_call)
        await scheduler.close()
        return first is loose_call, outcomes, steps

    loose_first, (long, loose), steps = asyncio.run(main())
    assert loose_first == (workers == 2)
    assert steps.rows == [1, 1]  # two batches of one row, never merged
    assert long.result.status.tolist() == [int(Status.MAX_ITER)]
    assert loose.result.status.tolist() == [int(Status.CONVERGED)]


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_a_bad_job_fails_alone_in_either_mode(tmp_path, kind):
    model = slow(tmp_path)

    async def main():
        steps = Steps()
        scheduler = make(kind, steps)
        good = SolveJob(model, torch.randn(2, 8), {"max_iter": 50})
        bad_inputs = SolveJob(model, torch.randn(1, 7), {})  # wrong width
        bad_tol = SolveJob(model, torch.randn(1, 8), {"tol": torch.tensor([-1.0])})
        results = await asyncio.gather(
            *(scheduler.submit(j) for j in (good, bad_inputs, bad_tol)), return_exceptions=True
        )
        await scheduler.close()
        return good, results

    good, (outcome, bad_inputs, bad_tol) = asyncio.run(main())
    assert isinstance(bad_inputs, ValueError)
    assert isinstance(bad_tol, ValueError)
    assert_solo(model, good, outcome)


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_a_caller_that_leaves_before_its_solve_is_reported_cancelled(tmp_path, kind):
    model = slow(tmp_path)
    x = torch.randn(1, 8)
    solved = []

    async def main():
        steps = Steps()
        # continuous: one slot, so `gone` must wait for it; request: one batch at a time
        scheduler = (
            ContinuousScheduler(slots=1, on_batch=steps)
            if kind == "continuous"
            else (RequestScheduler(workers=1, on_batch=steps))
        )
        first = SolveJob(model, x, {"max_iter": 1000})
        first_call = asyncio.ensure_future(scheduler.submit(first))
        await steps.wait_for(1)
        gone = SolveJob(model, x, {"max_iter": 1000}, on_solved=solved.extend)
        gone_call = asyncio.ensure_future(scheduler.submit(gone))
        await asyncio.sleep(0)  # one loop pass: the task runs up to its await, so it is queued
        assert scheduler.pending() == 2
        gone_call.cancel()
        first.cancelled.set()
        await first_call
        after = SolveJob(model, x, {"tol": 1e3})
        await scheduler.submit(after)  # FIFO: `gone` was dropped before `after` was solved
        await scheduler.close()
        return steps

    steps = asyncio.run(main())
    assert len(solved) == 1
    assert solved[0].result.iterations.tolist() == [0]
    assert solved[0].result.status.tolist() == [int(Status.CANCELLED)]
    if kind == "request":
        assert steps.rows == [1, 1]  # `first`'s batch and `after`'s: none for `gone`


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_a_failing_batch_fails_alone_and_the_engine_keeps_serving(tmp_path, kind):
    """A head that raises (out of memory, say) fails the requests it was answering; the next
    request is served; nobody is left waiting."""
    model = slow(tmp_path)
    copy = frozen(model)
    real_head = copy.head
    calls = []

    def head_failing_once(z):
        calls.append(z.shape[0])
        if len(calls) == 1:
            raise RuntimeError("the head ran out of memory")
        return real_head(z)

    copy.head = head_failing_once

    async def main():
        scheduler = make(kind, Steps())
        first = SolveJob(model, torch.randn(1, 8), {"tol": 1e3})
        failed = await asyncio.wait_for(
            asyncio.gather(scheduler.submit(first), return_exceptions=True), 60
        )
        second = SolveJob(model, torch.randn(1, 8), {"tol": 1e3})
        outcome = await asyncio.wait_for(scheduler.submit(second), 60)
        await scheduler.close()
        return failed[0], outcome

    try:
        failed, outcome = asyncio.run(main())
    finally:
        del copy.head
    assert isinstance(failed, RuntimeError)
    assert outcome.result.status.tolist() == [int(Status.CONVERGED)]


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_close_answers_a_job_submitted_in_the_same_loop_iteration(kind):
    """A job still in the event loop's hand-over list when close() runs fails; it never hangs."""
    model = load_checkpoint(bundled_checkpoints()["digits"]).eval()

    async def main():
        scheduler = make(kind, Steps())
        call = asyncio.ensure_future(scheduler.submit(SolveJob(model, torch.zeros(1, 64), {})))
        await asyncio.sleep(0)  # one loop pass: the job is in the hand-over list, not flushed
        await scheduler.close()
        return await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 60)

    (result,) = asyncio.run(main())
    assert isinstance(result, RuntimeError)


def test_zero_row_jobs_are_refused_alone():
    model = load_checkpoint(bundled_checkpoints()["digits"]).eval()

    async def main():
        scheduler = ContinuousScheduler(slots=4)
        results = await asyncio.wait_for(
            asyncio.gather(
                scheduler.submit(SolveJob(model, torch.zeros(0, 64), {})),
                scheduler.submit(SolveJob(model, torch.full((1, 64), 8.0), {})),
                return_exceptions=True,
            ),
            60,
        )
        await scheduler.close()
        return results

    empty, good = asyncio.run(main())
    assert isinstance(empty, ValueError)
    assert good.result.status.tolist() == [int(Status.CONVERGED)]


@pytest.mark.parametrize("kind", ["request", "continuous"])
@pytest.mark.parametrize("length", [0, 2, 3])
def test_a_per_sample_tolerance_of_the_wrong_length_fails_alone(kind, length):
    """One tol per sample or none: a longer or shorter tensor is refused before it joins a batch,
    and the neighbour submitted with it gets its solo answer."""
    model = load_checkpoint(bundled_checkpoints()["digits"]).double().eval()

    async def main():
        scheduler = make(kind, Steps())
        good = SolveJob(model, torch.full((1, 64), 8.0, dtype=torch.float64), {"tol": 1e-6})
        bad = SolveJob(
            model,
            torch.full((1, 64), 8.0, dtype=torch.float64),
            {"tol": torch.full((length,), 1e-3, dtype=torch.float64)},
        )
        results = await asyncio.wait_for(
            asyncio.gather(scheduler.submit(good), scheduler.submit(bad), return_exceptions=True),
            60,
        )
        await scheduler.close()
        return good, results

    good, (outcome, refused) = asyncio.run(main())
    assert isinstance(refused, ValueError)
    assert_solo(model, good, outcome)
