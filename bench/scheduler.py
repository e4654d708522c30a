"""Request-level vs continuous (iteration-level) batching, over gRPC on loopback.

Two workloads: the bundled `digits` model and a d=256 seed cell (tanh, spectral norm 0.95). A
trace of requests of 1-8 samples, each request with a tol drawn from {1e-2, 1e-4, 1e-6}
(anderson, relative residual). For each scheduler a `deq-server --scheduler S` subprocess serves
the workload and this process drives it with one grpc.aio client:

1. Ideal gain G, from solo solves of the trace's requests (in this process, before any server):
   G = mean over request-level batches of the batch's largest per-sample iteration count,
   divided by the mean per-sample iteration count. The batches are the trace cut, in arrival
   order, into runs of the mean rows per batch that the request scheduler reached at saturation
   (deq_batch_size from its /metrics). When a solver step costs about the same whatever its
   number of busy rows, no scheduler beats request-level batching by much more than G.
2. Saturation: `--inflight` requests always outstanding (closed loop), samples/s.
3. Open loop: Poisson arrivals at 50% and 90% of the request scheduler's saturation rate;
   p50/p99 latency per tolerance class; mean busy slots per solver step.
4. In process (no gRPC, no client on the same cores): the same trace submitted straight to each
   scheduler with `--inflight` requests outstanding, samples/s. This isolates the schedulers'
   own cost from the gRPC layer's.

    python bench/scheduler.py [--seconds 30] [--inflight 128] [--slots 128] [--out P]

A script, not a test: prints markdown tables and writes the raw numbers as JSON. The client
shares the machine's cores with the server; the machine is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _loopback import free_port, wait_ready

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import DEQModel, load_checkpoint, save_checkpoint
from deq_server.models import bundled_checkpoints

TOLS = (1e-2, 1e-4, 1e-6)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scheduler.json"
TRACE = 4000  # requests in a trace; loads cycle through it
CALL_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Request:
    x: np.ndarray  # (rows, 64) float32
    tol: float


def seed_model() -> DEQModel:
    torch.manual_seed(0)
    config = {
        "cell": "mlp",
        "in_features": 64,
        "hidden": 256,
        "out_features": 10,
        "activation": "tanh",
        "norm": "spectral",
        "max_norm": 0.95,
        "init_scale": 2.0,  # above the cap, so W's spectral norm is exactly 0.95
    }
    return DEQModel.from_config(config).eval()


def make_trace(workload: str, rng: random.Random) -> list[Request]:
    gen = np.random.default_rng(rng.randrange(2**32))
    out = []
    for _ in range(TRACE):
        rows = rng.randint(1, 8)
        if workload == "digits":
            x = gen.integers(0, 17, (rows, 64)).astype(np.float32)
        else:
            x = gen.standard_normal((rows, 64)).astype(np.float32)
        out.append(Request(x, rng.choice(TOLS)))
    return out


def solo_iterations(model: DEQModel, trace: list[Request]) -> list[np.ndarray]:
    """Per-sample iterations of each request solved alone (the served dtype, float32)."""
    out = []
    with torch.no_grad():
        for request in trace:
            _, result = model(torch.from_numpy(request.x), tol=request.tol)
            out.append(result.iterations.numpy())
    return out


def ideal_gain(iterations: list[np.ndarray], rows_per_batch: float) -> float:
    """G for request-level batches of about `rows_per_batch` rows, cut in arrival order."""
    maxima, batch, rows = [], [], 0
    for its in iterations:
        batch.append(its)
        rows += len(its)
        if rows >= rows_per_batch:
            maxima.append(max(int(i.max()) for i in batch))
            batch, rows = [], 0
    per_sample = float(np.concatenate(iterations).mean())
    return float(np.mean(maxima)) / per_sample if maxima else 1.0


# --- server -------------------------------------------------------------------------------


def start(model_dir: Path, scheduler: str, slots: int) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "deq_server",
        f"--address=127.0.0.1:{port}",
        f"--metrics-address=127.0.0.1:{metrics_port}",
        f"--model-dir={model_dir}",
        f"--scheduler={scheduler}",
        f"--max-batch-slots={slots}",
        "--max-queue=100000",
        # the two schedulers as such, both eager (auto would compile the request scheduler's
        # iteration during the warm-up; bench/serving.py measures the compiled default)
        "--compile-step=off",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port, metrics_port


def batch_stats(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of deq_batch_size over all models, from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("deq_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("deq_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


# --- load ---------------------------------------------------------------------------------


def to_proto(model: str, request: Request) -> pb.InferRequest:
    tensor = pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT32, shape=list(request.x.shape), data=request.x.tobytes()
    )
    return pb.InferRequest(model=model, input=tensor, solver=pb.SolverOptions(tol=request.tol))


async def closed_loop(stub: Any, model: str, trace: list[Request], inflight: int, seconds: float):
    """`inflight` workers, each sending its next request when the last one returned."""
    samples, errors = 0, 0
    until = time.monotonic() + seconds
    cursor = iter(range(10**9))

    async def worker() -> None:
        nonlocal samples, errors
        while time.monotonic() < until:
            request = trace[next(cursor) % len(trace)]
            try:
                await stub.Infer(to_proto(model, request), timeout=CALL_TIMEOUT_S)
                samples += request.x.shape[0]
            except grpc.aio.AioRpcError:
                errors += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return samples / (time.monotonic() - start), errors


async def open_loop(
    stub: Any, model: str, trace: list[Request], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    """Poisson arrivals at `rate` requests/s for `seconds`; latency per tolerance class."""
    rng = random.Random(seed)
    latencies: dict[float, list[float]] = {tol: [] for tol in TOLS}
    errors = 0
    tasks = []

    async def one(request: Request) -> None:
        nonlocal errors
        sent = time.monotonic()
        try:
            await stub.Infer(to_proto(model, request), timeout=CALL_TIMEOUT_S)
            latencies[request.tol].append(time.monotonic() - sent)
        except grpc.aio.AioRpcError:
            errors += 1

    start = time.monotonic()
    next_at, i = start, 0
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # pacing of the arrivals
        tasks.append(asyncio.ensure_future(one(trace[i % len(trace)])))
        i += 1
        next_at += rng.expovariate(rate)
    await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT_S)
    out: dict[str, Any] = {"rate": rate, "requests": i, "errors": errors}
    for tol, values in latencies.items():
        ms = np.array(values) * 1e3
        out[f"{tol:g}"] = {
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "n": len(ms),
        }
    return out


async def measure(
    port: int,
    metrics_port: int,
    model: str,
    trace: list[Request],
    args: argparse.Namespace,
    rates: dict[str, float] | None,
    saturate: bool = True,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_ready(channel)
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        await closed_loop(stub, model, trace, args.inflight, min(3.0, args.seconds))  # warm-up
        if saturate:
            before = batch_stats(metrics_port)
            rate, errors = await closed_loop(stub, model, trace, args.inflight, args.seconds)
            after = batch_stats(metrics_port)
            result["saturation"] = {
                "samples_per_s": rate,
                "errors": errors,
                "rows_per_step": (after[0] - before[0]) / max(after[1] - before[1], 1.0),
            }
        for name, level in (rates or {}).items():
            before = batch_stats(metrics_port)
            load = await open_loop(stub, model, trace, level, args.seconds, seed=1)
            after = batch_stats(metrics_port)
            load["rows_per_step"] = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
            result[name] = load
    return result


def in_process(model: DEQModel, trace: list[Request], args: argparse.Namespace) -> dict[str, float]:
    """Samples/s of each scheduler fed directly, `inflight` requests outstanding, one pass."""
    from deq_server.serving.engine import ContinuousScheduler, RequestScheduler
    from deq_server.serving.scheduler import SolveJob

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as the server does

    async def run(scheduler: Any) -> float:
        gate = asyncio.Semaphore(args.inflight)
        samples = 0

        async def one(request: Request) -> None:
            nonlocal samples
            async with gate:
                job = SolveJob(model, torch.from_numpy(request.x), {"tol": request.tol})
                await scheduler.submit(job)
                samples += request.x.shape[0]

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in trace))
        seconds = time.perf_counter() - start
        await scheduler.close()
        return samples / seconds

    out = {
        "request": asyncio.run(run(RequestScheduler(1, 1024))),
        "continuous": asyncio.run(run(ContinuousScheduler(args.slots))),
    }
    torch.set_num_threads(threads)
    return out


def run_workload(workload: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    if workload == "digits":
        model = load_checkpoint(bundled_checkpoints()["digits"]).eval()
    else:
        model = seed_model()
    save_checkpoint(model, folder / f"{workload}.safetensors")
    trace = make_trace(workload, random.Random(0))
    iterations = solo_iterations(model, trace)
    per_sample = float(np.concatenate(iterations).mean())
    out: dict[str, Any] = {"mean_iterations": per_sample, "schedulers": {}}
    out["in_process_samples_per_s"] = in_process(model, trace[:2000], args)
    if args.in_process_only:
        return out
    rates = None
    mean_rows = float(np.mean([r.x.shape[0] for r in trace]))
    for scheduler in ("request", "continuous"):
        proc, port, metrics_port = start(folder, scheduler, args.slots)
        try:
            out["schedulers"][scheduler] = asyncio.run(
                measure(port, metrics_port, workload, trace, args, rates)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if rates is None:  # from the request scheduler's saturation, in requests/s
            sat = out["schedulers"]["request"]["saturation"]
            request_rate = sat["samples_per_s"] / mean_rows
            rates = {"load50": 0.5 * request_rate, "load90": 0.9 * request_rate}
            proc, port, metrics_port = start(folder, scheduler, args.slots)
            try:  # the open-loop levels of the request scheduler, now that they are known
                loads = asyncio.run(
                    measure(port, metrics_port, workload, trace, args, rates, saturate=False)
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            out["schedulers"]["request"].update({k: loads[k] for k in rates})
            out["request_rows_per_batch"] = sat["rows_per_step"]
    out["G"] = ideal_gain(iterations, out["request_rows_per_batch"])
    req = out["schedulers"]["request"]["saturation"]["samples_per_s"]
    cont = out["schedulers"]["continuous"]["saturation"]["samples_per_s"]
    out["speedup"] = cont / req
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | mean iters | G | scheduler | samples/s (sat.) | rows/step (sat.) "
        "| p50 / p99 ms at 50%: 1e-2 · 1e-4 · 1e-6 | p50 / p99 ms at 90%: 1e-2 · 1e-4 · 1e-6 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, r in results["workloads"].items():
        for name, s in r["schedulers"].items():

            def cell(level: str, s: dict[str, Any] = s) -> str:
                parts = []
                for tol in TOLS:
                    v = s[level][f"{tol:g}"]
                    parts.append(f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}" if v["n"] else "-")
                return " · ".join(parts) + f" ({s[level]['rows_per_step']:.1f} rows/step)"

            lines.append(
                f"| {workload} | {r['mean_iterations']:.2f} | {r['G']:.2f} | {name} "
                f"| {s['saturation']['samples_per_s']:.0f} | {s['saturation']['rows_per_step']:.1f} "
                f"| {cell('load50')} | {cell('load90')} |"
            )
        lines.append(
            f"| {workload} | | | continuous / request | {r['speedup']:.2f}x "
            f"(target >= 0.9 G = {0.9 * r['G']:.2f}x) | | | |"
        )
        ip = r["in_process_samples_per_s"]
        lines.append(
            f"| {workload} | | | in process (no gRPC): request {ip['request']:.0f}, "
            f"continuous {ip['continuous']:.0f} samples/s | "
            f"{ip['continuous'] / ip['request']:.2f}x | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--inflight", type=int, default=128)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--workloads", nargs="+", default=["digits", "seed256"])
    parser.add_argument("--in-process-only", action="store_true", help="skip the gRPC runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": vars(args) | {"out": str(args.out)},
        "workloads": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            folder = Path(tmp) / workload
            folder.mkdir()
            results["workloads"][workload] = run_workload(workload, folder, args)
            print(f"{workload}: done", file=sys.stderr)
    if args.in_process_only:
        print(
            json.dumps({w: r["in_process_samples_per_s"] for w, r in results["workloads"].items()})
        )
    else:
        print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
