"""The compiled solver (`--compile-step`, issue 12): torch.compile'd slot steps per bucket of
busy slots, and `solve`'s compiled iterations (dynamic batch size), give the eager answers
(float64, CPU); a cell the slot compiler cannot take runs eagerly instead of failing."""

from __future__ import annotations

import numpy as np
import torch
from serving_harness import running_server
from sklearn.datasets import load_digits
from torch import Tensor

from deq_client import DEQClient
from deq_server.core import SlotPool, load_checkpoint
from deq_server.models import bundled_checkpoints

X = torch.from_numpy(load_digits().data[:15]).double()


def digits() -> torch.nn.Module:
    return load_checkpoint(bundled_checkpoints()["digits"]).double().eval().frozen()


def drive(pool: SlotPool, model) -> dict[int, tuple[int, int, Tensor]]:  # type: ignore[no-untyped-def]
    """Samples join at steps 0, 2 and 5 (1, then 3, then 11 of them: buckets 1, 4 and 16), each
    with its own tolerance; returns sample -> (iterations, status, z) as they retire."""
    joins = {0: range(0, 1), 2: range(1, 4), 5: range(4, 15)}
    out: dict[int, tuple[int, int, Tensor]] = {}
    with torch.no_grad():
        for step in range(200):
            if step in joins:
                idx = list(joins[step])
                tol = torch.tensor([10.0 ** -(2 + i % 8) for i in idx], dtype=torch.float64)
                cap = torch.full((len(idx),), 60, dtype=torch.int64)
                pool.admit(idx, torch.zeros(len(idx), 64).double(), model.inject(X[idx]), tol, cap)
            retired = pool.step()
            if retired is not None:
                for i, owner in enumerate(retired.owners):
                    out[owner] = (
                        int(retired.iterations[i]),
                        int(retired.status[i]),
                        retired.z[i].clone(),
                    )
            if len(out) == 15:
                return out
    raise AssertionError("samples never retired")


def pool(model, compile: bool) -> SlotPool:  # type: ignore[no-untyped-def]
    return SlotPool(
        model.cell,
        slots=32,
        state_shape=model.state_shape,
        inj_shape=(64,),
        dtype=torch.float64,
        compile=compile,
    )


def test_compiled_slots_give_the_eager_answers_in_float64() -> None:
    model = digits()
    eager, compiled = pool(model, False), pool(model, True)
    expected, got = drive(eager, model), drive(compiled, model)
    assert compiled.compiled  # it did compile (no fallback)
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in expected.items()}
    for sample, (_, _, z) in expected.items():
        torch.testing.assert_close(got[sample][2], z, rtol=1e-12, atol=1e-12)
    assert len({v[0] for v in expected.values()}) > 3  # tolerances differ, so do iterations


class _Uncompilable(torch.nn.Module):
    """A cell with a host round trip in it, which a full-graph compile refuses."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.inner = inner

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        if z.abs().sum().item() >= 0:  # data-dependent Python control flow
            return self.inner.cell(z, inj)
        return z


def test_a_cell_the_compiler_cannot_take_runs_eagerly() -> None:
    model = digits()
    odd = _Uncompilable(model)
    expected = drive(pool(model, False), model)
    fallback = SlotPool(
        odd, slots=32, state_shape=(64,), inj_shape=(64,), dtype=torch.float64, compile=True
    )
    got = drive(fallback, model)
    assert not fallback.compiled
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in expected.items()}


def test_a_server_with_compiled_steps_answers_as_one_without(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = load_digits().data[:3].astype(np.float32)
    answers = []
    for compile_step in ("off", "on"):
        with (
            running_server(model_dir=tmp_path / compile_step, compile_step=compile_step) as s,
            DEQClient(f"127.0.0.1:{s.port}", timeout=300) as client,
        ):
            answers.append(client.infer("digits", x, tol=1e-5))
    eager, compiled = answers
    assert compiled.iterations.tolist() == eager.iterations.tolist()
    np.testing.assert_allclose(compiled.output, eager.output, rtol=1e-5, atol=1e-5)


def test_compiled_solve_gives_the_eager_answers_in_float64() -> None:
    """The request scheduler's path: `solve` with its iterations compiled (dynamic batch size:
    the sizes below share one program, apart from 1), per-sample tolerances, a hook."""
    model = digits()
    for rows in (1, 3, 15):
        x = X[:rows]
        tol = torch.tensor([10.0 ** -(2 + i % 9) for i in range(rows)], dtype=torch.float64)
        with torch.no_grad():
            y_eager, eager = model(x, tol=tol, max_iter=60)
            y_compiled, compiled = model(x, tol=tol, max_iter=60, compile=True)
        assert compiled.iterations.tolist() == eager.iterations.tolist()
        assert compiled.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(compiled.z, eager.z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-12, atol=1e-12)
