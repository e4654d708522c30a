"""Damaged or hostile checkpoints, as the service meets them: in the model directory at start and
through LoadModel. Each is refused with a message naming the file and what is wrong, no pickle
ever runs, and the server keeps serving its other models (`tests/test_checkpoint.py` covers the
loader itself, case by case).
"""

from __future__ import annotations

import logging
import pathlib
import pickle
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core._checkpoint import checkpoint_digest
from deq_server.models import bundled_checkpoints


class TouchOnUnpickle:
    """Unpickling this creates `marker`: it stands in for arbitrary code in a hostile pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def rewrite(src: Path, dst: Path, **changes: Any) -> None:
    """Copy a checkpoint with tensors/metadata changed and a fresh digest (so that the check under
    test, not the digest, is what refuses it)."""
    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    tensors.update(changes.get("tensors", {}))
    meta.update(changes.get("meta", {}))
    meta["sha256"] = checkpoint_digest(tensors, meta)
    save_file(tensors, dst, metadata=meta)


def flip_bit(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x04
    return bytes(out)


# file name -> the text its refusal must hold
REASONS = {
    "cut_short.safetensors": "not a readable safetensors file",
    "bit_flipped.safetensors": "sha256",
    "wrong_shape.safetensors": "'layer.out.weight' has shape (64, 10), expected (10, 64)",
    "wrong_format_version.safetensors": "deq_format_version",
    "wrong_config.safetensors": "invalid model config",
    "wrong_architecture.safetensors": "architecture",
    "pickle_in_disguise.safetensors": "truncated or corrupt",
}


def write_bad_files(folder: Path, marker: Path) -> None:
    """Every damaged file of REASONS, plus a hostile `.pt`, beside nothing else."""
    good = bundled_checkpoints()["digits"]
    data = good.read_bytes()
    (folder / "cut_short.safetensors").write_bytes(data[: len(data) - 100])
    (folder / "bit_flipped.safetensors").write_bytes(flip_bit(data, len(data) - 7))
    with safe_open(good, framework="pt") as f:
        out = f.get_tensor("layer.out.weight")
        config = f.metadata()["config"]
    rewrite(
        good,
        folder / "wrong_shape.safetensors",
        tensors={"layer.out.weight": out.reshape(64, 10).contiguous()},
    )
    rewrite(good, folder / "wrong_format_version.safetensors", meta={"deq_format_version": "2"})
    rewrite(
        good,
        folder / "wrong_config.safetensors",
        meta={"config": config.replace('"hidden": 64', '"hidden": -64')},
    )
    rewrite(good, folder / "wrong_architecture.safetensors", meta={"architecture": "conv"})
    payload = {"state_dict": {"w": TouchOnUnpickle(marker)}}
    (folder / "pickle_in_disguise.safetensors").write_bytes(pickle.dumps(payload))
    torch.save(payload, folder / "hostile.pt")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(bundled_checkpoints()["digits"], root / "digits.safetensors")
    write_bad_files(root, tmp_path / "pwned")
    return root


def infer(stub: deq_pb2_grpc.DEQServiceStub, model: str, version: str = "") -> pb.InferResponse:
    x = np.full((1, 64), 8.0, np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    return stub.Infer(pb.InferRequest(model=model, version=version, input=tensor), timeout=60)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The hostile pickle does run when unpickled: its absence below means it was never run."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(TouchOnUnpickle(marker)))
    assert marker.exists()


def test_bad_files_at_start_are_skipped_with_their_reason(model_dir, caplog):
    caplog.set_level(logging.ERROR, logger="deq_server.registry")
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models]
        assert names == ["digits"]
        assert infer(stub, "digits").model_version == "1"
    skipped = {r.getMessage() for r in caplog.records if "skipping" in r.getMessage()}
    for name, reason in REASONS.items():
        (line,) = [m for m in skipped if f"{name}:" in m]
        assert reason in line, line
    assert not (model_dir.parent / "pwned").exists()


def test_a_damaged_newest_version_falls_back_to_the_last_good_one(model_dir, caplog):
    (model_dir / "digits").mkdir()
    shutil.copy(model_dir / "bit_flipped.safetensors", model_dir / "digits" / "2.safetensors")
    caplog.set_level(logging.ERROR, logger="deq_server.registry")
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="digits"), timeout=60).model
        assert list(info.versions) == ["1"]
        assert infer(stub, "digits").model_version == "1"
    assert any("2.safetensors" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", list(REASONS))
def test_load_model_refuses_a_bad_file_naming_the_problem(model_dir, name):
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(name="candidate", path=name), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert name in info.value.details()
        assert REASONS[name] in info.value.details()
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models]
        assert names == ["digits"]
        assert infer(stub, "digits").model_version == "1"
    assert not (model_dir.parent / "pwned").exists()


def test_load_model_refuses_a_pt_before_reading_it(model_dir):
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(name="candidate", path="hostile.pt"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ".safetensors" in info.value.details()
        assert infer(stub, "digits").model_version == "1"
    assert not (model_dir.parent / "pwned").exists()
