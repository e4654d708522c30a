"""The Open Inference Protocol servicer, driven by tritonclient unchanged and by raw stubs.

tritonclient registers its own copy of the `inference` protobuf package, which cannot share a
process with the server's generated stubs, so it runs in a separate process
(tritonclient_probe.py) against the server started here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_harness import channel_to, running_server

from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.core import load_checkpoint
from deq_server.models import bundled_checkpoints
from deq_server.serving.errors import InvalidArgumentError
from deq_server.serving.oip import solver_request


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def seen(server):
    """What tritonclient, in its own process, saw of the server."""
    probe = Path(__file__).with_name("tritonclient_probe.py")
    out = subprocess.run(
        [sys.executable, str(probe), str(server.port)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tritonclient_health_and_metadata(seen):
    assert seen["live"]
    assert seen["ready"]
    assert seen["model_ready"]
    assert not seen["unknown_model_ready"]
    assert seen["metadata"]["inputs"][0]["shape"] == ["-1", "64"]
    outputs = [o["name"] for o in seen["metadata"]["outputs"]]
    assert outputs == ["output", "iterations", "residual", "status"]
    assert seen["server_name"] == "deq-serve"


def test_tritonclient_infer_with_solver_parameters_matches_a_local_solve(seen):
    x = torch.tensor(seen["input"], dtype=torch.float32)
    local = load_checkpoint(bundled_checkpoints()["digits"]).eval()
    with torch.no_grad():
        y, solved = local(x, tol=1e-6, method="picard", max_iter=200)
    np.testing.assert_allclose(np.array(seen["output"]), y.numpy(), rtol=1e-5, atol=1e-5)
    assert seen["iterations"] == solved.iterations.tolist()
    assert seen["status"] == solved.status.tolist()
    assert max(seen["residual"]) <= 1e-6


def test_tritonclient_bf16_and_fp16_inputs_answer_as_fp32(seen):
    """tritonclient sends BF16 (from an ml_dtypes array) and FP16 as raw bytes; the pixels are
    integers, exact in both, so the answers are the FP32 request's (to float32 rounding)."""
    for key in ("output_bf16", "output_fp16"):
        np.testing.assert_allclose(
            np.array(seen[key]), np.array(seen["output"]), rtol=1e-5, atol=1e-5
        )


def test_tritonclient_numbers_sent_as_strings_answer_as_numbers(seen):
    """Issue 13, item 12: tol and max_iter as strings give the answer of the numbers."""
    assert seen["output_string_parameters"] == seen["output"]
    assert seen["iterations_string_parameters"] == seen["iterations"]
    assert "parameters.tol: expected a finite number" in seen["error_nan_tol"]


def test_tritonclient_sees_errors_with_their_messages(seen):
    assert "input.shape" in seen["error_bad_shape"]
    assert "parameters.solver" in seen["error_bad_parameter"]
    assert "nope" in seen["error_unknown_model"]


def test_typed_contents_and_requested_outputs(server):
    x = np.random.default_rng(3).integers(0, 17, size=(2, 64)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="digits", id="abc")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="status")
    with channel_to(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        assert response.id == "abc"
        assert [o.name for o in response.outputs] == ["status"]
        assert np.frombuffer(response.raw_output_contents[0], "<i4").tolist() == [1, 1]
        request.ClearField("outputs")
        request.outputs.add(name="logits")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Issue 13, item 12: float parameters (tol, budget_ms) from a double, an integer or a numeric
# string (KServe's proto has no double parameter); anything else is refused by name.
FLOAT_PARAMETERS = ["tol", "budget_ms"]


def _parameters(key: str, kind: str, value: object) -> dict[str, oip.InferParameter]:
    return {key: oip.InferParameter(**{kind: value})}


@settings(max_examples=200)
@given(
    key=st.sampled_from(FLOAT_PARAMETERS),
    value=st.floats(allow_nan=False, allow_infinity=False),
    kind=st.sampled_from(["double_param", "string_param", "string_repr"]),
)
def test_a_finite_number_is_read_the_same_from_a_double_or_its_text(key, value, kind):
    if kind == "double_param":
        params = _parameters(key, kind, value)
    else:
        text = repr(value) if kind == "string_repr" else f" {value:.17e} "
        params = _parameters(key, "string_param", text)
    assert getattr(solver_request(params), key) == value


@settings(max_examples=100)
@given(
    key=st.sampled_from(FLOAT_PARAMETERS),
    value=st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
def test_integers_are_numbers_too(key, value):
    kind = "int64_param" if value < 2**63 else "uint64_param"
    assert getattr(solver_request(_parameters(key, kind, value)), key) == float(value)
    assert getattr(solver_request(_parameters(key, "string_param", str(value))), key) == (
        float(value)
    )


NOT_NUMBERS = st.one_of(
    st.sampled_from(
        ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e999", "0x1p-3", "1_000"]
    ),
    st.sampled_from(["", " ", "1e-3s", "1,5", "e3", "."]),
    st.text(max_size=12).filter(lambda t: not re.fullmatch(r"\s*[+-]?[\d.]+([eE][+-]?\d+)?\s*", t)),
)


@settings(max_examples=200)
@given(key=st.sampled_from(FLOAT_PARAMETERS), text=NOT_NUMBERS)
def test_text_that_is_no_finite_number_is_refused_by_name(key, text):
    with pytest.raises(InvalidArgumentError, match=f"^parameters.{key}: expected a finite number"):
        solver_request(_parameters(key, "string_param", text))


@pytest.mark.parametrize("key", FLOAT_PARAMETERS)
@pytest.mark.parametrize(
    ("kind", "value"),
    [("bool_param", True), ("double_param", float("nan")), ("double_param", float("inf"))],
)
def test_booleans_and_non_finite_doubles_are_refused(key, kind, value):
    with pytest.raises(InvalidArgumentError, match=f"^parameters.{key}: expected a finite number"):
        solver_request(_parameters(key, kind, value))


def _infer_request(**parameters: oip.InferParameter) -> oip.ModelInferRequest:
    x = np.random.default_rng(5).integers(0, 17, size=(2, 64)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="digits", parameters=parameters)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(x.tobytes())
    return request


def test_string_parameters_answer_like_numbers_on_a_real_server(server):
    as_numbers = _infer_request(
        tol=oip.InferParameter(double_param=1e-6),
        budget_ms=oip.InferParameter(int64_param=60_000),
        max_iter=oip.InferParameter(int64_param=200),
        method=oip.InferParameter(string_param="picard"),
    )
    as_strings = _infer_request(
        tol=oip.InferParameter(string_param="1e-6"),
        budget_ms=oip.InferParameter(string_param="60000.0"),
        max_iter=oip.InferParameter(string_param="200"),
        method=oip.InferParameter(string_param="picard"),
    )
    with channel_to(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        first, second = stub.ModelInfer(as_numbers), stub.ModelInfer(as_strings)
        assert list(first.raw_output_contents) == list(second.raw_output_contents)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_infer_request(tol=oip.InferParameter(string_param="1e-3x")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("parameters.tol: expected a finite number")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_infer_request(budget_ms=oip.InferParameter(string_param="-5")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "budget_ms" in info.value.details()
