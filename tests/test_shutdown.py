"""SIGTERM on a real deq-server process: in-flight calls finish, new ones are refused, clean exit."""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import free_port, server_argv
from small_models import slow_model_dir

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc


def pending(metrics_port: int) -> float:
    """The pending-requests gauge of model `slow` (0 until its first request creates it)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    series = 'deq_inference_pending_requests{model="slow"}'
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(series)]
    return values[0] if values else 0.0


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tmp_path):
    slow_model_dir(tmp_path)
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        server_argv(port, tmp_path, metrics_port, "--grace-seconds", "30"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
        request = pb.InferRequest(
            model="slow",
            input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[32, 8], data=x.tobytes()),
        )
        answers: list[object] = []
        in_flight = threading.Thread(target=lambda: answers.append(stub.Infer(request, timeout=60)))
        in_flight.start()
        for _ in range(100_000):  # bounded: each check is an HTTP round trip to the server
            if pending(metrics_port) >= 1:
                break
        else:
            pytest.fail("deq_inference_pending_requests never counted the request in flight")
        proc.send_signal(signal.SIGTERM)
        in_flight.join(timeout=60)
        assert len(answers) == 1, proc.communicate(timeout=60)[1]
        assert set(answers[0].status) == {pb.SAMPLE_STATUS_MAX_ITER}
        assert list(answers[0].iterations) == [1000] * 32
        code = proc.wait(timeout=60)
        assert code == 0, proc.stderr.read()
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as late,
            pytest.raises(grpc.RpcError) as info,
        ):
            deq_pb2_grpc.DEQServiceStub(late).Infer(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_with_64_calls_in_flight_answers_every_one(tmp_path):
    slow_model_dir(tmp_path)
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        server_argv(port, tmp_path, metrics_port, "--grace-seconds", "60"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = deq_pb2_grpc.DEQServiceStub(channel)
            x = np.ones((1, 8), np.float32)
            request = pb.InferRequest(
                model="slow",
                input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8], data=x.tobytes()),
            )
            calls = [stub.Infer.future(request, timeout=120) for _ in range(64)]
            for _ in range(100_000):  # bounded: each check is an HTTP round trip
                if pending(metrics_port) >= 64:
                    break
            proc.send_signal(signal.SIGTERM)
            codes = []
            for call in calls:
                try:
                    call.result(timeout=120)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert codes.count(grpc.StatusCode.OK) == 64  # all were in flight: all answered
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
