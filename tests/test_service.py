"""The gRPC service end to end on loopback, through the generated stubs."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_harness import channel_to, running_server
from small_models import slow_model_dir

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import load_checkpoint
from deq_server.demo import held_out_digits
from deq_server.models import bundled_checkpoints


def wire(x: np.ndarray) -> pb.Tensor:
    dtype = {np.float32: pb.DATA_TYPE_FLOAT32, np.float64: pb.DATA_TYPE_FLOAT64}[x.dtype.type]
    return pb.Tensor(
        dtype=dtype, shape=list(x.shape), data=x.astype(x.dtype.newbyteorder("<")).tobytes()
    )


def unwire(t: pb.Tensor) -> np.ndarray:
    dtype = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_FLOAT64: "<f8"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with channel_to(server) as channel:
        yield deq_pb2_grpc.DEQServiceStub(channel)


@pytest.fixture(scope="module")
def digits():
    x, y = held_out_digits()
    return x[:8].numpy(), y[:8].numpy()


def test_mixed_tolerances_give_per_sample_reports_equal_to_a_local_solve(stub, digits):
    x, labels = digits
    tols = [1e-2, 1e-6] * 4
    response = stub.Infer(
        pb.InferRequest(
            model="digits",
            input=wire(x),
            solver=pb.SolverOptions(sample_tol=tols, method=pb.SOLVER_METHOD_ANDERSON),
            return_state=True,
        )
    )
    assert list(response.status) == [pb.SAMPLE_STATUS_CONVERGED] * 8
    assert all(r <= t for r, t in zip(response.residual, tols, strict=True))
    iters = np.array(response.iterations)
    assert iters[0::2].max() < iters[1::2].min()
    assert response.model_version == "1"
    assert response.timings.total_seconds >= response.timings.solve_seconds > 0

    local = load_checkpoint(bundled_checkpoints()["digits"]).eval()
    with torch.no_grad():
        y, result = local(torch.from_numpy(x), tol=torch.tensor(tols), method="anderson")
    np.testing.assert_allclose(unwire(response.output), y.numpy(), rtol=1e-5, atol=1e-5)
    assert list(response.iterations) == result.iterations.tolist()
    assert unwire(response.state).shape == (8, local.state_shape[0])
    assert (unwire(response.output).argmax(1) == labels).mean() >= 0.75


def test_list_and_get_model_describe_the_demo(stub):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["digits"]
    info = stub.GetModel(pb.GetModelRequest(name="digits")).model
    assert list(info.input_shape) == [64]
    assert list(info.output_shape) == [10]
    assert list(info.versions) == ["1"]
    assert info.device == "cpu"
    assert info.solver_defaults.method == pb.SOLVER_METHOD_ANDERSON
    assert '"cell": "mlp"' in info.config_json


def bad_requests() -> list[tuple[str, pb.InferRequest, grpc.StatusCode, str]]:
    ok = np.zeros((2, 64), np.float32)
    good = wire(ok)
    nan = ok.copy()
    nan[1, 3] = np.nan
    short = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=good.data[:-4])
    cases = [
        (
            "unknown model",
            pb.InferRequest(model="nope", input=good),
            grpc.StatusCode.NOT_FOUND,
            "nope",
        ),
        (
            "unknown version",
            pb.InferRequest(model="digits", version="7", input=good),
            grpc.StatusCode.NOT_FOUND,
            "version '7'",
        ),
        (
            "wrong shape",
            pb.InferRequest(model="digits", input=wire(np.zeros((2, 63), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.shape",
        ),
        (
            "byte count",
            pb.InferRequest(model="digits", input=short),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.data",
        ),
        (
            "nan input",
            pb.InferRequest(model="digits", input=wire(nan)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            "empty batch",
            pb.InferRequest(model="digits", input=wire(np.zeros((0, 64), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.shape[0]",
        ),
        ("no input", pb.InferRequest(model="digits"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (
            "unknown dtype",
            pb.InferRequest(model="digits", input=pb.Tensor(dtype=99, shape=[1, 64])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.dtype",
        ),
        (
            "zero tol",
            pb.InferRequest(model="digits", input=good, solver=pb.SolverOptions(tol=0.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "solver.tol",
        ),
        (
            "tol below floor",
            pb.InferRequest(model="digits", input=good, solver=pb.SolverOptions(tol=1e-15)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "floor",
        ),
        (
            "sample_tol length",
            pb.InferRequest(model="digits", input=good, solver=pb.SolverOptions(sample_tol=[1e-3])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "solver.sample_tol",
        ),
        (
            "max_iter cap",
            pb.InferRequest(model="digits", input=good, solver=pb.SolverOptions(max_iter=10**6)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "solver.max_iter",
        ),
        (
            "unknown method",
            pb.InferRequest(model="digits", input=good, solver=pb.SolverOptions(method=17)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "solver.method",
        ),
    ]
    return cases


@pytest.mark.parametrize(
    ("name", "request_", "code", "text"),
    bad_requests(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_requests_get_their_code_and_a_message_naming_the_field(
    stub, name, request_, code, text
):
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request_)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


def test_health_and_reflection(server):
    with channel_to(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "deq.v1.DEQService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"deq.v1.DEQService", "grpc.health.v1.Health"} <= names


def test_health_watch_streams_through_the_metrics_interceptor(server):
    with channel_to(server) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_infer_stream_answers_each_request_by_id_and_keeps_going_after_a_bad_one(stub, digits):
    x, _ = digits
    requests = [
        pb.InferStreamRequest(
            request_id=f"r{i}", request=pb.InferRequest(model="digits", input=wire(x[i : i + 2]))
        )
        for i in range(4)
    ]
    requests.insert(
        2, pb.InferStreamRequest(request_id="bad", request=pb.InferRequest(model="nope"))
    )
    answers = {r.request_id: r for r in stub.InferStream(iter(requests))}
    assert set(answers) == {"r0", "r1", "r2", "r3", "bad"}
    assert answers["bad"].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    for i in range(4):
        assert answers[f"r{i}"].error_code == 0
        assert list(answers[f"r{i}"].response.status) == [pb.SAMPLE_STATUS_CONVERGED] * 2


def test_deadline_gives_partial_answers_or_deadline_exceeded(tmp_path):
    with (
        running_server(model_dir=slow_model_dir(tmp_path)) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        x = wire(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
        partial = stub.Infer(
            pb.InferRequest(model="slow", input=x, solver=pb.SolverOptions(allow_partial=True)),
            timeout=0.3,
        )
        assert set(partial.status) == {pb.SAMPLE_STATUS_DEADLINE}
        assert max(partial.iterations) < 1000
        assert np.isfinite(unwire(partial.output)).all()
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(model="slow", input=x), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        budget = stub.Infer(
            pb.InferRequest(model="slow", input=x, solver=pb.SolverOptions(budget_ms=50))
        )
        assert set(budget.status) == {pb.SAMPLE_STATUS_DEADLINE}


def test_metrics_endpoint_exports_the_design_series_after_traffic(server, stub, digits):
    x, _ = digits
    stub.Infer(pb.InferRequest(model="digits", input=wire(x)))
    with pytest.raises(grpc.RpcError):
        stub.Infer(pb.InferRequest(model="nope"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for series in [
        'deq_inference_requests_total{code="OK",model="digits"}',
        'deq_inference_requests_total{code="NOT_FOUND",model="unknown"}',
        'deq_inference_request_duration_seconds_count{model="digits"}',
        'deq_inference_queue_duration_seconds_count{model="digits"}',
        'deq_solver_iterations_count{method="anderson",model="digits",phase="forward"}',
        'deq_solver_residual_count{model="digits",phase="forward"}',
        'deq_solver_samples_total{model="digits",status="CONVERGED"}',
        'deq_batch_size_count{model="digits"}',
        'deq_inference_pending_requests{model="digits"}',
        'deq_model_info{device="cpu",model="digits",version="1"}',
        'grpc_server_started_total{grpc_method="Infer",grpc_service="deq.v1.DEQService",grpc_type="unary"}',
        'grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Infer",grpc_service="deq.v1.DEQService",grpc_type="unary"}',
        'grpc_server_handling_seconds_count{grpc_method="Infer",grpc_service="deq.v1.DEQService",grpc_type="unary"}',
        "process_resident_memory_bytes",
    ]:
        line = next((ln for ln in text.splitlines() if ln.startswith(series)), None)
        assert line is not None, series
        if "pending" not in series:
            assert float(line.rsplit(" ", 1)[1]) > 0, line


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_grpc_series_count_every_rpc_by_its_own_code(server, stub, digits):
    """The interceptor wraps each method once and reuses the wrapper: every later RPC still
    counts once, under the code it ended with."""
    x, _ = digits
    labels = 'grpc_method="Infer",grpc_service="deq.v1.DEQService",grpc_type="unary"'
    names = {
        "started": f"grpc_server_started_total{{{labels}}}",
        "ok": f'grpc_server_handled_total{{grpc_code="OK",{labels}}}',
        "missing": f'grpc_server_handled_total{{grpc_code="NOT_FOUND",{labels}}}',
        "timed": f"grpc_server_handling_seconds_count{{{labels}}}",
    }
    before = scrape(server)
    for _ in range(3):
        stub.Infer(pb.InferRequest(model="digits", input=wire(x[:1])))
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            stub.Infer(pb.InferRequest(model="nope"))
    after = scrape(server)
    delta = {k: after.get(n, 0.0) - before.get(n, 0.0) for k, n in names.items()}
    assert delta == {"started": 5, "ok": 3, "missing": 2, "timed": 5}


def test_a_client_that_cancels_stops_the_solver(tmp_path):
    with (
        running_server(model_dir=slow_model_dir(tmp_path)) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        x = wire(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
        call = stub.Infer.future(pb.InferRequest(model="slow", input=x))
        solving = 'deq_batch_size_count{model="slow"}'  # observed when a solver batch starts
        for _ in range(20_000):  # bounded; each check is an HTTP round trip
            if scrape(server).get(solving, 0) >= 1:
                break
        call.cancel()
        cancelled = 'deq_solver_samples_total{model="slow",status="CANCELLED"}'
        for _ in range(20_000):
            values = scrape(server)
            if cancelled in values:
                break
        assert values[cancelled] == 64
        labels = '{method="picard",model="slow",phase="forward"}'
        mean = (
            values[f"deq_solver_iterations_sum{labels}"]
            / values[f"deq_solver_iterations_count{labels}"]
        )
        assert mean < 1000  # stopped early, not run to max_iter
        assert values['deq_inference_requests_total{code="CANCELLED",model="slow"}'] == 1


def test_a_full_queue_answers_resource_exhausted():
    x = wire(np.full((1, 64), 8.0, np.float32))
    with (
        running_server(max_queue=0) as server,
        channel_to(server) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        deq_pb2_grpc.DEQServiceStub(channel).Infer(pb.InferRequest(model="digits", input=x))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue" in info.value.details()
