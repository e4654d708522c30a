"""Crafted safetensors checkpoints and model-directory entries (issue 11, items 1-5): each is a
CheckpointError (skipped at start, INVALID_ARGUMENT from LoadModel), nothing is allocated past
the cap, and the server starts and serves its good models whatever else the directory holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import CheckpointError, DEQModel, Status, load_checkpoint, save_checkpoint
from deq_server.core._checkpoint import checkpoint_digest
from deq_server.models import bundled_checkpoints

MLP = {"cell": "mlp", "in_features": 4, "hidden": 8, "out_features": 3}


def craft(
    path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """A checkpoint whose metadata says `config`, holding `tensors` (default: a real model's),
    with a valid digest: only the check under test can refuse it."""
    if tensors is None:
        tensors = {k: v.clone() for k, v in DEQModel.from_config(MLP).state_dict().items()}
    meta = {
        "deq_format_version": "1",
        "config": json.dumps(config),
        "architecture": str(config.get("cell")),
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    meta["sha256"] = checkpoint_digest(tensors, meta)
    save_file(tensors, path, metadata=meta)
    return path


def raw_safetensors(path: Path, header: dict[str, Any] | bytes, body: bytes = b"") -> Path:
    data = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + body)
    return path


def refused(path: Path, *words: str, **kwargs: Any) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_json_nested_deep_in_the_header(tmp_path: Path) -> None:
    refused(
        raw_safetensors(tmp_path / "a.safetensors", b"[" * 100_000 + b"]" * 100_000), "readable"
    )


def test_json_nested_deep_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    craft(path, MLP)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["config"] = "[" * 100_000 + "]" * 100_000
    raw_safetensors(path, header, data[8 + n :])
    refused(path, "config")


def test_a_stride_overflowing_shape(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}
    refused(raw_safetensors(tmp_path / "a.safetensors", header), "2**40")


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"kernel_size": -3}, "kernel_size"),
        ({"groups": 0}, "groups"),
        ({"groups": 3}, "divisible"),
        ({"channels": 2**40}, "below 2**31"),
        ({"max_norm": "big"}, "finite number"),
    ],
)
def test_conv_configs_that_cannot_be_built(
    tmp_path: Path, change: dict[str, Any], word: str
) -> None:
    config = {
        "cell": "conv",
        "in_channels": 1,
        "height": 4,
        "width": 4,
        "channels": 4,
        "out_features": 2,
    }
    refused(craft(tmp_path / "a.safetensors", {**config, **change}), word)


def test_a_config_too_large_to_read(tmp_path: Path) -> None:
    refused(craft(tmp_path / "a.safetensors", {**MLP, "pad": "x" * (2 << 20)}), "characters")


def test_a_kilobyte_file_asking_for_terabytes_allocates_nothing(tmp_path: Path) -> None:
    """hidden 2e6 asks for 16 TB of weights; it is refused from the config alone, in a process
    whose peak memory barely moves."""
    path = craft(tmp_path / "bomb.safetensors", {**MLP, "hidden": 2_000_000})
    assert path.stat().st_size < 4096
    code = (
        "import resource, sys; from deq_server.core import load_checkpoint, CheckpointError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "above the cap" in out[0]
    assert int(out[-1]) < 64  # MB


def test_the_cap_is_the_servers_max_model_bytes(tmp_path: Path) -> None:
    path = craft(tmp_path / "a.safetensors", MLP)
    load_checkpoint(path, max_bytes=path.stat().st_size)
    refused(path, "above the cap", max_bytes=path.stat().st_size - 1)
    big = tmp_path / "big.safetensors"
    save_checkpoint(DEQModel.from_config({**MLP, "hidden": 512}), big)
    refused(big, "above the cap", max_bytes=512 * 512 * 4 - 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    tensors = {k: v.clone() for k, v in DEQModel.from_config(MLP).state_dict().items()}
    tensors["layer.out.bias"][0] = value
    refused(craft(tmp_path / "a.safetensors", MLP, tensors), "non-finite", "layer.out.bias")


def test_a_head_that_overflows_is_never_labelled_converged(tmp_path: Path) -> None:
    model = DEQModel.from_config(MLP)
    with torch.no_grad():
        model.layer.out.weight.fill_(3e38)
    y, result = model(torch.ones(2, 4))
    assert not bool(torch.isfinite(y).all())
    assert result.status.tolist() == [int(Status.NONFINITE)] * 2


# --- through the server --------------------------------------------------------------------


def solver_config(**solver: Any) -> dict[str, Any]:
    return {**MLP, "solver": solver}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copy(bundled_checkpoints()["digits"], root / "digits.safetensors")
    outside = tmp_path_factory.mktemp("outside")
    save_checkpoint(DEQModel.from_config(MLP), outside / "escape.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "escape.safetensors")
    (root / "zero.safetensors").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.safetensors")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    craft(root / "huge_cap.safetensors", solver_config(max_iter=2**32))
    craft(root / "over_cap.safetensors", solver_config(max_iter=2**31))
    craft(root / "tiny_tol.safetensors", solver_config(tol=1e-50))
    craft(root / "half_m.safetensors", solver_config(method="anderson", m=2.5))
    craft(root / "nan_bias.safetensors", MLP, {
        **{k: v.clone() for k, v in DEQModel.from_config(MLP).state_dict().items()},
        "layer.out.bias": torch.tensor([float("nan"), 0.0, 0.0]),
    })  # fmt: skip
    spare = root / "spare"
    spare.mkdir()
    for name in ("huge_cap", "over_cap", "tiny_tol", "half_m", "nan_bias"):
        shutil.copy(root / f"{name}.safetensors", spare / f"{name}.safetensors")
    return root


def test_the_server_starts_and_serves_only_the_good_model(model_dir: Path, caplog: Any) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="deq_server.registry"),
        running_server(model_dir=model_dir) as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
        x = np.full((1, 64), 8.0, np.float32)
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
        answer = stub.Infer(pb.InferRequest(model="digits", input=tensor))
    assert names == ["digits"]
    assert list(answer.status) == [pb.SAMPLE_STATUS_CONVERGED]
    for reason in (
        "escape.safetensors: it links outside",
        "zero.safetensors: it links outside",
        "fifo.safetensors: not a regular file",
        "linked: it links outside",
        "--max-iter-cap",
        "below the server's --min-tol",
        "anderson history m",
        "non-finite",
    ):
        assert reason in caplog.text


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("huge_cap", "--max-iter-cap"),
        ("over_cap", "--max-iter-cap"),
        ("tiny_tol", "--min-tol"),
        ("half_m", "anderson history m"),
        ("nan_bias", "non-finite"),
    ],
)
def test_load_model_refuses_defaults_the_server_cannot_serve(
    model_dir: Path, name: str, word: str
) -> None:
    with running_server(model_dir=model_dir) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(name="x", path=f"spare/{name}.safetensors"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert word in (info.value.details() or "")
        stub.GetModel(pb.GetModelRequest(name="digits"))  # still answering
