"""The Open Inference Protocol servicer, driven by tritonclient unchanged and by raw stubs.

tritonclient registers its own copy of the `inference` protobuf package, which cannot share a
process with the server's generated stubs, so it runs in a separate process
(tritonclient_probe.py) against the server started here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from serving_harness import channel_to, running_server

from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.core import load_checkpoint
from deq_server.models import bundled_checkpoints


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
