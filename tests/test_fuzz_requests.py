"""Property-based fuzzing of Infer and ModelInfer requests: only documented codes, never a crash.

Every generated request must end OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED (never
INTERNAL or UNKNOWN), and the server must still answer a good request afterwards.
"""

from __future__ import annotations

import math
import shutil

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints

TRAIN_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ITEMSIZE = {0: 4, 1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 17: 4}
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def digits_batches(draw: st.DrawFn) -> pb.Tensor:
    """A well-formed input for the demo model, so that fuzzed solver options reach the solver."""
    dtype = draw(st.sampled_from([pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT64]))
    rows = draw(st.integers(1, 8))
    x = np.full((rows, 64), draw(st.sampled_from([0.0, 8.0, 16.0])))
    x = x.astype("<f4" if dtype == pb.DATA_TYPE_FLOAT32 else "<f8")
    return pb.Tensor(dtype=dtype, shape=[rows, 64], data=x.tobytes())


@st.composite
def junk_tensors(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    shape = draw(st.lists(st.integers(-2, 70), min_size=0, max_size=3))
    count = math.prod(shape) if shape and all(d >= 0 for d in shape) else 0
    exact = count * ITEMSIZE[dtype]
    size = draw(st.sampled_from([exact, max(exact - 1, 0), exact + 4, 0]))
    if size > 200_000:
        size = 0
    fill = draw(st.sampled_from([0.0, 8.0, float("nan"), float("inf")]))
    data = np.full(size // 4 + 1, fill, np.float32).tobytes()[:size]
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def solver_options(draw: st.DrawFn) -> pb.SolverOptions:
    opts = pb.SolverOptions()
    if draw(st.booleans()):
        opts.tol = draw(floats)
    if draw(st.booleans()):
        opts.sample_tol.extend(draw(st.lists(floats, max_size=4)))
    if draw(st.booleans()):
        opts.max_iter = draw(st.integers(0, 2**32 - 1))
    opts.method = draw(st.integers(0, 5))
    opts.stop_mode = draw(st.integers(0, 4))
    opts.allow_partial = draw(st.booleans())
    if draw(st.booleans()):
        opts.budget_ms = draw(floats)
    return opts


infer_requests = st.builds(
    pb.InferRequest,
    model=st.sampled_from(["digits", "digits", "digits", "nope", "", "../digits"]),
    version=st.sampled_from(["", "", "1", "2", "x"]),
    input=st.one_of(digits_batches(), digits_batches(), junk_tensors()),
    solver=solver_options(),
    initial_state=st.one_of(st.just(pb.Tensor()), st.just(pb.Tensor()), junk_tensors()),
    return_state=st.booleans(),
)


@st.composite
def model_infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=draw(st.sampled_from(["digits", "nope"])))
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(st.lists(st.integers(-1, 70), max_size=3))
        request.inputs.add(
            name="input",
            datatype=draw(st.sampled_from(["FP32", "FP64", "FP16", "BF16", "INT8", ""])),
            shape=shape,
        )
        request.raw_input_contents.append(b"\0" * draw(st.integers(0, 600)))
    for key in draw(st.lists(st.sampled_from(["tol", "max_iter", "method", "bogus"]), max_size=3)):
        param = request.parameters[key]
        kind = draw(st.sampled_from(["double_param", "int64_param", "string_param", "bool_param"]))
        value = {
            "double_param": draw(floats),
            "int64_param": draw(st.integers(-5, 10**6)),
            "string_param": draw(st.sampled_from(["picard", "newton", ""])),
            "bool_param": draw(st.booleans()),
        }[kind]
        setattr(param, kind, value)
    return request


CONFIG_FAULTS = {
    "model": ["nope", ""],
    "optimizer": [5, -1 % 2**31],
    "learning_rate": [0.0, -1.0, float("nan"), 1e38],
    "loss": [0, 3],
    "gradient_mode": [4, 9],
    "jacobian_reg_weight": [-1.0, float("inf")],
    "publish_as": ["../x", "a/b", "x\n"],
    "backward_tol": [0.0, 1e300, float("nan")],
    "backward_max_iter": [0, 2**32 - 1],
    "max_grad_norm": [0.0, -1.0],
    "max_steps": [1],
}


@st.composite
def train_configs(draw: st.DrawFn) -> pb.TrainConfig:
    """A valid session config, or one with a single field made wrong."""
    config = pb.TrainConfig(
        model="digits",
        optimizer=draw(st.sampled_from([pb.OPTIMIZER_ADAM, pb.OPTIMIZER_ADAMW, pb.OPTIMIZER_SGD])),
        learning_rate=1e-3,
        loss=pb.LOSS_CROSS_ENTROPY,
        gradient_mode=draw(
            st.sampled_from([pb.GRADIENT_MODE_IFT, pb.GRADIENT_MODE_PHANTOM, pb.GRADIENT_MODE_JFB])
        ),
        jacobian_reg_weight=draw(st.sampled_from([0.0, 0.1])),
    )
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(CONFIG_FAULTS)))
        setattr(config, field, draw(st.sampled_from(CONFIG_FAULTS[field])))
    return config


