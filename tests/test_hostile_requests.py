"""Requests that parse but once answered INTERNAL, and InferStream messages that once ended the
stream (issue 11, items 6-7): each now gets its own INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and
a stream goes on after an undecodable message or an oversized answer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints

LIMIT = 32 * 1024  # --max-message-bytes: 100 digits fit in a request, not their states


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    root = tmp_path_factory.mktemp("models")
    shutil.copy(bundled_checkpoints()["digits"], root / "digits.safetensors")
    with (
        running_server(model_dir=root, max_message_bytes=LIMIT) as server,
        channel_to(server) as ch,
    ):
        yield ch


def digits_tensor(batch: int) -> pb.Tensor:
    x = np.full((batch, 64), 8.0, np.float32)
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[batch, 64], data=x.tobytes())


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_a_zero_element_tensor_with_huge_sizes(channel: grpc.Channel) -> None:
    stub = deq_pb2_grpc.DEQServiceStub(channel)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**40, 2**40], data=b"")
    request = pb.InferRequest(model="digits", input=tensor)
    assert code_of(lambda: stub.Infer(request)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("version", ["²", "1" * 5000, "\u0661", " 1", "-1"])
def test_version_strings_that_are_not_numbers(channel: grpc.Channel, version: str) -> None:
    stub = deq_pb2_grpc.DEQServiceStub(channel)
    request = pb.InferRequest(model="digits", version=version, input=digits_tensor(1))
    assert code_of(lambda: stub.Infer(request)) in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )
    oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
    meta = oip.ModelMetadataRequest(name="digits", version=version)
    assert code_of(lambda: oip_stub.ModelMetadata(meta)) in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )


def test_a_very_long_load_model_path(channel: grpc.Channel) -> None:
    stub = deq_pb2_grpc.DEQServiceStub(channel)
    request = pb.LoadModelRequest(name="x", path="a" * 5000 + ".safetensors")
    assert code_of(lambda: stub.LoadModel(request)) == grpc.StatusCode.INVALID_ARGUMENT
    nested = pb.LoadModelRequest(name="x", path="/".join(["a" * 250] * 4) + ".safetensors")
    assert code_of(lambda: stub.LoadModel(nested)) in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )


def raw_stream(channel: grpc.Channel, messages: list[bytes]) -> list[pb.InferStreamResponse]:
    call = channel.stream_stream(
        "/deq.v1.DEQService/InferStream",
        request_serializer=lambda data: data,  # the bytes as given
        response_deserializer=pb.InferStreamResponse.FromString,
    )
    return list(call(iter(messages), timeout=60))


def stream_request(request_id: str, batch: int, *, state: bool = False) -> bytes:
    request = pb.InferRequest(model="digits", input=digits_tensor(batch), return_state=state)
    return pb.InferStreamRequest(request_id=request_id, request=request).SerializeToString()


def test_an_undecodable_message_gets_an_error_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a field whose length runs past the message
    answers = raw_stream(channel, [stream_request("one", 1), garbage, stream_request("three", 2)])
    assert len(answers) == 3
    by_id = {a.request_id: a for a in answers}
    assert by_id["one"].HasField("response")
    assert list(by_id["three"].response.status) == [pb.SAMPLE_STATUS_CONVERGED] * 2
    error = by_id[""]
    assert error.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "could not be decoded" in error.error_message


def test_an_answer_above_the_message_limit_fails_alone(channel: grpc.Channel) -> None:
    big = stream_request("big", 120, state=True)
    assert len(big) < LIMIT  # the request fits; its answer (120 states of 64 floats) does not
    answers = raw_stream(channel, [big, stream_request("small", 1)])
    by_id = {a.request_id: a for a in answers}
    assert by_id["big"].error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "--max-message-bytes" in by_id["big"].error_message
    assert by_id["small"].HasField("response")
