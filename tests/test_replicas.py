"""Replicas sharing one model directory (issue 14), as real server processes: with
`--model-control poll` a commit on one is served by the others within their poll interval, and
publications racing across replicas never share a version number (the directory's claims)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
from serving_harness import free_port, server_argv
from sklearn.datasets import load_digits

from deq_client import DEQClient
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import load_checkpoint
from deq_server.models import bundled_checkpoints

POLL = ("--model-control", "poll", "--poll-interval", "0.2")
X = load_digits().data[:8].astype(np.float32)
LABELS = load_digits().target[:8].astype(np.int64)


@contextmanager
def replica(model_dir: Path, log: Path, *extra: str) -> Iterator[str]:
    """A `deq-server` process on the shared directory; yields its target once it answers."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(server_argv(port, model_dir, None, *extra), stderr=out)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def commit(target: str) -> str:
    with DEQClient(target, timeout=120) as client:
        events = client.train(
            "digits", [(X, LABELS)], {"loss": "cross_entropy", "learning_rate": 1e-3}
        )
        return str(list(events)[-1].version)


def load(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        request = pb.LoadModelRequest(name="digits", path="spare/digits.safetensors")
        return str(stub.LoadModel(request, timeout=120).version)


def test_a_commit_on_one_replica_is_served_by_the_others(tmp_path: Path) -> None:
    models = tmp_path / "models"
    with ExitStack() as stack:
        targets = [
            stack.enter_context(replica(models, tmp_path / f"{i}.log", *POLL)) for i in range(3)
        ]
        assert commit(targets[0]) == "2"
        for target in targets[1:]:
            with DEQClient(target, timeout=60) as client:
                deadline = time.monotonic() + 60  # bounded: 300 poll intervals
                while "2" not in client.get_model("digits").versions:
                    assert time.monotonic() < deadline, f"{target} never served version 2"
                assert client.infer("digits", X, version="2").model_version == "2"
        # a commit elsewhere, once served here, is this replica's newest: the next is 3
        assert commit(targets[1]) == "3"


def test_200_racing_commits_across_two_replicas_never_share_a_number(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "spare").mkdir(parents=True)  # not a version file: the directory gets seeded
    shutil.copy(bundled_checkpoints()["digits"], models / "spare" / "digits.safetensors")
    with (
        replica(models, tmp_path / "a.log", *POLL) as a,
        replica(models, tmp_path / "b.log", *POLL) as b,
        ThreadPoolExecutor(2) as pool,
    ):
        # 100 fine-tunes of one model on each replica, the two replicas committing at once
        # (one session per model and replica: each replica's commits follow one another)
        runs = [pool.submit(lambda t=t: [commit(t) for _ in range(100)]) for t in (a, b)]
        committed = [v for run in runs for v in run.result()]
        # then LoadModel on both at once: numbers claimed without a checkpoint written
        loads = [pool.submit(load, t) for t in (a, b) for _ in range(10)]
        loaded = [f.result() for f in loads]
    numbers = [int(v) for v in committed + loaded]
    assert len(numbers) == 220
    assert len(set(numbers)) == 220, "two publications got one number"
    assert min(numbers) >= 2  # 1 is the seeded demo's
    claims = {int(p.name.split(".")[1]) for p in (models / "digits").glob(".*.claim")}
    assert claims == set(numbers)  # each number claimed, and kept: never reused
    files = {p.stem for p in (models / "digits").glob("*.safetensors")}
    assert files == {"1", *committed}  # every commit wrote its file; LoadModel writes none
    for version in committed:  # and every file loads
        assert load_checkpoint(models / "digits" / f"{version}.safetensors").config["cell"]