@st.composite
def train_batches(draw: st.DrawFn) -> pb.TrainBatch:
    """Usually a well-formed digits batch with matching class targets; sometimes junk."""
    rows = draw(st.integers(1, 8))
    x = np.full((rows, 64), draw(st.sampled_from([0.0, 8.0, 16.0])), "<f4")
    inputs = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[rows, 64], data=x.tobytes())
    classes = (np.arange(rows) % 10).astype("<i8")
    targets = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[rows], data=classes.tobytes())
    if draw(st.integers(0, 4)) == 0:
        inputs = draw(junk_tensors())
    if draw(st.integers(0, 4)) == 0:
        targets = draw(junk_tensors())
    return pb.TrainBatch(inputs=inputs, targets=targets)


@st.composite
def train_streams(draw: st.DrawFn) -> list[pb.TrainRequest]:
    """Train message sequences: usually config then batches; sometimes out of order."""
    messages = [
        pb.TrainRequest(config=draw(train_configs()))
        if draw(st.integers(0, 9)) == 0
        else pb.TrainRequest(batch=draw(train_batches()))
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.integers(0, 4)) > 0:
        messages.insert(0, pb.TrainRequest(config=draw(train_configs())))
    return messages


@pytest.fixture(scope="module")
def train_channel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(bundled_checkpoints()["digits"], folder / "digits.safetensors")
    with running_server(model_dir=folder, max_batch=64) as server, channel_to(server) as ch:
        yield ch


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=train_streams())
def test_fuzzed_train_streams_get_documented_codes(train_channel, messages):
    stub = deq_pb2_grpc.DEQServiceStub(train_channel)
    code, details = grpc.StatusCode.OK, ""
    try:
        list(stub.Train(iter(messages), timeout=60))
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code in TRAIN_ALLOWED, (code, details)


@pytest.fixture(scope="module")
def channel():
    with running_server(max_batch=64) as server, channel_to(server) as ch:
        yield ch


def check(call) -> None:  # type: ignore[no-untyped-def]
    code, details = grpc.StatusCode.OK, ""
    try:
        call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code in ALLOWED, (code, details)


FUZZ = settings(
    max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(request=infer_requests)
def test_fuzzed_infer_requests_get_documented_codes(channel, request):
    check(lambda: deq_pb2_grpc.DEQServiceStub(channel).Infer(request, timeout=30))


@settings(
    max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=model_infer_requests())
def test_fuzzed_model_infer_requests_get_documented_codes(channel, request):
    check(lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30))


def test_server_still_answers_after_the_fuzzing(channel):
    x = np.full((1, 64), 8.0, np.float32)
    good = pb.InferRequest(
        model="digits", input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    )
    assert deq_pb2_grpc.DEQServiceStub(channel).Infer(good).status == [pb.SAMPLE_STATUS_CONVERGED]
