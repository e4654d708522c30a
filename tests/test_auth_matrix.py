"""Every RPC the server exposes, called with no token, a bad token, the wrong scope and the right
one, on a real server on 127.0.0.1.

The table below is checked against the services the server lists through reflection, so an RPC
added later without a row here fails `test_the_table_covers_every_rpc_the_server_exposes`.

Scopes: `infer` tokens reach the inference and model-reading RPCs of both protocols; `admin`
tokens also reach Train, LoadModel and UnloadModel. Health (`grpc.health.v1.Health`) and server
reflection are open on purpose: load balancers and Kubernetes probe health without credentials,
and reflection describes only the public API (no model data). Every admin token also has the
infer scope, so the "wrong scope" case exists only for the admin RPCs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_harness import running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints
from deq_server.serving import auth

INFER_TOKEN = "infer-token-7f3a9c01d2e4"
ADMIN_TOKEN = "admin-token-b81e55c2a9f0"
X = np.full((2, 64), 8.0, np.float32)
TENSOR = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=X.tobytes())
INFER = pb.InferRequest(model="digits", input=TENSOR)
OK = grpc.StatusCode.OK


@dataclass
class Stubs:
    deq: deq_pb2_grpc.DEQServiceStub
    oip: oip_grpc.GRPCInferenceServiceStub
    health: health_pb2_grpc.HealthStub
    reflection: reflection_pb2_grpc.ServerReflectionStub


Metadata = list[tuple[str, str]] | None
Call = Callable[[Stubs, Metadata], Any]


def _model_infer(s: Stubs, md: Metadata) -> Any:
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 64])
    request = oip.ModelInferRequest(
        model_name="digits", inputs=[tensor], raw_input_contents=[X.tobytes()]
    )
    return s.oip.ModelInfer(request, metadata=md, timeout=30)


def _infer_stream(s: Stubs, md: Metadata) -> Any:
    item = pb.InferStreamRequest(request_id="a", request=INFER)
    return list(s.deq.InferStream(iter([item]), metadata=md, timeout=30))


def _train(s: Stubs, md: Metadata) -> Any:
    # A config and a half-close: a zero-step session that commits a copy as a new version.
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    return list(s.deq.Train(iter([pb.TrainRequest(config=config)]), metadata=md, timeout=30))


def _load(s: Stubs, md: Metadata) -> Any:
    request = pb.LoadModelRequest(name="spare", path="spare.safetensors")
    return s.deq.LoadModel(request, metadata=md, timeout=30)


def _unload(s: Stubs, md: Metadata) -> Any:
    # Something to unload first (with the admin token), so that the right scope gets plain OK.
    s.deq.LoadModel(
        pb.LoadModelRequest(name="doomed", path="spare.safetensors"),
        metadata=bearer(ADMIN_TOKEN),
        timeout=30,
    )
    return s.deq.UnloadModel(pb.UnloadModelRequest(name="doomed"), metadata=md, timeout=30)


def _watch(s: Stubs, md: Metadata) -> Any:
    call = s.health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=md, timeout=30)
    try:
        return next(call)
    finally:
        call.cancel()


def _reflect(s: Stubs, md: Metadata) -> Any:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return list(s.reflection.ServerReflectionInfo(iter([request]), metadata=md, timeout=30))


# method -> (scope needed or None when open, a call whose normal answer with that scope is OK)
RPCS: dict[str, tuple[str | None, Call]] = {
    "/deq.v1.DEQService/Infer": ("infer", lambda s, md: s.deq.Infer(INFER, metadata=md)),
    "/deq.v1.DEQService/InferStream": ("infer", _infer_stream),
    "/deq.v1.DEQService/ListModels": (
        "infer",
        lambda s, md: s.deq.ListModels(pb.ListModelsRequest(), metadata=md),
    ),
    "/deq.v1.DEQService/GetModel": (
        "infer",
        lambda s, md: s.deq.GetModel(pb.GetModelRequest(name="digits"), metadata=md),
    ),
    "/deq.v1.DEQService/Train": ("admin", _train),
    "/deq.v1.DEQService/LoadModel": ("admin", _load),
    "/deq.v1.DEQService/UnloadModel": ("admin", _unload),
    "/inference.GRPCInferenceService/ServerLive": (
        "infer",
        lambda s, md: s.oip.ServerLive(oip.ServerLiveRequest(), metadata=md),
    ),
    "/inference.GRPCInferenceService/ServerReady": (
        "infer",
        lambda s, md: s.oip.ServerReady(oip.ServerReadyRequest(), metadata=md),
    ),
    "/inference.GRPCInferenceService/ModelReady": (
        "infer",
        lambda s, md: s.oip.ModelReady(oip.ModelReadyRequest(name="digits"), metadata=md),
    ),
    "/inference.GRPCInferenceService/ServerMetadata": (
        "infer",
        lambda s, md: s.oip.ServerMetadata(oip.ServerMetadataRequest(), metadata=md),
    ),
    "/inference.GRPCInferenceService/ModelMetadata": (
        "infer",
        lambda s, md: s.oip.ModelMetadata(oip.ModelMetadataRequest(name="digits"), metadata=md),
    ),
    "/inference.GRPCInferenceService/ModelInfer": ("infer", _model_infer),
    "/grpc.health.v1.Health/Check": (
        None,
        lambda s, md: s.health.Check(health_pb2.HealthCheckRequest(service=""), metadata=md),
    ),
    "/grpc.health.v1.Health/Watch": (None, _watch),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (None, _reflect),
}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# Credentials that must all count as "bad": wrong, a prefix or an extension of a real token, a
# real token under another scheme or with its case changed, an empty bearer.
BAD_TOKENS: dict[str, Metadata] = {
    "wrong": bearer("not-a-token"),
    "prefix": bearer(ADMIN_TOKEN[:-1]),
    "extended": bearer(ADMIN_TOKEN + "x"),
    "upper_case": bearer(ADMIN_TOKEN.upper()),
    "basic_scheme": [("authorization", f"Basic {ADMIN_TOKEN}")],
    "no_scheme": [("authorization", ADMIN_TOKEN)],
    "empty_bearer": [("authorization", "Bearer ")],
}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copy(bundled_checkpoints()["digits"], root / "digits.safetensors")
    shutil.copy(bundled_checkpoints()["digits"], root / "spare.safetensors")
    with (
        running_server(model_dir=root, infer_tokens=INFER_TOKEN, admin_tokens=ADMIN_TOKEN) as srv,
        grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel,
    ):
        yield Stubs(
            deq_pb2_grpc.DEQServiceStub(channel),
            oip_grpc.GRPCInferenceServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            reflection_pb2_grpc.ServerReflectionStub(channel),
        )


def outcome(call: Call, stubs: Stubs, metadata: Metadata) -> grpc.StatusCode:
    try:
        call(stubs, metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def test_the_table_covers_every_rpc_the_server_exposes(stubs):
    listed = _reflect(stubs, None)[0].list_services_response.service
    services = {s.name for s in listed}
    pools = [pb.DESCRIPTOR, oip.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
    exposed = {
        f"/{service.full_name}/{method.name}"
        for file in pools
        for service in file.services_by_name.values()
        if service.full_name in services
        for method in service.methods
    }
    assert services == {
        "deq.v1.DEQService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert exposed == set(RPCS)


def test_the_open_rpcs_are_exactly_health_and_reflection():
    open_rpcs = {m for m, (scope, _) in RPCS.items() if scope is None}
    assert open_rpcs == {m for m in RPCS if m.startswith(auth.OPEN_PREFIXES)}
    assert {m for m, (scope, _) in RPCS.items() if scope == "admin"} == auth.ADMIN_METHODS


@pytest.mark.parametrize("method", list(RPCS))
def test_no_token(stubs, method):
    scope, call = RPCS[method]
    expected = OK if scope is None else grpc.StatusCode.UNAUTHENTICATED
    assert outcome(call, stubs, None) == expected


@pytest.mark.parametrize("bad", list(BAD_TOKENS))
@pytest.mark.parametrize("method", list(RPCS))
def test_bad_token(stubs, method, bad):
    scope, call = RPCS[method]
    expected = OK if scope is None else grpc.StatusCode.UNAUTHENTICATED
    assert outcome(call, stubs, BAD_TOKENS[bad]) == expected


@pytest.mark.parametrize("method", [m for m, (scope, _) in RPCS.items() if scope == "admin"])
def test_wrong_scope(stubs, method):
    _, call = RPCS[method]
    assert outcome(call, stubs, bearer(INFER_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("method", "token"),
    [
        (method, token)
        for method, (scope, _) in RPCS.items()
        for token in ("infer", "admin")
        if not (scope == "admin" and token == "infer")  # the wrong-scope case, tested above
    ],
)
def test_right_scope(stubs, method, token):
    _, call = RPCS[method]
    assert outcome(call, stubs, bearer(INFER_TOKEN if token == "infer" else ADMIN_TOKEN)) == OK


def test_the_token_check_compares_against_every_token_in_constant_time(monkeypatch):
    """The check goes through `hmac.compare_digest` on fixed-length digests, once per configured
    token, wherever (or whether) the token matches: neither the length of a guess, nor how much of
    it is right, nor which token it equals changes the work done."""
    interceptor = auth.TokenAuthInterceptor(["i1", "i2-longer"], ["a1", "a2", "a3-much-longer"])
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for guess, scopes in [
        ("i1", {"infer"}),
        ("a3-much-longer", {"infer", "admin"}),
        ("a", None),
        ("x" * 1000, None),
    ]:
        calls.clear()
        assert interceptor._scopes(guess) == scopes
        assert len(calls) == 5
        assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
