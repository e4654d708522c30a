"""Replicas: how long until a commit on one replica is served by all the others.

N deq-server processes (2 and 4 by default) share one model directory with
`--model-control poll --poll-interval P`. The script commits a fine-tune of `digits` on one
replica (round-robin), then asks every other replica for the new version until each serves it,
and records the delay from the commit's answer to each replica's first answer from the new
version. Expect about half an interval on average and at most one interval plus a load.

    python bench/replicas.py [--replicas 2 4] [--poll-interval 1.0] [--commits 10] [--out PATH]

Every loop is bounded; only 127.0.0.1 is contacted. A script, not a test: it prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from soak import start

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc

X = np.full((8, 64), 8.0, np.float32)


def tensor(x: np.ndarray) -> pb.Tensor:
    dtype = pb.DATA_TYPE_INT64 if x.dtype == np.int64 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(x.shape), data=x.tobytes())


async def commit(stub: deq_pb2_grpc.DEQServiceStub) -> str:
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    batch = pb.TrainBatch(inputs=tensor(X), targets=tensor(np.arange(8, dtype=np.int64)))
    requests = [pb.TrainRequest(config=config), pb.TrainRequest(batch=batch)]
    last = None
    async for response in stub.Train(iter(requests), timeout=120):
        last = response
    assert last is not None
    return str(last.committed.version)


async def served_after(stub: deq_pb2_grpc.DEQServiceStub, version: str, since: float) -> float:
    """Seconds from `since` until `stub`'s replica answers from `version` (bounded: 60 s)."""
    request = pb.InferRequest(model="digits", version=version, input=tensor(X[:1]))
    while time.perf_counter() - since < 60:
        try:
            await stub.Infer(request, timeout=10)
            return time.perf_counter() - since
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.005)  # asking again: the version is not there yet
    raise RuntimeError(f"version {version} never served")


async def measure(replicas: int, interval: float, commits: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        extra = ("--model-control=poll", f"--poll-interval={interval}", "--keep-versions=2")
        procs = [start(Path(folder), *extra) for _ in range(replicas)]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _, port in procs]
        try:
            for channel in channels:
                await wait_ready(channel)
            stubs = [deq_pb2_grpc.DEQServiceStub(c) for c in channels]
            delays: list[float] = []
            for n in range(commits):
                source = n % replicas
                version = await commit(stubs[source])
                since = time.perf_counter()
                others = [s for i, s in enumerate(stubs) if i != source]
                delays += await asyncio.gather(*(served_after(s, version, since) for s in others))
        finally:
            for channel in channels:
                await channel.close()
            for proc, _ in procs:
                proc.terminate()
                proc.wait(timeout=60)
    ordered = sorted(delays)
    return {
        "replicas": replicas,
        "poll_interval_s": interval,
        "commits": commits,
        "delay_mean_s": statistics.fmean(delays),
        "delay_p50_s": ordered[len(ordered) // 2],
        "delay_max_s": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/replicas.json")
    args = parser.parse_args()
    rows = [asyncio.run(measure(n, args.poll_interval, args.commits)) for n in args.replicas]
    print(f"{'replicas':>8} {'interval':>9} {'mean':>8} {'p50':>8} {'max':>8}  (commit -> served)")
    for r in rows:
        print(
            f"{r['replicas']:>8} {r['poll_interval_s']:>8.2f}s {r['delay_mean_s']:>7.3f}s "
            f"{r['delay_p50_s']:>7.3f}s {r['delay_max_s']:>7.3f}s"
        )
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
