"""bfloat16 inputs: the SDK encodes them, and both protocols of a real server accept them.

numpy has no bfloat16: on the wire it is the 16-bit pattern (the upper half of a float32), which
the server reinterprets as torch.bfloat16 and casts to the serving dtype, exactly (checked bit for
bit). So a bfloat16 request answers as the float32 request holding the same values; the answers
are compared to float32 rounding, because two identical float32 requests may differ in the last
bit (the solver's batched kernels are not bitwise deterministic across calls).
"""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
from serving_harness import channel_to, running_server

from deq_client import DEQClient
from deq_client._tensor import from_proto, to_proto
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.serving import tensors


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


def pixels_bf16(n: int) -> torch.Tensor:
    """Digit-like inputs in [0, 16] with fractional parts, rounded to bfloat16."""
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(n, 64, generator=gen, dtype=torch.float64) * 16).to(torch.bfloat16)


def test_server_decodes_the_sdks_bfloat16_bits_exactly_and_encodes_them_back():
    x = torch.tensor([[0.1, -2.5, 3.0e38], [1e-3, -0.0, 65504.0]], dtype=torch.bfloat16)
    wire = to_proto(x, "input")
    assert wire.dtype == pb.DATA_TYPE_BFLOAT16
    got = tensors.decode(wire, "input", max_elements=6)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), x.view(torch.int16))  # bit for bit, -0.0 kept
    back = tensors.encode(got)
    assert (back.dtype, list(back.shape), back.data) == (wire.dtype, [2, 3], wire.data)
    np.testing.assert_array_equal(from_proto(back), x.float().numpy())
    assert tensors.wire_dtype(torch.bfloat16) == pb.DATA_TYPE_BFLOAT16


def test_sdk_bfloat16_round_trip_through_a_real_server_equals_float32(server):
    x = pixels_bf16(5)
    with DEQClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        as_f32 = client.infer("digits", x.float().numpy())
        as_torch_bf16 = client.infer("digits", x)
        as_ml_dtypes = client.infer("digits", x.float().numpy().astype(ml_dtypes.bfloat16))
    for result in (as_torch_bf16, as_ml_dtypes):
        np.testing.assert_allclose(result.output, as_f32.output, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.status, as_f32.status)
    assert as_f32.converged.all()


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_or_short_bfloat16_inputs_are_refused(server, value):
    x = pixels_bf16(2)
    x[1, 5] = value
    with channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(model="digits", input=to_proto(x, "input")))
        short = to_proto(pixels_bf16(2), "input")
        short.data = short.data[:-1]
        with pytest.raises(grpc.RpcError) as short_info:
            stub.Infer(pb.InferRequest(model="digits", input=short))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.data: expected finite values" in info.value.details()
    assert short_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256 bytes" in short_info.value.details()


def same(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def model_infer(stub, datatype: str, raw: bytes, shape: list[int]) -> np.ndarray:
    request = oip.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    response = stub.ModelInfer(request, timeout=60)
    index = [o.name for o in response.outputs].index("output")
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape[0], -1)


def test_oip_accepts_bf16_and_fp16_raw_inputs_like_fp32(server):
    x = pixels_bf16(3)
    # Values exact in bfloat16 and in float16 (half steps in [0, 16]): all three requests agree.
    halves = (x.float() * 2).round() / 2
    with channel_to(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        f32 = halves.numpy().astype("<f4")
        want = model_infer(stub, "FP32", f32.tobytes(), [3, 64])
        bf16 = halves.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
        fp16 = halves.numpy().astype("<f2").tobytes()
        same(model_infer(stub, "BF16", bf16, [3, 64]), want)
        same(model_infer(stub, "FP16", fp16, [3, 64]), want)
        # bfloat16 values that float16 cannot hold exactly still answer as their float32 values
        raw = x.view(torch.int16).numpy().astype("<i2").tobytes()
        same(
            model_infer(stub, "BF16", raw, [3, 64]),
            model_infer(stub, "FP32", x.float().numpy().astype("<f4").tobytes(), [3, 64]),
        )


def test_oip_bf16_without_raw_contents_is_refused_naming_the_field(server):
    request = oip.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="BF16", shape=[1, 64])
    tensor.contents.fp32_contents.extend([1.0] * 64)  # the protocol has no bf16 contents
    with channel_to(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in info.value.details()
    assert "BF16" in info.value.details()
