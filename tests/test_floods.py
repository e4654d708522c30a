"""What an unauthenticated or idle client can hold (issue 11, item 8): health Watch streams are
capped so that they can never fill --max-concurrent-rpcs, an InferStream that goes quiet is
closed, and one connection can open only --max-streams-per-connection calls. Authenticated
callers keep being served throughout. (bench/flood.py measures latency and memory under a
flood.)"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints

TOKEN = "flood-test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    return tmp_path


def infer_request(batch: int = 1) -> pb.InferRequest:
    x = np.full((batch, 64), 8.0, np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[batch, 64], data=x.tobytes())
    return pb.InferRequest(model="digits", input=tensor)


def test_unauthenticated_watch_streams_cannot_lock_callers_out(model_dir: Path) -> None:
    """With 24 concurrent RPCs allowed and 40 token-less Watch attempts, only 16 are held; an
    authenticated caller is still answered."""
    with (
        running_server(
            model_dir=model_dir, admin_tokens=TOKEN, max_concurrent_rpcs=24, max_watch_streams=16
        ) as server,
        channel_to(server) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        held: list[Any] = []
        refusals: list[tuple[grpc.StatusCode, str]] = []
        try:
            for _ in range(40):
                call = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                try:
                    first = next(call)
                except grpc.RpcError as exc:
                    refusals.append((exc.code(), exc.details() or ""))
                    continue
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                held.append(call)
            assert (len(held), len(refusals)) == (16, 24)
            assert {code for code, _ in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all("--max-watch-streams" in text for _, text in refusals)
            stub = deq_pb2_grpc.DEQServiceStub(channel)
            for _ in range(5):
                answer = stub.Infer(infer_request(), metadata=AUTH, timeout=30)
                assert list(answer.status) == [pb.SAMPLE_STATUS_CONVERGED]
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for call in held:
                call.cancel()
        # once they close, new watchers are admitted again
        again = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        try:
            assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            again.cancel()


def one_request_then_quiet(release: threading.Event) -> Iterator[pb.InferStreamRequest]:
    yield pb.InferStreamRequest(request_id="only", request=infer_request())
    release.wait(60)


def test_a_quiet_infer_stream_is_closed_after_its_answers(model_dir: Path) -> None:
    release = threading.Event()
    with (
        running_server(model_dir=model_dir, stream_idle_seconds=0.3) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        answers: list[pb.InferStreamResponse] = []
        try:
            with pytest.raises(grpc.RpcError) as info:
                answers.extend(stub.InferStream(one_request_then_quiet(release), timeout=30))
        finally:
            release.set()
    assert [a.request_id for a in answers] == ["only"]
    assert answers[0].HasField("response")
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-seconds" in (info.value.details() or "")


def test_one_connection_holds_at_most_its_stream_cap(model_dir: Path) -> None:
    """Four half-open streams fill a connection capped at four: a fifth call on it waits (and
    times out), while another connection is served at once."""
    releases = [threading.Event() for _ in range(4)]
    with (
        running_server(model_dir=model_dir, max_streams_per_connection=4) as server,
        channel_to(server) as channel,
        # a connection of its own (channels to one target otherwise share a subchannel)
        grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        streams = [stub.InferStream(one_request_then_quiet(r), timeout=60) for r in releases]
        try:
            for stream in streams:
                assert next(stream).request_id == "only"  # open and answered, now quiet
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(infer_request(), timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            answer = deq_pb2_grpc.DEQServiceStub(other).Infer(infer_request(), timeout=30)
            assert list(answer.status) == [pb.SAMPLE_STATUS_CONVERGED]
        finally:
            for release in releases:
                release.set()
            for stream in streams:
                stream.cancel()


def test_half_open_infer_streams_leave_room_for_unary_calls(model_dir: Path) -> None:
    """With 24 RPC slots, InferStreams may hold at most half of them (--max-infer-streams 0,
    automatic): of 30 authenticated streams that send one request and go quiet, 12 are held and
    18 refused, and unary Infer is still answered. Once they close, a new stream is admitted."""
    releases = [threading.Event() for _ in range(30)]
    with (
        running_server(model_dir=model_dir, admin_tokens=TOKEN, max_concurrent_rpcs=24) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        held: list[Any] = []
        refusals: list[tuple[grpc.StatusCode, str]] = []
        try:
            for release in releases:
                stream = stub.InferStream(
                    one_request_then_quiet(release), metadata=AUTH, timeout=60
                )
                try:
                    assert next(stream).request_id == "only"
                except grpc.RpcError as exc:
                    refusals.append((exc.code(), exc.details() or ""))
                    continue
                held.append(stream)
            assert (len(held), len(refusals)) == (12, 18)
            assert {code for code, _ in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all("--max-infer-streams" in text for _, text in refusals)
            for _ in range(5):
                answer = stub.Infer(infer_request(), metadata=AUTH, timeout=30)
                assert list(answer.status) == [pb.SAMPLE_STATUS_CONVERGED]
        finally:
            for release in releases:
                release.set()
            for stream in held:
                stream.cancel()
        release = threading.Event()
        again = stub.InferStream(one_request_then_quiet(release), metadata=AUTH, timeout=60)
        try:
            assert next(again).request_id == "only"
        finally:
            release.set()
            again.cancel()


def stream_request(i: int) -> pb.InferStreamRequest:
    request = infer_request(batch=64)
    request.return_state = True  # about 17 KB an answer: flow control soon holds them back
    request.solver.max_iter = 1
    return pb.InferStreamRequest(request_id=str(i), request=request)


async def stop_reading_then_probe(port: int) -> list[str]:
    """Read one answer of a stream, then keep sending without reading; meanwhile open second
    streams (--max-infer-streams 1) until one is admitted. What each attempt got, in order."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        silent = stub.InferStream(timeout=120)
        await silent.write(stream_request(0))
        assert (await silent.read()).request_id == "0"

        async def send() -> None:
            for i in range(1, 1500):  # flow control soon blocks these writes for good
                await silent.write(stream_request(i))

        sender = asyncio.create_task(send())
        outcomes: list[str] = []
        try:
            for _ in range(2000):  # bounded: each refused attempt is answered at once
                # A probe sends nothing (a write racing a refusal fails on the client's side):
                # refused at once, or admitted and closed as idle after --stream-idle-seconds.
                probe = stub.InferStream(timeout=30)
                code = await probe.code()
                outcomes.append(code.name)
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "--stream-idle-seconds" in await probe.details()
                    break
                await asyncio.sleep(0.05)  # pacing between retries, not synchronisation
        finally:
            sender.cancel()
            silent.cancel()
        return outcomes


def test_an_infer_stream_whose_client_stops_reading_gives_up_its_slot(model_dir: Path) -> None:
    """A client that keeps sending but reads nothing: once no answer could be written for
    --stream-idle-seconds, the server's handler ends and its stream slot is free again (gRPC's
    transport keeps the stream itself until the client's deadline or disconnection)."""
    with running_server(
        model_dir=model_dir, stream_idle_seconds=2.0, max_infer_streams=1
    ) as server:
        outcomes = asyncio.run(stop_reading_then_probe(server.port))
    assert outcomes[0] == "RESOURCE_EXHAUSTED"  # the silent stream held the only slot
    assert outcomes[-1] == "DEADLINE_EXCEEDED"  # admitted, then closed for sending nothing
    assert set(outcomes[:-1]) == {"RESOURCE_EXHAUSTED"}
