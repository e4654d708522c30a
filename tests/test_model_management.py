"""LoadModel / UnloadModel: served from the model directory only, never outside it."""

from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.models import bundled_checkpoints


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(bundled_checkpoints()["digits"], root / "digits.safetensors")
    (root / "spare").mkdir()
    shutil.copy(bundled_checkpoints()["digits"], root / "spare" / "other.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(bundled_checkpoints()["digits"], outside)
    os.symlink(outside, root / "link.safetensors")
    (root / "broken.safetensors").write_bytes(b"not a checkpoint")
    return root


@pytest.fixture
def stub(model_dir):
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        yield deq_pb2_grpc.DEQServiceStub(channel)


def infer(stub, model: str) -> pb.InferResponse:
    x = np.full((1, 64), 8.0, np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    return stub.Infer(pb.InferRequest(model=model, input=tensor))


def test_load_serve_and_unload_a_checkpoint(stub, model_dir):
    info = stub.LoadModel(pb.LoadModelRequest(name="second", path="spare/other.safetensors")).model
    assert (info.name, list(info.versions)) == ("second", ["1"])
    assert infer(stub, "second").model_version == "1"
    again = stub.LoadModel(pb.LoadModelRequest(name="second", path="spare/other.safetensors")).model
    assert list(again.versions) == ["1", "2"]
    stub.UnloadModel(pb.UnloadModelRequest(name="second"))
    with pytest.raises(grpc.RpcError) as info:
        infer(stub, "second")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (model_dir / "spare" / "other.safetensors").is_file()
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
    assert "second" not in names
    assert "digits" in names


@pytest.mark.parametrize(
    ("name", "path", "code", "text"),
    [
        ("x", "../outside.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "path"),
        ("x", "spare/../../outside.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "path"),
        ("x", "/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "path"),
        ("x", "link.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "links may not leave"),
        ("x", "spare/other.pt", grpc.StatusCode.INVALID_ARGUMENT, ".safetensors"),
        ("x", "spare\x00.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "path"),
        ("x", "missing.safetensors", grpc.StatusCode.NOT_FOUND, "missing"),
        ("x", "broken.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "checkpoint"),
        ("a/b", "spare/other.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ("..", "spare/other.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ("bad\nname", "spare/other.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ("trailing\n", "spare/other.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ],
)
def test_load_refuses_escapes_and_bad_files(stub, model_dir, name, path, code, text):
    before = sorted(str(p) for p in model_dir.rglob("*"))
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(pb.LoadModelRequest(name=name, path=path))
    assert info.value.code() == code
    assert text in info.value.details()
    assert sorted(str(p) for p in model_dir.rglob("*")) == before
    assert infer(stub, "digits").model_version == "1"  # still serving


def test_unload_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.UnloadModel(pb.UnloadModelRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_loads_get_distinct_versions(stub):
    calls = [
        stub.LoadModel.future(pb.LoadModelRequest(name="many", path="spare/other.safetensors"))
        for _ in range(4)
    ]
    for call in calls:
        call.result()
    info = stub.GetModel(pb.GetModelRequest(name="many")).model
    # Four distinct numbers were handed out; the newest two stay loaded (--keep-versions 2).
    assert sorted(map(int, info.versions)) == [3, 4]


def test_a_commit_never_overwrites_a_checkpoint_left_on_disk(stub, model_dir):
    shutil.copy(model_dir / "digits.safetensors", model_dir / "kept.safetensors")
    stub.LoadModel(pb.LoadModelRequest(name="kept", path="kept.safetensors"))
    stub.UnloadModel(pb.UnloadModelRequest(name="kept"))  # its file stays: version 1 on disk
    before = (model_dir / "kept.safetensors").read_bytes()
    x = np.full((2, 64), 8.0, np.float32)
    batch = pb.TrainBatch(
        inputs=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=x.tobytes()),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], data=np.array([1, 2]).tobytes()),
    )
    config = pb.TrainConfig(
        model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY, publish_as="kept"
    )
    events = list(stub.Train(iter([pb.TrainRequest(config=config), pb.TrainRequest(batch=batch)])))
    assert events[-1].committed.version == "2"
    assert (model_dir / "kept.safetensors").read_bytes() == before
    assert (model_dir / "kept" / "2.safetensors").is_file()
