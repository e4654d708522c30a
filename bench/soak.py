"""Soak and overload, over gRPC on loopback (the long versions of tests/test_soak.py).

Soak: a deq-server subprocess serving `digits`; 64 concurrent clients of mixed Infer (1-32
samples, tol 1e-2..1e-6) for `--minutes`, and a Train session committing a new version every
`--commit-every` seconds. Per minute: requests, failed calls, p50/p99 latency, and the server's
resident memory, open file descriptors and threads (from /proc). Growth is measured from the end
of the first minute (warm-up) to the end.

Overload: a second server with `--max-queue Q`. Capacity C (requests/s) is measured closed-loop;
then Poisson arrivals at `--overload` x C for `--overload-seconds`. Reported: the share of calls
refused with RESOURCE_EXHAUSTED and how fast (p50/p99), the accepted calls' p99, and the queue
bound Q / C that a full queue takes to drain. No call may end in anything but OK or
RESOURCE_EXHAUSTED.

    python bench/soak.py [--minutes 10] [--commit-every 60] [--overload 3] [--out P]

A script, not a test: prints markdown tables and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _loopback import free_port, wait_ready

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints

CLIENTS = 64
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak.json"
CALL_TIMEOUT_S = 30.0


def footprint(pid: int) -> dict[str, int]:
    """Resident KiB, open file descriptors and threads of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {ln.split(":")[0]: ln.split()[1] for ln in status if ":" in ln and len(ln.split()) > 1}
    return {
        "rss_kib": int(field["VmRSS"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(field["Threads"]),
    }


def start(model_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "deq_server",
        f"--address=127.0.0.1:{port}",
        "--metrics-address=",
        f"--model-dir={model_dir}",
        *extra,
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def tensor(x: np.ndarray) -> pb.Tensor:
    dtype = pb.DATA_TYPE_INT64 if x.dtype == np.int64 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(x.shape), data=x.tobytes())


def infer_request(rng: random.Random, max_rows: int = 32) -> pb.InferRequest:
    rows = rng.randint(1, max_rows)
    x = np.array([[rng.randint(0, 16)] * 64 for _ in range(rows)], np.float32)
    tol = 10.0 ** -rng.randint(2, 6)
    return pb.InferRequest(model="digits", input=tensor(x), solver=pb.SolverOptions(tol=tol))


# A light client in its own process, one call every 20 ms: its latencies are the server's answer
# time under overload, free of the load generator's own backlog (it shares the cores).
PROBE = """
import json, sys, time
import grpc, numpy as np
from deq_client.pb.deq.v1 import deq_pb2 as pb, deq_pb2_grpc
port, seconds = int(sys.argv[1]), float(sys.argv[2])
x = np.full((4, 64), 8.0, np.float32)
tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 64], data=x.tobytes())
request = pb.InferRequest(model="digits", input=tensor, solver=pb.SolverOptions(tol=1e-4))
out, until = [], time.monotonic() + seconds
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = deq_pb2_grpc.DEQServiceStub(channel)
    while time.monotonic() < until:
        sent = time.monotonic()
        try:
            stub.Infer(request, timeout=30)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        out.append((code, time.monotonic() - sent))
        time.sleep(max(0.0, 0.02 - (time.monotonic() - sent)))  # pacing of the probe
print(json.dumps(out))
"""


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.array(values) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def soak(port: int, pid: int, minutes: int, commit_every: float) -> dict[str, Any]:
    minute = 60.0
    start = time.monotonic()
    until = start + minutes * minute
    buckets: list[dict[str, Any]] = [{"latency": [], "failures": []} for _ in range(minutes)]
    commits: list[str] = []

    def bucket() -> dict[str, Any]:
        return buckets[min(int((time.monotonic() - start) // minute), minutes - 1)]

    async def client(stub: Any, rng: random.Random) -> None:
        while time.monotonic() < until:
            sent = time.monotonic()
            try:
                await stub.Infer(infer_request(rng), timeout=CALL_TIMEOUT_S)
                bucket()["latency"].append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as exc:
                bucket()["failures"].append(exc.code().name)

    async def trainer(stub: Any) -> None:
        x = np.full((8, 64), 8.0, np.float32)
        y = (np.arange(8) % 10).astype(np.int64)
        config = pb.TrainConfig(
            model="digits", learning_rate=1e-4, loss=pb.LOSS_CROSS_ENTROPY, publish_as="soaked"
        )
        batch = pb.TrainRequest(batch=pb.TrainBatch(inputs=tensor(x), targets=tensor(y)))
        while True:  # the first commit right away, so that minute 1 (warm-up) includes training
            try:
                call = stub.Train(iter([pb.TrainRequest(config=config), *[batch] * 3]), timeout=60)
                events = [e async for e in call]
                commits.append(events[-1].committed.version)
            except grpc.aio.AioRpcError as exc:
                bucket()["failures"].append(f"Train {exc.code().name}")
            if until - time.monotonic() < commit_every:
                return
            await asyncio.sleep(commit_every)  # pacing of the workload

    async def sampler() -> list[dict[str, int]]:
        samples = []
        for m in range(1, minutes + 1):
            await asyncio.sleep(max(0.0, start + m * minute - time.monotonic() - 0.5))
            samples.append(footprint(pid))
        return samples

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_ready(channel)
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        clients = [client(stub, random.Random(i)) for i in range(CLIENTS)]
        *_, samples = await asyncio.gather(trainer(stub), *clients, sampler())
    rows = []
    for m, (b, fp) in enumerate(zip(buckets, samples, strict=True), start=1):
        rows.append(
            {"minute": m, "requests": len(b["latency"]), "failures": Counter(b["failures"])}
            | percentiles(b["latency"])
            | fp
        )
    first, last = samples[0], samples[-1]
    return {
        "minutes": rows,
        "commits": commits,
        "growth_after_warmup": {
            "rss": last["rss_kib"] / first["rss_kib"] - 1.0,
            "fds": last["fds"] - first["fds"],
            "threads": last["threads"] - first["threads"],
        },
    }


async def overload(port: int, factor: float, seconds: float, queue: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_ready(channel)
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        rng = random.Random(0)
        done = 0
        until = time.monotonic() + 10.0

        async def closed() -> None:
            nonlocal done
            while time.monotonic() < until:
                try:
                    await stub.Infer(infer_request(rng, 8), timeout=CALL_TIMEOUT_S)
                    done += 1
                except grpc.aio.AioRpcError as exc:  # a limit below the closed loop's width
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise

        begin = time.monotonic()
        await asyncio.gather(*(closed() for _ in range(CLIENTS)))
        capacity = done / (time.monotonic() - begin)

        accepted: list[float] = []
        refused: list[float] = []
        other: Counter[str] = Counter()

        async def one(request: pb.InferRequest) -> None:
            sent = time.monotonic()
            try:
                await stub.Infer(request, timeout=CALL_TIMEOUT_S)
                accepted.append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(time.monotonic() - sent)
                else:
                    other[exc.code().name] += 1

        rate = factor * capacity
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(port), str(seconds)], stdout=subprocess.PIPE
        )
        tasks, start = [], time.monotonic()
        next_at = start
        while next_at < start + seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # pacing of the arrivals
            tasks.append(asyncio.ensure_future(one(infer_request(rng, 8))))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        probes = json.loads(probe.communicate(timeout=CALL_TIMEOUT_S + seconds)[0])
    return {
        "probe": {
            "calls": len(probes),
            "refused": percentiles([t for code, t in probes if code == "RESOURCE_EXHAUSTED"]),
            "accepted": percentiles([t for code, t in probes if code == "OK"]),
            "codes": dict(Counter(code for code, _ in probes)),
        },
        "capacity_rps": capacity,
        "offered_rps": rate,
        "calls": len(tasks),
        "refused_share": len(refused) / max(len(tasks), 1),
        "refused": percentiles(refused),
        "accepted": percentiles(accepted),
        "other_codes": dict(other),
        "queue_bound_ms": 1e3 * queue / capacity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--commit-every", type=float, default=60.0)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--queue", type=int, default=64, help="--max-queue of the overload server")
    parser.add_argument(
        "--max-concurrent-rpcs", type=int, default=0, help="of the overload server (0: none)"
    )
    parser.add_argument("--skip-soak", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
        "settings": vars(args) | {"out": str(args.out)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(bundled_checkpoints()["digits"], Path(tmp) / "digits.safetensors")
        if not args.skip_soak:
            proc, port = start(Path(tmp), "--max-queue=4096")
            try:
                results["soak"] = asyncio.run(soak(port, proc.pid, args.minutes, args.commit_every))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        proc, port = start(
            Path(tmp),
            f"--max-queue={args.queue}",
            f"--max-concurrent-rpcs={args.max_concurrent_rpcs}",
        )
        try:
            results["overload"] = asyncio.run(
                overload(port, args.overload, args.overload_seconds, args.queue)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if "soak" in results:
        print("| minute | requests | failed | p50 ms | p99 ms | RSS MiB | fds | threads |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results["soak"]["minutes"]:
            print(
                f"| {r['minute']} | {r['requests']} | {sum(r['failures'].values())} "
                f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_kib'] / 1024:.0f} "
                f"| {r['fds']} | {r['threads']} |"
            )
        g = results["soak"]["growth_after_warmup"]
        print(
            f"\ngrowth after minute 1: RSS {100 * g['rss']:+.1f}%, fds {g['fds']:+d}, "
            f"threads {g['threads']:+d}; commits: {len(results['soak']['commits'])}"
        )
    o = results["overload"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    p = o["probe"]
    print(
        f"probe client ({p['calls']} calls, {p['codes']}): refused p50 "
        f"{ms(p['refused']['p50_ms'])} / p99 {ms(p['refused']['p99_ms'])}; accepted p50 "
        f"{ms(p['accepted']['p50_ms'])} / p99 {ms(p['accepted']['p99_ms'])}"
    )
    print(
        f"\noverload: capacity {o['capacity_rps']:.0f} req/s, offered {o['offered_rps']:.0f} req/s; "
        f"refused {100 * o['refused_share']:.0f}% (p50 {ms(o['refused']['p50_ms'])}, "
        f"p99 {ms(o['refused']['p99_ms'])}); accepted p99 {ms(o['accepted']['p99_ms'])} "
        f"vs queue bound {o['queue_bound_ms']:.0f} ms; other codes {o['other_codes']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=dict))


if __name__ == "__main__":
    main()
