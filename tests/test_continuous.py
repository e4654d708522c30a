"""`ContinuousScheduler`: requests join and leave the solver batch at every iteration.

Claims: each request gets its solo answer whatever its neighbours and arrival time; a loose
request that arrives after a tight one is in flight finishes first; cancellation and deadlines free
the slot within one iteration; a request larger than the pool is admitted in parts; a caller that
leaves while queued costs no compute (tests/test_engine.py, both modes); broyden falls back to request-level batching; a job that
fails does not stop the scheduler. Synchronisation is on the scheduler's own per-step callback.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import torch
from small_models import slow_model_dir

from deq_server.core import Status, load_checkpoint
from deq_server.models import bundled_checkpoints
from deq_server.serving.engine import ContinuousScheduler
from deq_server.serving.scheduler import SolveJob


def digits_model():
    return load_checkpoint(bundled_checkpoints()["digits"]).double().eval()


class Steps:
    """Counts solver steps (the scheduler's on_batch callback) and lets a test wait for one."""

    def __init__(self) -> None:
        self.count = 0
        self.rows: list[int] = []
        self._cond = threading.Condition()

    def __call__(self, model: str, rows: int) -> None:
        with self._cond:
            self.count += 1
            self.rows.append(rows)
            self._cond.notify_all()

    async def wait_for(self, count: int) -> None:
        def wait() -> None:
            with self._cond:
                assert self._cond.wait_for(lambda: self.count >= count, timeout=60)

        await asyncio.get_running_loop().run_in_executor(None, wait)


def assert_solo(model, job: SolveJob, outcome) -> None:
    with torch.no_grad():
        y, solo = model(job.x, **job.solver)
    assert outcome.result.iterations.tolist() == solo.iterations.tolist()
    assert outcome.result.status.tolist() == solo.status.tolist()
    torch.testing.assert_close(outcome.y, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outcome.result.z, solo.z, rtol=1e-10, atol=1e-12)


def test_random_mixes_of_requests_get_their_solo_answers():
    model = digits_model()
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for _ in range(40):
        rows = rng.randint(1, 8)
        solver = {"tol": rng.choice([1e-2, 1e-4, 1e-6]), "max_iter": rng.choice([5, 50])}
        if rng.random() < 0.3:
            solver["method"] = "picard"
        if rng.random() < 0.2:
            solver["tol"] = torch.tensor([rng.choice([1e-3, 1e-8]) for _ in range(rows)])
        x = torch.randint(0, 17, (rows, 64), generator=gen).double()
        jobs.append((rng.randint(0, 30), SolveJob(model, x, solver)))

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=12, on_batch=steps)
        # A request that never converges keeps the solver stepping, so that arrival times
        # measured in solver steps always come; it is cancelled at the end.
        anchor = SolveJob(model, jobs[0][1].x[:1], {"tol": 1e-300, "max_iter": 10**6})
        anchor_call = asyncio.ensure_future(scheduler.submit(anchor))
        pending = []
        for at, job in sorted(jobs, key=lambda item: item[0]):
            await steps.wait_for(at)  # arrive at solver step `at` (or later)
            pending.append(asyncio.ensure_future(scheduler.submit(job)))
        outcomes = await asyncio.gather(*pending)
        anchor.cancelled.set()
        await anchor_call
        await scheduler.close()
        return [job for _, job in sorted(jobs, key=lambda item: item[0])], outcomes, steps

    ordered, outcomes, steps = asyncio.run(main())
    for job, outcome in zip(ordered, outcomes, strict=True):
        assert_solo(model, job, outcome)
    assert max(steps.rows) <= 12
    assert max(steps.rows) > 1  # requests really shared steps


def test_a_loose_request_after_a_tight_one_finishes_first(tmp_path):
    slow = load_checkpoint(slow_model_dir(tmp_path) / "slow.safetensors").eval()
    x = torch.randn(2, 8)

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=4, on_batch=steps)
        tight = SolveJob(slow, x, {"tol": 1e-9, "max_iter": 1000})
        loose = SolveJob(slow, x, {"tol": 1e3, "max_iter": 1000})  # abs tol above ||f(0)||
        tight_call = asyncio.ensure_future(scheduler.submit(tight))
        await steps.wait_for(1)  # the tight request holds two slots
        loose_call = asyncio.ensure_future(scheduler.submit(loose))
        done, _ = await asyncio.wait({tight_call, loose_call}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        tight.cancelled.set()
        late = await tight_call
        await scheduler.close()
        return first is loose_call, await loose_call, late

    loose_first, loose, tight = asyncio.run(main())
    assert loose_first
    assert set(loose.result.status.tolist()) == {int(Status.CONVERGED)}
    assert loose.result.iterations.max() < tight.result.iterations.min()
    assert set(tight.result.status.tolist()) == {int(Status.CANCELLED)}


def test_cancel_and_deadline_free_the_slot_within_one_iteration(tmp_path):
    slow = load_checkpoint(slow_model_dir(tmp_path) / "slow.safetensors").eval()
    x = torch.randn(1, 8)

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=1, on_batch=steps)
        first = SolveJob(slow, x, {"max_iter": 1000})
        first_call = asyncio.ensure_future(scheduler.submit(first))
        await steps.wait_for(3)
        now = time.monotonic()
        late = SolveJob(slow, x, {"max_iter": 1000}, deadline=now)  # waits: no free slot
        over_budget = SolveJob(slow, x, {"max_iter": 1000}, budget_deadline=now)
        queued = [asyncio.ensure_future(scheduler.submit(j)) for j in (late, over_budget)]
        seen = steps.count
        first.cancelled.set()
        outcomes = [await first_call, *await asyncio.gather(*queued)]
        await scheduler.close()
        return seen, outcomes

    seen, (cancelled, late, over_budget) = asyncio.run(main())
    assert cancelled.result.status.tolist() == [int(Status.CANCELLED)]
    assert cancelled.result.iterations.item() <= seen + 1
    for outcome in (late, over_budget):
        assert outcome.result.status.tolist() == [int(Status.DEADLINE)]
        assert outcome.result.iterations.tolist() == [1]


