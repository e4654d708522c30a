"""`inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over the same solver.

ModelInfer decodes into the data plane's `InferCall` (inference.py), as deq.v1 Infer does, so
both protocols share validation, scheduling and metrics, with no detour through deq.v1 messages.
Solver options travel in the request `parameters` (tol, budget_ms, max_iter, method,
stop_mode, allow_partial; tol and budget_ms as a double, an integer or a numeric string, since
KServe's proto has no double); besides `output`, the response carries per-sample `iterations`
(INT64), `residual` (FP64) and `status` (INT32, the SampleStatus numbers) as extra outputs.
Inputs (FP32, FP64, FP16 or BF16) may come as raw_input_contents, or as typed contents for FP32
and FP64 (the protocol has none for the 16-bit types).
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_client.wire import DTYPES, METHODS, STOP_MODES, WireDtype

from . import validate
from .errors import invalid, unary
from .inference import Answer, InferCall
from .registry import Registry
from .servicer import DEQServicer, model_info
from .tensors import WireTensor

# Input datatypes: the float dtypes of the wire table, by OIP name. KServe v2 has typed contents
# for FP32 and FP64 only; FP16 and BF16 (16-bit patterns) come as raw_input_contents, as in Triton.
_INPUTS: dict[str, WireDtype] = {d.oip: d for d in DTYPES.values() if d.code != pb.DATA_TYPE_INT64}
_TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}
# The outputs and their OIP datatypes (status as INT32: the SampleStatus numbers), encoded as
# the wire table's numpy dtypes (INT32 is the protocol's alone).
OUTPUTS = {"output": "FP32", "iterations": "INT64", "residual": "FP64", "status": "INT32"}
_NUMPY = {d.oip: d.storage for d in DTYPES.values()} | {"INT32": np.dtype("<i4")}


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


def solver_request(params: Any) -> validate.SolverRequest:
    """The solver settings of the request parameters, types decoded (range checks follow in the
    data plane, as for deq.v1); unknown keys are refused by name."""
    fields: dict[str, Any] = {}
    for key, param in params.items():
        value = _value(param)
        if key in ("tol", "budget_ms"):
            fields[key] = _finite_number(f"parameters.{key}", value)
        elif key == "max_iter":
            count = _integer(value)
            if count is None or not 1 <= count < 2**32:
                raise invalid("parameters.max_iter", "an integer in 1..2**32-1", value)
            fields[key] = count
        elif key in ("method", "stop_mode"):
            table = METHODS if key == "method" else STOP_MODES
            if value not in table:
                raise invalid(f"parameters.{key}", f"one of {sorted(table)}", value)
            fields[key] = value
        elif key == "allow_partial":
            if not isinstance(value, bool):
                raise invalid("parameters.allow_partial", "a bool", value)
            fields[key] = value
        else:
            raise invalid(
                f"parameters.{key}",
                "tol, budget_ms, max_iter, method, stop_mode or allow_partial",
                key,
            )
    return validate.SolverRequest(**fields)


def input_tensor(request: oip.ModelInferRequest) -> WireTensor:
    """The single input's bytes, from raw contents or typed contents, and its wire dtype."""
    if len(request.inputs) != 1:
        raise invalid("inputs", "exactly one input tensor", len(request.inputs))
    tensor = request.inputs[0]
    if tensor.datatype not in _INPUTS:
        raise invalid("inputs[0].datatype", f"one of {sorted(_INPUTS)}", tensor.datatype)
    wire = _INPUTS[tensor.datatype]
    if request.raw_input_contents:
        data = request.raw_input_contents[0]
    elif tensor.datatype in _TYPED_CONTENTS:
        values = getattr(tensor.contents, _TYPED_CONTENTS[tensor.datatype])
        data = np.asarray(values, dtype=wire.storage).tobytes()
    else:
        raise invalid(
            "raw_input_contents",
            f"the {tensor.datatype} input's bytes (the protocol has no typed contents for it)",
            "none",
        )
    return WireTensor(wire.code, tuple(tensor.shape), data)


# Output metadata by the output's shape: the same four messages for every response of a model
# and batch size. A message handed to a constructor is copied, so these are never changed.
_METAS: dict[tuple[int, ...], dict[str, oip.ModelInferResponse.InferOutputTensor]] = {}
_METAS_KEPT = 256  # shapes; past that the table starts over (a few per model in practice)


def _output_metas(shape: tuple[int, ...]) -> dict[str, oip.ModelInferResponse.InferOutputTensor]:
    metas = _METAS.get(shape)
    if metas is None:
        if len(_METAS) >= _METAS_KEPT:
            _METAS.clear()
        per_sample = list(shape[:1])
        metas = _METAS[shape] = {
            name: oip.ModelInferResponse.InferOutputTensor(
                name=name, datatype=datatype, shape=list(shape) if name == "output" else per_sample
            )
            for name, datatype in OUTPUTS.items()
        }
    return metas


def response_outputs(
    answer: Answer,
) -> dict[str, tuple[oip.ModelInferResponse.InferOutputTensor, bytes]]:
    """Every output of an answer as OIP metadata and raw little-endian bytes."""
    output = answer.output
    if output.dtype != torch.float32:
        output = output.to(torch.float32)
    values = {
        "output": output.numpy(),
        "iterations": answer.iterations,
        "residual": answer.residual,
        "status": answer.status,
    }
    metas = _output_metas(values["output"].shape)
    return {
        name: (metas[name], np.ascontiguousarray(values[name], dtype=_NUMPY[datatype]).tobytes())
        for name, datatype in OUTPUTS.items()
    }


class OIPServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol handlers over the DEQ servicer and registry."""

    def __init__(
        self, deq: DEQServicer, registry: Registry, health: Any, server_version: str
    ) -> None:
        self.deq = deq
        self.registry = registry
        self.health = health
        self.server_version = server_version  # ServerMetadata's version: the app's to say

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
            name="deq-serve", version=self.server_version, extensions=["deq_solver_parameters"]
        )

    @unary
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        served, _ = self.registry.resolve(request.name, request.version)
        info = model_info(served, str(self.registry.device))
        meta = oip.ModelMetadataResponse.TensorMetadata
        shapes = {"output": info.output_shape}
        return oip.ModelMetadataResponse(
            name=served.name,
            versions=list(info.versions),
            platform="deq-serve_pytorch",
            inputs=[meta(name="input", datatype="FP32", shape=[-1, *info.input_shape])],
            outputs=[
                meta(name=name, datatype=datatype, shape=[-1, *shapes.get(name, ())])
                for name, datatype in OUTPUTS.items()
            ],
        )

    @unary
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        unknown = [o.name for o in request.outputs if o.name not in OUTPUTS]
        if unknown:
            raise invalid("outputs", f"names among {sorted(OUTPUTS)}", unknown)
        call = InferCall(
            model=request.model_name,
            version=request.model_version,
            input=input_tensor(request),
            solver=solver_request(request.parameters),
        )
        answer = await self.deq.inference.run(call, context.time_remaining())
        produced = response_outputs(answer)
        wanted = [o.name for o in request.outputs] or list(produced)
        # built in one constructor call: appending copies each output message once more
        return oip.ModelInferResponse(
            model_name=request.model_name,
            model_version=answer.version,
            id=request.id,
            outputs=[produced[name][0] for name in wanted],
            raw_output_contents=[produced[name][1] for name in wanted],
        )
