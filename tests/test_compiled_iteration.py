"""`--compile-step` for the request-level lanes: a solver iteration compiled ahead of time
(`CompiledIteration`: torch.export + AOTInductor, any row count) gives the eager answers in
float64, is used only where it fits, is built in a child process by the serving layer, and a
lane whose program cannot be built keeps solving eagerly."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import threading
import weakref
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from deq_server.core import CompiledIteration, DEQModel, load_checkpoint, make_method, solve
from deq_server.models import bundled_checkpoints
from deq_server.serving import batch_lane, compiled_step
from deq_server.serving.engine import RequestScheduler
from deq_server.serving.scheduler import SolveJob, frozen

X = torch.from_numpy(load_digits().data[:20]).double()
COMPILE_TIMEOUT_S = 600  # a bound, not a timing: the compile takes seconds


def served() -> DEQModel:
    return load_checkpoint(bundled_checkpoints()["digits"]).double().eval()


def compiled(model: DEQModel, method: str, max_rows: int = 16) -> CompiledIteration:
    x = X[:2]
    with torch.no_grad():
        z0, inj = model.init_state(x), model.inject(x)
    return CompiledIteration(
        model.cell, make_method(method), z0, [inj], stop_mode="rel", divergence=1e5,
        max_rows=max_rows,
    )  # fmt: skip


def tolerances(rows: int) -> Tensor:
    return torch.tensor([10.0 ** -(2 + i % 9) for i in range(rows)], dtype=torch.float64)


def cancel_at_step_3(progress: Any) -> Tensor | None:
    """Stops the rows of odd batch index at step 3 (CANCELLED), as a caller leaving would."""
    if progress.step != 3:
        return None
    return (progress.active % 2) * 6  # Status.CANCELLED == 6


def run(model: DEQModel, rows: int, method: str, **kw: Any) -> Any:
    x = X[:rows]
    with torch.no_grad():
        return solve(
            model.cell, model.init_state(x), args=(model.inject(x),), tol=tolerances(rows),
            max_iter=60, method=method, **kw,
        )  # fmt: skip


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_the_compiled_iteration_gives_the_eager_answers_in_float64(method: str) -> None:
    """Rows retire at their own steps (so the program meets many row counts, 1 included), and a
    stop hook cancels some of them mid-way."""
    model = served().frozen()
    program = compiled(model, method)
    for rows, hook in ((1, None), (3, None), (15, None), (15, cancel_at_step_3)):
        eager = run(model, rows, method, should_stop=hook)
        got = run(model, rows, method, should_stop=hook, iteration=program)
        assert got.iterations.tolist() == eager.iterations.tolist()
        assert got.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(got.z, eager.z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.residual, eager.residual, rtol=1e-9, atol=1e-15)
    assert len(set(eager.iterations.tolist())) > 3  # tolerances differ, so do iterations
    assert 6 in eager.status.tolist()  # the hook did cancel rows


def test_an_iteration_that_does_not_fit_is_not_used() -> None:
    """Another method, more rows than it takes, another dtype, another model: the plain eager
    solve, exactly."""
    model = served().frozen()
    program = compiled(model, "anderson", max_rows=4)
    for rows, method in ((3, "picard"), (15, "anderson")):
        eager = run(model, rows, method)
        got = run(model, rows, method, iteration=program)
        assert torch.equal(got.z, eager.z)
        assert torch.equal(got.iterations, eager.iterations)
    single = served().float().frozen()
    x = X[:3].float()
    with torch.no_grad():
        args = dict(args=(single.inject(x),), tol=1e-4, max_iter=60)
        eager = solve(single.cell, single.init_state(x), **args)
        got = solve(single.cell, single.init_state(x), iteration=program, **args)
    assert torch.equal(got.z, eager.z)
    other = served().frozen()  # another model (other weights: the program bakes its own in)
    with torch.no_grad():
        other.layer.W.weight.mul_(0.5)
    eager = run(other, 3, "anderson")
    got = run(other, 3, "anderson", iteration=program)
    assert torch.equal(got.z, eager.z)


class _DataDependent(torch.nn.Module):
    """A cell with Python control flow on tensor values, which export refuses."""

    def __init__(self, inner: DEQModel) -> None:
        super().__init__()
        self.inner = inner

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        if z.abs().sum().item() >= 0:
            return self.inner.cell(z, inj)
        return z


def test_a_cell_export_cannot_take_raises_at_build() -> None:
    model = served().frozen()
    x = X[:2]
    with torch.no_grad():
        z0, inj = model.init_state(x), model.inject(x)
    odd = _DataDependent(model)
    with pytest.raises(RuntimeError, match="data-dependent"):
        CompiledIteration(
            odd.cell, make_method("anderson"), z0, [inj], stop_mode="rel", divergence=1e5,
            max_rows=8,
        )  # fmt: skip


def test_a_lane_solves_with_the_program_its_child_process_built(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """RequestScheduler(compile_step=True): the first request makes the lane, which has its
    iteration compiled in a child process; once that is ready the lane's answers are the eager
    ones (float64), and the log says the model runs its compiled iteration."""
    futures: list[Future[CompiledIteration]] = []

    def recording(*args: Any) -> Future[CompiledIteration]:
        futures.append(compiled_step.compile_iteration(*args))
        return futures[-1]

    monkeypatch.setattr(batch_lane, "compile_iteration", recording)
    model = served()
    reference = frozen(model)

    async def answers(model: DEQModel) -> list[Any]:
        scheduler = RequestScheduler(compile_step=True)
        try:
            first = await scheduler.submit(SolveJob(model, X[:1], {"tol": 1e-6}))
            program = await asyncio.wrap_future(futures[0])  # bounded by the compile's timeout
            assert isinstance(program, CompiledIteration)
            later = [
                await scheduler.submit(SolveJob(model, X[i : i + 3], {"tol": tolerances(3)}))
                for i in (0, 5, 10)
            ]
            return [first, *later]
        finally:
            await scheduler.close()

    outcomes = asyncio.run(answers(model))
    assert len(futures) == 1
    # the program, kept per served model, does not keep that model alive
    alive = weakref.ref(reference)
    del model, reference
    gc.collect()
    assert alive() is None
    assert isinstance(futures[0].result(), CompiledIteration)
    eager_model = served().frozen()  # the same weights
    for outcome, (start, rows) in zip(outcomes, [(0, 1), (0, 3), (5, 3), (10, 3)], strict=True):
        x = X[start : start + rows]
        tol = 1e-6 if rows == 1 else tolerances(3)
        with torch.no_grad():
            y, eager = eager_model(x, tol=tol)
        assert outcome.result.iterations.tolist() == eager.iterations.tolist()
        assert outcome.result.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(outcome.result.z, eager.z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outcome.y, y, rtol=1e-12, atol=1e-12)


def test_a_compile_that_fails_leaves_the_lane_eager(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A child that cannot finish (here: a timeout too short for any compile) fails the future
    with the reason, logged once; `ready` then gives None, so the lane keeps solving eagerly, and
    a lane made again for the same model and settings gets the same outcome, not a new compile."""
    monkeypatch.setattr(compiled_step, "COMPILE_TIMEOUT_S", 0.01)
    model = served()
    settings = {"method": "anderson", "stop_mode": "rel"}
    with caplog.at_level("WARNING", logger="deq_server.compile"):
        future = compiled_step.compile_iteration(model, frozen(model), "digits", settings, 8)
        assert isinstance(future.exception(timeout=COMPILE_TIMEOUT_S), subprocess.TimeoutExpired)
    assert compiled_step.ready(future) is None
    assert caplog.text.count("model digits solves eagerly") == 1
    again = compiled_step.compile_iteration(model, frozen(model), "digits", dict(settings), 8)
    assert again is future
    alive = weakref.ref(frozen(model))  # the failure kept with the lane holds no model
    del model
    gc.collect()
    assert alive() is None


