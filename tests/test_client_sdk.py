"""The client SDK without a real server: tensor codec, request builder, health codec, errors,
and the sync/asyncio clients against a tiny in-process fake of DEQService (loopback, port 0)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deq_client import AsyncDEQClient, DEQClient, DEQError, InferResult, ModelInfo, TrainEvent
from deq_client._errors import rpc_errors, status_code
from deq_client._health import SERVING_STATUS, decode_response, encode_request
from deq_client._requests import infer_request, train_requests
from deq_client._retry import AsyncReplay, Replay
from deq_client._tensor import bfloat16_bits, from_proto, to_proto
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc as pb_grpc

WIRE_DTYPES = [np.float32, np.float64, np.float16, np.int64]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


def arrays(dtype: type) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(dtype, SHAPES)


# --- tensor codec -------------------------------------------------------------------------------


@given(st.sampled_from(WIRE_DTYPES).flatmap(arrays))
def test_tensor_round_trip(array: np.ndarray) -> None:
    tensor = to_proto(array)
    assert list(tensor.shape) == list(array.shape)
    assert len(tensor.data) == array.size * array.itemsize
    back = from_proto(tensor)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.flags.writeable
    np.testing.assert_array_equal(back, array)


@given(st.sampled_from(WIRE_DTYPES).flatmap(arrays))
def test_tensor_big_endian_and_non_contiguous_inputs_are_converted(array: np.ndarray) -> None:
    big = array.astype(array.dtype.newbyteorder(">"))
    assert to_proto(big).data == to_proto(array).data
    np.testing.assert_array_equal(from_proto(to_proto(big)), array)
    if array.ndim >= 2:
        strided = array.T
        assert not strided.flags.c_contiguous or strided.size <= 1 or 1 in strided.shape
        np.testing.assert_array_equal(from_proto(to_proto(strided)), strided)
    if array.ndim >= 1:
        np.testing.assert_array_equal(from_proto(to_proto(array[::-2])), array[::-2])


def test_tensor_bytes_are_little_endian_row_major() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = to_proto(array.T)  # column view: the wire holds the transposed rows
    assert tensor.dtype == pb.DATA_TYPE_FLOAT32
    assert list(tensor.shape) == [3, 2]
    assert tensor.data == np.array([0, 3, 1, 4, 2, 5], dtype="<f4").tobytes()
    assert to_proto(np.int64(7)).data == (7).to_bytes(8, "little")


def test_tensor_accepts_torch_tensors_by_duck_typing() -> None:
    x = torch.arange(6, dtype=torch.float32, requires_grad=True).reshape(2, 3) * 1.5
    np.testing.assert_array_equal(from_proto(to_proto(x)), x.detach().numpy())
    labels = torch.tensor([1, 2, 3])
    assert to_proto(labels).dtype == pb.DATA_TYPE_INT64


@given(st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7F80) != 0x7F80 or (b & 0x7F) == 0))
def test_bfloat16_bits_round_trip(bits: int) -> None:
    value = np.array([bits << 16], dtype=np.uint32).view(np.float32)
    assert int(bfloat16_bits(value)[0]) == bits
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_BFLOAT16, shape=[1], data=bits.to_bytes(2, "little"))
    decoded = from_proto(tensor)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, value)


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan() -> None:
    values = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, np.nan, -np.nan, np.inf, 3.4e38], np.float32)
    bits = bfloat16_bits(values)
    assert bits[0] == 0x3F80
    assert bits[1] == 0x3F82
    decoded = from_proto(pb.Tensor(dtype=pb.DATA_TYPE_BFLOAT16, shape=[6], data=bits.tobytes()))
    assert np.isnan(decoded[2])
    assert np.isnan(decoded[3])
    assert decoded[4] == np.inf
    assert decoded[5] == np.inf  # above the largest bfloat16: rounds to infinity


def test_bfloat16_from_torch_and_ml_dtypes() -> None:
    x = torch.tensor([[0.1, -2.5], [3.0, 1e-3]], dtype=torch.bfloat16)
    tensor = to_proto(x)
    assert tensor.dtype == pb.DATA_TYPE_BFLOAT16
    assert len(tensor.data) == 8
    np.testing.assert_array_equal(from_proto(tensor), x.float().numpy())
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    reference = values.astype(ml_dtypes.bfloat16)
    assert to_proto(reference).data == reference.view(np.uint16).astype("<u2").tobytes()
    assert bfloat16_bits(values).tobytes() == reference.view(np.uint16).tobytes()


@pytest.mark.parametrize(
    "value", [np.zeros(3, np.int32), np.zeros(3, bool), np.zeros(3, np.complex64), ["a"]]
)
def test_tensor_rejects_unsupported_dtypes(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"^INVALID_ARGUMENT: x: dtype .* not supported.*float32, float64"
    ):
        to_proto(value, "x")


def test_tensor_byte_count_mismatch_rejected_before_allocating() -> None:
    # 2**60 float64 elements would be 8 EiB: only a check before allocating can answer this.
    huge = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[2**30, 2**30], data=b"\0" * 8)
    with pytest.raises(ValueError, match=r"output\.data: 8 bytes, expected 9223372036854775808"):
        from_proto(huge, "output")
    short = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 23)
    with pytest.raises(ValueError, match=r"t\.data: 23 bytes, expected 24"):
        from_proto(short, "t")
    with pytest.raises(ValueError, match=r"t\.shape: dimensions must be >= 0"):
        from_proto(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 2], data=b""), "t")
    with pytest.raises(ValueError, match=r"t\.dtype: unknown\(0\) is not a tensor dtype"):
        from_proto(pb.Tensor(shape=[0], data=b""), "t")
    with pytest.raises(
        ValueError, match=r"t\.shape: \[0, 4611686018427387904\] is not a valid array shape"
    ):
        from_proto(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**62], data=b""), "t")


# --- request builder ----------------------------------------------------------------------------


def test_infer_request_maps_every_option() -> None:
    x = np.ones((3, 4), np.float32)
    z0 = np.zeros((3, 8), np.float64)
    request = infer_request(
        "digits",
        x,
        version="7",
        tol=1e-5,
        max_iter=40,
        method="broyden",
        stop_mode="abs",
        allow_partial=True,
        budget_ms=12.5,
        initial_state=z0,
        return_state=True,
    )
    assert request.model == "digits"
    assert request.version == "7"
    np.testing.assert_array_equal(from_proto(request.input), x)
    np.testing.assert_array_equal(from_proto(request.initial_state), z0)
    solver = request.solver
    assert solver.HasField("tol")
    assert solver.tol == 1e-5
    assert not solver.sample_tol
    assert solver.max_iter == 40
    assert solver.budget_ms == 12.5
    assert solver.allow_partial
    assert solver.method == pb.SOLVER_METHOD_BROYDEN
    assert solver.stop_mode == pb.STOP_MODE_ABS
    assert request.return_state


def test_infer_request_defaults_leave_fields_unset() -> None:
    request = infer_request("m", [[1.0, 2.0]])
    solver = request.solver
    assert not (solver.HasField("tol"))
    assert not (solver.HasField("max_iter"))
    assert not (solver.HasField("budget_ms"))
    assert solver.method == pb.SOLVER_METHOD_UNSPECIFIED
    assert solver.stop_mode == pb.STOP_MODE_UNSPECIFIED
    assert not solver.allow_partial
    assert not request.return_state
    assert request.version == ""
    assert not request.HasField("initial_state")
    assert request.input.dtype == pb.DATA_TYPE_FLOAT64  # numpy's default: never cast silently


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("picard", pb.SOLVER_METHOD_PICARD),
        ("anderson", pb.SOLVER_METHOD_ANDERSON),
        ("broyden", pb.SOLVER_METHOD_BROYDEN),
    ],
)
def test_method_enum_mapping(method: str, code: int) -> None:
    assert infer_request("m", [[1.0]], method=method).solver.method == code  # type: ignore[arg-type]


@given(st.lists(st.floats(1e-300, 1e300), min_size=1, max_size=6))
def test_per_sample_tol_becomes_sample_tol(tols: list[float]) -> None:
    x = np.zeros((len(tols), 2), np.float32)
    for tol in (tols, np.array(tols), tuple(tols), torch.tensor(tols, dtype=torch.float64)):
        solver = infer_request("m", x, tol=tol).solver
        assert list(solver.sample_tol) == tols
        assert not solver.HasField("tol")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"tol": 0.0}, ValueError, r"^tol: must be finite and > 0"),
        ({"tol": -1e-3}, ValueError, r"^tol: must be finite and > 0"),
        ({"tol": math.nan}, ValueError, r"^tol: must be finite"),
        ({"tol": math.inf}, ValueError, r"^tol: must be finite"),
        ({"tol": [1e-3, 0.0]}, ValueError, r"^tol: every per-sample tolerance"),
        ({"tol": [1e-3, math.nan]}, ValueError, r"^tol: every per-sample tolerance"),
        (
            {"tol": [1e-3, 1e-3, 1e-3]},
            ValueError,
            r"^tol: 3 per-sample tolerances for a batch of 2",
        ),
        ({"tol": [[1e-3], [1e-3]]}, ValueError, r"^tol: expected a number or a 1-D"),
        ({"tol": "1e-3"}, TypeError, r"^tol: expected a number, got str"),
        ({"tol": True}, TypeError, r"^tol: expected a number"),
        (
            {"method": "newton"},
            ValueError,
            r"^method: unknown value 'newton'; expected one of 'picard', 'anderson', 'broyden'",
        ),
        ({"method": "Anderson"}, ValueError, r"^method: unknown value"),
        (
            {"stop_mode": "relative"},
            ValueError,
            r"^stop_mode: unknown value 'relative'; expected one of 'abs', 'rel'",
        ),
        ({"max_iter": 0}, ValueError, r"^max_iter: must be in \[1, 4294967295\]"),
        ({"max_iter": 2**32}, ValueError, r"^max_iter: must be in"),
        ({"max_iter": 2.5}, TypeError, r"^max_iter: expected an int"),
        ({"max_iter": True}, TypeError, r"^max_iter: expected an int"),
        ({"budget_ms": 0}, ValueError, r"^budget_ms: must be finite and > 0"),
        ({"allow_partial": 1}, TypeError, r"^allow_partial: expected a bool"),
        ({"return_state": "yes"}, TypeError, r"^return_state: expected a bool"),
        (
            {"initial_state": np.zeros((3, 2))},
            ValueError,
            r"^initial_state: batch dimension must be 2",
        ),
        ({"initial_state": np.zeros((3, 2), np.int32)}, ValueError, r"^initial_state: dtype int32"),
        ({"version": 3}, TypeError, r"^version: expected a string"),
    ],
)
def test_infer_request_rejects_bad_options_naming_the_field(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern.replace("^", "^INVALID_ARGUMENT: ", 1)) as caught:
        infer_request("m", np.zeros((2, 3), np.float32), **kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, DEQError)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@given(
    tol=st.one_of(
        st.floats(max_value=0.0),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.lists(st.floats(max_value=0.0), min_size=2, max_size=2),
    )
)
def test_every_bad_tolerance_is_a_deq_error_with_invalid_argument(tol: object) -> None:
    """Issue 13, item 5: one exception type; it is also a ValueError for `except ValueError`."""
    with pytest.raises(DEQError) as caught:
        infer_request("m", np.zeros((2, 3), np.float32), tol=tol)  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(caught.value, ValueError)
    assert caught.value.message.startswith("tol: ")


@given(
    option=st.sampled_from(["tol", "max_iter", "budget_ms", "allow_partial", "method"]),
    value=st.one_of(st.none().map(lambda _: object()), st.binary(max_size=3), st.complex_numbers()),
)
def test_every_value_of_a_wrong_type_is_a_deq_error_and_a_type_error(
    option: str, value: object
) -> None:
    with pytest.raises(DEQError) as caught:
        infer_request("m", np.zeros((2, 3), np.float32), **{option: value})  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(caught.value, TypeError | ValueError)
    assert caught.value.message.startswith(f"{option}: ")


def test_constructor_and_decoding_errors_are_deq_errors_too() -> None:
    with pytest.raises(DEQError) as caught:
        DEQClient("127.0.0.1:1", retries=-1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(DEQError) as caught:
        DEQClient("127.0.0.1:1", timeout=0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    short = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 23)
    with pytest.raises(DEQError) as caught:
        from_proto(short, "InferResponse.output")
    assert caught.value.code == grpc.StatusCode.INTERNAL  # a server bug, not the caller's
    assert isinstance(caught.value, ValueError)


def test_infer_request_rejects_bad_model_and_input() -> None:
    with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: model: must not be empty"):
        infer_request("", [[1.0]])
    with pytest.raises(
        TypeError, match=r"^INVALID_ARGUMENT: model: expected a string, got NoneType"
    ):
        infer_request(None, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: x: expected a batch-first array"):
        infer_request("m", 1.0)
    with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: x: dtype uint8"):
        infer_request("m", np.zeros((1, 2), np.uint8))


FULL_CONFIG = {
    "version": "3",
    "optimizer": "sgd",
    "learning_rate": 0.05,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "loss": "cross_entropy",
    "gradient_mode": "phantom",
    "backward_tol": 1e-6,
    "backward_max_iter": 30,
    "tol": 1e-4,
    "max_iter": 50,
    "method": "picard",
    "stop_mode": "rel",
    "max_grad_norm": 1.0,
    "jacobian_reg_weight": 0.1,
    "max_steps": 100,
    "publish_as": "digits-ft",
}


def test_train_requests_config_first_then_batches_in_order() -> None:
    batches = [(np.full((2, 3), i, np.float32), np.array([i, i + 1])) for i in range(3)]
    messages = list(train_requests("digits", batches, FULL_CONFIG))
    assert [m.WhichOneof("message") for m in messages] == ["config", "batch", "batch", "batch"]
    c = messages[0].config
    assert (c.model, c.version, c.publish_as) == ("digits", "3", "digits-ft")
    assert c.optimizer == pb.OPTIMIZER_SGD
    assert c.loss == pb.LOSS_CROSS_ENTROPY
    assert c.gradient_mode == pb.GRADIENT_MODE_PHANTOM
    assert (c.learning_rate, c.weight_decay, c.momentum) == (0.05, 1e-4, 0.9)
    assert (c.backward_tol, c.backward_max_iter, c.max_grad_norm) == (1e-6, 30, 1.0)
    assert (c.jacobian_reg_weight, c.max_steps) == (0.1, 100)
    assert (c.solver.tol, c.solver.max_iter) == (1e-4, 50)
    assert c.solver.method == pb.SOLVER_METHOD_PICARD
    assert c.solver.stop_mode == pb.STOP_MODE_REL
    for i, message in enumerate(messages[1:]):
        np.testing.assert_array_equal(from_proto(message.batch.inputs), batches[i][0])
        np.testing.assert_array_equal(from_proto(message.batch.targets), batches[i][1])


def test_train_config_minimal_leaves_defaults_unset() -> None:
    (message,) = train_requests("m", [], {"loss": "mse", "learning_rate": 1e-3})
    c = message.config
    assert c.optimizer == pb.OPTIMIZER_UNSPECIFIED
    assert c.gradient_mode == pb.GRADIENT_MODE_UNSPECIFIED
    assert not c.HasField("backward_tol")
    assert not c.HasField("max_grad_norm")
    assert not c.solver.HasField("tol")
    assert c.learning_rate == 1e-3


@pytest.mark.parametrize(
    ("config", "error", "pattern"),
    [
        ({"loss": "mse", "learning_rate": 1e-3, "lr": 1.0}, TypeError, r"unknown keys \['lr'\]"),
        ({"learning_rate": 1e-3}, TypeError, r"missing required keys \['loss'\]"),
        ({"loss": "mse"}, TypeError, r"missing required keys \['learning_rate'\]"),
        (
            {"loss": "l1", "learning_rate": 1e-3},
            ValueError,
            r"^loss: unknown value 'l1'; expected one of 'mse', 'cross_entropy'",
        ),
        (
            {"loss": "mse", "learning_rate": 0.0},
            ValueError,
            r"^learning_rate: must be finite and > 0",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "optimizer": "lbfgs"},
            ValueError,
            r"^optimizer: unknown value 'lbfgs'; expected one of 'adam', 'adamw', 'sgd'",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "gradient_mode": "bptt"},
            ValueError,
            r"^gradient_mode: .*'ift', 'phantom', 'jfb'",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "weight_decay": -1.0},
            ValueError,
            r"^weight_decay: must be finite and >= 0",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "backward_max_iter": 0},
            ValueError,
            r"^backward_max_iter: must be in",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "tol": [1e-3]},
            ValueError,
            r"^tol: training takes one tolerance",
        ),
        (
            {"loss": "mse", "learning_rate": 1e-3, "method": "newton"},
            ValueError,
            r"^method: unknown value",
        ),
    ],
)
def test_train_config_rejected_before_any_message(
    config: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern.replace("^", "^INVALID_ARGUMENT: ", 1)) as caught:
        train_requests("m", iter(()), config)  # eager: no next() needed
    assert isinstance(caught.value, DEQError)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_train_batches_are_checked_against_the_loss() -> None:
    ce = {"loss": "cross_entropy", "learning_rate": 1e-3}
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"^INVALID_ARGUMENT: batch 0 targets: cross_entropy takes int64"
    ):
        list(train_requests("m", [(x, np.zeros(2, np.float32))], ce))
    with pytest.raises(
        ValueError, match=r"^INVALID_ARGUMENT: batch 0: inputs \[2, 3\] and targets \[3\]"
    ):
        list(train_requests("m", [(x, np.zeros(3, np.int64))], ce))
    with pytest.raises(
        TypeError, match=r"^INVALID_ARGUMENT: batch 1: expected an \(inputs, targets\) pair"
    ):
        list(train_requests("m", [(x, np.zeros(2, np.int64)), x], ce))
    mse = {"loss": "mse", "learning_rate": 1e-3}
    with pytest.raises(
        ValueError, match=r"^INVALID_ARGUMENT: batch 0 targets: mse takes float targets"
    ):
        list(train_requests("m", [(x, np.zeros((2, 1), np.int64))], mse))


# --- health codec and errors --------------------------------------------------------------------


@given(st.text())
def test_health_request_codec_matches_grpc_health(service: str) -> None:
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert encode_request(service) == expected
    assert health_pb2.HealthCheckRequest.FromString(encode_request(service)).service == service


@pytest.mark.parametrize("status", sorted(SERVING_STATUS))
def test_health_response_codec_matches_grpc_health(status: int) -> None:
    data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert decode_response(data) == health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    # Unknown fields of every wire type are skipped, wherever they sit.
    extra = b"\x10\x96\x01" + b"\x1a\x03abc" + b"\x21" + bytes(8) + b"\x2d" + bytes(4)
    assert decode_response(extra + data + extra) == SERVING_STATUS[status]
    with pytest.raises(ValueError, match="truncated"):
        decode_response(b"\x1a\x05ab")


class FakeRpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "model 'x' not found"


def test_deq_error_from_rpc_error() -> None:
    error = DEQError.from_rpc_error(FakeRpcError())
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.message == error.details == "model 'x' not found"
    assert str(error) == "NOT_FOUND: model 'x' not found"
    bare = DEQError.from_rpc_error(grpc.RpcError("no status"))
    assert bare.code is grpc.StatusCode.UNKNOWN
    assert bare.message == "no status"
    with pytest.raises(DEQError) as caught, rpc_errors():
        raise FakeRpcError()
    assert isinstance(caught.value.__cause__, FakeRpcError)
    assert status_code(14) is grpc.StatusCode.UNAVAILABLE
    assert status_code(99) is grpc.StatusCode.UNKNOWN


def test_importing_the_sdk_pulls_in_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, deq_client, deq_client.aio\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'deq_server')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the clients against an in-process fake server ---------------------------------------------


def answer(request: pb.InferRequest) -> pb.InferResponse:
    """Output 2x, statuses alternating CONVERGED / MAX_ITER."""
    x = from_proto(request.input)
    batch = x.shape[0]
    response = pb.InferResponse(
        output=to_proto(2 * x),
        iterations=range(1, batch + 1),
        residual=[1e-6] * batch,
        status=[pb.SAMPLE_STATUS_CONVERGED, pb.SAMPLE_STATUS_MAX_ITER] * (batch // 2)
        + [1] * (batch % 2),
        model_version="1",
        timings=pb.Timings(queue_seconds=0.25, solve_seconds=0.5, total_seconds=1.0),
    )
    if request.return_state:
        response.state.CopyFrom(to_proto(np.ones((batch, 4), np.float32)))
    return response


class FakeDEQ(pb_grpc.DEQServiceServicer):
    """Injected failures: ``fail[method]`` codes are aborted with, one per call, in order."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.fail_stream_after_first = False
        self.metadata: list[dict[str, str]] = []

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        codes = self.fail.get(name)
        if codes:
            context.abort(codes.pop(0), f"{name}: injected failure")

    def Infer(self, request, context):
        self._enter("Infer", context)
        return answer(request)

    def InferStream(self, request_iterator, context):
        self._enter("InferStream", context)
        requests = list(request_iterator)  # all, then answer in reverse order
        for n, item in enumerate(reversed(requests)):
            if n == 1 and self.fail_stream_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "gone after the first answer")
            if item.request.model == "broken":
                yield pb.InferStreamResponse(
                    request_id=item.request_id, error_code=3, error_message="input: bad"
                )
            else:
                yield pb.InferStreamResponse(
                    request_id=item.request_id, response=answer(item.request)
                )

    def Train(self, request_iterator, context):
        self._enter("Train", context)
        steps = 0
        for request in request_iterator:
            if request.HasField("batch"):
                steps += 1
                yield pb.TrainResponse(
                    step=pb.TrainStep(step=steps, loss=1.0 / steps, grad_norm=0.5)
                )
        yield pb.TrainResponse(
            committed=pb.TrainCommitted(model="digits", version="2", steps=steps)
        )

    def ListModels(self, request, context):
        self._enter("ListModels", context)
        return pb.ListModelsResponse(models=[MODEL_INFO])

    def GetModel(self, request, context):
        self._enter("GetModel", context)
        if request.name != MODEL_INFO.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        return pb.GetModelResponse(model=MODEL_INFO)


