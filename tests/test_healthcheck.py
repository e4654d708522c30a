"""`deq-healthcheck`, the container's HEALTHCHECK probe: exit 0 only for a SERVING server.

Checked against real gRPC health services on 127.0.0.1: a deq-server (plain and TLS), a health
service set to NOT_SERVING (what a draining server reports), and a port nobody listens on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from serving_harness import free_port, running_server

from deq_server.healthcheck import main, probe_target


@pytest.mark.parametrize(
    ("listen", "dial"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:7000", "127.0.0.1:7000"),
        (":7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("deq:50051", "deq:50051"),
    ],
)
def test_the_probe_dials_the_listen_address_on_loopback(listen: str, dial: str) -> None:
    assert probe_target(listen) == dial


def test_a_serving_server_is_healthy(capsys: pytest.CaptureFixture[str]) -> None:
    with running_server() as server:
        assert main([], env={"DEQ_ADDRESS": f"0.0.0.0:{server.port}"}) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{server.port}: SERVING"


@pytest.fixture
def not_serving() -> Iterator[int]:
    """A bare gRPC health service whose whole-server status is NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def test_a_draining_server_is_unhealthy(
    not_serving: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", f"127.0.0.1:{not_serving}"], env={}) == 1
    assert capsys.readouterr().out.strip().endswith("NOT_SERVING")


def test_an_unreachable_server_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"DEQ_HEALTHCHECK_TARGET": f"127.0.0.1:{free_port()}"}
    assert main(["--timeout", "2"], env=env) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_the_probe_trusts_the_servers_tls_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-days", "1", *ec_key, *names, *files],
        check=True,
        capture_output=True,
    )
    with running_server(tls_cert=cert, tls_key=key) as server:
        env = {"DEQ_ADDRESS": f"127.0.0.1:{server.port}"}
        assert main([], env=env) == 1  # plain text to a TLS port fails
        assert main([], env={**env, "DEQ_TLS_CERT": str(cert)}) == 0
