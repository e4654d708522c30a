"""Bearer tokens never reach the logs or the metrics.

A real `deq-server` process (tokens from DEQ_* variables, as docs/api.md advises: flags would show
them in `ps`), in both log formats, gets calls with good, bad, truncated and wrong-scope tokens on
both protocols, plus a failing LoadModel and a skipped bad checkpoint so that it has something to
log. Its whole stdout and stderr and a /metrics scrape must not hold any token, nor any 8-character
piece of one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import string
import subprocess
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import free_port, server_argv

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints

WINDOW = 8


def make_token(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40))


RNG = random.Random(20240605)
INFER_TOKEN, ADMIN_TOKEN, STRANGER = (make_token(RNG) for _ in range(3))
# Every credential a client presents in this test; none may be echoed anywhere.
PRESENTED = [INFER_TOKEN, ADMIN_TOKEN, STRANGER, ADMIN_TOKEN[:-1], INFER_TOKEN + "z"]


def pieces(token: str) -> set[str]:
    return {token[i : i + WINDOW] for i in range(len(token) - WINDOW + 1)}


def exercise(port: int) -> None:
    """Calls that succeed, fail authentication, lack the scope, or fail in the handler."""
    x = np.full((2, 64), 8.0, np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=x.tobytes())
    infer = pb.InferRequest(model="digits", input=tensor)
    model_infer = oip.ModelInferRequest(
        model_name="digits",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 64])
        ],
        raw_input_contents=[x.tobytes()],
    )
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    labels = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], data=np.arange(2).tobytes())
    train = [
        pb.TrainRequest(config=config),
        pb.TrainRequest(batch=pb.TrainBatch(inputs=tensor, targets=labels)),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        deq, oip_stub = (
            deq_pb2_grpc.DEQServiceStub(channel),
            oip_grpc.GRPCInferenceServiceStub(channel),
        )
        calls = [
            lambda md: deq.Infer(infer, metadata=md, timeout=60),
            lambda md: oip_stub.ModelInfer(model_infer, metadata=md, timeout=60),
            lambda md: list(deq.Train(iter(train), metadata=md, timeout=60)),
            lambda md: deq.LoadModel(
                pb.LoadModelRequest(name="again", path="broken.safetensors"),
                metadata=md,
                timeout=60,
            ),
            lambda md: deq.LoadModel(
                pb.LoadModelRequest(name="../x", path="/etc/passwd"), metadata=md, timeout=60
            ),
        ]
        codes = set()
        for token in PRESENTED:
            for header in (f"Bearer {token}", f"bearer {token}", token):
                for call in calls:
                    try:
                        call([("authorization", header)])
                        codes.add(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.add(exc.code())
    # The calls did reach every outcome whose handling might log something.
    assert {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    } <= codes


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_in_logs_or_metrics(tmp_path: Path, log_format: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(bundled_checkpoints()["digits"], models / "digits.safetensors")
    (models / "broken.safetensors").write_bytes(b"\x08" + bytes(15))
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEQ_")}
    env.update(
        DEQ_INFER_TOKENS=INFER_TOKEN, DEQ_ADMIN_TOKENS=ADMIN_TOKEN, DEQ_LOG_FORMAT=log_format
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            server_argv(port, models, metrics_port), stdout=stdout, stderr=stderr, env=env
        )
        try:
            exercise(port)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=30) as response:
                scrape = response.read().decode()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = out.read_text() + err.read_text()
    # The capture works and holds what the calls caused: the start line, the skipped file.
    assert "deq-server ready" in logs, logs
    assert "broken.safetensors" in logs, logs
    assert 'grpc_code="UNAUTHENTICATED"' in scrape
    assert 'grpc_code="PERMISSION_DENIED"' in scrape
    for token in PRESENTED:
        leaked = sorted(p for p in pieces(token) if p in logs or p in scrape)
        assert not leaked, f"pieces of a token appear in the logs or metrics: {leaked}"
