"""A lone request's floor: the bare solve, the engine's round trip, and the torch calls behind them.

One held-out `digits` sample at a time (bench/serving.py's inputs; tol 1e-4, anderson), one torch
thread, in this process (no gRPC, no metrics):

- bare: the frozen model's forward in `torch.inference_mode`, what the engine thread runs for a
  lone request with nothing around it; with `--compile`, also the same forward with its
  iterations as one compiled program (`CompiledIteration`, what `--compile-step` gives the
  request-level lanes; compiled once before the rounds);
- engine: `RequestScheduler.submit` awaited on an event loop: the hand-over to the engine thread,
  the lane's batch setup and finish, and the way back; its outcome splits it into queue (submit to
  batch start) and solve (batch start to finish) seconds;
- aten calls: torch operations dispatched per lone solve, counted with a `TorchDispatchMode` (on
  one-row tensors each costs more than its arithmetic, so their number sets the floor).

The two timings alternate for `--rounds` rounds, since this VM's speed drifts.

    python bench/lone_request.py [--requests 1000] [--rounds 3] [--compile] [--out P]

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import serving  # the sibling script: its inputs and machine facts
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deq_server.core import CompiledIteration, DEQModel, load_checkpoint, make_method
from deq_server.models import bundled_checkpoints
from deq_server.serving.engine import RequestScheduler
from deq_server.serving.scheduler import SolveJob

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lone_request.json"
TOL = 1e-4
WARMUP = 100  # requests left out of each timing


class _CountCalls(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _samples(n: int) -> list[torch.Tensor]:
    """bench/serving.py's request inputs, one sample each, cycled to n."""
    x, _, _ = serving.digits(1)
    return [torch.from_numpy(x[i % len(x)].copy()) for i in range(n)]


def _program(model: DEQModel) -> CompiledIteration:
    """The model's iteration compiled for the default solver settings."""
    x = torch.zeros(2, *model.input_shape)
    with torch.no_grad():
        z0, inj = model.init_state(x), model.inject(x)
    solver = model.solver_options()
    return CompiledIteration(
        model.cell, make_method(solver["method"]), z0, [inj], stop_mode=solver["stop_mode"],
        divergence=1e5, max_rows=256,
    )  # fmt: skip


def _bare(
    model: DEQModel, xs: list[torch.Tensor], program: CompiledIteration | None
) -> tuple[np.ndarray, float]:
    """Seconds per lone forward, and the mean iterations."""
    times, iterations = [], []
    with torch.inference_mode():
        for x in xs:
            start = time.perf_counter()
            _, result = model(x, tol=TOL, iteration=program)
            times.append(time.perf_counter() - start)
            iterations.append(int(result.iterations[0]))
    return np.asarray(times[WARMUP:]), float(np.mean(iterations))


async def _engine(model: DEQModel, xs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Seconds per awaited submit, with the outcome's queue and solve seconds."""
    scheduler = RequestScheduler()
    total, queue, solve = [], [], []
    try:
        for x in xs:
            start = time.perf_counter()
            outcome = await scheduler.submit(SolveJob(model, x, {"tol": TOL}))
            total.append(time.perf_counter() - start)
            queue.append(outcome.queue_seconds)
            solve.append(outcome.solve_seconds)
    finally:
        await scheduler.close()
    return {
        k: np.asarray(v[WARMUP:]) for k, v in (("total", total), ("queue", queue), ("solve", solve))
    }


def _count(model: DEQModel, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    counter = _CountCalls()
    with torch.inference_mode(), counter:
        model(x, tol=TOL)
    return sum(counter.calls.values()), dict(counter.calls.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="per timing and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="also time the forward with a compiled iteration"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.requests <= WARMUP:
        parser.error(f"--requests must be > {WARMUP} (the warm-up)")
    torch.set_num_threads(1)
    served = load_checkpoint(bundled_checkpoints()["digits"]).eval()
    frozen = served.frozen()
    xs = _samples(args.requests)
    calls, by_op = _count(frozen, xs[0])

    columns = ["bare", *(["bare_compiled"] if args.compile else []), "engine", "queue", "solve"]
    rows: list[dict[str, Any]] = []
    print("| round | " + " | ".join(f"{c} p50 ms" for c in columns) + " | mean iterations |")
    print("|---" * (len(columns) + 2) + "|")
    program = _program(frozen) if args.compile else None
    for r in range(1, args.rounds + 1):
        bare, iterations = _bare(frozen, xs, None)
        times = {"bare": bare}
        if program is not None:
            times["bare_compiled"] = _bare(frozen, xs, program)[0]
        engine = asyncio.run(_engine(served, xs))
        times.update(engine=engine["total"], queue=engine["queue"], solve=engine["solve"])
        row = {f"{c}_p50_ms": float(np.median(times[c])) * 1e3 for c in columns}
        row.update(round=r, mean_iterations=iterations)
        rows.append(row)
        cells = " | ".join(f"{row[f'{c}_p50_ms']:.3f}" for c in columns)
        print(f"| {r} | {cells} | {iterations:.2f} |")
    print(f"\naten calls per lone solve of sample 0: {calls}")
    out = {
        "machine": {**serving.machine_info(), "torch_threads": torch.get_num_threads()},
        "config": {
            "requests": args.requests,
            "rounds": args.rounds,
            "compile": args.compile,
            "tol": TOL,
            "warmup": WARMUP,
        },
        "aten_calls": calls,
        "aten_calls_by_op": by_op,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
