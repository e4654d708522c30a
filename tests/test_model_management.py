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
