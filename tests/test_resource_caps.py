"""Server caps that no request can lift, on a real server with small caps, through every door:
`Infer`, `InferStream`, the Open Inference Protocol's `ModelInfer` (its `parameters` included)
and `Train` (its config, its solver options and its batches).

Caps: rows per request (`--max-batch`), `max_iter` (`--max-iter-cap`), the lowest tolerance
(`--min-tol`, per-sample tolerances included), the message size (`--max-message-bytes`,
RESOURCE_EXHAUSTED), Train sessions at once (one per model; `--max-train-sessions` in all) and
batches per Train stream (`--max-train-steps`). The property tests at the end check the
validators themselves: whatever they accept is within the caps.
"""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server.models import bundled_checkpoints
from deq_server.serving import validate
from deq_server.serving.config import ServerConfig
from deq_server.serving.errors import InvalidArgumentError
from deq_server.serving.oip import solver_request
from deq_server.serving.servicer import STREAM_WINDOW

T = TypeVar("T")
MAX_BATCH = 4
MAX_ITER = 50
MIN_TOL = 1e-6
MAX_BYTES = 64 * 1024
MAX_STEPS = 3
CAPS = {
    "max_batch": MAX_BATCH,
    "max_iter_cap": MAX_ITER,
    "min_tol": MIN_TOL,
    "max_message_bytes": MAX_BYTES,
    "max_train_steps": MAX_STEPS,
    "max_train_sessions": 1,
}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def tensor(rows: int, dtype: str = "<f4") -> pb.Tensor:
    x = np.full((rows, 64), 8.0, dtype)
    code = pb.DATA_TYPE_FLOAT32 if dtype == "<f4" else pb.DATA_TYPE_FLOAT64
    return pb.Tensor(dtype=code, shape=[rows, 64], data=x.tobytes())


def infer(**fields: object) -> pb.InferRequest:
    return pb.InferRequest(model="digits", **fields)


def labels(rows: int) -> pb.Tensor:
    y = (np.arange(rows) % 10).astype("<i8")
    return pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[rows], data=y.tobytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("digits", "other"):
        shutil.copy(bundled_checkpoints()["digits"], root / f"{name}.safetensors")
    with running_server(model_dir=root, **CAPS) as running:
        yield running, root


@pytest.fixture(scope="module")
def stubs(server):
    running, _ = server
    with channel_to(running) as channel:
        yield deq_pb2_grpc.DEQServiceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)


def code_and_details(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


# --- Infer and ModelInfer -------------------------------------------------------------------

# name -> (Infer request, ModelInfer parameters or None where the OIP has no such field,
#          expected code, text the message must hold)
INFER_CASES: dict[str, tuple[pb.InferRequest, dict[str, object] | None, grpc.StatusCode, str]] = {
    "batch_at_cap": (infer(input=tensor(MAX_BATCH)), {}, grpc.StatusCode.OK, ""),
    "batch_over_cap": (infer(input=tensor(MAX_BATCH + 1)), {}, INVALID, "input"),
    "float64_batch_over_cap": (
        infer(input=tensor(MAX_BATCH + 1, "<f8")),
        {},
        INVALID,
        "input",
    ),
    "warm_start_over_cap": (
        infer(input=tensor(1), initial_state=tensor(MAX_BATCH + 1)),
        None,
        INVALID,
        "initial_state",
    ),
    "max_iter_at_cap": (
        infer(input=tensor(1), solver=pb.SolverOptions(max_iter=MAX_ITER)),
        {"max_iter": MAX_ITER},
        grpc.StatusCode.OK,
        "",
    ),
    "max_iter_over_cap": (
        infer(input=tensor(1), solver=pb.SolverOptions(max_iter=MAX_ITER + 1)),
        {"max_iter": MAX_ITER + 1},
        INVALID,
        "max_iter",
    ),
    "max_iter_huge": (
        infer(input=tensor(1), solver=pb.SolverOptions(max_iter=2**32 - 1)),
        {"max_iter": 2**32 - 1},
        INVALID,
        "max_iter",
    ),
    "tol_at_floor": (
        infer(input=tensor(1), solver=pb.SolverOptions(tol=MIN_TOL)),
        {"tol": MIN_TOL},
        grpc.StatusCode.OK,
        "",
    ),
    "tol_below_floor": (
        infer(input=tensor(1), solver=pb.SolverOptions(tol=MIN_TOL / 10)),
        {"tol": MIN_TOL / 10},
        INVALID,
        "tol",
    ),
    "tol_smallest_positive": (
        infer(input=tensor(1), solver=pb.SolverOptions(tol=5e-324)),
        {"tol": 5e-324},
        INVALID,
        "tol",
    ),
    "one_sample_tol_below_floor": (
        infer(input=tensor(3), solver=pb.SolverOptions(sample_tol=[1e-2, MIN_TOL / 2, 1e-3])),
        None,
        INVALID,
        "sample_tol[1]",
    ),
    "sample_tol_beside_a_valid_tol": (  # sample_tol wins over tol, and is checked
        infer(input=tensor(2), solver=pb.SolverOptions(tol=1e-2, sample_tol=[1e-2, 1e-9])),
        None,
        INVALID,
        "sample_tol[1]",
    ),
}


def model_infer_request(
    request: pb.InferRequest, params: dict[str, object]
) -> oip.ModelInferRequest:
    shape = list(request.input.shape)
    datatype = "FP32" if request.input.dtype == pb.DATA_TYPE_FLOAT32 else "FP64"
    out = oip.ModelInferRequest(
        model_name="digits",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)
        ],
        raw_input_contents=[request.input.data],
    )
    for key, value in params.items():
        if isinstance(value, float):
            out.parameters[key].double_param = value
        else:
            out.parameters[key].uint64_param = int(value)
    return out


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_infer_caps(stubs, case):
    deq, _ = stubs
    request, _, expected, text = INFER_CASES[case]
    code, details = code_and_details(lambda: deq.Infer(request, timeout=60))
    assert code == expected, details
    assert text in details


