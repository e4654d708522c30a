"""Health tells the truth about what is served (issue 13, item 7): NOT_SERVING while no model
is served, and with --strict-readiness (as Triton's strict readiness) while a checkpoint found
at start failed to load; each change shows on a health Watch stream as it happens."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status(channel: grpc.Channel) -> int:
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return int(check.status)


def server_ready(channel: grpc.Channel) -> bool:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerReady(oip.ServerReadyRequest(), timeout=30).ready)


@pytest.fixture
def broken_only(tmp_path: Path) -> Path:
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    return tmp_path


def watch(channel: grpc.Channel) -> Iterator[Any]:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)


def test_a_server_serving_nothing_is_not_serving_until_a_model_loads(broken_only: Path) -> None:
    shutil.copy(bundled_checkpoints()["digits"], broken_only / "good.bin")  # not discovered
    with running_server(model_dir=broken_only) as server, channel_to(server) as channel:
        assert status(channel) == NOT_SERVING
        assert not server_ready(channel)
        updates = watch(channel)
        try:
            assert next(updates).status == NOT_SERVING
            shutil.copy(broken_only / "good.bin", broken_only / "digits.safetensors")
            admin = deq_pb2_grpc.DEQServiceStub(channel)
            admin.LoadModel(pb.LoadModelRequest(name="digits", path="digits.safetensors"))
            assert next(updates).status == SERVING
            assert server_ready(channel)
            admin.UnloadModel(pb.UnloadModelRequest(name="digits"))
            assert next(updates).status == NOT_SERVING  # the last model went
        finally:
            updates.cancel()
        assert not server_ready(channel)


def test_strict_readiness_waits_for_every_checkpoint_found_at_start(broken_only: Path) -> None:
    shutil.copy(bundled_checkpoints()["digits"], broken_only / "digits.safetensors")
    with running_server(model_dir=broken_only) as server, channel_to(server) as channel:
        assert status(channel) == SERVING  # by default: one good model is enough
    with (
        running_server(model_dir=broken_only, strict_readiness=True) as server,
        channel_to(server) as channel,
    ):
        assert status(channel) == NOT_SERVING
        assert not server_ready(channel)
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["digits"]
        updates = watch(channel)
        try:
            assert next(updates).status == NOT_SERVING
            # the failed model served again, from a good file: ready
            shutil.copy(broken_only / "digits.safetensors", broken_only / "fixed.safetensors")
            stub.LoadModel(pb.LoadModelRequest(name="broken", path="fixed.safetensors"))
            assert next(updates).status == SERVING
        finally:
            updates.cancel()
        assert server_ready(channel)


def test_a_damaged_newest_version_is_a_failure_for_strict_readiness(tmp_path: Path) -> None:
    """The fallback to version 1 serves, but the directory's newest (2) did not load."""
    (tmp_path / "digits").mkdir()
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits" / "1.safetensors")
    (tmp_path / "digits" / "2.safetensors").write_bytes(b"torn")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        assert status(channel) == SERVING
    with (
        running_server(model_dir=tmp_path, strict_readiness=True) as server,
        channel_to(server) as channel,
    ):
        assert status(channel) == NOT_SERVING
