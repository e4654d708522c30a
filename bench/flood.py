"""Flood: what unauthenticated and idle clients cost the callers who hold a token.

A deq-server subprocess (tokens configured, --max-concurrent-rpcs 256) serves `digits`. The
script measures an authenticated client's sequential Infer latency (p50/p99) three times:
unloaded; while a flood holds open as much as it can (token-less health Watch streams, token-less
InferStreams, and authenticated InferStreams that never send a request, spread over many
connections, from a process of its own so that its client work does not slow the probe's); and
after the flood has closed. It also records the server's resident memory at
each point (/proc), so that memory held by the flood, and released after it, shows.

    python bench/flood.py [--watch N] [--tokenless N] [--half-open N] [--out PATH]

Every loop is bounded; only 127.0.0.1 is contacted. A script, not a test: it prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _loopback import wait_ready
from grpc_health.v1 import health_pb2, health_pb2_grpc
from soak import footprint, start

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints

TOKEN = "flood-bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "flood.json"
PROBES = 300


def request() -> pb.InferRequest:
    x = np.full((1, 64), 8.0, np.float32)
    return pb.InferRequest(
        model="digits", input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    )


async def probe(target: str) -> dict[str, float]:
    """PROBES sequential authenticated Infer calls: p50/p99 in ms, and how many failed."""
    times, failed = [], 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        for _ in range(PROBES):
            start_t = time.perf_counter()
            try:
                await stub.Infer(request(), metadata=AUTH, timeout=30)
                times.append((time.perf_counter() - start_t) * 1e3)
            except grpc.aio.AioRpcError:
                failed += 1
    q = statistics.quantiles(times, n=100) if len(times) > 1 else [float("nan")] * 99
    return {"p50_ms": q[49], "p99_ms": q[98], "failed": failed}


async def hold_watch(channel: grpc.aio.Channel, opened: list[str]) -> None:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async for _ in call:
            opened.append("Watch open")
            await asyncio.Event().wait()  # held until cancelled
    except grpc.aio.AioRpcError as exc:
        opened.append(f"Watch {exc.code().name}")


async def hold_stream(channel: grpc.aio.Channel, metadata: Any, opened: list[str]) -> None:
    async def nothing() -> Any:  # half-open: the stream never sends a request
        await asyncio.Event().wait()
        yield pb.InferStreamRequest()

    call = deq_pb2_grpc.DEQServiceStub(channel).InferStream(nothing(), metadata=metadata)
    try:
        async for _ in call:
            pass
        opened.append("InferStream ended")
    except grpc.aio.AioRpcError as exc:
        opened.append(f"InferStream {exc.code().name}")


async def flood(target: str, args: argparse.Namespace, conn: Any) -> None:
    """Open the flood, tell `conn` when it had time to, hold it until told to stop, then send
    back what each attempt got."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    outcomes: list[str] = []
    tasks = []
    for i in range(args.watch):
        tasks.append(asyncio.create_task(hold_watch(channels[i % len(channels)], outcomes)))
    for i in range(args.tokenless):
        ch = channels[i % len(channels)]
        tasks.append(asyncio.create_task(hold_stream(ch, None, outcomes)))
    for i in range(args.half_open):
        ch = channels[i % len(channels)]
        tasks.append(asyncio.create_task(hold_stream(ch, AUTH, outcomes)))
    await asyncio.sleep(args.settle)  # let the flood open what it can (load, not a check)
    conn.send(len(outcomes))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    held = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    ended = sum(v for k, v in held.items() if k.startswith("InferStream"))
    held["InferStream open"] = args.tokenless + args.half_open - ended
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    conn.send(held)


def flood_process(target: str, args: argparse.Namespace, conn: Any) -> None:
    asyncio.run(flood(target, args, conn))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp())
    (folder / "digits.safetensors").write_bytes(bundled_checkpoints()["digits"].read_bytes())
    proc, port = start(folder, f"--admin-tokens={TOKEN}", "--max-concurrent-rpcs=256")
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            await wait_ready(ch)
        result: dict[str, Any] = {"rss_start_mb": footprint(proc.pid)["rss_kib"] / 1024}
        result["unloaded"] = await probe(target)
        ours, theirs = multiprocessing.Pipe()
        flooder = multiprocessing.get_context("spawn").Process(
            target=flood_process, args=(target, args, theirs)
        )
        flooder.start()
        loop = asyncio.get_running_loop()
        result["flood_answered_before_probe"] = await loop.run_in_executor(None, ours.recv)
        result["rss_flood_mb"] = footprint(proc.pid)["rss_kib"] / 1024
        result["flood"] = await probe(target)
        ours.send("stop")
        result["flood_outcomes"] = await loop.run_in_executor(None, ours.recv)
        flooder.join(60)
        rss = []
        for _ in range(10):  # bounded: up to 10 s for the server to settle
            await asyncio.sleep(1)
            rss.append(footprint(proc.pid)["rss_kib"] / 1024)
        result["rss_after_mb"] = rss[-1]
        result["after"] = await probe(target)
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--watch", type=int, default=2000, help="token-less Watch streams tried")
    p.add_argument("--tokenless", type=int, default=2000, help="token-less InferStreams tried")
    p.add_argument("--half-open", type=int, default=1000, help="authenticated, never sending")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--settle", type=float, default=5.0, help="seconds the flood opens for")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    result = asyncio.run(run(args))
    print("| phase | p50 (ms) | p99 (ms) | failed | server RSS (MB) |")
    print("|---|---|---|---|---|")
    for phase, rss in (
        ("unloaded", "rss_start_mb"),
        ("flood", "rss_flood_mb"),
        ("after", "rss_after_mb"),
    ):
        r = result[phase]
        print(
            f"| {phase} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed']} | {result[rss]:.0f} |"
        )
    print("flood outcomes:", result["flood_outcomes"])
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        settings=vars(args) | {"out": str(args.out)},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
