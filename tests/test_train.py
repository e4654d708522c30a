"""The Train stream: implicit-gradient fine-tuning, commit-to-publish, and nothing else written."""

from __future__ import annotations

import hashlib
import queue
import shutil
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from serving_harness import channel_to, running_server
from sklearn.datasets import load_digits

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import load_checkpoint
from deq_server.models import bundled_checkpoints


def wire(x: np.ndarray) -> pb.Tensor:
    dtype = {np.dtype("float32"): pb.DATA_TYPE_FLOAT32, np.dtype("int64"): pb.DATA_TYPE_INT64}[
        x.dtype
    ]
    return pb.Tensor(
        dtype=dtype, shape=list(x.shape), data=x.astype(x.dtype.newbyteorder("<")).tobytes()
    )


def shifted_digit_batches(n: int, size: int = 64):
    """A new task for the demo model: predict (digit + 1) mod 10. Its loss starts high."""
    data = load_digits()
    rng = np.random.default_rng(0)
    for _ in range(n):
        idx = rng.choice(len(data.target), size, replace=False)
        x = data.data[idx].astype(np.float32)
        y = ((data.target[idx] + 1) % 10).astype(np.int64)
        yield pb.TrainRequest(batch=pb.TrainBatch(inputs=wire(x), targets=wire(y)))


def config(**kw) -> pb.TrainRequest:
    base = {
        "model": "digits",
        "optimizer": pb.OPTIMIZER_ADAM,
        "learning_rate": 1e-2,
        "loss": pb.LOSS_CROSS_ENTROPY,
    }
    return pb.TrainRequest(config=pb.TrainConfig(**{**base, **kw}))


def dir_digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def model_dir(tmp_path):
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    return tmp_path


@pytest.fixture
def stub(model_dir):
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        yield deq_pb2_grpc.DEQServiceStub(channel)


def infer_version(stub) -> str:
    x = np.full((1, 64), 8.0, np.float32)
    return stub.Infer(pb.InferRequest(model="digits", input=wire(x))).model_version


def test_train_lowers_the_loss_and_publishes_only_on_commit(stub, model_dir):
    steps_seen: queue.Queue = queue.Queue()
    versions_during: list[str] = []

    def requests():
        yield config(gradient_mode=pb.GRADIENT_MODE_IFT, backward_tol=1e-6, backward_max_iter=50)
        for i, batch in enumerate(shifted_digit_batches(25)):
            yield batch
            if i == 3:
                steps_seen.get(timeout=60)  # a step has been answered: the session is live
                versions_during.append(infer_version(stub))

    events = []
    for event in stub.Train(requests()):
        events.append(event)
        if event.WhichOneof("event") == "step":
            steps_seen.put(event.step.step)
    steps = [e.step for e in events[:-1]]
    committed = events[-1].committed
    assert len(steps) == 25
    assert not any(s.skipped for s in steps)
    assert np.mean([s.loss for s in steps[-5:]]) < 0.5 * np.mean([s.loss for s in steps[:5]])
    assert all(s.backward_iterations_max >= 1 and s.forward_iterations_mean >= 1 for s in steps)
    assert versions_during == ["1"]
    assert (committed.model, committed.version, committed.steps) == ("digits", "2", 25)
    assert infer_version(stub) == "2"
    info = stub.GetModel(pb.GetModelRequest(name="digits")).model
    assert list(info.versions) == ["1", "2"]
    assert not info.training
    saved = load_checkpoint(model_dir / "digits" / "2.safetensors")
    assert saved.provenance["parent"].endswith("digits.safetensors")
    assert saved.provenance["user.steps"] == "25"