MODEL_INFO = pb.ModelInfo(
    name="digits",
    versions=["1", "2"],
    latest_version="2",
    config_json='{"cell": "mlp", "hidden": 32}',
    input_shape=[64],
    output_shape=[10],
    state_shape=[32],
    solver_defaults=pb.SolverOptions(
        tol=1e-4, max_iter=50, method=pb.SOLVER_METHOD_ANDERSON, stop_mode=pb.STOP_MODE_REL
    ),
    device="cpu",
    dtype=pb.DATA_TYPE_FLOAT32,
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeDEQ, health.HealthServicer]]:
    fake = FakeDEQ()
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("deq.v1.DEQService", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DEQServiceServicer_to_server(fake, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", fake, health_servicer
    server.stop(None)


@pytest.fixture
def fake(served: tuple[str, FakeDEQ, health.HealthServicer]) -> FakeDEQ:
    served[1].__init__()  # fresh counters and failures per test
    return served[1]


@pytest.fixture
def target(served: tuple[str, FakeDEQ, health.HealthServicer], fake: FakeDEQ) -> str:
    return served[0]


def check_result(result: InferResult, x: np.ndarray) -> None:
    np.testing.assert_array_equal(result.output, 2 * x)
    np.testing.assert_array_equal(result.iterations, np.arange(1, len(x) + 1))
    assert result.iterations.dtype == np.int64
    assert result.status.dtype == np.int64
    assert result.residual.dtype == np.float64


def test_sync_infer_sends_the_token_and_decodes_the_response(target: str, fake: FakeDEQ) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with DEQClient(target, token="s3cret", timeout=10) as client:
        result = client.infer("digits", x, tol=[1e-3, 1e-4, 1e-5], return_state=True)
    check_result(result, x)
    assert result.status_names == ["CONVERGED", "MAX_ITER", "CONVERGED"]
    np.testing.assert_array_equal(result.converged, [True, False, True])
    assert result.model_version == "1"
    assert result.timings.total_seconds == 1.0
    assert result.state is not None
    assert result.state.shape == (3, 4)
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"


def test_infer_many_yields_in_request_order_and_raises_per_item(target: str) -> None:
    xs = [np.full((k + 1, 2), k, np.float32) for k in range(5)]
    with DEQClient(target) as client:
        results = list(client.infer_many("digits", xs, max_iter=10))
        assert [len(r.output) for r in results] == [1, 2, 3, 4, 5]
        for result, x in zip(results, xs, strict=True):
            check_result(result, x)
        seen: list[InferResult] = []
        with pytest.raises(DEQError) as caught:
            seen.extend(client.infer_many("broken", xs[:1]))
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.request_id == "0"
        assert caught.value.message == "input: bad"
        with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: method: unknown value"):
            next(client.infer_many("digits", xs, method="newton"))  # type: ignore[call-overload]


def test_train_yields_steps_then_commit_and_surfaces_batch_errors(target: str) -> None:
    batches = [(np.zeros((2, 3), np.float32), np.array([0, 1])) for _ in range(3)]
    config = {"loss": "cross_entropy", "learning_rate": 1e-3}
    with DEQClient(target) as client:
        events = list(client.train("digits", batches, config, progress=True))
        bad = [*batches[:1], (np.zeros((2, 3), np.float32), np.array([0.5, 1.5]))]
        with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: batch 1 targets: cross_entropy"):
            list(client.train("digits", bad, config))
    assert [e.kind for e in events] == ["step", "step", "step", "committed"]
    assert [e.step for e in events[:3]] == [1, 2, 3]
    assert events[1].loss == 0.5
    assert events[-1] == TrainEvent(kind="committed", model="digits", version="2", steps=3)


def test_models_and_health(target: str) -> None:
    with DEQClient(target) as client:
        (info,) = client.list_models()
        assert client.get_model("digits") == info
        with pytest.raises(DEQError, match=r"^NOT_FOUND: model 'nope' not found") as caught:
            client.get_model("nope")
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert client.health() == "SERVING"
        assert client.health("deq.v1.DEQService") == "NOT_SERVING"
        assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    assert info == ModelInfo(
        name="digits",
        versions=["1", "2"],
        latest_version="2",
        config={"cell": "mlp", "hidden": 32},
        input_shape=(64,),
        output_shape=(10,),
        state_shape=(32,),
        solver_defaults={"tol": 1e-4, "max_iter": 50, "method": "anderson", "stop_mode": "rel"},
        device="cpu",
        dtype="float32",
        training=False,
    )


UNAVAILABLE, INTERNAL = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL


def test_unavailable_is_retried_with_backoff(target: str, fake: FakeDEQ) -> None:
    x = np.ones((1, 2), np.float32)
    with DEQClient(target, retries=3, backoff=0.001) as client:
        fake.fail["Infer"] = [UNAVAILABLE, UNAVAILABLE]
        check_result(client.infer("digits", x), x)
        assert fake.calls["Infer"] == 3
        fake.fail["InferStream"] = [UNAVAILABLE]  # before the first response: requests replayed
        assert len(list(client.infer_many("digits", [x, x]))) == 2
        assert fake.calls["InferStream"] == 2


def test_no_retry_on_other_codes_exhausted_retries_or_after_a_stream_answered(
    target: str, fake: FakeDEQ
) -> None:
    x = np.ones((1, 2), np.float32)
    with DEQClient(target, retries=1, backoff=0.001) as client:
        fake.fail["Infer"] = [UNAVAILABLE, UNAVAILABLE]
        with pytest.raises(DEQError) as caught:
            client.infer("digits", x)
        assert caught.value.code is UNAVAILABLE
        assert fake.calls["Infer"] == 2
        fake.fail["Infer"] = [INTERNAL]
        with pytest.raises(DEQError, match=r"^INTERNAL: Infer: injected failure"):
            client.infer("digits", x)
        assert fake.calls["Infer"] == 3
        fake.fail_stream_after_first = True
        stream = client.infer_many("digits", [x, x])
        with pytest.raises(DEQError, match=r"^UNAVAILABLE: gone after the first answer"):
            list(stream)
        assert fake.calls["InferStream"] == 1
    with pytest.raises(ValueError, match=r"^INVALID_ARGUMENT: retries: must be an int >= 0"):
        DEQClient(target, retries=-1)


def test_async_client_same_methods(target: str, fake: FakeDEQ) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    config = {"loss": "mse", "learning_rate": 1e-3}

    async def batches() -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(2):
            yield x, np.zeros((3, 1), np.float32)
        yield x, np.zeros((3, 1), np.int64)  # rejected: mse takes floats

    async def main() -> None:
        async with AsyncDEQClient(target, token="t", retries=2, backoff=0.001) as client:
            fake.fail["Infer"] = [UNAVAILABLE]
            check_result(await client.infer("digits", x, method="anderson"), x)
            assert fake.calls["Infer"] == 2
            assert fake.metadata[-1]["authorization"] == "Bearer t"
            results = [r async for r in client.infer_many("digits", (x[: k + 1] for k in range(3)))]
            assert [len(r.output) for r in results] == [1, 2, 3]
            events = [e async for e in client.train("digits", [(x, np.zeros((3, 1)))], config)]
            assert [e.kind for e in events] == ["step", "committed"]
            with pytest.raises(
                ValueError, match=r"^INVALID_ARGUMENT: batch 2 targets: mse takes float"
            ):
                _ = [e async for e in client.train("digits", batches(), config)]
            assert (await client.get_model("digits")).name == "digits"
            assert len(await client.list_models()) == 1
            assert await client.health() == "SERVING"
            with pytest.raises(DEQError) as caught:
                await client.get_model("nope")
            assert caught.value.code is grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


# --- stream replay (retries before the first response) -------------------------------------------


def test_replay_resends_what_was_pulled_and_never_pulls_twice() -> None:
    pulls: list[int] = []

    def source() -> Iterator[int]:
        for i in range(6):
            pulls.append(i)
            yield i

    replay = Replay(source())
    first = replay.attempt()
    assert [next(first), next(first), next(first)] == [0, 1, 2]  # then the call fails
    second = replay.attempt()
    assert [next(second), next(second)] == [0, 1]
    replay.commit()  # the first response: no more retries
    assert list(second) == [2, 3, 4, 5]
    assert pulls == [0, 1, 2, 3, 4, 5]
    assert replay.sent == 6
    assert replay.log == []  # nothing kept once the live attempt has sent it


def test_replay_hands_items_a_dead_attempt_pulled_to_the_live_one() -> None:
    replay = Replay(iter(range(5)))
    dead = replay.attempt()
    assert next(dead) == 0
    live = replay.attempt()
    replay.commit()
    assert next(live) == 0
    assert next(dead) == 1  # gRPC's old consumer thread was still pulling
    assert list(live) == [1, 2, 3, 4]


def test_replay_keeps_the_source_error_for_every_attempt() -> None:
    def source() -> Iterator[int]:
        yield 0
        raise ValueError("batch 1: bad")

    replay = Replay(source())
    first = replay.attempt()
    assert next(first) == 0
    with pytest.raises(ValueError, match="batch 1: bad"):
        next(first)
    with pytest.raises(ValueError, match="batch 1: bad"):
        list(replay.attempt())  # never a clean end (which would half-close and commit)
    assert isinstance(replay.error, ValueError)


def test_async_replay_survives_a_cancelled_consumer() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def source() -> AsyncIterator[int]:
            yield 0
            await gate.wait()  # slow data loading
            yield 1

        replay = AsyncReplay(source())
        dead = replay.attempt()
        assert await anext(dead) == 0
        waiting = asyncio.ensure_future(anext(dead))
        await asyncio.sleep(0)
        waiting.cancel()  # gRPC cancels the dead attempt's consumer task
        with pytest.raises(asyncio.CancelledError):
            await waiting
        live = replay.attempt()
        assert await anext(live) == 0
        gate.set()
        assert [item async for item in live] == [1]

    asyncio.run(main())


def test_train_stream_is_retried_before_its_first_event(target: str, fake: FakeDEQ) -> None:
    batches = iter([(np.zeros((2, 3), np.float32), np.array([0, 1])) for _ in range(2)])
    config = {"loss": "cross_entropy", "learning_rate": 1e-3}
    fake.fail["Train"] = [UNAVAILABLE, UNAVAILABLE]
    with DEQClient(target, backoff=0.001) as client:
        events = list(client.train("digits", batches, config))
    assert [e.kind for e in events] == ["step", "step", "committed"]
    assert fake.calls["Train"] == 3
