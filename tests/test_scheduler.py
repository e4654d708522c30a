"""Request-level batching: concurrent requests share a solve yet each gets its solo answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from deq_server.core import Status, load_checkpoint
from deq_server.models import bundled_checkpoints
from deq_server.serving.app import compile_step_for, scheduler_for
from deq_server.serving.config import ServerConfig
from deq_server.serving.engine import ContinuousScheduler, RequestScheduler
from deq_server.serving.scheduler import SolveJob, batch_key


def digits_model():
    return load_checkpoint(bundled_checkpoints()["digits"]).double().eval()


def test_concurrent_requests_are_batched_and_match_solo_solves():
    model = digits_model()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 17, (n, 64), generator=gen).double() for n in (1, 3, 2, 4)]
    options = [{"tol": 1e-2}, {"tol": 1e-8, "max_iter": 200}, {}, {"tol": 1e-5, "max_iter": 3}]

    async def main():
        scheduler = RequestScheduler(workers=1, max_batch=64)
        jobs = [SolveJob(model, x, dict(o)) for x, o in zip(inputs, options, strict=True)]
        outcomes = await asyncio.gather(*(scheduler.submit(job) for job in jobs))
        await scheduler.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert [o.batch_rows for o in outcomes] == [10] * 4  # one shared solve
    for x, opts, outcome in zip(inputs, options, outcomes, strict=True):
        with torch.no_grad():
            y, solo = model(x, **opts)
        assert outcome.result.iterations.tolist() == solo.iterations.tolist()
        assert outcome.result.status.tolist() == solo.status.tolist()
        torch.testing.assert_close(outcome.y, y, rtol=1e-10, atol=1e-12)
    assert set(outcomes[3].result.status.tolist()) == {int(Status.MAX_ITER)}


def test_a_cancelled_request_stops_only_its_own_rows():
    model = digits_model()
    x = torch.full((2, 64), 8.0, dtype=torch.float64)

    async def main():
        scheduler = RequestScheduler(workers=1)
        gone = SolveJob(model, x, {"tol": 1e-12, "max_iter": 500})
        gone.cancelled.set()
        kept = SolveJob(model, x, {"tol": 1e-12, "max_iter": 500})
        outcomes = await asyncio.gather(scheduler.submit(gone), scheduler.submit(kept))
        await scheduler.close()
        return outcomes

    gone, kept = asyncio.run(main())
    assert set(gone.result.status.tolist()) == {int(Status.CANCELLED)}
    assert gone.result.iterations.tolist() == [1, 1]
    assert set(kept.result.status.tolist()) == {int(Status.CONVERGED)}


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_both_schedulers_share_one_batch_rule_and_survive_a_failing_callback(kind):
    """The drift the two copies had: a request naming the model's default method batches with
    one naming none, and a failing on_solved costs nobody an answer, in both schedulers."""
    model = digits_model()
    x = torch.full((2, 64), 8.0, dtype=torch.float64)
    default = model.solver_defaults["method"]
    assert batch_key(SolveJob(model, x, {})) == batch_key(SolveJob(model, x, {"method": default}))
    assert batch_key(SolveJob(model, x, {})) != batch_key(SolveJob(model, x, {"method": "picard"}))

    def explode(outcome):
        raise RuntimeError("a broken metrics callback")

    async def main():
        scheduler = RequestScheduler(workers=1) if kind == "request" else ContinuousScheduler(8)
        jobs = [
            SolveJob(model, x, {"tol": 1e-6}, on_solved=explode),
            SolveJob(model, x, {"tol": 1e-6, "method": default}),
        ]
        outcomes = await asyncio.gather(*(scheduler.submit(job) for job in jobs))
        await scheduler.close()
        return outcomes

    for outcome in asyncio.run(main()):
        assert set(outcome.result.status.tolist()) == {int(Status.CONVERGED)}


@pytest.mark.parametrize("kind", ["request", "continuous"])
def test_requests_that_finish_in_one_turn_are_recorded_in_one_call_per_recorder(kind):
    """Metrics cost per call, so the engine hands a recorder all of a turn's outcomes at once;
    jobs with another recorder get their own call."""
    model = digits_model()
    x = torch.full((1, 64), 8.0, dtype=torch.float64)
    shared, other = [], []

    async def main():
        scheduler = RequestScheduler(workers=1) if kind == "request" else ContinuousScheduler(8)
        # tol 1e3: every sample converges at its first evaluation, so all finish in one turn
        jobs = [SolveJob(model, x, {"tol": 1e3}, on_solved=shared.append) for _ in range(4)]
        jobs.append(SolveJob(model, x, {"tol": 1e3}, on_solved=other.append))
        outcomes = await asyncio.wait_for(asyncio.gather(*(scheduler.submit(j) for j in jobs)), 60)
        await scheduler.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert [len(call) for call in shared] == [4]
    assert [len(call) for call in other] == [1]
    assert {id(o) for o in shared[0]} == {id(o) for o in outcomes[:4]}


def test_an_unhashable_recorder_is_called_on_its_own_and_the_engine_keeps_serving():
    model = digits_model()
    x = torch.full((1, 64), 8.0, dtype=torch.float64)

    @dataclass  # eq without frozen: unhashable
    class Tally:
        calls: list

        def __call__(self, outcomes):
            self.calls.append(len(outcomes))

    tally = Tally([])

    async def main():
        scheduler = RequestScheduler(workers=1)
        jobs = [SolveJob(model, x, {"tol": 1e3}, on_solved=tally) for _ in range(3)]
        # bounded: an engine thread killed by the recorder would leave these unanswered
        first = await asyncio.wait_for(asyncio.gather(*(scheduler.submit(j) for j in jobs)), 60)
        after = await asyncio.wait_for(scheduler.submit(SolveJob(model, x, {"tol": 1e3})), 60)
        await scheduler.close()
        return [*first, after]

    outcomes = asyncio.run(main())
    assert tally.calls == [3]  # the same object: one group
    assert all(o.result.status.tolist() == [int(Status.CONVERGED)] for o in outcomes)


def test_auto_picks_request_batching_on_a_cpu_and_continuous_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert scheduler_for(ServerConfig(), cpu) == "request"
    assert scheduler_for(ServerConfig(), gpu) == "continuous"
    for chosen in ("request", "continuous"):  # a named scheduler is what runs, anywhere
        assert scheduler_for(ServerConfig(scheduler=chosen), cpu) == chosen
        assert scheduler_for(ServerConfig(scheduler=chosen), gpu) == chosen


def test_auto_compiles_on_a_cpu_with_the_request_scheduler_and_a_compiler(monkeypatch, tmp_path):
    """--compile-step auto: on only where it measured faster (a CPU, request-level lanes) and a
    C++ compiler can build the programs; on and off are what they say, anywhere."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))  # the compiler AOTInductor would call
    assert compile_step_for(ServerConfig(), cpu) == (
        True,
        f"on (auto: CPU, request scheduler, {fake})",
    )
    assert not compile_step_for(ServerConfig(), gpu)[0]
    assert not compile_step_for(ServerConfig(scheduler="continuous"), cpu)[0]
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert compile_step_for(ServerConfig(), cpu) == (False, "off (auto: no C++ compiler on PATH)")
    for device in (cpu, gpu):
        assert compile_step_for(ServerConfig(compile_step="on"), device) == (True, "on")
        assert compile_step_for(ServerConfig(compile_step="off"), device) == (False, "off")


@pytest.mark.parametrize("value", [True, False, "yes", ""])
def test_a_compile_step_made_in_code_must_be_auto_on_or_off(value) -> None:
    """ServerConfig built in code skips the parser: a leftover bool must not pass for off."""
    with pytest.raises(ValueError, match="auto, on or off"):
        compile_step_for(ServerConfig(compile_step=value), torch.device("cpu"))
