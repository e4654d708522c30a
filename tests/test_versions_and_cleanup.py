"""Versions and the model directory (issue 11, items 11-12): version numbers never reused in a
process and above every one on disk, temp files of killed commits cleaned at start, publish_as
that would break another model's clients refused, unloaded models' series removed, and admin
errors that never show where the server keeps its files."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from serving_harness import channel_to, running_server

from deq_client import DEQClient
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import DEQModel, save_checkpoint
from deq_server.models import bundled_checkpoints

DIGITS = bundled_checkpoints()["digits"]


def infer(stub, model: str, version: str = "") -> pb.InferResponse:  # type: ignore[no-untyped-def]
    x = np.full((1, 64), 8.0, np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    return stub.Infer(pb.InferRequest(model=model, version=version, input=tensor))


def test_a_version_number_is_never_handed_out_twice(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "digits.safetensors")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        first = stub.LoadModel(pb.LoadModelRequest(name="second", path="digits.safetensors"))
        assert list(first.model.versions) == ["1"]
        stub.UnloadModel(pb.UnloadModelRequest(name="second"))
        again = stub.LoadModel(pb.LoadModelRequest(name="second", path="digits.safetensors"))
        assert list(again.model.versions) == ["2"]
        with pytest.raises(grpc.RpcError) as info:
            infer(stub, "second", version="1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_model_numbers_start_above_the_versions_on_disk(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    for n in (1, 2, 7):
        shutil.copy(DIGITS, tmp_path / "digits" / f"{n}.safetensors")
    shutil.copy(DIGITS, tmp_path / "spare.safetensors")
    with (
        running_server(model_dir=tmp_path, keep_versions=1) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        stub.UnloadModel(pb.UnloadModelRequest(name="digits"))
        # a version's own file comes back under its number; any other file gets a new one
        info = stub.LoadModel(pb.LoadModelRequest(name="digits", path="digits/1.safetensors"))
        assert list(info.model.versions) == ["1"]
        info = stub.LoadModel(pb.LoadModelRequest(name="digits", path="spare.safetensors"))
        assert list(info.model.versions) == ["8"]
        info = stub.LoadModel(pb.LoadModelRequest(name="digits", path="digits/7.safetensors"))
        assert list(info.model.versions) == ["7"]


def test_temp_files_of_a_killed_commit_are_removed_at_start(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "digits.safetensors")
    (tmp_path / "digits").mkdir()
    stale = [
        tmp_path / ".digits.safetensors.k3j_x9.tmp",
        tmp_path / "digits" / ".2.safetensors.abc123.tmp",
        tmp_path / "digits" / ".3.pt2.zz9.tmp",
    ]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    kept = [tmp_path / ".keep", tmp_path / "digits" / "notes.tmp"]
    for path in kept:
        path.write_text("mine")
    with running_server(model_dir=tmp_path):
        pass
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def _train_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, (8, 64)).astype(np.float32)
    return [(x, rng.integers(0, 10, 8).astype(np.int64))]


@pytest.fixture
def two_models(tmp_path: Path) -> Path:
    shutil.copy(DIGITS, tmp_path / "digits.safetensors")
    other = DEQModel.from_config({"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 2})
    save_checkpoint(other, tmp_path / "small.safetensors")
    (tmp_path / "taken").write_text("a file, not a version folder")
    return tmp_path


@pytest.mark.parametrize(
    ("publish_as", "code", "word"),
    [
        ("small", grpc.StatusCode.INVALID_ARGUMENT, "same input and output shapes"),
        ("taken", grpc.StatusCode.ALREADY_EXISTS, "a file of that name"),
    ],
)
def test_publish_as_that_would_break_clients_is_refused(
    two_models: Path, publish_as: str, code: grpc.StatusCode, word: str
) -> None:
    config = {"loss": "cross_entropy", "learning_rate": 1e-3, "publish_as": publish_as}
    with (
        running_server(model_dir=two_models) as server,
        DEQClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        with pytest.raises(Exception) as info:  # noqa: PT011  # the SDK's error wraps the status
            list(client.train("digits", _train_batches(), config))
        assert word in str(info.value)
        assert code.name in str(info.value) or code.name in repr(info.value)
        assert sorted(m.name for m in client.list_models()) == ["digits", "small"]
    assert not (two_models / "small").exists()


def test_an_unloaded_models_series_are_removed(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "digits.safetensors")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        stub.LoadModel(pb.LoadModelRequest(name="second", path="digits.safetensors"))
        infer(stub, "second")
        infer(stub, "digits")
        before = generate_latest(server.metrics.registry).decode()
        stub.UnloadModel(pb.UnloadModelRequest(name="second"))
        after = generate_latest(server.metrics.registry).decode()
    assert 'model="second"' in before
    assert 'model="second"' not in after
    assert 'deq_solver_iterations_count{method="anderson",model="digits"' in after


def test_admin_errors_show_paths_relative_to_the_model_directory(tmp_path: Path) -> None:
    (tmp_path / "spare").mkdir()
    (tmp_path / "spare" / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    shutil.copy(DIGITS, tmp_path / "digits.safetensors")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(name="x", path="spare/broken.safetensors"))
    details = info.value.details() or ""
    assert "spare/broken.safetensors" in details
    assert str(tmp_path) not in details
    assert str(tmp_path.resolve()) not in details
