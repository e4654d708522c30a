"""Issue 13, item 3: a busy gRPC or metrics address stops a second server at once, with one
line and a non-zero exit; gRPC's default SO_REUSEPORT never lets two servers share a port."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import channel_to, running_server

from deq_server.serving.app import StartupError


@pytest.fixture(scope="module")
def first():
    with running_server() as running:
        yield running


def second_server(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deq_server", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_a_second_server_on_a_busy_grpc_port_exits_with_one_line(first):
    result = second_server("--address", f"127.0.0.1:{first.port}", "--metrics-address", "")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert errors == [
        f"deq-server: error: gRPC address 127.0.0.1:{first.port} is not available: "
        "Address already in use (another server there? choose another port)"
    ]
    with channel_to(first) as channel:  # the first server still answers every connection
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == 1


def test_a_second_server_on_a_busy_metrics_port_exits_with_one_line(first):
    result = second_server(
        "--address", "127.0.0.1:0", "--metrics-address", f"127.0.0.1:{first.metrics_port}"
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(
        f"deq-server: error: metrics address 127.0.0.1:{first.metrics_port} is not available"
    )


@pytest.mark.parametrize("which", ["address", "metrics_address"])
def test_start_server_refuses_a_busy_address_in_process(first, which):
    busy = {"address": first.port, "metrics_address": first.metrics_port}[which]
    with (
        pytest.raises(StartupError, match="is not available"),
        running_server(**{which: f"127.0.0.1:{busy}"}),
    ):
        pass


def test_the_grpc_port_is_not_open_to_a_socket_with_so_reuseport(first):
    """With gRPC's default SO_REUSEPORT on the server's socket, any later socket that sets it
    too (as a second gRPC server does) would bind the same port and share its connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", first.port))