def test_only_the_models_own_settings_are_compiled(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Requests naming other solver settings (a method option, another stop mode, another
    method) get lanes of their own, which solve eagerly: a client cannot make the server compile
    once per setting it invents. The default settings' lane (named or not) asks once."""
    asked: list[dict[str, Any]] = []

    def recording(served, model, name, shared, max_rows):  # type: ignore[no-untyped-def]
        asked.append(shared)
        return Future()  # never ready: the lane solves eagerly, no compile runs

    monkeypatch.setattr(batch_lane, "compile_iteration", recording)
    model = served()
    settings = [{}, {"method": "anderson"}, {"m": 3}, {"stop_mode": "abs"}, {"method": "picard"}]

    async def submit_all() -> None:
        scheduler = RequestScheduler(compile_step=True)
        try:
            for solver in settings:
                await scheduler.submit(SolveJob(model, X[:1], {"tol": 1e-4, **solver}))
        finally:
            await scheduler.close()

    asyncio.run(submit_all())
    assert asked == [
        {k: v for k, v in model.solver_options().items() if k not in ("tol", "max_iter")}
    ]


def test_a_compile_waiting_its_turn_holds_no_model(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Compiles run one at a time; a model unloaded while its compile waits (a burst of Train
    commits, say) is freed, and its compile ends with a LookupError instead of running."""
    gate, started = threading.Event(), threading.Event()

    def held(*args: Any) -> CompiledIteration:
        started.set()
        gate.wait(COMPILE_TIMEOUT_S)
        raise RuntimeError("held")

    monkeypatch.setattr(compiled_step, "_build", held)
    settings = {"method": "anderson", "stop_mode": "rel"}
    first = served()
    busy = compiled_step.compile_iteration(first, frozen(first), "first", settings, 8)
    assert started.wait(COMPILE_TIMEOUT_S)  # the one compile thread is now busy with `first`
    model = served()
    waiting = compiled_step.compile_iteration(model, frozen(model), "second", settings, 8)
    alive = weakref.ref(frozen(model))
    del model
    gc.collect()
    assert alive() is None
    gate.set()
    assert isinstance(busy.exception(timeout=COMPILE_TIMEOUT_S), RuntimeError)
    assert isinstance(waiting.exception(timeout=COMPILE_TIMEOUT_S), LookupError)


def test_fits_names_what_the_program_was_made_for() -> None:
    """One program, one check per setting it was built for (no compile per case: `fits` only)."""
    model = served().frozen()
    program = compiled(model, "anderson", max_rows=4)
    x = X[:3]
    with torch.no_grad():
        z, inj = model.init_state(x), model.inject(x)
    anderson = make_method("anderson")
    assert program.fits(model.cell, anderson, z, [inj], "rel")
    assert not program.fits(served().frozen().cell, anderson, z, [inj], "rel")  # another model
    assert not program.fits(model.cell, make_method("picard"), z, [inj], "rel")
    assert not program.fits(model.cell, make_method("anderson", m=3), z, [inj], "rel")
    assert not program.fits(model.cell, anderson, z, [inj], "abs")
    assert not program.fits(model.cell, anderson, z.float(), [inj.float()], "rel")
    big = X[:5]
    with torch.no_grad():
        assert not program.fits(
            model.cell, anderson, model.init_state(big), [model.inject(big)], "rel"
        )
    assert not program.fits(model.cell, anderson, z, [inj[:2]], "rel")  # args of other rows
