"""Train stream throughput next to a local loop running the same implicit steps in process.

Both fine-tune the bundled `digits` model on the sklearn digits (batches of 64, Adam, lr 1e-3,
cross-entropy, the server's default implicit backward) for the same number of steps:

- local: `DEQModel` forward with implicit backward, loss, backward, Adam step, in this process;
- served: a `deq-server` subprocess on loopback, one Train stream sending the same batches.

Each side is warmed up with 10 batches first (the local loop in process, the server with a short
stream of its own), so that neither pays a process's first-use costs in the timing.

Reports samples/s of each and their ratio (the fast-path issue's target: served >= 0.8x local).

    python bench/train.py [--steps 200] [--batch 64] [--out PATH]

A script, not a test: it prints a table and writes JSON. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from _loopback import wait_ready
from sklearn.datasets import load_digits
from soak import start

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import load_checkpoint
from deq_server.models import bundled_checkpoints


def batches(steps: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(x), size, replace=False) for _ in range(steps)]
    return [(x[p], y[p]) for p in picks]


def local(data: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Seconds for the steps in process (one torch thread, as the server's default on 2 cores)."""
    model = load_checkpoint(bundled_checkpoints()["digits"]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start_s = time.perf_counter()
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        out, _ = model(torch.from_numpy(x))
        F.cross_entropy(out, torch.from_numpy(y)).backward()
        optimizer.step()
    return time.perf_counter() - start_s


def tensor(x: np.ndarray) -> pb.Tensor:
    dtype = pb.DATA_TYPE_INT64 if x.dtype == np.int64 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(x.shape), data=x.tobytes())


async def stream(
    stub: deq_pb2_grpc.DEQServiceStub, data: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, str]:
    """One Train stream: seconds from the first batch sent to the last step's answer, and the
    committed version."""
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    requests = [pb.TrainRequest(config=config)] + [
        pb.TrainRequest(batch=pb.TrainBatch(inputs=tensor(x), targets=tensor(y))) for x, y in data
    ]
    start_s = time.perf_counter()
    seconds, version = 0.0, ""
    async for response in stub.Train(iter(requests), timeout=600):
        if response.HasField("step") and response.step.step == len(data):
            seconds = time.perf_counter() - start_s
        if response.HasField("committed"):
            version = response.committed.version
    return seconds, version


async def served(data: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, str]:
    """The timed stream's seconds and committed version, after a 10-batch warm-up stream (as
    the local loop is warmed up: a process's first optimizer step imports torch's compiler
    stack, about 0.6 s here)."""
    with tempfile.TemporaryDirectory() as folder:
        proc, port = start(Path(folder))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await wait_ready(channel)
                stub = deq_pb2_grpc.DEQServiceStub(channel)
                await stream(stub, data[:10])
                return await stream(stub, data)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/train.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    data = batches(args.steps, args.batch)
    local(data[:10])  # warm-up
    local_s = local(data)
    served_s, version = asyncio.run(served(data))
    samples = args.steps * args.batch
    row: dict[str, Any] = {
        "steps": args.steps,
        "batch": args.batch,
        "local_samples_per_s": samples / local_s,
        "served_samples_per_s": samples / served_s,
        "ratio": local_s / served_s,
        "committed_version": version,
    }
    print("| loop | samples/s |\n|---|---|")
    print(f"| local (in process) | {row['local_samples_per_s']:.0f} |")
    print(f"| Train stream | {row['served_samples_per_s']:.0f} |")
    print(f"served / local: {row['ratio']:.2f} (target >= 0.8)")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "result": row}, indent=2) + "\n")


if __name__ == "__main__":
    main()
