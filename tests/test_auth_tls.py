"""Bearer-token scopes and TLS, on a real server."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc

X = np.full((1, 64), 8.0, np.float32)
INFER = pb.InferRequest(
    model="digits", input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=X.tobytes())
)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def stub():
    with (
        running_server(infer_tokens="reader-1,reader-2", admin_tokens="boss") as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield deq_pb2_grpc.DEQServiceStub(channel), health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (bearer("wrong"), grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Basic reader-1")], grpc.StatusCode.UNAUTHENTICATED),
        (bearer("reader-2"), None),
        (bearer("boss"), None),
    ],
)
def test_infer_needs_a_token_with_the_infer_scope(stub, metadata, code):
    deq, _ = stub
    if code is None:
        assert deq.Infer(INFER, metadata=metadata).model_version == "1"
        return
    with pytest.raises(grpc.RpcError) as info:
        deq.Infer(INFER, metadata=metadata)
    assert info.value.code() == code


def test_admin_methods_need_the_admin_scope(stub):
    deq, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        deq.UnloadModel(pb.UnloadModelRequest(name="nope"), metadata=bearer("reader-1"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    train = iter([pb.TrainRequest(config=pb.TrainConfig(model="digits"))])
    with pytest.raises(grpc.RpcError) as info:
        list(deq.Train(train, metadata=bearer("reader-1")))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:  # past auth: the method itself answers
        deq.UnloadModel(pb.UnloadModelRequest(name="nope"), metadata=bearer("boss"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_stays_open_for_probes(stub):
    _, health = stub
    reply = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_serves_a_client_that_trusts_the_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    with running_server(tls_cert=cert, tls_key=key) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            assert deq_pb2_grpc.DEQServiceStub(channel).Infer(INFER).model_version == "1"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            with pytest.raises(grpc.RpcError) as info:
                deq_pb2_grpc.DEQServiceStub(plain).Infer(INFER, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
