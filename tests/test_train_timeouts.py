"""Train sessions end on their own (issue 11, item 9): a stream that goes silent is closed after
--train-idle-seconds, one that stays open past --train-max-seconds too, and either way its
session slot and its model are free again at once (nothing published)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints


def config_then_silence(release: threading.Event) -> Iterator[pb.TrainRequest]:
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    yield pb.TrainRequest(config=config)
    release.wait(60)  # a client that never sends again (bounded, released by the test)


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        ({"train_idle_seconds": 0.3, "train_max_seconds": 600.0}, "--train-idle-seconds"),
        ({"train_idle_seconds": 600.0, "train_max_seconds": 0.3}, "--train-max-seconds"),
    ],
)
def test_a_silent_session_is_closed_and_its_slot_freed(
    tmp_path: Path, limits: dict[str, float], flag: str
) -> None:
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    release = threading.Event()
    with (
        running_server(model_dir=tmp_path, max_train_sessions=1, **limits) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Train(config_then_silence(release), timeout=30))
        finally:
            release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert flag in (info.value.details() or "")
        assert "nothing published" in (info.value.details() or "")
        assert server.registry.training_sessions == 0
        # the model is free again: LoadModel and a new session both go through
        stub.LoadModel(pb.LoadModelRequest(name="digits", path="digits.safetensors"))
        again = threading.Event()
        try:
            with pytest.raises(grpc.RpcError) as second:
                list(stub.Train(config_then_silence(again), timeout=30))
        finally:
            again.set()
        assert second.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not FAILED_PRECONDITION
    # no checkpoint written (the folder holds LoadModel's version claim only)
    assert not list(tmp_path.glob("digits/*.safetensors"))