@pytest.mark.parametrize("case", [c for c, v in INFER_CASES.items() if v[1] is not None])
def test_model_infer_caps(stubs, case):
    _, oip_stub = stubs
    request, params, expected, text = INFER_CASES[case]
    assert params is not None
    call = model_infer_request(request, params)
    code, details = code_and_details(lambda: oip_stub.ModelInfer(call, timeout=60))
    assert code == expected, details
    assert text in details


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_infer_stream_items_meet_the_same_caps(stubs, case):
    deq, _ = stubs
    request, _, expected, text = INFER_CASES[case]
    (answer,) = deq.InferStream(
        iter([pb.InferStreamRequest(request_id="r", request=request)]), timeout=60
    )
    assert answer.request_id == "r"
    assert answer.error_code == expected.value[0], answer.error_message
    assert text in answer.error_message


def oversized_rows() -> int:
    """Rows of float32 digits inputs whose message is just past --max-message-bytes."""
    return MAX_BYTES // (64 * 4) + 1


def listing(root: Path) -> list[str]:
    """The files under `root` (a commit taken back may leave its empty version folder)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_oversized_messages_are_resource_exhausted_on_every_rpc(stubs, server):
    """gRPC refuses the message before the handler sees it. A Train stream cut that way looks
    like a half-close to the handler, which starts a commit: the RPC's cancellation, which follows
    within a millisecond, must take it back, so nothing is published and no file is left."""
    deq, oip_stub = stubs
    _, root = server
    before = listing(root)
    versions = list(deq.GetModel(pb.GetModelRequest(name="digits")).model.versions)
    big = tensor(oversized_rows())
    calls = {
        "Infer": lambda: deq.Infer(infer(input=big), timeout=60),
        "InferStream": lambda: list(
            deq.InferStream(
                iter([pb.InferStreamRequest(request=infer(input=big))]),
                timeout=60,
            )
        ),
        "ModelInfer": lambda: oip_stub.ModelInfer(
            model_infer_request(infer(input=big), {}), timeout=60
        ),
        "Train": lambda: list(
            deq.Train(
                iter(
                    [
                        pb.TrainRequest(config=train_config()),
                        pb.TrainRequest(batch=pb.TrainBatch(inputs=big, targets=big)),
                    ]
                ),
                timeout=60,
            )
        ),
    }
    for name, call in calls.items():
        code, details = code_and_details(call)
        assert code == EXHAUSTED, (name, code, details)
    assert deq.Infer(infer(input=tensor(1)), timeout=60).output.data
    for _ in range(10_000):  # bounded: a commit taken back finishes its write first
        if listing(root) == before:
            break
        time.sleep(0.001)  # pacing of the poll; the condition above is what is waited for
    assert listing(root) == before
    assert list(deq.GetModel(pb.GetModelRequest(name="digits")).model.versions) == versions


# --- Train ------------------------------------------------------------------------------------


def train_config(**fields: object) -> pb.TrainConfig:
    base: dict[str, object] = {
        "model": "digits",
        "learning_rate": 1e-3,
        "loss": pb.LOSS_CROSS_ENTROPY,
        "backward_max_iter": MAX_ITER,  # the model's own default (100) is past this server's cap
    }
    return pb.TrainConfig(**{**base, **fields})


def run_train(deq, config: pb.TrainConfig, batches: list[pb.TrainBatch]):
    requests = [pb.TrainRequest(config=config)] + [pb.TrainRequest(batch=b) for b in batches]
    return list(deq.Train(iter(requests), timeout=120))


def good_batch(rows: int = 2) -> pb.TrainBatch:
    return pb.TrainBatch(inputs=tensor(rows), targets=labels(rows))


TRAIN_CASES: dict[str, tuple[pb.TrainConfig, list[pb.TrainBatch], grpc.StatusCode, str]] = {
    "batch_over_cap": (train_config(), [good_batch(MAX_BATCH + 1)], INVALID, "batch.inputs"),
    "solver_max_iter_over_cap": (
        train_config(solver=pb.SolverOptions(max_iter=MAX_ITER + 1)),
        [good_batch()],
        INVALID,
        "solver.max_iter",
    ),
    "solver_tol_below_floor": (
        train_config(solver=pb.SolverOptions(tol=MIN_TOL / 10)),
        [good_batch()],
        INVALID,
        "solver.tol",
    ),
    "solver_sample_tol_below_floor": (
        train_config(solver=pb.SolverOptions(sample_tol=[1e-3, MIN_TOL / 10])),
        [good_batch()],
        INVALID,
        "solver.sample_tol[1]",
    ),
    "backward_max_iter_over_cap": (
        train_config(backward_max_iter=MAX_ITER + 1),
        [],
        INVALID,
        "backward_max_iter",
    ),
    "backward_tol_below_floor": (
        train_config(backward_tol=MIN_TOL / 10),
        [],
        INVALID,
        "backward_tol",
    ),
    "max_steps_over_cap": (
        train_config(max_steps=MAX_STEPS + 1),
        [],
        INVALID,
        "config.max_steps",
    ),
    "stream_past_the_step_cap": (
        train_config(),
        [good_batch()] * (MAX_STEPS + 1),
        EXHAUSTED,
        "--max-train-steps",
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_caps_and_nothing_is_published(stubs, server, case):
    deq, _ = stubs
    _, root = server
    before = listing(root)
    versions = list(deq.GetModel(pb.GetModelRequest(name="digits")).model.versions)
    config, batches, expected, text = TRAIN_CASES[case]
    code, details = code_and_details(lambda: run_train(deq, config, batches))
    assert code == expected, details
    assert text in details
    assert listing(root) == before
    assert list(deq.GetModel(pb.GetModelRequest(name="digits")).model.versions) == versions


def test_a_stream_of_exactly_the_step_cap_commits(stubs):
    deq, _ = stubs
    events = run_train(deq, train_config(publish_as="capped"), [good_batch()] * MAX_STEPS)
    assert events[-1].committed.steps == MAX_STEPS
    events = run_train(
        deq, train_config(publish_as="capped", max_steps=MAX_STEPS), [good_batch()] * MAX_STEPS
    )
    assert events[-1].committed.steps == MAX_STEPS


class OpenSession:
    """A Train stream kept open: config and one batch sent, the first step answered."""

    def __init__(self, deq, model: str) -> None:
        self._requests: queue.Queue[pb.TrainRequest | None] = queue.Queue()
        self._requests.put(pb.TrainRequest(config=train_config(model=model)))
        self._requests.put(pb.TrainRequest(batch=good_batch()))
        self.call = deq.Train(iter(self._requests.get, None), timeout=120)
        self.first = next(self.call)

    def commit(self) -> pb.TrainResponse:
        self._requests.put(None)
        return list(self.call)[-1]


def test_train_sessions_are_capped_per_model_and_in_all(stubs):
    deq, _ = stubs
    session = OpenSession(deq, "digits")
    assert session.first.step.step == 1
    same = code_and_details(lambda: run_train(deq, train_config(), [good_batch()]))
    assert same[0] == grpc.StatusCode.FAILED_PRECONDITION, same
    other = code_and_details(lambda: run_train(deq, train_config(model="other"), [good_batch()]))
    assert other[0] == EXHAUSTED, other
    assert "--max-train-sessions" in other[1]
    assert session.commit().committed.steps == 1
    # The slot is free again once the session ended.
    assert run_train(deq, train_config(model="other"), [good_batch()])[-1].committed.steps == 1


# --- the validators themselves (property tests) ----------------------------------------------

CONFIG = ServerConfig(max_batch=MAX_BATCH, max_iter_cap=MAX_ITER, min_tol=MIN_TOL)
tols = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [MIN_TOL, MIN_TOL * (1 - 1e-12), 5e-324, 0.0, -MIN_TOL, validate.MAX_TOL]
)


@st.composite
def solver_messages(draw: st.DrawFn) -> tuple[pb.SolverOptions, int]:
    batch = draw(st.integers(1, MAX_BATCH))
    opts = pb.SolverOptions()
    if draw(st.booleans()):
        opts.tol = draw(tols)
    if draw(st.booleans()):
        size = draw(st.sampled_from([batch, batch + 1, max(batch - 1, 0)]))
        opts.sample_tol.extend(draw(st.lists(tols, min_size=size, max_size=size)))
    if draw(st.booleans()):
        opts.max_iter = draw(st.integers(0, 2**32 - 1) | st.integers(MAX_ITER - 1, MAX_ITER + 1))
    return opts, batch


def attempt(check: Callable[..., T], *args: object) -> tuple[T | None, str]:
    """(what the validator returned, "") or (None, the INVALID_ARGUMENT message)."""
    try:
        return check(*args), ""
    except InvalidArgumentError as exc:
        return None, exc.message


def within_caps(out: dict[str, object], batch: int) -> None:
    tol = out.get("tol")
    if tol is not None:
        values = [tol] if isinstance(tol, float) else tol.tolist()  # type: ignore[union-attr]
        assert len(values) in (1, batch)
        assert all(MIN_TOL <= v <= validate.MAX_TOL for v in values)
    if "max_iter" in out:
        assert 1 <= out["max_iter"] <= MAX_ITER  # type: ignore[operator]


@settings(max_examples=400, deadline=None)
@given(solver_messages())
def test_accepted_solver_options_are_within_the_caps(message):
    opts, batch = message
    out, error = attempt(validate.solver_options, opts, batch, CONFIG)
    if out is None:
        assert error.startswith("solver.")
        return
    within_caps(out, batch)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["tol", "max_iter"]),
        st.one_of(tols, st.integers(-(2**63), 2**64 - 1), st.booleans(), st.text(max_size=3)),
    )
)
def test_accepted_oip_parameters_are_within_the_caps(params):
    request = oip.ModelInferRequest()
    for key, value in params.items():
        slot = request.parameters[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, int):
            if value < 0:
                slot.int64_param = max(value, -(2**63))
            elif value < 2**63:
                slot.int64_param = value
            else:
                slot.uint64_param = value
        else:
            slot.string_param = value
    opts, error = attempt(solver_request, request.parameters)
    out = None if opts is None else attempt(validate.solver_settings, opts, 1, CONFIG)[0]
    if out is None:
        assert error.startswith("parameters.") or opts is not None
        return
    within_caps(out, 1)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(0, 3 * MAX_BATCH),
    width=st.sampled_from([63, 64, 65]),
    dtype=st.sampled_from([pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT64, pb.DATA_TYPE_FLOAT16]),
    extra_bytes=st.sampled_from([0, 0, -1, 4]),
)
def test_accepted_batches_are_within_the_cap(rows, width, dtype, extra_bytes):
    itemsize = {pb.DATA_TYPE_FLOAT32: 4, pb.DATA_TYPE_FLOAT64: 8, pb.DATA_TYPE_FLOAT16: 2}[dtype]
    size = max(rows * width * itemsize + extra_bytes, 0)
    message = pb.Tensor(dtype=dtype, shape=[rows, width], data=bytes(size))
    x, error = attempt(validate.batch_tensor, message, "input", (64,), CONFIG)
    if x is None:
        assert error.startswith("input")
        return
    assert 1 <= x.shape[0] <= MAX_BATCH
    assert tuple(x.shape[1:]) == (64,)


def test_an_infer_stream_keeps_at_most_its_window_in_flight(tmp_path):
    """A stream of many more requests than --max-queue, sent at once: the server reads no more
    than STREAM_WINDOW ahead of the answers it sends, so the stream never fills the queue by
    itself (every request answered OK, none RESOURCE_EXHAUSTED) and a client that sends without
    reading cannot make the server buffer answers without bound."""
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    count = 6 * STREAM_WINDOW
    with (
        running_server(model_dir=tmp_path, max_queue=STREAM_WINDOW + 32) as running,
        channel_to(running) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        items = [
            pb.InferStreamRequest(request_id=str(i), request=infer(input=tensor(1)))
            for i in range(count)
        ]
        answers = list(stub.InferStream(iter(items), timeout=300))
    assert sorted(int(a.request_id) for a in answers) == list(range(count))
    assert [a.error_message for a in answers if a.error_code] == []
