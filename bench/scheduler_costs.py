"""Where a continuous-batching turn spends its time (the diagnosis behind bench/scheduler.py).

1. Step cost against busy rows: `SlotPool.step` alone (digits, anderson, one torch thread), and
   `solve` on a batch of the same size, in ms per step. Flat = the GPU-like regime where
   iteration-level batching pays; proportional to rows = the CPU regime where request-level
   batching with per-sample retirement (as `solve` does) already wastes little.
2. Inside a serving process under closed-loop gRPC load (`--inflight` requests of 1-8 samples,
   tol in {1e-2, 1e-4, 1e-6}): the solver thread's time per turn, split into admission, the
   pool step (wall and thread CPU), retirement and delivery, and waiting for work. The server
   runs in this process (the load generator in a subprocess) with the turn's parts wrapped in
   timers.

    python bench/scheduler_costs.py [--seconds 10] [--inflight 128] [--slots 512] [--out P]

A script, not a test: prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deq_server.core import SlotPool, load_checkpoint, solve
from deq_server.core import _slots as slots_module
from deq_server.models import bundled_checkpoints
from deq_server.serving import engine, slot_lane
from deq_server.serving.app import start_server
from deq_server.serving.config import ServerConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scheduler_costs.json"

LOAD = """
import asyncio, random, sys, time
import grpc, numpy as np
from deq_client.pb.deq.v1 import deq_pb2 as pb, deq_pb2_grpc

port, seconds, inflight = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])

async def main():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        rng, gen = random.Random(0), np.random.default_rng(0)
        requests = []
        for _ in range(500):
            rows = rng.randint(1, 8)
            x = gen.integers(0, 17, (rows, 64)).astype(np.float32)
            tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[rows, 64], data=x.tobytes())
            tol = pb.SolverOptions(tol=rng.choice([1e-2, 1e-4, 1e-6]))
            requests.append((rows, pb.InferRequest(model="digits", input=tensor, solver=tol)))
        until, samples = time.monotonic() + seconds, 0

        async def worker(i):
            nonlocal samples
            n = i
            while time.monotonic() < until:
                rows, request = requests[n % len(requests)]
                await stub.Infer(request, timeout=30)
                samples += rows
                n += inflight

        start = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(inflight)))
        print(samples / (time.monotonic() - start))

asyncio.run(main())
"""


def step_costs() -> list[dict[str, float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_checkpoint(bundled_checkpoints()["digits"]).eval().frozen()
    out = []
    with torch.no_grad():
        for rows in (8, 32, 128, 512):
            x = torch.randint(0, 17, (rows, 64)).float()
            inj = model.inject(x)
            pool = SlotPool(
                model.cell, slots=rows, state_shape=(64,), inj_shape=(64,), dtype=torch.float32
            )
            never = torch.full((rows,), 1e-30), torch.full((rows,), 10**9)
            pool.admit(list(range(rows)), torch.zeros(rows, 64), inj, *never)
            pool.step()
            start = time.perf_counter()
            for _ in range(100):
                pool.step()
            pool_ms = (time.perf_counter() - start) * 10
            start = time.perf_counter()
            result = solve(model.cell, torch.zeros(rows, 64), args=(inj,), tol=1e-30, max_iter=100)
            solve_ms = (time.perf_counter() - start) * 1e3 / result.steps
            out.append({"rows": rows, "pool_ms_per_step": pool_ms, "solve_ms_per_step": solve_ms})
    torch.set_num_threads(threads)
    return out


class Timers:
    """Wall time (and thread CPU time) of wrapped methods, accumulated per name."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        totals = self.totals.setdefault(label, [0.0, 0.0, 0.0])

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                totals[0] += time.perf_counter() - wall
                totals[1] += time.thread_time() - cpu
                totals[2] += 1

        setattr(owner, name, timed)


async def serve_and_load(args: argparse.Namespace, timers: Timers) -> float:
    config = ServerConfig(
        address="127.0.0.1:0",
        metrics_address="",
        max_batch_slots=args.slots,
        max_queue=100_000,
        compile_step="off",  # the schedulers' own costs, as measured before auto compiled
    )
    running = await start_server(config)
    loop = asyncio.get_running_loop()
    load: Callable[[], subprocess.CompletedProcess[str]] = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", LOAD, str(running.port), str(args.seconds), str(args.inflight)],
        capture_output=True,
        text=True,
        check=True,
    )
    await loop.run_in_executor(None, load)  # warm-up pass
    for totals in timers.totals.values():
        totals[:] = [0.0, 0.0, 0.0]
    done = await loop.run_in_executor(None, load)
    await running.stop(1.0)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--inflight", type=int, default=128)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    costs = step_costs()
    print("| busy rows | SlotPool.step ms | solve ms per step |\n| --- | --- | --- |")
    for c in costs:
        print(f"| {c['rows']} | {c['pool_ms_per_step']:.2f} | {c['solve_ms_per_step']:.2f} |")

    timers = Timers()
    timers.wrap(slot_lane.SlotLane, "turn", "turn (all)")
    timers.wrap(slot_lane.SlotLane, "admit", "admission")
    timers.wrap(slots_module.SlotPool, "step", "pool step")
    timers.wrap(engine.Engine, "_wait_for_work", "waiting for work")
    samples_per_s = asyncio.run(serve_and_load(args, timers))
    turns = timers.totals["turn (all)"][2] or 1.0
    print(f"\nserving: {samples_per_s:.0f} samples/s; per turn ({turns:.0f} turns):")
    print("| part | wall ms | thread CPU ms |\n| --- | --- | --- |")
    parts = {}
    for label, (wall, cpu, _) in timers.totals.items():
        parts[label] = {"wall_ms": 1e3 * wall / turns, "cpu_ms": 1e3 * cpu / turns}
        print(f"| {label} | {parts[label]['wall_ms']:.2f} | {parts[label]['cpu_ms']:.2f} |")
    rest = {
        k: parts["turn (all)"][k] - parts["admission"][k] - parts["pool step"][k]
        for k in ("wall_ms", "cpu_ms")
    }
    print(
        f"| retirement + delivery (turn - admission - step) | {rest['wall_ms']:.2f} "
        f"| {rest['cpu_ms']:.2f} |"
    )
    result = {
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
        "settings": vars(args) | {"out": str(args.out)},
        "step_costs": costs,
        "serving_samples_per_s": samples_per_s,
        "per_turn": parts | {"retirement + delivery": rest},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
