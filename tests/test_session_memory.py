"""A Train session lets go of its private weights and optimizer state when it ends, whether it
committed, failed or was cancelled, so a long-running server does not accumulate sessions."""

from __future__ import annotations

import gc
import platform
import queue
import shutil
import weakref
from typing import Any

import grpc
import numpy as np
import pytest
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints
from deq_server.serving import training
from deq_server.serving.memory import release_free_memory

X = np.full((2, 64), 8.0, np.float32)
INPUTS = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=X.tobytes())
LABELS = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], data=np.arange(2).tobytes())
CONFIG = pb.TrainRequest(
    config=pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
)
BATCH = pb.TrainRequest(batch=pb.TrainBatch(inputs=INPUTS, targets=LABELS))


@pytest.fixture
def sessions(monkeypatch) -> list[tuple[weakref.ref[Any], weakref.ref[Any]]]:
    """Weak references to every session's model copy and optimizer, as sessions start."""
    seen: list[tuple[weakref.ref[Any], weakref.ref[Any]]] = []
    start = training.TrainSession.__init__

    def recording(self: training.TrainSession, *args: Any, **kwargs: Any) -> None:
        start(self, *args, **kwargs)
        seen.append((weakref.ref(self.model), weakref.ref(self.optimizer)))

    monkeypatch.setattr(training.TrainSession, "__init__", recording)
    return seen


@pytest.fixture
def stub(tmp_path):
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        yield deq_pb2_grpc.DEQServiceStub(channel)


def released(refs: list[tuple[weakref.ref[Any], weakref.ref[Any]]]) -> bool:
    """True once every recorded model and optimizer is gone (bounded wait for the server side:
    the client may read the last message before the handler's clean-up has run)."""
    for _ in range(1_000):
        gc.collect()
        if all(model() is None and optimizer() is None for model, optimizer in refs):
            return True
    return False


def test_a_committed_session_releases_its_memory(stub, sessions):
    events = list(stub.Train(iter([CONFIG, BATCH, BATCH]), timeout=120))
    assert events[-1].committed.steps == 2
    assert len(sessions) == 1
    assert released(sessions)


def test_a_failed_session_releases_its_memory(stub, sessions):
    bad = pb.TrainRequest(batch=pb.TrainBatch(inputs=INPUTS, targets=INPUTS))  # float labels
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(iter([CONFIG, BATCH, bad]), timeout=120))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(sessions) == 1
    assert released(sessions)


def test_a_cancelled_session_releases_its_memory(stub, sessions):
    requests: queue.Queue[pb.TrainRequest | None] = queue.Queue()
    for message in (CONFIG, BATCH):
        requests.put(message)
    call = stub.Train(iter(requests.get, None), timeout=120)
    assert next(call).step.step == 1
    call.cancel()
    requests.put(None)
    assert len(sessions) == 1
    assert released(sessions)
    # The model is free for the next session.
    assert list(stub.Train(iter([CONFIG, BATCH]), timeout=120))[-1].committed.steps == 1


def test_free_memory_goes_back_to_the_os_where_the_c_library_allows():
    """On glibc the trim runs (and says so); elsewhere it is a no-op that says it did nothing."""
    assert release_free_memory() is (platform.libc_ver()[0] == "glibc")
