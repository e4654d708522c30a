"""A training solve on a weight- or spectral-normalised model holds no process-wide lock
(issue 11, item 10): while one is in progress, another model's frozen inference copy (what a
newly loaded version's first request builds) and a LoadModel through a real server complete."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import DEQModel, save_checkpoint

WAIT = 20.0  # seconds; only reached when something blocks


def normalised(norm: str) -> DEQModel:
    config = {"cell": "mlp", "in_features": 4, "hidden": 16, "out_features": 2, "norm": norm}
    return DEQModel.from_config(config)


def solve_held_open(model: DEQModel, inside: threading.Event, release: threading.Event) -> None:
    """A training forward whose solve waits (in its per-iteration hook) until released."""

    def hook(progress: object) -> None:
        inside.set()
        release.wait(WAIT)

    y, _ = model(torch.randn(3, 4), should_stop=hook, max_iter=2)
    y.sum().backward()


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_a_training_solve_does_not_block_another_models_frozen_copy(norm: str) -> None:
    training, other = normalised(norm).train(), normalised(norm)
    inside, release, baked = threading.Event(), threading.Event(), threading.Event()
    step = threading.Thread(target=solve_held_open, args=(training, inside, release))
    step.start()
    try:
        assert inside.wait(WAIT)
        freezer = threading.Thread(target=lambda: (other.frozen(), baked.set()))
        freezer.start()
        assert baked.wait(WAIT), "frozen() waited for the training solve"
        freezer.join()
    finally:
        release.set()
        step.join()
    assert (
        training.layer.W.parametrizations.weight.original.grad is not None
        if norm == "spectral"
        else True
    )


def test_load_model_and_infer_go_on_during_a_long_training_solve(tmp_path: Path) -> None:
    model = normalised("spectral")
    save_checkpoint(model, tmp_path / "slow.safetensors")
    save_checkpoint(normalised("weight"), tmp_path / "other.safetensors")
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        training = server.registry.models["slow"].latest.model
        copy = type(training).from_config(training.config)
        copy.load_state_dict(training.state_dict())
        inside, release = threading.Event(), threading.Event()
        step = threading.Thread(target=solve_held_open, args=(copy.train(), inside, release))
        step.start()
        try:
            assert inside.wait(WAIT)
            stub.LoadModel(
                pb.LoadModelRequest(name="third", path="other.safetensors"), timeout=WAIT
            )
            x = torch.ones(1, 4).numpy()
            tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 4], data=x.tobytes())
            answer = stub.Infer(pb.InferRequest(model="third", input=tensor), timeout=WAIT)
            assert len(answer.status) == 1
        finally:
            release.set()
            step.join()
