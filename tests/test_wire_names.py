"""One table per wire concept (`deq_client.wire`), derived from the proto enums, and every user
of a name agreeing with it: the engine's method registry, stop modes and statuses, the server's
validation, the OIP adapter, the SDK's request builder and results, deqctl, and both tensor
codecs (which once disagreed on bfloat16: the SDK sent it, the server refused it)."""

from __future__ import annotations

import re
import typing

import numpy as np
import pytest
import torch

from deq_client import wire
from deq_client._errors import InvalidArgumentError as SDKInvalidArgument
from deq_client._requests import solver_options as sdk_solver_options
from deq_client._results import solver_defaults, status_name
from deq_client._tensor import from_proto, to_proto
from deq_client.cli import parser as deqctl_parser
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.inference import grpc_service_pb2 as oip_pb
from deq_server import core
from deq_server.serving import oip, tensors, validate
from deq_server.serving.config import ServerConfig
from deq_server.serving.errors import InvalidArgumentError
from deq_server.serving.inference import Answer

ENUMS = [
    (wire.METHODS, pb.SolverMethod),
    (wire.STOP_MODES, pb.StopMode),
    (wire.STATUSES, pb.SampleStatus),
    (wire.OPTIMIZERS, pb.Optimizer),
    (wire.LOSSES, pb.Loss),
    (wire.GRADIENT_MODES, pb.GradientMode),
]
ENUM_IDS = ["method", "stop_mode", "status", "optimizer", "loss", "gradient_mode"]


@pytest.mark.parametrize(("table", "enum"), ENUMS, ids=ENUM_IDS)
def test_every_set_enum_value_has_exactly_one_name_and_round_trips(table, enum):
    set_values = [v for v in enum.values() if v != 0]
    assert sorted(table.values()) == sorted(set_values)  # each value once, none missing
    for name, value in table.items():
        assert enum.Name(value).lower().endswith("_" + name.lower())
        assert wire.name_of(table, value) == name
    assert wire.name_of(table, 0) is None  # *_UNSPECIFIED: "not set", never a name
    assert wire.name_of(table, max(enum.values()) + 1) is None


def test_the_literal_types_list_the_table_keys():
    assert typing.get_args(wire.Method) == tuple(wire.METHODS)
    assert typing.get_args(wire.StopMode) == tuple(wire.STOP_MODES)


def test_the_engine_has_exactly_the_wire_methods_stop_modes_and_statuses():
    """Adding a method, stop mode or status to the engine or to the proto alone fails here."""
    assert set(core.METHODS) == set(wire.METHODS)
    assert set(core.STOP_MODES) == set(wire.STOP_MODES)
    assert {s.name: int(s) for s in core.Status} == wire.STATUSES


def _server_names(field: str, code: int) -> str:
    opts = pb.SolverOptions(**{field: code})
    return validate.solver_options(opts, batch=1, config=ServerConfig())[field]


@pytest.mark.parametrize(
    ("field", "table"), [("method", wire.METHODS), ("stop_mode", wire.STOP_MODES)]
)
def test_sdk_server_oip_and_deqctl_accept_exactly_the_same_names(field, table):
    for name, code in table.items():
        assert getattr(sdk_solver_options(**{field: name}), field) == code  # SDK -> wire
        assert _server_names(field, code) == name  # wire -> engine
        params = {field: oip_pb.InferParameter(string_param=name)}
        assert getattr(oip.solver_request(params), field) == name  # OIP -> the data plane
        assert solver_defaults(pb.SolverOptions(**{field: code}))[field] == name  # model defaults
        flag = "--" + field.replace("_", "-")
        args = deqctl_parser().parse_args(["infer", "--model", "m", "--input", "x.npy", flag, name])
        assert getattr(args, field) == name
    with pytest.raises(SDKInvalidArgument):
        sdk_solver_options(**{field: "newton"})
    with pytest.raises(
        InvalidArgumentError, match=re.escape(f"solver.{field}: expected one of {sorted(table)}")
    ):
        _server_names(field, max(table.values()) + 1)
    with pytest.raises(InvalidArgumentError, match=f"parameters.{field}: expected one of"):
        oip.solver_request({field: oip_pb.InferParameter(string_param="newton")})
    with pytest.raises(SystemExit):
        deqctl_parser().parse_args(["infer", "--model", "m", "--input", "x.npy", flag, "newton"])


def test_status_names_are_the_engines():
    assert [status_name(int(s)) for s in core.Status] == [s.name for s in core.Status]
    assert status_name(99) == "UNKNOWN_99"


# --- tensor dtypes ------------------------------------------------------------------------------