def test_a_request_larger_than_the_pool_is_admitted_in_parts():
    model = digits_model()
    x = torch.randint(0, 17, (10, 64), generator=torch.Generator().manual_seed(1)).double()
    job = SolveJob(model, x, {"tol": 1e-6})

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=3, on_batch=steps)
        outcome = await scheduler.submit(job)
        await scheduler.close()
        return outcome, steps

    outcome, steps = asyncio.run(main())
    assert_solo(model, job, outcome)
    assert max(steps.rows) == 3


def test_broyden_is_solved_by_the_request_level_fallback():
    model = digits_model()
    x = torch.randint(0, 17, (3, 64), generator=torch.Generator().manual_seed(2)).double()
    job = SolveJob(model, x, {"method": "broyden", "tol": 1e-6})

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=8, on_batch=steps)
        outcome = await scheduler.submit(job)
        await scheduler.close()
        return outcome, steps

    outcome, steps = asyncio.run(main())
    assert_solo(model, job, outcome)
    assert steps.rows == [3]  # one request-level batch


def test_a_failing_job_does_not_stop_the_scheduler():
    model = digits_model()

    async def main():
        scheduler = ContinuousScheduler(slots=4)
        bad = SolveJob(model, torch.zeros(1, 7, dtype=torch.float64), {})  # wrong width
        failure = None
        try:
            await scheduler.submit(bad)
        except ValueError as exc:
            failure = exc
        good = SolveJob(model, torch.full((1, 64), 8.0, dtype=torch.float64), {})
        outcome = await scheduler.submit(good)
        await scheduler.close()
        return failure, good, outcome

    failure, good, outcome = asyncio.run(main())
    assert failure is not None
    assert_solo(model, good, outcome)


def test_a_bad_job_fails_alone_while_others_are_solving(tmp_path):
    slow = load_checkpoint(slow_model_dir(tmp_path) / "slow.safetensors").eval()

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=8, on_batch=steps)
        good = SolveJob(slow, torch.randn(2, 8), {"max_iter": 50})
        good_call = asyncio.ensure_future(scheduler.submit(good))
        await steps.wait_for(1)
        bad = SolveJob(slow, torch.randn(1, 7), {})  # wrong width: refused on its own
        failure = None
        try:
            await scheduler.submit(bad)
        except ValueError as exc:
            failure = exc
        outcome = await good_call
        await scheduler.close()
        return failure, good, outcome

    failure, good, outcome = asyncio.run(main())
    assert failure is not None
    assert_solo(slow, good, outcome)


def test_a_failing_metrics_callback_does_not_cost_the_answer():
    model = digits_model()

    def broken(outcome) -> None:
        raise RuntimeError("metrics down")

    async def main():
        scheduler = ContinuousScheduler(slots=4)
        job = SolveJob(model, torch.full((2, 64), 8.0, dtype=torch.float64), {}, on_solved=broken)
        outcome = await asyncio.wait_for(scheduler.submit(job), 60)
        await scheduler.close()
        return job, outcome

    job, outcome = asyncio.run(main())
    assert_solo(model, job, outcome)


def test_close_answers_every_request_and_pending_counts_the_fallback(tmp_path):
    slow = load_checkpoint(slow_model_dir(tmp_path) / "slow.safetensors").eval()
    x = torch.randn(1, 8)

    async def main():
        steps = Steps()
        scheduler = ContinuousScheduler(slots=1, on_batch=steps)
        calls = [
            asyncio.ensure_future(scheduler.submit(SolveJob(slow, x, {"method": m})))
            for m in ("broyden", "broyden", "picard", "picard")
        ]
        await steps.wait_for(2)  # a broyden batch and a picard slot are solving
        in_flight = scheduler.pending()
        await scheduler.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        return in_flight, results

    in_flight, results = asyncio.run(main())
    assert in_flight == 4
    assert all(isinstance(r, RuntimeError) or r.result.status.numel() == 1 for r in results)
    assert any(isinstance(r, RuntimeError) for r in results)
