"""`inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over the same solver.

ModelInfer is translated into a `deq.v1.InferRequest` and answered by `DEQServicer`, so both
protocols share validation, scheduling and metrics. Solver options travel in the request
`parameters` (tol, budget_ms, max_iter, method, stop_mode, allow_partial; tol and budget_ms as a
double, an integer or a numeric string, since KServe's proto has no double); besides `output`, the
response carries per-sample `iterations` (INT64), `residual` (FP64) and `status` (INT32, the
SampleStatus numbers) as extra outputs. Inputs (FP32, FP64, FP16 or BF16) may come as raw_input_contents, or
as typed contents for FP32 and FP64 (the protocol has none for the 16-bit types).
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server import __version__

from .errors import invalid, unary
from .registry import Registry
from .servicer import DEQServicer, model_info
from .validate import METHODS, STOP_MODES

# Input datatypes: the deq.v1 float dtypes. KServe v2 has typed contents for FP32 and FP64 only;
# FP16 and BF16 (16-bit patterns, decoded by deq.v1) come as raw_input_contents, as in Triton.
_WIRE = {
    "FP32": (pb.DATA_TYPE_FLOAT32, "<f4"),
    "FP64": (pb.DATA_TYPE_FLOAT64, "<f8"),
    "FP16": (pb.DATA_TYPE_FLOAT16, "<f2"),
    "BF16": (pb.DATA_TYPE_BFLOAT16, "<u2"),
}
_TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}
OUTPUTS = ("output", "iterations", "residual", "status")
_METHOD_CODES = {name: code for code, name in METHODS.items()}
_STOP_CODES = {name: code for code, name in STOP_MODES.items()}


def _value(p: oip.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


# A decimal number as text: what a client without a double parameter (KServe's Python client, whose
# proto has bool, int64 and string only) sends for tol or budget_ms. No nan, inf, hex or "1_000".
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")


def _finite_number(field: str, value: object) -> float:
    """A float parameter from a double, an integer or a numeric string; finite, else refused."""
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or not math.isfinite(number):
        raise invalid(field, "a finite number (a double, an integer or a numeric string)", value)
    return number


def _integer(value: object) -> int | None:
    """An integer parameter from an int64/uint64 or a decimal string (None when neither)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def solver_from_parameters(params: Any) -> pb.SolverOptions:
    """SolverOptions from the request parameters; unknown keys are refused by name."""
    opts = pb.SolverOptions()
    for key, param in params.items():
        value = _value(param)
        if key == "tol":
            opts.tol = _finite_number("parameters.tol", value)
        elif key == "budget_ms":
            opts.budget_ms = _finite_number("parameters.budget_ms", value)
        elif key == "max_iter":
            count = _integer(value)
            if count is None or not 1 <= count < 2**32:
                raise invalid("parameters.max_iter", "an integer in 1..2**32-1", value)
            opts.max_iter = count
        elif key == "method":
            if value not in _METHOD_CODES:
                raise invalid("parameters.method", f"one of {sorted(_METHOD_CODES)}", value)
            opts.method = _METHOD_CODES[value]
        elif key == "stop_mode":
            if value not in _STOP_CODES:
                raise invalid("parameters.stop_mode", f"one of {sorted(_STOP_CODES)}", value)
            opts.stop_mode = _STOP_CODES[value]
        elif key == "allow_partial":
            if not isinstance(value, bool):
                raise invalid("parameters.allow_partial", "a bool", value)
            opts.allow_partial = value
        else:
            raise invalid(
                f"parameters.{key}",
                "tol, budget_ms, max_iter, method, stop_mode or allow_partial",
                key,
            )
    return opts


def input_tensor(request: oip.ModelInferRequest) -> pb.Tensor:
    """The single input as a deq.v1 Tensor, from raw bytes or typed contents."""
    if len(request.inputs) != 1:
        raise invalid("inputs", "exactly one input tensor", len(request.inputs))
    tensor = request.inputs[0]
    if tensor.datatype not in _WIRE:
        raise invalid("inputs[0].datatype", f"one of {sorted(_WIRE)}", tensor.datatype)
    dtype, np_dtype = _WIRE[tensor.datatype]
    if request.raw_input_contents:
        data = request.raw_input_contents[0]
    elif tensor.datatype in _TYPED_CONTENTS:
        values = getattr(tensor.contents, _TYPED_CONTENTS[tensor.datatype])
        data = np.asarray(values, dtype=np_dtype).tobytes()
    else:
        raise invalid(
            "raw_input_contents",
            f"the {tensor.datatype} input's bytes (the protocol has no typed contents for it)",
            "none",
        )
    return pb.Tensor(dtype=dtype, shape=list(tensor.shape), data=data)


def _output(
    name: str, datatype: str, array: np.ndarray
) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    meta = oip.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(array.shape)
    )
    return meta, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


class OIPServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol handlers over the DEQ servicer and registry."""

    def __init__(self, deq: DEQServicer, registry: Registry, health: Any) -> None:
        self.deq = deq
        self.registry = registry
        self.health = health

    @unary
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return oip.ServerReadyResponse(
            ready=status.status == health_pb2.HealthCheckResponse.SERVING
        )

    @unary
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        served = self.registry.models.get(request.name)
        ready = served is not None and (not request.version or request.version in served.versions)
        return oip.ModelReadyResponse(ready=ready)

    @unary
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="deq-serve", version=__version__, extensions=["deq_solver_parameters"]
        )

    @unary
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        served, _ = self.registry.resolve(request.name, request.version)
        info = model_info(served, str(self.registry.device))
        meta = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=served.name,
            versions=list(info.versions),
            platform="deq-serve_pytorch",
            inputs=[meta(name="input", datatype="FP32", shape=[-1, *info.input_shape])],
            outputs=[
                meta(name="output", datatype="FP32", shape=[-1, *info.output_shape]),
                meta(name="iterations", datatype="INT64", shape=[-1]),
                meta(name="residual", datatype="FP64", shape=[-1]),
                meta(name="status", datatype="INT32", shape=[-1]),
            ],
        )

    @unary
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        unknown = [o.name for o in request.outputs if o.name not in OUTPUTS]
        if unknown:
            raise invalid("outputs", f"names among {sorted(OUTPUTS)}", unknown)
        deq_request = pb.InferRequest(
            model=request.model_name,
            version=request.model_version,
            input=input_tensor(request),
            solver=solver_from_parameters(request.parameters),
        )
        answer = await self.deq.infer_counted(deq_request, context.time_remaining())
        dtype = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_FLOAT64: "<f8"}[answer.output.dtype]
        output = np.frombuffer(answer.output.data, dtype=dtype).reshape(tuple(answer.output.shape))
        produced = {
            "output": _output("output", "FP32", output.astype(np.float32)),
            "iterations": _output("iterations", "INT64", np.asarray(answer.iterations, np.int64)),
            "residual": _output("residual", "FP64", np.asarray(answer.residual, np.float64)),
            "status": _output("status", "INT32", np.asarray(answer.status, np.int32)),
        }
        wanted = [o.name for o in request.outputs] or list(produced)
        response = oip.ModelInferResponse(
            model_name=request.model_name, model_version=answer.model_version, id=request.id
        )
        for name in wanted:
            meta, raw = produced[name]
            response.outputs.append(meta)
            response.raw_output_contents.append(raw)
        return response