def test_every_data_type_has_one_wire_dtype_with_a_unique_oip_name():
    assert sorted(wire.DTYPES) == sorted(v for v in pb.DataType.values() if v != 0)
    assert all(code == d.code for code, d in wire.DTYPES.items())
    assert len({d.oip for d in wire.DTYPES.values()}) == len(wire.DTYPES)
    assert len({d.name for d in wire.DTYPES.values()}) == len(wire.DTYPES)
    assert all(d.storage == d.storage.newbyteorder("<") for d in wire.DTYPES.values())
    assert wire.DTYPES[pb.DATA_TYPE_BFLOAT16].oip == "BF16"


def test_the_server_maps_every_wire_dtype_to_the_torch_dtype_of_its_name():
    assert set(tensors.TORCH_DTYPES) == set(wire.DTYPES)
    assert tensors.TORCH_DTYPES[pb.DATA_TYPE_BFLOAT16] == torch.bfloat16
    for code, torch_dtype in tensors.TORCH_DTYPES.items():
        assert tensors.wire_dtype(torch_dtype) == code
        assert (
            torch.empty(0, dtype=torch_dtype).element_size() == wire.DTYPES[code].storage.itemsize
        )


VALUES = [[0.0, 1.0, -2.0], [3.5, -0.0, 16.0]]  # exact in every wire dtype but int64
DTYPE_IDS = [d.name for d in wire.DTYPES.values()]


@pytest.mark.parametrize("code", list(wire.DTYPES), ids=DTYPE_IDS)
def test_sdk_and_server_encode_every_dtype_to_the_same_bytes_and_read_each_other(code):
    """What would have caught bfloat16: the server decodes whatever the SDK encodes, to the same
    values, and encodes them back to the very bytes the SDK sent."""
    torch_dtype = tensors.TORCH_DTYPES[code]
    values = torch.tensor(VALUES, dtype=torch.float64).to(torch_dtype)
    sent = to_proto(values, "x")
    assert sent.dtype == code
    on_server = tensors.decode(sent, "x", max_elements=6)
    assert on_server.dtype == torch_dtype
    assert torch.equal(on_server, values)
    assert tensors.encode(on_server) == sent
    np.testing.assert_array_equal(from_proto(sent, "x"), values.double().numpy())


@pytest.mark.parametrize("dtype", list(oip._INPUTS.values()), ids=lambda d: d.oip)
def test_oip_raw_inputs_become_the_tensor_the_sdk_would_send(dtype):
    values = torch.tensor(VALUES, dtype=tensors.TORCH_DTYPES[dtype.code])
    request = oip_pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype=dtype.oip, shape=[2, 3])
    request.raw_input_contents.append(to_proto(values).data)
    sent = to_proto(values)
    assert oip.input_tensor(request) == tensors.WireTensor(sent.dtype, tuple(sent.shape), sent.data)


def test_oip_takes_every_float_wire_dtype_and_nothing_else():
    floats = {d.oip for d in wire.DTYPES.values() if getattr(torch, d.name).is_floating_point}
    assert set(oip._INPUTS) == floats


@pytest.mark.parametrize("dtype", list(oip._INPUTS.values()), ids=lambda d: d.oip)
def test_oip_answers_fp32_whatever_float_dtype_the_engine_answered_in(dtype):
    """The adapter once decoded only FP32 and FP64 answers: a BF16 or FP16 one was a KeyError."""
    values = torch.tensor(VALUES, dtype=tensors.TORCH_DTYPES[dtype.code])
    answer = Answer(
        version="1",
        output=values,
        state=None,
        iterations=np.array([3, 4]),
        residual=np.array([1e-7, 2e-7]),
        status=np.array([1, 2]),
        queue_seconds=0.0,
        solve_seconds=0.0,
        total_seconds=0.0,
    )
    produced = oip.response_outputs(answer)
    meta, raw = produced["output"]
    assert (meta.datatype, list(meta.shape)) == ("FP32", [2, 3])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 3), values.float().numpy())
    assert {name: meta.datatype for name, (meta, _) in produced.items()} == oip.OUTPUTS
    assert np.frombuffer(produced["status"][1], "<i4").tolist() == [1, 2]


@pytest.mark.parametrize("code", list(oip._INPUTS.values()), ids=lambda d: d.oip)
def test_the_data_planes_numpy_decoding_reads_what_the_torch_decoding_reads(code):
    """Inference validates with numpy (bfloat16 widened to float32): the values are torch's."""
    values = torch.tensor(VALUES, dtype=tensors.TORCH_DTYPES[code.code])
    sent = to_proto(values, "x")
    array = tensors.decode_array(tensors.WireTensor.of(sent), "x", max_elements=6)
    np.testing.assert_array_equal(array, tensors.decode(sent, "x", max_elements=6).float().numpy())