def test_cancelled_train_writes_nothing_and_releases_the_model(stub, model_dir):
    before = dir_digest(model_dir)
    first_step = threading.Event()

    def requests():
        yield config()
        yield from shifted_digit_batches(3)
        first_step.wait(timeout=60)
        yield from shifted_digit_batches(1000)  # more than will ever be read

    call = stub.Train(requests())
    next(call)
    first_step.set()
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.CANCELLED
    for _ in range(10_000):  # bounded: each check is an RPC round trip
        if not stub.GetModel(pb.GetModelRequest(name="digits")).model.training:
            break
    assert dir_digest(model_dir) == before
    assert infer_version(stub) == "1"
    events = list(stub.Train(iter([config(), *shifted_digit_batches(1)])))
    assert events[-1].committed.version == "2"


def test_a_second_session_on_the_same_model_is_refused(stub):
    gate = threading.Event()

    def slow():
        yield config()
        yield from shifted_digit_batches(1)
        gate.wait(timeout=60)

    first = stub.Train(slow())
    next(first)  # the first session holds the model
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(iter([config()])))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    gate.set()
    assert list(first)[-1].committed.version == "2"


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        (lambda: [*shifted_digit_batches(1)], "config as the first"),
        (lambda: [config(), config()], "the config comes once"),
        (lambda: [], "empty stream"),
        (lambda: [config(loss=pb.LOSS_MSE), *shifted_digit_batches(1)], "batch.targets"),
        (lambda: [config(learning_rate=0.0)], "config.learning_rate"),
        (lambda: [config(publish_as="../evil")], "config.publish_as"),
        (lambda: [config(model="nope")], "nope"),
    ],
)
def test_malformed_sessions_are_refused_naming_the_problem(stub, model_dir, messages, text):
    before = dir_digest(model_dir)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(iter(messages())))
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert text in info.value.details()
    assert dir_digest(model_dir) == before


def test_train_needs_a_model_directory():
    with running_server() as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Train(iter([config()])))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_training_metrics_are_exported(model_dir):
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        list(stub.Train(iter([config(), *shifted_digit_batches(2)])))
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics")
            .read()
            .decode()
        )
    values = {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    assert values['deq_train_steps_total{model="digits"}'] == 2
    assert values['deq_train_loss{model="digits"}'] > 0
    assert values["deq_train_sessions_active"] == 0
    assert (
        values['deq_solver_iterations_count{method="anderson",model="digits",phase="backward"}']
        == 128
    )
    assert values['deq_model_info{device="cpu",model="digits",version="2"}'] == 1


def test_training_one_model_never_blocks_inference_on_another(model_dir):
    shutil.copy(model_dir / "digits.safetensors", model_dir / "other.safetensors")
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        gate = threading.Event()

        def held_open():
            yield config()
            yield from shifted_digit_batches(2)
            gate.wait(timeout=60)

        session = stub.Train(held_open())
        next(session)  # the session on digits is live and holds its lock
        x = np.full((2, 64), 8.0, np.float32)
        for _ in range(5):
            answer = stub.Infer(pb.InferRequest(model="other", input=wire(x)), timeout=30)
            assert list(answer.status) == [pb.SAMPLE_STATUS_CONVERGED] * 2
        assert stub.GetModel(pb.GetModelRequest(name="digits")).model.training
        gate.set()
        assert list(session)[-1].committed.version == "2"


def test_model_defaults_above_the_server_caps_are_brought_within_them(tmp_path):
    """The demo model's backward max_iter (100) is above a cap of 50: a Train that does not set
    it runs within the cap instead of being refused for a field the client never set."""
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    with (
        running_server(model_dir=tmp_path, max_iter_cap=50) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        events = list(stub.Train(iter([config(), *shifted_digit_batches(2)]), timeout=120))
        steps = [e.step for e in events if e.WhichOneof("event") == "step"]
        assert len(steps) == 2
        assert all(s.backward_iterations_max <= 50 for s in steps)
        assert events[-1].WhichOneof("event") == "committed"
        with pytest.raises(grpc.RpcError) as refused:  # a value the client sets is still checked
            list(stub.Train(iter([config(backward_max_iter=51)]), timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
